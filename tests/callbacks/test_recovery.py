"""The recovery policy carried out in a real Trainer + LoRA run: each test is a fault, Guardian's response, and
what the run would have done without it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from trainkit import CorruptWeight, Recorder, all_finite, rules, run_events
from transformers import Trainer, TrainerCallback, TrainingArguments

from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.callbacks.snapshots import trainable_parameters
from guardian.events import ActionEvent
from guardian.testing.tinyrun import TextDataset, TinyRun, build_model, make_texts

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NAN_ROLLS_BACK = """
version: 1
rules:
  - name: nan
    metrics: [loss, grad_norm]
    detector: {kind: non_finite}
    actions: [rollback]
"""
NAN_STOPS = """
version: 1
rules:
  - name: nan
    metrics: [loss, grad_norm]
    detector: {kind: non_finite}
    actions: [stop]
"""
SKIP_EVERY_UPDATE = """
version: 1
rules:
  - name: every_step
    metric: learning_rate
    detector: {kind: threshold, above: 0.0}
    actions: [skip_update]
"""


def train(tmp_path: Path, callbacks: list[Any], **settings: Any) -> Any:
    settings.setdefault("max_steps", 60)
    settings.setdefault("eval_steps", 0)
    trainer = TinyRun(str(tmp_path), **settings).trainer(callbacks)
    trainer.train()
    return trainer


class ForceRate(TrainerCallback):
    """From a step on, every step's rate is multiplied after the scheduler set it (a broken wrapper)."""

    def __init__(self, start: int, factor: float) -> None:
        self.start, self.factor = start, factor

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if state.global_step + 1 >= self.start:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor


def test_corrupted_weights_are_rolled_back_once_and_the_run_ends_finite(tmp_path: Path) -> None:
    """Unguarded, an inf in a weight makes every later loss NaN; skipping cannot help, the weights are the problem."""
    guardian = GuardianCallback()
    trainer = train(tmp_path / "g", [CorruptWeight(30, math.inf), guardian])
    assert all_finite(trainer.model)
    rollbacks = [i for i in guardian.interventions if i.rollback_to_step is not None]
    assert len(rollbacks) == 1 and rollbacks[0].rollback_to_step == 25
    damaged = next(d for d in guardian.decisions if d.rule == "weights_damaged")
    assert damaged.step == 31 and damaged.incident == 1
    unguarded = train(tmp_path / "u", [CorruptWeight(30, math.inf)])
    assert not all_finite(unguarded.model)


def test_a_stretch_of_bad_batches_costs_skips_and_never_the_run(tmp_path: Path) -> None:
    guardian = GuardianCallback()
    trainer = train(tmp_path, [FaultInjector([Fault("poison", 30, steps=25)]), guardian], max_steps=80)
    assert trainer.state.global_step == 80  # not stopped
    assert guardian.counts["rollbacks"] == 0 and guardian.counts["stops"] == 0 and guardian.counts["lr_cuts"] == 0
    assert guardian.counts["skipped_updates"] >= 20
    assert {d.incident for d in guardian.decisions if d.rule == "loss_spike"} == {1}


def test_a_rate_forced_off_its_schedule_is_put_back_at_every_step(tmp_path: Path) -> None:
    recorder = Recorder()
    guardian = GuardianCallback()
    train(tmp_path, [ForceRate(40, 100.0), guardian, recorder], max_steps=60)
    clean = Recorder()
    train(tmp_path / "clean", [clean], max_steps=60)
    # Every step from 40 on is taken at the scheduled rate, not at 100x it; no update is lost.
    for step in range(40, 61):
        assert recorder.rates[step][0] == pytest.approx(clean.rates[step][0], rel=1e-6), step
    assert guardian.counts["lr_restores"] == 21 and guardian.counts["skipped_updates"] == 0


def test_a_rollback_keeps_the_schedule_where_the_step_count_is(tmp_path: Path) -> None:
    recorder, clean = Recorder(), Recorder()
    guardian = GuardianCallback(rules(NAN_ROLLS_BACK))
    train(tmp_path, [FaultInjector([Fault("nan", 40)]), guardian, recorder], max_steps=60, warmup_steps=10)
    train(tmp_path / "clean", [clean], max_steps=60, warmup_steps=10)
    assert [i.rollback_to_step for i in guardian.interventions if i.rollback_to_step is not None] == [25]
    # After rolling back to step 25 at step 40, step 41 gets step 41's rate, not step 26's.
    for step in (41, 50, 60):
        assert recorder.rates[step] == pytest.approx(clean.rates[step]), step


def test_a_stop_leaves_the_last_good_weights_and_skips_the_update(tmp_path: Path) -> None:
    recorder = Recorder()
    guardian = GuardianCallback(rules(NAN_STOPS))
    trainer = train(tmp_path, [FaultInjector([Fault("nan", 33)]), guardian, recorder], max_steps=60)
    assert trainer.state.global_step == 33 and all_finite(trainer.model)
    # The newest good state before the onset (step 33, margin 5) is the snapshot of step 25.
    for name, param in trainable_parameters(trainer.model).items():
        assert torch.equal(param.detach(), recorder.params_at_end[25][name]), name
    (stop,) = [i for i in guardian.interventions if i.stopped]
    assert stop.skipped_update and stop.restored is not None and "the weights of step 25" in stop.restored


def test_evaluate_after_train_never_changes_the_model(tmp_path: Path) -> None:
    overfit = """
version: 1
rules:
  - name: overfitting
    metric: eval_loss
    detector: {kind: overfitting, patience_evals: 1}
    actions: [{stop: {restore_best: true}}]
"""
    guardian = GuardianCallback(rules(overfit))
    trainer = TinyRun(str(tmp_path), max_steps=40, eval_steps=20, train_size=16).trainer([guardian])
    trainer.train()
    before = {k: p.detach().clone() for k, p in trainable_parameters(trainer.model).items()}
    trainer.evaluate()
    trainer.evaluate(eval_dataset=TextDataset(make_texts(8, seed=99)))  # a different, worse set, same step
    for name, param in trainable_parameters(trainer.model).items():
        assert torch.equal(param.detach(), before[name]), name
    assert not [e for e in run_events(tmp_path) if isinstance(e, ActionEvent) and e.step == 40]


def _fp16_trainer(tmp_path: Path, callbacks: list[Any], *, max_grad_norm: float) -> Trainer:
    """fp16 mixed precision on the CPU: accelerate makes no GradScaler there, so give it torch's CPU one."""
    args = TrainingArguments(output_dir=str(tmp_path), fp16=True, use_cpu=True, report_to=[], max_steps=8,
                             max_grad_norm=max_grad_norm, logging_steps=1, disable_tqdm=True, learning_rate=2e-3,
                             per_device_train_batch_size=8, seed=0)
    trainer = Trainer(model=build_model(0), args=args, train_dataset=TextDataset(make_texts(128, 0)),
                      callbacks=callbacks)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    return trainer


class ScaleRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.scales: list[float] = []
        self.trainer: Trainer | None = None

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        assert self.trainer is not None
        self.scales.append(float(self.trainer.accelerator.scaler.get_scale()))


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_a_skipped_update_under_an_fp16_grad_scaler(tmp_path: Path, max_grad_norm: float) -> None:
    """Without clipping nothing unscales the gradients before Guardian drops them, and GradScaler.step would
    assert "No inf checks were recorded for this optimizer"; the scale must still move as it would unguarded."""
    guarded, plain = ScaleRecorder(), ScaleRecorder()
    guardian = GuardianCallback(rules(SKIP_EVERY_UPDATE), snapshot_every_steps=0)
    trainer = _fp16_trainer(tmp_path / "g", [guardian, guarded], max_grad_norm=max_grad_norm)
    guarded.trainer = trainer
    before = {k: p.detach().clone() for k, p in trainable_parameters(trainer.model).items()}
    trainer.train()
    assert guardian.counts["skipped_updates"] == 8 and guardian.errors == 0
    for name, param in trainable_parameters(trainer.model).items():
        assert torch.equal(param.detach(), before[name]), name
    reference = _fp16_trainer(tmp_path / "u", [plain], max_grad_norm=max_grad_norm)
    plain.trainer = reference
    reference.train()
    assert guarded.scales == plain.scales  # grew every 2 steps in both: no overflow, none invented
