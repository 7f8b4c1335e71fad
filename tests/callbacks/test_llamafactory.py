"""LLaMA-Factory end to end: the real `llamafactory-cli train` (SFT + LoRA, and DPO) under `guardian run`, and
`guardian attach` following such a run's live `trainer_log.jsonl`.

Everything is made here: a tiny Llama and a character tokenizer saved to a temporary folder, a dataset file with
a stretch of garbage samples and its `dataset_info.json`, the LLaMA-Factory YAML. Nothing is downloaded
(HF_HUB_OFFLINE). llamafactory 0.9.5 caps transformers at 5.6, so these tests run in their own virtualenv:
`make test-llamafactory` creates `.venv-llamafactory` and runs them; elsewhere (`make test`) they are skipped.
LLaMA-Factory imports torchaudio unconditionally, and the torchaudio the registry resolves does not load beside
torch 2.13.0: `tests/stubs/torchaudio` stands in for it, on the child's PYTHONPATH only. Faults LLaMA-Factory
cannot be made to have on cue (a SIGKILL, a corrupted weight) come from `tests/stubs/faults/sitecustomize.py`,
which `guardian run`'s sitecustomize chains to, in the two tests that put it on the PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from repopaths import STUBS_DIR

from guardian.events import ActionEvent, AnyEvent, DecisionEvent, EndEvent, MetricsEvent, StartEvent
from guardian.logs.eventlog import read_events

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llamafactory") is None or shutil.which("llamafactory-cli", path=str(
        Path(sys.executable).parent)) is None,
    reason="llamafactory is not installed here; `make test-llamafactory` runs these in .venv-llamafactory")

STUBS = STUBS_DIR
CLI = str(Path(sys.executable).parent / "llamafactory-cli")
GUARDIAN = [sys.executable, "-m", "guardian.cli"]
CHARS = string.ascii_lowercase + string.digits + " +=.,;:?!\n"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
STEPS, BATCH, GARBAGE_FROM, GARBAGE_STEPS = 40, 4, 28, 3  # the garbage fills the batches of steps 28-30


# --- a tiny model, tokenizer and dataset, made here -------------------------------------------------------------


def build_model_dir(folder: Path) -> Path:
    """A Llama-architecture model from a config and a character-level fast tokenizer, saved as a hub folder."""
    import torch

    torch.set_num_threads(1)  # the children get OMP_NUM_THREADS=1 too: a tiny model on a shared CPU
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", padding_side="right")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pretrain(model: Any, tokenizer: Any, steps: int = 150) -> None:
    """A few full-parameter steps on the task, so the LoRA fine-tuning starts from a model that knows it (as a
    real one starts from a pretrained base): its loss is low and steady, and a garbage batch stands out."""
    import torch

    rng = random.Random(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        texts = ["".join(sums(rng)) + tokenizer.eos_token for _ in range(16)]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def sums(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"{a}+{b}=", f"the sum is {a + b}."


def garbage(rng: random.Random) -> str:
    return "".join(rng.choice(CHARS[:36]) for _ in range(24))


def write_datasets(folder: Path) -> Path:
    """SFT (alpaca) and DPO (pairwise) training files whose samples at GARBAGE_FROM.. are garbage, eval files."""
    rng = random.Random(0)
    bad = range((GARBAGE_FROM - 1) * BATCH, (GARBAGE_FROM - 1 + GARBAGE_STEPS) * BATCH)  # steps count from 1
    sft, dpo = [], []
    for i in range(STEPS * BATCH):
        prompt, answer = sums(rng)
        wrong = garbage(rng)
        sft.append({"instruction": prompt, "input": "", "output": wrong if i in bad else answer})
        dpo.append({"instruction": prompt, "input": "", "chosen": wrong if i in bad else answer,
                    "rejected": answer if i in bad else wrong})
    evals = [sums(rng) for _ in range(16)]
    files = {
        "sft.json": sft, "dpo.json": dpo,
        "sft_eval.json": [{"instruction": p, "input": "", "output": a} for p, a in evals],
        "dpo_eval.json": [{"instruction": p, "input": "", "chosen": a, "rejected": garbage(rng)} for p, a in evals],
    }
    for name, rows in files.items():
        (folder / name).write_text(json.dumps(rows))
    pairwise = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
    info = {"toy_sft": {"file_name": "sft.json"}, "toy_sft_eval": {"file_name": "sft_eval.json"},
            "toy_dpo": {"file_name": "dpo.json", "ranking": True, "columns": pairwise},
            "toy_dpo_eval": {"file_name": "dpo_eval.json", "ranking": True, "columns": pairwise}}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return folder


@dataclass(frozen=True)
class Assets:
    model: Path
    data: Path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    root = tmp_path_factory.mktemp("llamafactory-assets")
    return Assets(build_model_dir(root / "model"), write_datasets(root))


def config(assets: Assets, out: Path, stage: str = "sft", **changes: Any) -> Path:
    """A LLaMA-Factory YAML for a LoRA run of STEPS steps on the toy data, logging and judging every step."""
    settings: dict[str, Any] = {
        "model_name_or_path": str(assets.model), "stage": stage, "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 8, "dataset": f"toy_{stage}", "eval_dataset": f"toy_{stage}_eval",
        "dataset_dir": str(assets.data), "template": "empty", "cutoff_len": 96, "overwrite_cache": True,
        "output_dir": str(out), "logging_steps": 1, "save_steps": 10, "plot_loss": False,
        "overwrite_output_dir": True, "report_to": "none", "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": 8, "learning_rate": 1e-3 if stage == "sft" else 5e-4, "max_steps": STEPS,
        "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 3, "max_grad_norm": 1.0,
        "disable_shuffling": True, "do_eval": True, "eval_strategy": "steps", "eval_steps": 20,
        "dataloader_num_workers": 0, "seed": 0,
    }
    if stage == "dpo":
        settings.update(pref_beta=0.1, pref_loss="sigmoid")
    settings.update(changes)
    import yaml

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(settings))
    return path


def child_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDIAN_")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(STUBS), env.get("PYTHONPATH", "")) if p),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp / "hf-home"), WANDB_DISABLED="true",
               PYTHONWARNINGS="ignore", DISABLE_VERSION_CHECK="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def guarded(tmp: Path, cfg: Path, *options: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARDIAN, "run", "--backoff", "0.1", *options, "--", CLI, "train", str(cfg)],
                          capture_output=True, text=True, env={**child_env(tmp), **env}, timeout=600)


def unguarded(tmp: Path, cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "train", str(cfg)], capture_output=True, text=True, env=child_env(tmp), timeout=600)


def events(out: Path) -> list[AnyEvent]:
    """The run's event file, typed (every line must be an event)."""
    found = list(read_events(out / "guardian" / "events.jsonl"))
    assert None not in found, "a line of the event file is not an event"
    return [e for e in found if e is not None]


def decided(written: list[AnyEvent]) -> list[tuple[int, str]]:
    return [(e.step, e.rule) for e in written if isinstance(e, DecisionEvent)]


def skipped_steps(written: list[AnyEvent]) -> list[int]:
    return [e.step for e in written if isinstance(e, ActionEvent) and e.skipped_update]


def after_end(written: list[AnyEvent]) -> list[AnyEvent]:
    """The events written after the run's end event (evaluations after `train()` returned)."""
    end = next(i for i, e in enumerate(written) if isinstance(e, EndEvent))
    return written[end + 1:]


def adapter_is_finite(folder: Path) -> bool:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return bool(tensors) and all(bool(t.isfinite().all()) for t in tensors.values())


def final_eval_loss(out: Path) -> float:
    return float(json.loads((out / "eval_results.json").read_text())["eval_loss"])


def train_metrics(written: list[AnyEvent]) -> list[MetricsEvent]:
    return [e for e in written if isinstance(e, MetricsEvent) and e.phase == "train"]


def train_steps(written: list[AnyEvent]) -> list[int]:
    return [e.step for e in train_metrics(written)]


GARBAGE = list(range(GARBAGE_FROM, GARBAGE_FROM + GARBAGE_STEPS))


@dataclass(frozen=True)
class Followed:
    """An unguarded SFT run with `guardian attach` following it live: the baseline for the guarded one."""

    out: Path
    train: subprocess.CompletedProcess[str]
    attach: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def followed(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Followed:
    tmp = tmp_path_factory.mktemp("followed")
    out = tmp / "sft"
    env = child_env(tmp)
    train = subprocess.Popen([CLI, "train", str(config(assets, out))], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:  # started before the run writes anything: it waits for the folder, then follows the log as it grows
        attach = subprocess.run([*GUARDIAN, "attach", str(out), "--pid", str(train.pid), "--linger", "3",
                                 "--poll-seconds", "0.5"], capture_output=True, text=True, env=env, timeout=600)
    finally:
        output, _ = train.communicate(timeout=600)
    return Followed(out, subprocess.CompletedProcess(train.args, train.returncode, output, ""), attach)


# --- the tests --------------------------------------------------------------------------------------------------


def test_sft_lora_under_guardian_run_skips_the_garbage_and_keeps_good_checkpoints(
        assets: Assets, followed: Followed, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    result = guarded(tmp_path, config(assets, out))
    said = result.stdout + result.stderr
    assert result.returncode == 0, said[-4000:]
    assert said.count("Guardian: watching with 15 rules") == 1, said[-4000:]  # the child confirms it is attached
    assert f"Guardian: run ended at step {STEPS}: 3 decisions, 3 updates skipped, 0 rollbacks" in said
    written = events(out)
    assert train_steps(written) == list(range(1, STEPS + 1))  # every optimizer step read, in the process
    assert decided(written) == [(step, "loss_spike") for step in GARBAGE]
    assert skipped_steps(written) == GARBAGE  # dropped before optimizer.step(): the garbage never reached the weights
    bad = [json.loads(line) for line in (out / "guardian" / "bad_samples.jsonl").read_text().splitlines()]
    first = (GARBAGE_FROM - 1) * BATCH
    assert [row["index"] for row in bad] == list(range(first, first + GARBAGE_STEPS * BATCH))
    good = sorted(p.name for p in (out / "guardian" / "good").iterdir())
    assert good == ["checkpoint-10", "checkpoint-20"]  # saved while healthy; 30 and 40 fall in the incident
    for name in good:
        assert adapter_is_finite(out / "guardian" / "good" / name)
    assert adapter_is_finite(out)  # the final adapter LLaMA-Factory saves after train()
    # LLaMA-Factory's evaluation after training (do_eval) is recorded, after the end, and never acted on
    after = [e for e in after_end(written) if isinstance(e, MetricsEvent)]
    assert [(e.step, e.phase, e.after_train) for e in after] == [(STEPS, "eval", True)]
    assert after[0].values["eval_loss"] == pytest.approx(final_eval_loss(out))
    assert not [e for e in after_end(written) if isinstance(e, (DecisionEvent, ActionEvent))]
    # no worse than the same run unguarded
    assert followed.train.returncode == 0, followed.train.stdout[-3000:]
    assert final_eval_loss(out) <= final_eval_loss(followed.out) * 1.01


def test_dpo_lora_under_guardian_run(assets: Assets, tmp_path: Path) -> None:
    out, plain = tmp_path / "dpo", tmp_path / "dpo-unguarded"
    result = guarded(tmp_path, config(assets, out, "dpo"))
    said = result.stdout + result.stderr
    assert result.returncode == 0, said[-4000:]
    # DPO gets the default rules and the preference rules (rules/preference.yaml), chosen at train begin
    watching = re.findall(r"Guardian: watching with (\d+) rules from (\S+)", said)
    assert len(watching) == 1 and int(watching[0][0]) > 15 and "preference.yaml" in said, said[-4000:]
    written = events(out)
    assert train_steps(written) == list(range(1, STEPS + 1))
    # a garbage `chosen` against a good `rejected`: the preference loss jumps, and those updates are skipped
    decisions = decided(written)
    assert {step for step, _ in decisions} == set(GARBAGE) and ("loss_spike" in {rule for _, rule in decisions}), \
        decisions
    assert skipped_steps(written) == GARBAGE
    good = sorted(p.name for p in (out / "guardian" / "good").iterdir())
    assert good == ["checkpoint-10", "checkpoint-20"]
    assert all(adapter_is_finite(out / "guardian" / "good" / name) for name in good) and adapter_is_finite(out)
    assert [(e.phase, e.after_train) for e in after_end(written) if isinstance(e, MetricsEvent)] == [("eval", True)]
    reference = unguarded(tmp_path, config(assets, plain, "dpo"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert final_eval_loss(out) <= final_eval_loss(plain) * 1.01 + 1e-3


def test_a_killed_run_restarts_from_its_last_good_checkpoint_and_finishes(assets: Assets, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    paths = os.pathsep.join([str(STUBS / "faults"), child_env(tmp_path)["PYTHONPATH"]])
    result = guarded(tmp_path, config(assets, out), PYTHONPATH=paths, GUARDIAN_TEST_KILL_STEP="25")
    said = result.stdout + result.stderr
    assert result.returncode == 0, said[-4000:]
    good = out / "guardian" / "good" / "checkpoint-20"
    assert f"was killed by SIGKILL; restart 1 of 3 in 0 s, resuming from {good}" in said, said[-4000:]
    assert f"guardian: resuming from {good}" in said
    written = events(out)
    assert [e.step for e in written if isinstance(e, StartEvent)] == [0, 20]  # the second attempt began at 20
    assert train_steps(written)[-(STEPS - 20):] == list(range(21, STEPS + 1))
    assert skipped_steps(written) == GARBAGE
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == STEPS
    assert adapter_is_finite(out)


def test_weights_corrupted_mid_run_are_rolled_back_to_the_good_checkpoint(assets: Assets, tmp_path: Path) -> None:
    """An inf written into a LoRA weight after step 15: unguarded every later loss is NaN (the weights are the
    problem, skipping cannot help). Guardian's reference batch tells damaged weights from a bad batch, and it
    rolls back to the newest good state before the damage: the good checkpoint-10 on disk."""
    out = tmp_path / "sft"
    paths = os.pathsep.join([str(STUBS / "faults"), child_env(tmp_path)["PYTHONPATH"]])
    result = guarded(tmp_path, config(assets, out), PYTHONPATH=paths, GUARDIAN_TEST_CORRUPT_STEP="15")
    said = result.stdout + result.stderr
    assert result.returncode == 0, said[-4000:]
    written = events(out)
    rules = decided(written)
    assert (16, "weights_damaged") in rules, rules
    rollbacks = [e for e in written if isinstance(e, ActionEvent) and e.rollback_to_step is not None]
    assert [e.rollback_to_step for e in rollbacks] == [10], said[-3000:]
    assert train_steps(written) == list(range(1, STEPS + 1))
    losses = [e.values["loss"] for e in train_metrics(written)]
    assert all(math.isfinite(x) for x in losses[16:])  # from the step after the rollback on
    assert adapter_is_finite(out) and math.isfinite(final_eval_loss(out))


def test_a_tokenizer_that_cannot_load_is_not_restarted(assets: Assets, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(assets.model, broken)
    (broken / "tokenizer.json").write_text("{ this is not a tokenizer")
    out = tmp_path / "sft"
    result = guarded(tmp_path, config(Assets(broken, assets.data), out), "--max-restarts", "3")
    said = result.stdout + result.stderr
    assert result.returncode == 1, said[-4000:]
    assert "the training command failed before its first step (exit code 1)" in said, said[-4000:]
    assert "restart 1 of" not in said
    assert "tokenizer" in said.lower() and "Traceback" in said  # the child's own error is there to read


def test_attach_follows_a_live_llamafactory_log(followed: Followed) -> None:
    said = followed.attach.stdout + followed.attach.stderr
    assert followed.attach.returncode == 0, said[-4000:]
    assert f"attach: following {followed.out / 'trainer_log.jsonl'} with 15 rules" in said
    written = events(followed.out)
    assert {e.source for e in written} == {"attach"}
    assert train_steps(written) == list(range(1, STEPS + 1))
    assert decided(written) == [(step, "loss_spike") for step in GARBAGE]
    for step in (10, 20):
        assert (followed.out / f"checkpoint-{step}" / "guardian_good.json").is_file()
    assert not (followed.out / "checkpoint-30" / "guardian_good.json").exists()
    assert (followed.out / "guardian" / "last_good_checkpoint").read_text().strip() == str(
        followed.out / "checkpoint-20")
    # LLaMA-Factory's log has no grad_norm; each line is written before the checkpoint holding its grad norm
    assert f"attach: grad_norm for {STEPS} of {STEPS} logged steps read from trainer_state.json" in said, said
    assert "for lack of grad_norm" not in said
    assert "attach: cannot fire for lack of seconds_since_report in the log: stalled" in said
