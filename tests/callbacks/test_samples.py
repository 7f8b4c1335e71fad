"""Naming the samples of skipped updates, and not training on them again: real Trainer + LoRA runs.

The garbage is placed, not injected: a clean run without Guardian gives the order in which the loader yields
the dataset (the same with Guardian: tested), and the dataset items of chosen optimizer steps are replaced by
random letters the texts never use before the guarded run. Their loss spikes, the shipped rules skip those
updates, and the file must list exactly those dataset indices.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import skip_first_batches
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler
from transformers import TrainerCallback

from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.callbacks.samples import BadSampleFile, IndexQueue, SampleTracker, record_order, stop_recording
from guardian.commands.report import load_run, render_markdown
from guardian.events import EndEvent, LrChange
from guardian.logs.badsample import BadSample, bad_samples_path, fingerprint, read_bad_samples
from guardian.logs.eventlog import read_events
from guardian.rulefile.reader import load_rules
from guardian.testing.tinyrun import ALPHABET, BOS, CharTokenizer, TextDataset, TinyRun, make_texts

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
TEXTS = list(dict.fromkeys(make_texts(2200, seed=0)))[:2000]  # unique, so a row's tokens name its index
NEVER_USED = torch.tensor([ALPHABET.index(c) + 2 for c in ALPHABET if c not in set("".join(TEXTS))])
STEPS = 34
BAD_STEPS = (25, 33)  # where the garbage's loss is clearly (1.6x) above the run's


class BatchRecorder(TrainerCallback):  # type: ignore[misc]
    """Each training micro-batch's input_ids as the model receives them (a forward pre-hook)."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self.loader: Any = None
        self._hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self.loader = kwargs.get("train_dataloader")

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self._hook.remove()

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:  # type: ignore[type-arg]
        if module.training and "input_ids" in kwargs:
            self.batches.append(kwargs["input_ids"].tolist())


def train(out: Path, callbacks: list[Any], dataset: Any, *, resume: Path | None = None, **settings: Any) -> Any:
    settings = {"max_steps": STEPS, "eval_steps": 0, "tokenizer": True, **settings}
    trainer = TinyRun(str(out), **settings).trainer(callbacks, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


def indices_of(batches: list[list[list[int]]], dataset: TextDataset) -> list[list[int]]:
    where = {tuple(item.tolist()): i for i, item in enumerate(dataset.items)}
    return [[where[tuple(row)] for row in batch] for batch in batches]


def with_garbage(indices: list[int]) -> TextDataset:
    """The texts, with random letters they never use at `indices` (a loss ~1.6x the run's at step 25)."""
    dataset = TextDataset(TEXTS)
    generator = torch.Generator().manual_seed(1)
    for i in indices:
        letters = NEVER_USED[torch.randint(0, len(NEVER_USED), (len(dataset.items[i]) - 1,), generator=generator)]
        dataset.items[i] = torch.cat([torch.tensor([BOS]), letters])
    return dataset


def records(out: Path) -> list[BadSample]:
    samples, unreadable = read_bad_samples(bad_samples_path(out))
    assert unreadable == 0
    return samples


def skips(guardian: GuardianCallback) -> list[int]:
    return [r.step for r in guardian.interventions if r.skipped_update]


@pytest.fixture(scope="module")
def order(tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """The dataset indices of each batch of a run without Guardian (batch size 8)."""
    recorder, dataset = BatchRecorder(), TextDataset(TEXTS)
    train(tmp_path_factory.mktemp("clean"), [recorder], dataset)
    return indices_of(recorder.batches, dataset)


def garbage_of(order: list[list[int]]) -> list[int]:
    return [i for step in BAD_STEPS for i in order[step - 1]]


@pytest.fixture(scope="module")
def bad_run(order: list[list[int]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A guarded run whose optimizer steps 25 and 33 are all garbage, and whose learning rate jumps at 30."""
    out, recorder, guardian = tmp_path_factory.mktemp("bad"), BatchRecorder(), GuardianCallback()
    dataset = with_garbage(garbage_of(order))
    train(out, [FaultInjector([Fault("lr_blowup", 30)]), guardian, recorder], dataset)
    return {"out": out, "guardian": guardian, "garbage": garbage_of(order), "dataset": dataset,
            "batches": recorder.batches, "order": order}


# ---- recording, with a real Trainer ------------------------------------------------------------------


def test_the_data_order_with_guardian_is_the_order_without_it(order: list[list[int]], tmp_path: Path) -> None:
    recorder, dataset, guardian = BatchRecorder(), TextDataset(TEXTS), GuardianCallback()
    train(tmp_path, [guardian, recorder], dataset)
    assert indices_of(recorder.batches, dataset) == order
    assert guardian.counts["skipped_updates"] == 0 and not bad_samples_path(tmp_path).exists()
    assert guardian.samples is not None and guardian.samples.queue.trusted
    assert type(recorder.loader.batch_sampler) is BatchSampler  # its own class back at the end


def test_the_skipped_steps_name_exactly_their_samples(bad_run: dict[str, Any]) -> None:
    guardian, dataset = bad_run["guardian"], bad_run["dataset"]
    assert guardian.counts["skipped_updates"] > 0 and skips(guardian) == [25, 33]
    # step 30's jump is put back on its schedule, not skipped: a learning-rate jump says nothing about the data
    assert [r.step for r in guardian.interventions if isinstance(r.lr_restored, LrChange)] == [30]
    named = records(bad_run["out"])
    assert sorted(s.index for s in named) == sorted(bad_run["garbage"])  # type: ignore[type-var]
    assert [s.step for s in named] == [25] * 8 + [33] * 8
    assert [(s.micro_batch, s.row) for s in named[:8]] == [(0, r) for r in range(8)]
    tokenizer = CharTokenizer()
    for sample in named:
        tokens = dataset.items[sample.index].tolist()
        assert sample.index_verified and "loss_spike" in sample.rules and sample.incident == 1  # steps 25-33: one incident
        assert sample.fingerprint == fingerprint(tokens) and sample.tokens == len(tokens) == len(TEXTS[0]) + 1
        assert sample.excerpt == tokenizer.decode(tokens, skip_special_tokens=True)[:160] != ""
    assert indices_of(bad_run["batches"], dataset) == bad_run["order"]  # the garbage moved nothing either


def test_guardian_report_lists_them(bad_run: dict[str, Any], tmp_path: Path) -> None:
    named = records(bad_run["out"])
    text = render_markdown(load_run(bad_run["out"], ruleset=load_rules()))
    assert "## Samples of the skipped updates" in text
    assert "16 samples of 2 skipped steps (25, 33)" in text and "16 with a dataset index checked" in text
    first = named[0]
    assert f"| 25 | {', '.join(first.rules)} | 0, 0 | {first.index} | yes | `{first.excerpt}` |" in text
    cli = [sys.executable, "-m", "guardian.cli", "report", str(bad_run["out"]), "--out", str(tmp_path / "r")]
    shown = subprocess.run(cli, capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""})
    assert shown.returncode == 0, shown.stderr
    assert "16 samples of skipped updates (steps 25, 33)" in shown.stdout
    assert f"index {first.index} (verified)" in shown.stdout and "... and 6 more" in shown.stdout
    as_json = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True).stdout)
    assert as_json["bad_samples"]["total"] == 16
    assert as_json["bad_samples"]["listed"][0] == first.to_dict()


def test_gradient_accumulation_names_every_micro_batch_of_the_step(order: list[list[int]], tmp_path: Path) -> None:
    garbage = order[24]  # the sampler's permutation does not depend on the batch size: 2 x 4 rows of step 25
    guardian = GuardianCallback()
    train(tmp_path, [guardian], with_garbage(garbage), batch_size=4, gradient_accumulation_steps=2)
    assert skips(guardian) == [25]
    named = records(tmp_path)
    assert [(s.micro_batch, s.row) for s in named] == [(m, r) for m in (0, 1) for r in range(4)]
    assert [s.index for s in named] == garbage and all(s.index_verified for s in named)


# ---- closing the loop --------------------------------------------------------------------------------


def test_a_restart_in_the_same_folder_masks_them(bad_run: dict[str, Any], tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    shutil.copytree(bad_run["out"], out)
    guardian, recorder = GuardianCallback(), BatchRecorder()
    with caplog.at_level(logging.WARNING, logger="guardian"):
        train(out, [guardian, recorder], bad_run["dataset"])
    assert f"16 samples known bad from an earlier run will be masked ({bad_samples_path(out)})" in caplog.text
    assert guardian.counts["masked_samples"] == 16
    assert guardian.counts["skipped_updates"] == 0 and not guardian.decisions  # the spikes do not come back
    end = list(read_events(out / "guardian" / "events.jsonl"))[-1]
    assert isinstance(end, EndEvent) and end.masked_samples == 16
    assert recorder.batches == bad_run["batches"]  # masked, not dropped: the same batches in the same order
    assert len(records(out)) == 16  # nothing new was written


def test_masking_can_be_turned_off(bad_run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(bad_run["out"], out)
    guardian = GuardianCallback(mask_known_bad_samples=False)
    train(out, [guardian], bad_run["dataset"])
    assert guardian.counts["masked_samples"] == 0 and skips(guardian) == list(BAD_STEPS)
    assert len(records(out)) == 32  # named again, under the same fingerprints
    assert len({s.fingerprint for s in records(out)}) == 16


class StopAt(TrainerCallback):  # type: ignore[misc]
    """Ends the run after `step` (as a crash there would), once its checkpoint is saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        control.should_training_stop = state.global_step >= self.step


def test_after_a_resume_the_indices_are_right(order: list[list[int]], tmp_path: Path) -> None:
    """Resuming skips the trained batches (accelerate's SkipBatchSampler): the queue must leave them out."""
    dataset = with_garbage(garbage_of(order))
    train(tmp_path, [GuardianCallback(), StopAt(20)], dataset, save_steps=20)
    assert not bad_samples_path(tmp_path).exists()
    resumed = GuardianCallback()
    train(tmp_path, [resumed], dataset, save_steps=20, resume=tmp_path / "checkpoint-20")
    assert skips(resumed) == list(BAD_STEPS)
    named = records(tmp_path)
    assert [s.index for s in named] == garbage_of(order) and all(s.index_verified for s in named)


def test_an_iterable_dataset_gives_null_indices_and_still_names_the_samples(tmp_path: Path) -> None:
    garbage = list(range(8 * 24, 8 * 25))  # read in order: the 25th batch is step 25
    guardian = GuardianCallback()
    train(tmp_path, [guardian], Streamed(with_garbage(garbage)), max_steps=26)
    assert skips(guardian) == [25]
    named = records(tmp_path)
    assert len(named) == 8 and all(s.index is None and not s.index_verified for s in named)
    assert all(s.excerpt and s.tokens == len(TEXTS[0]) + 1 for s in named)
    assert guardian.samples is not None and guardian.samples.why_no_indices == "an IterableDataset has no indices"


class Streamed(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, dataset: TextDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self.dataset[i] for i in range(len(self.dataset)))


# ---- the pieces, on their own --------------------------------------------------------------------------


def loader(batch_size: int = 4, **kwargs: Any) -> Any:
    numbers: Any = list(range(40))
    return DataLoader(numbers, batch_sampler=BatchSampler(SequentialSampler(numbers), batch_size, False), **kwargs)


def test_a_recorded_loader_queues_what_it_yields_and_skip_first_batches_leaves_out_what_it_skips() -> None:
    plain, queue = loader(), IndexQueue()
    assert record_order(plain, queue) is None
    assert isinstance(plain.batch_sampler, BatchSampler)
    for batch in plain:
        assert queue.pop() == batch.tolist()
    resumed = skip_first_batches(plain, 3)  # what Trainer does on resume
    batches = [b.tolist() for b in resumed]
    assert batches[0] == [12, 13, 14, 15] and [queue.pop() for _ in batches] == batches and queue.trusted
    stop_recording(plain)
    assert type(plain.batch_sampler) is BatchSampler


def test_batches_loaded_by_worker_processes_keep_their_order() -> None:
    queue, workers = IndexQueue(), loader(num_workers=2, prefetch_factor=3)
    record_order(workers, queue)
    for _ in range(2):  # two epochs
        assert all(queue.pop() == batch.tolist() for batch in workers) and queue.trusted


def test_the_order_is_distrusted_rather_than_guessed() -> None:
    queue, recorded = IndexQueue(), loader()
    record_order(recorded, queue)
    next(iter(recorded.batch_sampler))  # iterated by something that is not a DataLoader
    assert not queue.trusted and queue.pop() is None and "not by a DataLoader" in queue.why_not
    queue = IndexQueue(max_len=3)
    record_order(recorded, queue)
    list(recorded)  # 10 batches loaded, none trained on: more than the queue holds
    assert not queue.trusted and queue.pop() is None and "loaded ahead" in queue.why_not
    streamed = DataLoader(Streamed(TextDataset(TEXTS[:8])))
    assert record_order(streamed, IndexQueue()) == "an IterableDataset has no indices"


def test_a_recording_sampler_pickles_and_copies_as_its_own_class() -> None:
    recorded = loader()
    record_order(recorded, IndexQueue())
    copied = copy.deepcopy(recorded.batch_sampler)
    assert type(copied) is BatchSampler and list(copied) == list(loader().batch_sampler)


def test_the_file_stops_at_its_cap_and_survives_a_torn_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "guardian" / "bad_samples.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 3, "rul')  # a crash in the middle of a line
    sample = BadSample(7, ("loss_spike",), 0, 1, 42, True, fingerprint([1, 2, 3]), 3, "abc", incident=2)
    writer = BadSampleFile(path, existing=0, max_records=3)
    with caplog.at_level(logging.WARNING, logger="guardian"):
        assert writer.append([sample] * 2) == 2 and writer.append([sample] * 2) == 1 and writer.append([sample]) == 0
    writer.close()
    assert caplog.text.count("its limit") == 1
    assert read_bad_samples(path) == ([sample] * 3, 1)
    assert BadSample.from_dict(sample.to_dict()) == sample


def test_an_index_the_dataset_contradicts_is_written_as_null(tmp_path: Path) -> None:
    """The last guard: a row whose dataset item holds other tokens gets no index (never a wrong one)."""
    rows = torch.tensor([[1, 5, 6, 0], [1, 7, 8, 9]])
    inputs = {"input_ids": rows, "attention_mask": (rows != 0).long(), "labels": rows.clone()}
    dataset = [{"input_ids": [1, 5, 6]}, {"input_ids": [1, 2, 3]}, {"text": "no token ids"}]
    for indices, expected in (([0, 1], [(0, True), (None, False)]), ([2, 0], [(2, False), (None, False)])):
        tracker = SampleTracker(tmp_path, tokenizer=CharTokenizer())
        tracker.dataset = dataset
        tracker.queue.restart(None)
        tracker.queue.push(indices)
        tracker.see(inputs)
        named = tracker.flag(7, ["loss_spike"], incident=3)
        assert [(s.index, s.index_verified) for s in named] == expected
        assert [s.tokens for s in named] == [3, 4] and named[0].fingerprint == fingerprint([1, 5, 6])
        assert named[0].excerpt == "34" and named[0].incident == 3
        tracker.close()
    assert len(records(tmp_path)) == 4
