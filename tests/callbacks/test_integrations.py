"""Guardian's decisions and actions in the Trainer's own reporting (`report_to`): real Trainer runs with a poisoned
batch, read back from TensorBoard's event files, W&B's offline run file and MLflow's local file store."""

from __future__ import annotations

import glob
import json
import logging
import struct
from pathlib import Path
from typing import Any

import pytest
from repopaths import REPO_ROOT
from transformers import PrinterCallback, Trainer, TrainingArguments

from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.testing.tinyrun import TextDataset, build_model, make_texts

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def train(out: Path, report_to: list[str], guardian: GuardianCallback, *, max_steps: int, poison_at: int,
          poison_steps: int = 2, fault: str = "poison") -> Trainer:
    """A real tiny Llama + LoRA run with `report_to`, and poisoned (or NaN) batches at `poison_at`."""
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, learning_rate=2e-3, warmup_steps=5,
                             per_device_train_batch_size=8, logging_steps=10, max_grad_norm=1.0, save_strategy="no",
                             report_to=report_to, use_cpu=True, disable_tqdm=True, run_name="tiny")
    trainer = Trainer(model=build_model(0), args=args, train_dataset=TextDataset(make_texts(600, seed=0)),
                      callbacks=[FaultInjector([Fault(fault, poison_at, steps=poison_steps)]), guardian])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer


def tensorboard(out: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    """Every scalar and text of the run's TensorBoard event files: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [folder] = glob.glob(str(out / "runs" / "*"))
    events = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    texts = {t.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(t)]
             for t in events.Tags()["tensors"]}
    return scalars, texts


def test_decisions_and_actions_are_in_tensorboard_at_their_steps(tmp_path: Path) -> None:
    guardian = GuardianCallback()
    trainer = train(tmp_path, ["tensorboard"], guardian, max_steps=55, poison_at=30)
    assert {(d.step, d.rule) for d in guardian.decisions} >= {(30, "loss_spike"), (31, "loss_spike")}
    scalars, texts = tensorboard(tmp_path)
    assert scalars["guardian/skipped_updates"] == [(30, 1.0), (31, 2.0)]
    assert scalars["guardian/lr_scale"] == [(30, 1.0), (31, 1.0)]
    assert scalars["guardian/rollbacks"] == [(30, 0.0), (31, 0.0)]
    closed = guardian.engine.policy.incidents[0].closed_step
    assert closed is not None and scalars["guardian/incident"] == [(30, 1.0), (31, 1.0), (closed, 0.0)]
    lines = texts["guardian/events"]
    assert lines[0][0] == 30 and lines[0][1].startswith("Guardian skipped step 30 (loss_spike): loss ")
    assert "rolling median" in lines[0][1]
    assert (31, "Guardian skipped step 31 (loss_spike): loss ") in [(s, t[:44]) for s, t in lines]
    # A rule that only alerts (the gradient spike, clipped) gets a line of its own and is not named as the skip's.
    alerts = [t for s, t in lines if t.startswith("Guardian alert")]
    assert len(lines) == 2 + len(alerts) and all("grad_explosion" in t for t in alerts)
    # The Trainer's own curves are untouched: the loss is logged every 10 steps, averaged as before.
    assert [s for s, _ in scalars["train/loss"]] == [10, 20, 30, 40, 50]
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 5 and not any(k.startswith("guardian") for h in trainer.state.log_history for k in h)


def test_a_learning_rate_cut_shows_its_scale_and_says_what_was_done(tmp_path: Path) -> None:
    from guardian.rulefile.reader import parse_rules

    cut = parse_rules("""
version: 1
rules:
  - name: nan
    metrics: [loss]
    detector: {kind: non_finite}
    actions: [skip_update, {reduce_lr: {factor: 0.5}}]
""", "cut.yaml")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=14, learning_rate=2e-3, warmup_steps=2,
                             logging_steps=5, save_strategy="no", report_to=["tensorboard"], use_cpu=True,
                             disable_tqdm=True)
    guardian = GuardianCallback(cut)
    trainer = Trainer(model=build_model(0), args=args, train_dataset=TextDataset(make_texts(200, seed=0)),
                      callbacks=[FaultInjector([Fault("nan", 12)]), guardian])
    trainer.train()
    scalars, texts = tensorboard(tmp_path)
    assert scalars["guardian/lr_scale"] == [(12, 0.5)] and scalars["guardian/lr_cuts"] == [(12, 1.0)]
    assert scalars["guardian/skipped_updates"] == [(12, 1.0)]
    [(step, line)] = texts["guardian/events"]
    assert step == 12 and line.startswith("Guardian at step 12: skipped this update; learning rate x0.5 -> ")
    assert line.endswith("(nan): " + guardian.decisions[0].finding.message)


def test_report_to_integrations_false_writes_nothing_there(tmp_path: Path) -> None:
    guardian = GuardianCallback(report_to_integrations=False)
    train(tmp_path, ["tensorboard"], guardian, max_steps=32, poison_at=30, poison_steps=1)
    assert guardian.counts["skipped_updates"] == 1
    scalars, texts = tensorboard(tmp_path)
    assert "train/loss" in scalars
    assert not [t for t in [*scalars, *texts] if t.startswith("guardian")]


def test_a_failing_writer_is_logged_once_and_training_goes_on(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A full disk under TensorBoard's writer: Guardian says so once, keeps acting, and the run ends normally."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    class FullDisk(SummaryWriter):
        def add_scalar(self, tag: str, *args: Any, **kwargs: Any) -> None:
            if tag.startswith("guardian/"):
                raise OSError(28, "No space left on device")
            super().add_scalar(tag, *args, **kwargs)

    guardian = GuardianCallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=34, learning_rate=2e-3, warmup_steps=5,
                             logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=build_model(0), args=args, train_dataset=TextDataset(make_texts(300, seed=0)),
                      callbacks=[TensorBoardCallback(FullDisk(str(tmp_path / "runs" / "tb"))),
                                 FaultInjector([Fault("poison", 30, steps=3)]), guardian])
    with caplog.at_level(logging.WARNING, logger="guardian"):
        trainer.train()
    assert trainer.state.global_step == 34 and guardian.counts["skipped_updates"] == 3 and guardian.errors == 0
    failures = [r.getMessage() for r in caplog.records if "could not write to TensorBoard" in r.getMessage()]
    assert len(failures) == 1 and "No space left on device" in failures[0]


# ---- W&B (offline) and MLflow (local file store) ------------------------------------------------------------


def wandb_records(run_file: str) -> list[Any]:
    """The records of a W&B `.wandb` run file (a LevelDB-style log of protobuf records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pos, chunks = Path(run_file).read_bytes(), [], 7, b""  # 7: the ":W&B" file header
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


@pytest.mark.slow
def test_wandb_offline_and_mlflow_file_store_get_the_scalars_and_the_line(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    guardian = GuardianCallback()
    try:
        train(tmp_path / "out", ["wandb", "mlflow"], guardian, max_steps=34, poison_at=30, fault="nan")
    finally:
        wandb.finish()
        wandb.teardown()  # waits for wandb-core to write the run file out
        if mlflow.active_run() is not None:
            mlflow.end_run()
    assert guardian.counts["skipped_updates"] == 2

    [run_file] = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(run_file)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    skipped = [(h["train/global_step"], h["guardian/skipped_updates"]) for h in history if "guardian/skipped_updates" in h]
    assert skipped == [(30, 1), (31, 2)]
    assert [(h["train/global_step"], h["guardian/incident"]) for h in history if "guardian/incident" in h] == [
        (30, 1), (31, 1)]
    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert len(alerts) == 1 and alerts[0].level == "ERROR"  # one per incident, though each NaN step is critical
    assert alerts[0].text.startswith("Guardian skipped step 30 (non_finite_loss): loss is nan at step 30")

    [run] = [p for p in (tmp_path / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    lines = (run / "metrics" / "guardian" / "skipped_updates").read_text().split("\n")
    assert [(float(v), int(s)) for _, v, s in (line.split() for line in lines if line)] == [(1.0, 30), (2.0, 31)]
    assert (run / "tags" / "guardian.last_event").read_text().startswith("Guardian skipped step 31 (non_finite_loss)")
    text = (run / "artifacts" / "guardian" / "events.txt").read_text().splitlines()
    assert text[0].startswith("step 30: Guardian skipped step 30 (non_finite_loss): loss is nan")
    assert any(line.startswith("step 31: Guardian skipped step 31 (non_finite_loss)") for line in text)
    assert {line.split(":")[0] for line in text} == {"step 30", "step 31"}


@pytest.mark.slow
def test_a_trl_sft_trainer_gets_the_same_lines(tmp_path: Path) -> None:
    """TRL's SFTTrainer (the fault suite's tokenizer and model) with TensorBoard's callback, a NaN at step 12."""
    import sys

    from transformers.integrations import TensorBoardCallback

    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "faults"))
    import runner
    from scenarios import Scenario

    setup = Scenario(id="tb", family="healthy_noisy", trainer="sft", learning_rate=4e-3, max_steps=16, batch_size=8,
                     grad_accum=1, max_grad_norm=1.0, warmup_steps=4, eval_steps=100, eval_size=16,
                     eval_resample=False, train_size=200, data_noise=0.05, data_seed=11)
    trainer, _ = runner.build_trainer(setup, 0, "guarded", str(tmp_path))
    assert type(trainer).__name__ == "SFTTrainer"
    guardian = GuardianCallback()
    for callback in (TensorBoardCallback(), FaultInjector([Fault("nan", 12)]), guardian):
        trainer.add_callback(callback)  # what report_to=["tensorboard"] adds
    trainer.train()
    scalars, texts = tensorboard(tmp_path)
    assert scalars["guardian/skipped_updates"] == [(12, 1.0)]
    [(step, line)] = texts["guardian/events"]
    assert step == 12 and line.startswith("Guardian skipped step 12 (non_finite_loss): loss is nan at step 12")
