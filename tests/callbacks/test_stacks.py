"""The per-step, pre-update reading on every transformers the package admits (`make test-oldest` runs this file on
the oldest one): a real Trainer on the tiny Llama, each optimizer step read once before its update, with the
loss of that step and the gradient norm before clipping; and a loud warning where that cannot be done."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from repopaths import REPO_ROOT
from trainkit import Recorder, start_event, train_metrics
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.callbacks.snapshots import trainable_parameters
from guardian.testing.tinyrun import TextDataset, TinyRun, build_model, make_texts

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def observed_steps(guardian: GuardianCallback) -> list[int]:
    """Spy on the real engine: the step of every training observation it is fed (train values, not evals)."""
    steps: list[int] = []
    observe = guardian.engine.observe

    def counting(step: int, metrics: Any, probe: Any = None) -> Any:
        if "loss" in metrics or "grad_norm" in metrics:
            steps.append(step)
        return observe(step, metrics, probe)

    guardian.engine.observe = counting  # type: ignore[method-assign]
    return steps


class RawNorm(TrainerCallback):
    """The gradient norm as the parameters hold it before Guardian's hook (added before Guardian)."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms[state.global_step + 1] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def test_a_garbage_stretch_is_skipped_step_by_step_before_each_update(tmp_path: Path) -> None:
    """Issue #16 on transformers 4.57: 15 garbage batches logged every 5 steps gave no decision at all. Read per
    step, each garbage step is judged before its update and its update is skipped: the weights do not move."""
    guardian = GuardianCallback()
    seen = observed_steps(guardian)
    recorder = Recorder()
    trainer = TinyRun(str(tmp_path), max_steps=50, eval_steps=0, logging_steps=5).trainer(
        [FaultInjector([Fault("poison", 30, steps=15)]), guardian, recorder])
    trainer.train()
    garbage = list(range(30, 45))
    assert [(d.step, d.rule) for d in guardian.decisions] == [(s, "loss_spike") for s in garbage]
    assert guardian.counts["skipped_updates"] == 15
    for step in garbage:  # carried out: the skipped steps left every trainable weight as it was
        before, after = recorder.params_at_end[step - 1], recorder.params_at_end[step]
        assert all(torch.equal(before[k], after[k]) for k in after), step
    assert any(not torch.equal(recorder.params_at_end[45][k], recorder.params_at_end[44][k])
               for k in recorder.params_at_end[45])  # and training goes on after the stretch
    assert seen == list(range(1, 51))  # each step fed to the engine once, never again at log time
    metrics = train_metrics(tmp_path)
    assert [e.step for e in metrics] == list(range(1, 51))
    assert all(isinstance(e.values["loss"], float) for e in metrics)
    assert start_event(tmp_path).pre_update is True


def test_the_gradient_norm_is_the_one_before_clipping_and_each_step_is_written_once(tmp_path: Path) -> None:
    """Every step is clipped (max_grad_norm 0.05): Guardian's grad norm is the pre-clip one Trainer logs, not the
    clipped 0.05 the parameters hold at the pre-optimizer hook; one metrics event per step, with its loss."""
    guardian = GuardianCallback()
    seen = observed_steps(guardian)
    trainer = TinyRun(str(tmp_path), max_steps=8, eval_steps=0, logging_steps=1, max_grad_norm=0.05).trainer([guardian])
    trainer.train()
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    metrics = train_metrics(tmp_path)
    assert [e.step for e in metrics] == list(range(1, 9)) == sorted(logged) == seen
    for event in metrics:
        assert logged[event.step]["grad_norm"] > 0.06
        assert event.values["grad_norm"] == pytest.approx(logged[event.step]["grad_norm"], rel=1e-5)
        assert event.values["loss"] == pytest.approx(logged[event.step]["loss"], rel=1e-4)
    start = start_event(tmp_path)
    expected = "_get_grad_norm" if hasattr(trainer, "_get_grad_norm") else "accelerator.clip_grad_norm_"
    assert start.pre_update is True and start.grad_norm_from == expected


def test_without_clipping_the_norm_and_loss_are_still_read_every_step(tmp_path: Path) -> None:
    """max_grad_norm 0: transformers 4 calls no clip to take the norm from; it is measured at the hook."""
    raw = RawNorm()
    guardian = GuardianCallback()
    seen = observed_steps(guardian)
    trainer = TinyRun(str(tmp_path), max_steps=6, eval_steps=0, logging_steps=3, max_grad_norm=0.0).trainer(
        [raw, guardian])
    trainer.train()
    metrics = train_metrics(tmp_path)
    assert [e.step for e in metrics] == list(range(1, 7)) == seen
    for event in metrics:
        assert isinstance(event.values["loss"], float)
        assert event.values["grad_norm"] == pytest.approx(raw.norms[event.step], rel=1e-5)
    assert guardian._probe is not None and guardian._probe.reading.pre_update


def test_a_custom_loop_without_a_trainer_is_told_loudly_and_judged_once_per_logged_step(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A loop of its own that calls the callback's hooks: no Trainer to read from, so one WARNING paragraph at
    train begin says so and what still works, the start event records it, and each logged step is fed once."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=6, logging_steps=1)
    state, control = TrainerState(max_steps=6), TrainerControl()
    model = build_model(0)
    optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-3)
    data = TextDataset(make_texts(48, seed=0))
    guardian = GuardianCallback()
    seen = observed_steps(guardian)
    with caplog.at_level(logging.WARNING, logger="guardian"):
        guardian.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    [warning] = [r for r in caplog.records if "cannot read each optimizer step" in r.getMessage()]
    assert warning.levelno == logging.WARNING and warning.name == "guardian"
    assert "no transformers.Trainer was found" in warning.getMessage()
    assert "no update is ever skipped" in warning.getMessage()
    for step in range(6):
        batch = {k: torch.stack([data[i][k] for i in range(step * 8, step * 8 + 8)]) for k in data[0]}
        loss = model(**batch).loss
        loss.backward()
        guardian.on_pre_optimizer_step(args, state, control, model=model, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1
        guardian.on_step_end(args, state, control, model=model, optimizer=optimizer)
        guardian.on_log(args, state, control, logs={"loss": float(loss.detach()), "learning_rate": 1e-3}, model=model)
    guardian.on_train_end(args, state, control)
    assert seen == list(range(1, 7))
    assert [e.step for e in train_metrics(tmp_path)] == list(range(1, 7))
    start = start_event(tmp_path)
    assert start.pre_update is False and "no transformers.Trainer" in (start.pre_update_why or "")
    assert guardian.errors == 0


def test_deepspeed_is_named_as_a_run_where_guardian_cannot_act_before_the_update(tmp_path: Path) -> None:
    """DeepSpeed updates inside the backward pass, before any hook: the reading says so (DeepSpeed itself is not
    installed here; the flag is the one Trainer sets for it)."""
    from guardian.callbacks.probe import reading_of

    trainer = TinyRun(str(tmp_path), max_steps=1, eval_steps=0).trainer()
    assert reading_of(trainer).pre_update
    trainer.is_deepspeed_enabled = True
    reading = reading_of(trainer)
    assert not reading.pre_update and "DeepSpeed" in reading.why and "DeepSpeed" in reading.warning()


def test_the_oldest_stack_tested_is_the_oldest_the_package_admits() -> None:
    """pyproject.toml's lower bounds on the training side are the versions constraints-oldest.txt pins."""
    root = REPO_ROOT
    text = (root / "pyproject.toml").read_text()
    admitted = dict(re.findall(r'"(transformers|peft|accelerate)>=([0-9.]+)', text))
    pinned = dict(re.findall(r"^(transformers|peft|accelerate)==([0-9.]+)", (root / "constraints-oldest.txt").read_text(),
                             re.M))
    assert admitted.keys() == pinned.keys() == {"transformers", "peft", "accelerate"}
    for name, low in admitted.items():
        assert pinned[name].split(".")[:len(low.split("."))] == low.split("."), (name, low, pinned[name])
