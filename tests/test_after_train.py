"""What Guardian does around the edges of a run: evaluations after `train()` returned, its own log lines in a
process that configured no logging, and the rollback target when memory and disk hold different good states."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from trainkit import events, rules

from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.tinyrun import TextDataset, TinyRun, make_texts

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
    written = events(tmp_path)
    end = next(i for i, e in enumerate(written) if e["kind"] == "end")
    later = written[end + 1:]
    assert [(e["kind"], e["step"], e["phase"], e.get("after_train")) for e in later] == [
        ("metrics", 20, "eval", True), ("metrics", 20, "eval", True)]
    assert [e["values"]["eval_loss"] for e in later] == [first["eval_loss"], second["eval_loss"]]
    assert [e["seq"] for e in written] == list(range(1, len(written) + 1))  # the numbering goes on
    assert guardian.interventions == [] and guardian.counts["stops"] == 0
    assert not [e for e in written if e["kind"] in ("decision", "action")]


@pytest.mark.parametrize("fault_step", [23, 40])
def test_a_rollback_takes_the_newest_good_checkpoint_over_an_older_snapshot(tmp_path: Path, fault_step: int) -> None:
    """The ring holds only the snapshot taken at step 0; a good checkpoint of step 20 is on disk."""
    recorder = Recorder()
    guardian = GuardianCallback(rules(NAN_ROLLS_BACK), snapshot_every_steps=1000)
    train(tmp_path, [FaultInjector([Fault("nan", fault_step)]), guardian, recorder], max_steps=fault_step + 5,
          save_steps=20)
    assert [s.step for s in guardian.snapshots.all()] == [0]
    assert (tmp_path / "guardian" / "good" / "checkpoint-20").is_dir()
    (rollback,) = [i for i in guardian.interventions if "rollback" in i]
    assert rollback["rollback_to_step"] == 20, rollback
    assert rollback["rollback"].endswith("checkpoint-20")
