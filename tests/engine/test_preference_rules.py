"""Rules for preference and RL training on real TRL trainers (DPOTrainer, GRPOTrainer) and the tiny Llama.

The rule set follows the trainer (default + preference.yaml for DPO, default + rl.yaml for GRPO), TRL's
per-batch metrics reach the rules every optimizer step before the update, healthy runs are quiet, and the
faults of issue #16 are caught: a 3-step chosen/rejected swap (its updates skipped) and a GRPO reward
function turning constant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trlkit import dpo_trainer, grpo_trainer, sum_reward

from guardian.callbacks import GuardianCallback
from guardian.callbacks.trl_metrics import StoredMetrics
from guardian.rulefile.reader import LOSS_LEVEL_RULES, load_rules, shipped_rules_for

SWAPPED = (30, 31, 32)
PREFERENCE_RULES = {"reward_accuracy_collapse", "reward_margin_flip", "chosen_reward_collapse"}
RL_RULES = {"reward_collapse", "no_reward_signal", "kl_blowup"}


def fired(guardian: GuardianCallback) -> dict[int, set[str]]:
    steps: dict[int, set[str]] = {}
    for decision in guardian.decisions:
        steps.setdefault(decision.step, set()).add(decision.rule)
    return steps


def test_rule_sets_follow_the_method_and_a_given_file_wins(tmp_path: Path) -> None:
    default = {r.name for r in load_rules().rules}
    assert {r.name for r in shipped_rules_for("dpo").rules} == default | PREFERENCE_RULES
    assert {r.name for r in shipped_rules_for("grpo").rules} == (default - set(LOSS_LEVEL_RULES)) | RL_RULES
    assert {r.name for r in shipped_rules_for("sft").rules} == default
    assert {r.name for r in shipped_rules_for(None).rules} == default
    mine = tmp_path / "mine.yaml"
    mine.write_text("version: 1\nrules:\n  - {name: only, metric: loss, detector: {kind: non_finite}, actions: [alert]}\n")
    guardian = GuardianCallback(rules=mine, event_log=False)
    dpo_trainer(str(tmp_path / "run"), steps=1, callbacks=[guardian]).train()
    assert [r.name for r in guardian.ruleset.rules] == ["only"]


def test_stored_metrics_give_each_step_its_own_values_across_log_clears() -> None:
    class Trainer:
        _metrics: dict[str, Any] = {"train": {}}

    trainer = Trainer()
    reader = StoredMetrics(trainer)
    store = trainer._metrics["train"]
    store["rewards/margins"] = [1.0, 3.0]  # two micro-batches of step 1 (gradient accumulation)
    assert reader.read() == {"rewards/margins": 2.0}
    store["rewards/margins"].append(5.0)
    assert reader.read() == {"rewards/margins": 5.0}
    assert reader.read() == {}  # nothing new: no value, rather than a stale one
    store.clear()  # Trainer.log averaged and cleared the store
    store["rewards/margins"] = [7.0]  # a new list of the same length as before the clear
    store["reward"] = [float("nan"), 1.0]
    assert reader.read() == {"rewards/margins": 7.0, "reward": 1.0}


@pytest.mark.slow
def test_a_healthy_dpo_run_is_quiet_and_a_swap_is_skipped_before_its_update(tmp_path: Path) -> None:
    healthy = GuardianCallback(event_log=False)
    dpo_trainer(str(tmp_path / "healthy"), steps=40, callbacks=[healthy]).train()
    assert PREFERENCE_RULES <= {r.name for r in healthy.ruleset.rules}
    assert healthy.decisions == [] and healthy.errors == 0

    swapped = GuardianCallback(event_log=False)
    dpo_trainer(str(tmp_path / "swapped"), steps=40, callbacks=[swapped], swapped_steps=SWAPPED).train()
    steps = fired(swapped)
    assert set(steps) == set(SWAPPED), steps  # every swapped step, nothing else
    assert all({"reward_accuracy_collapse", "reward_margin_flip"} <= steps[s] for s in SWAPPED)
    skipped = {i.step for i in swapped.interventions if i.skipped_update}
    assert skipped == set(SWAPPED)
    assert swapped.counts["skipped_updates"] == 3 and swapped.errors == 0


@pytest.mark.slow
def test_a_healthy_grpo_run_is_quiet_and_a_constant_reward_is_caught(tmp_path: Path) -> None:
    healthy = GuardianCallback(event_log=False)
    grpo_trainer(str(tmp_path / "healthy"), steps=30, callbacks=[healthy]).train()
    assert RL_RULES <= {r.name for r in healthy.ruleset.rules}
    assert healthy.decisions == [] and healthy.errors == 0

    broken_from = 15

    def breaks(completions: list[str], **kwargs: Any) -> list[float]:
        return [0.0] * len(completions) if trainer.state.global_step + 1 >= broken_from else sum_reward(completions)

    collapsed = GuardianCallback(event_log=False)
    trainer = grpo_trainer(str(tmp_path / "broken"), steps=30, callbacks=[collapsed], reward=breaks)
    trainer.train()
    steps = fired(collapsed)
    assert steps and min(steps) >= broken_from, steps
    assert "no_reward_signal" in set().union(*steps.values())
    assert collapsed.interventions == []  # alerts only: acting on the update would not help


def test_stored_metrics_read_online_dpo_s_flat_store_and_orpo_s_stored_metrics() -> None:
    class OnlineDPO:
        stats: dict[str, list[float]] = {"objective/kl": [0.5], "rewards/accuracies": []}

    class ORPO:
        _stored_metrics: dict[str, Any] = {"train": {"rewards/margins": [0.25, 0.75]}}

    assert StoredMetrics(OnlineDPO()).read() == {"objective/kl": 0.5}
    assert StoredMetrics(ORPO()).read() == {"rewards/margins": 0.5}
    assert StoredMetrics(object()).read() == {}


def test_kl_blowup_follows_a_growing_kl_and_fires_on_a_jump() -> None:
    """The KL of a real healthy GRPO run (tests/trlkit.py, beta 0.04, seed 0) grows 500x in 40 steps: quiet.
    The same run with a 10x jump at the end: fires."""
    from guardian.engine.engine import Engine

    measured = [0.0, 0.00102, 0.00474, 0.00663, 0.00479, 0.01098, 0.0276, 0.0243, 0.04884, 0.03456, 0.0432,
                0.03285, 0.04605, 0.05784, 0.08072, 0.04972, 0.06506, 0.08343, 0.13538, 0.12093, 0.10706, 0.16251,
                0.26611, 0.19825, 0.28382, 0.27923, 0.34257, 0.30358, 0.26914, 0.37058, 0.19661, 0.32861, 0.37772,
                0.29612, 0.40507, 0.29933, 0.32656, 0.29567, 0.42682, 0.49759]
    engine = Engine(shipped_rules_for("grpo"))
    assert [d for i, v in enumerate(measured, 1) for d in engine.observe(i, {"kl": v})] == []
    decisions = engine.observe(41, {"kl": 0.49759 * 12})
    assert [d.rule for d in decisions] == ["kl_blowup"]


def test_reward_collapse_is_quiet_on_measured_healthy_rewards_and_fires_when_they_drop_to_zero() -> None:
    """The rewards of two real healthy GRPO runs (tests/trlkit.py, seeds 0 and 1), then a reward function
    returning 0 from step 41."""
    from guardian.engine.engine import Engine

    runs = [[0.12, 0.25, 0.12, 0.25, 0.25, 0.5, 0.75, 0.5, 0.38, 0.25, 0.25, 0.25, 0.38, 0.25, 0.5, 0.38, 0.25, 0.62,
             0.38, 0.62, 0.5, 0.12, 0.62, 0.62, 1.0, 0.5, 0.5, 0.38, 0.75, 0.62, 0.62, 0.75, 0.88, 0.88, 1.0, 1.0, 1.0,
             0.88, 0.88, 0.62],
            [0.0, 0.25, 0.25, 0.0, 0.38, 0.25, 0.62, 0.25, 0.25, 0.0, 0.12, 0.5, 0.5, 0.25, 0.38, 0.38, 0.25, 0.5, 0.62,
             0.38, 0.5, 0.62, 0.62, 0.62, 0.38, 0.5, 0.5, 0.5, 0.38, 0.5, 0.5, 0.62, 0.62, 0.75, 0.62, 0.5, 0.62, 1.0,
             1.0, 0.88]]
    for rewards in runs:
        engine = Engine(shipped_rules_for("grpo"))
        assert [d for i, v in enumerate(rewards, 1) for d in engine.observe(i, {"reward": v})] == []
        fired_at = [i for i in range(41, 51) if any(d.rule == "reward_collapse" for d in engine.observe(i, {"reward": 0.0}))]
        assert fired_at and fired_at[0] <= 45, fired_at


def test_preference_rules_are_quiet_on_a_dpo_run_that_has_not_learnt_to_tell_the_answers_apart() -> None:
    """Per-step values of a real DPO run (tests/trlkit.py with a task the tiny model did not learn, lr 1e-2):
    accuracies around 0.5 and margins around 0, either sign. Nothing is reversed, so nothing may fire."""
    from guardian.engine.engine import Engine

    acc = [0.0, 0.625, 0.5, 0.125, 0.625, 0.625, 0.5, 0.375, 0.375, 0.375, 0.75, 0.375, 0.375, 0.375, 0.25, 0.5, 0.375,
           0.5, 0.375, 0.375, 0.75, 0.625, 0.5, 0.25, 0.5, 0.375, 0.875, 0.25, 0.5, 0.375, 0.625, 0.625, 0.5, 0.625,
           0.875, 0.375, 0.75, 0.75, 0.625, 0.25]
    margins = [0.0, 0.025, 0.003, -0.272, 0.019, 0.061, -0.001, -0.102, -0.068, -0.02, 0.08, -0.083, -0.097, -0.088,
               -0.142, -0.002, -0.012, -0.002, -0.049, -0.067, 0.136, 0.077, -0.002, -0.196, 0.002, -0.078, 0.183,
               -0.12, 0.009, -0.053, 0.014, 0.001, 0.002, 0.008, 0.047, -0.031, 0.088, 0.123, 0.08, -0.199]
    chosen = [0.0, 0.009, -0.077, -0.221, -0.042, 0.019, 0.02, -0.027, -0.009, 0.005, 0.024, -0.112, -0.148, -0.14,
              -0.144, -0.037, -0.008, 0.029, 0.03, 0.029, 0.133, 0.107, 0.078, -0.019, 0.074, 0.025, 0.137, -0.017,
              0.035, -0.004, 0.001, -0.016, -0.025, -0.024, -0.014, -0.081, -0.036, -0.045, -0.098, -0.274]
    engine = Engine(shipped_rules_for("dpo"))
    for step, values in enumerate(zip(acc, margins, chosen), 1):
        observed = dict(zip(("rewards/accuracies", "rewards/margins", "rewards/chosen"), values))
        assert engine.observe(step, observed) == [], step


def test_reversal_fires_on_a_flip_from_a_clear_level_and_survives_a_restart() -> None:
    from guardian.detectors import ReversalDetector

    rising = [0.1 * i + (0.05 if i % 2 else -0.05) for i in range(1, 25)]  # margins growing, with noise
    detector = ReversalDetector("rewards/margins")
    assert [detector.update(i, {"rewards/margins": v}) for i, v in enumerate(rising, 1)] == [None] * 24
    restored = ReversalDetector("rewards/margins")
    restored.load_state_dict(detector.state_dict())
    for d in (detector, restored):
        finding = d.update(25, {"rewards/margins": -1.5})
        assert finding is not None and finding.value == -1.5 and finding.evidence["level"] > 1.5
        assert d.update(26, {"rewards/margins": -1.2}) is not None  # the flipped value did not enter the level
        assert d.update(27, {"rewards/margins": 2.6}) is None
