"""What Guardian does around the edges of a run: evaluations after `train()` returned, its own log lines in a
process that configured no logging, and the rollback target when memory and disk hold different good states."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from repopaths import SCRIPTS_DIR
from trainkit import rules, run_events

from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.events import ActionEvent, DecisionEvent, EndEvent, MetricsEvent
from guardian.testing.tinyrun import TextDataset, TinyRun, make_texts

SCRIPT = SCRIPTS_DIR / "plain_train.py"
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

OVERFIT_STOPS = """
version: 1
rules:
  - name: overfitting
    metric: eval_loss
    detector: {kind: overfitting, patience_evals: 1}
    actions: [{stop: {restore_best: true}}]
"""
NAN_ROLLS_BACK = """
version: 1
rules:
  - name: nan
    metrics: [loss, grad_norm]
    detector: {kind: non_finite}
    actions: [rollback]
"""


def train(tmp_path: Path, callbacks: list[Any], **settings: Any) -> Any:
    settings.setdefault("eval_steps", 0)
    trainer = TinyRun(str(tmp_path), **settings).trainer(callbacks)
    trainer.train()
    return trainer


def test_evaluations_after_train_are_recorded_and_never_acted_on(tmp_path: Path) -> None:
    """TRL and LLaMA-Factory users call `trainer.evaluate()` after `train()`: the same step as the last
    evaluation, here once on the eval set and once on a worse one (which a live rule would call overfitting)."""
    guardian = GuardianCallback(rules(OVERFIT_STOPS))
    trainer = train(tmp_path, [guardian], max_steps=20, eval_steps=10, train_size=16, eval_size=32)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    first = trainer.evaluate()
    second = trainer.evaluate(eval_dataset=TextDataset(make_texts(8, seed=99)))
    after = trainer.model.state_dict()
    assert before.keys() == after.keys()
    for name, value in after.items():
        assert torch.equal(value, before[name]), name
    written = run_events(tmp_path)
    end = next(i for i, e in enumerate(written) if isinstance(e, EndEvent))
    later = written[end + 1:]
    assert all(isinstance(e, MetricsEvent) for e in later), later
    assert [(e.step, e.phase, e.after_train) for e in later if isinstance(e, MetricsEvent)] == [
        (20, "eval", True), (20, "eval", True)]
    assert [e.values["eval_loss"] for e in later if isinstance(e, MetricsEvent)] == [
        first["eval_loss"], second["eval_loss"]]
    assert [e.seq for e in written] == list(range(1, len(written) + 1))  # the numbering goes on
    assert guardian.interventions == [] and guardian.counts["stops"] == 0
    assert not [e for e in written if isinstance(e, (DecisionEvent, ActionEvent))]


@pytest.mark.slow
def test_a_guarded_run_says_guardian_is_attached_and_how_it_ended(tmp_path: Path) -> None:
    """The child of `guardian run` configures no logging: Guardian's INFO lines are shown once each."""
    env = {**os.environ, "MAX_STEPS": "10", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "guardian.cli", "run", "--", sys.executable, str(SCRIPT),
                             str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Guardian: watching with ") == 1, result.stderr[-3000:]
    assert result.stderr.count("Guardian: run ended at step 10: 0 decisions") == 1, result.stderr[-3000:]


def test_a_process_with_its_own_logging_gets_the_lines_there(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """pytest's handlers are on the root logger, as a script's `logging.basicConfig` would put them."""
    caplog.set_level(logging.INFO, logger="guardian")
    handlers = list(logging.getLogger("guardian").handlers)
    train(tmp_path, [GuardianCallback()], max_steps=2, train_size=16)
    assert logging.getLogger("guardian").handlers == handlers  # none added
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if line.startswith("Guardian: watching with ")]) == 1
    assert len([line for line in lines if line.startswith("Guardian: run ended at step 2")]) == 1


@pytest.mark.parametrize("fault_step", [23, 30])
def test_a_rollback_takes_the_newest_good_checkpoint_over_an_older_snapshot(tmp_path: Path, fault_step: int) -> None:
    """The ring holds only the snapshot taken at step 0; a good checkpoint of step 20 is on disk."""
    guardian = GuardianCallback(rules(NAN_ROLLS_BACK), snapshot_every_steps=1000)
    train(tmp_path, [FaultInjector([Fault("nan", fault_step)]), guardian], max_steps=fault_step + 2,
          save_steps=20)
    assert [s.step for s in guardian.snapshots.all()] == [0]
    assert (tmp_path / "guardian" / "good" / "checkpoint-20").is_dir()
    (rollback,) = [i for i in guardian.interventions if i.rollback is not None]
    assert rollback.rollback_to_step == 20, rollback
    assert rollback.rollback.endswith("checkpoint-20")
