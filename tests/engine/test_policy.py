"""The incident policy as tables: a sequence of observations -> the actions carried out and the incidents.

Each table row also says what doing nothing would have meant, so a row reads as the counterfactual too:
skipping a stretch of bad batches leaves the weights where they were; a rollback is only worth repeating
after updates were made; a stop leaves good weights instead of the damaged ones.
"""

from __future__ import annotations

import pytest

from guardian.engine.actions import Restore, merge
from guardian.engine.engine import Decision, Engine
from guardian.engine.policy import IncidentPolicy, PolicySettings
from guardian.rulefile.reader import parse_rules

RULES = """\
version: 1
policy: {{rollback_budget: {budget}, incident_quiet_steps: 10, repeat_window_steps: {window}}}
rules:
  - name: spike            # a bad batch: skip it
    metric: loss
    detector: {{kind: threshold, above: 10.0}}
    actions: [skip_update]
  - name: damaged          # the reference batch got much worse: the weights are damaged
    metric: probe_loss
    detector: {{kind: ratio, reference_metric: probe_loss_ref, above: 1.5}}
    actions: [rollback]
  - name: rate             # asks for an LR cut every time it fires
    metric: grad_norm
    detector: {{kind: threshold, above: 10.0}}
    actions: [{{reduce_lr: {{factor: 0.5}}}}]
    actions_when_clipped: [alert]
  - name: halt
    metric: eval_loss
    detector: {{kind: threshold, above: 10.0}}
    actions: [stop]
  - name: overfit
    metric: eval_loss
    detector: {{kind: threshold, below: 0.1}}
    actions: [{{stop: {{restore_best: true}}}}]
  - name: zero
    metric: loss
    detector: {{kind: threshold, below: 1.0e-12}}
    actions: [alert]
"""

STEPS = {
    ".": {"loss": 1.0},                                              # a healthy step
    "S": {"loss": 50.0, "probe_loss": 1.0, "probe_loss_ref": 1.0},   # a bad batch; the weights are fine
    "D": {"loss": 50.0, "probe_loss": 9.0, "probe_loss_ref": 1.0},   # the weights are damaged
    "G": {"loss": 1.0, "grad_norm": 50.0},                           # a gradient spike with a normal loss
    "Z": {"loss": 0.0},                                              # an alert-only rule fires
    "E": {"eval_loss": 50.0},                                        # an evaluation that asks for a stop
    "O": {"eval_loss": 0.01},                                        # one that asks for the best weights
}


def engine(budget: int = 3, window: int = 200, clipped: bool = False) -> Engine:
    return Engine(parse_rules(RULES.format(budget=budget, window=window), "policy.yaml"), clipped=clipped)


def run(stream: str, eng: Engine | None = None) -> tuple[list[str], list[list[Decision]]]:
    """Feed one observation per character; return what each step's plan does: s skip, R rollback (which also
    skips), L an LR cut, X a stop (which also skips), a alerts only, - nothing."""
    eng = eng or engine()
    codes, per_step = [], []
    for step, char in enumerate(stream, start=1):
        decisions = eng.observe(step, STEPS[char])
        per_step.append(decisions)
        plan = merge(a for d in decisions for a in d.actions)
        code = ("s" if plan.skip_update and not (plan.rollback or plan.stop) else "") + ("R" if plan.rollback else "") \
            + ("L" if plan.lr_factor < 1 else "") + ("X" if plan.stop else "")
        codes.append(code or ("a" if decisions else "-"))
    return codes, per_step


def compact(codes: list[str]) -> str:
    return " ".join(codes)


TABLE = [
    # A long stretch of bad batches costs skipped updates, never the run: the weights never moved, so there is
    # nothing to roll back (unguarded, all 40 would have been applied).
    ("bad data stretch", "....." + "S" * 40 + "." * 12, ["-"] * 5 + ["s"] * 40 + ["-"] * 12, [1]),
    # Damage is rolled back once; while every update since is skipped the weights are the restored ones, so
    # a second rollback to the same state is a skip.
    ("no second rollback without updates", "..DDD..", ["-", "-", "R", "s", "s", "-", "-"], [1]),
    # The damage came back after updates were made: the rate is to blame, once; after that, stop.
    ("damage after the rollback held", ".D...D...D", ["-", "R", "-", "-", "-", "RL", "-", "-", "-", "X"], [1]),
    # The LR is cut at most once per incident however often a rule asks.
    ("one LR cut per incident", ".GGG.", ["-", "L", "a", "a", "-"], [1]),
    # Alert-only firings belong to the open incident, and open none of their own.
    ("alerts join the open incident", "Z.S.Z.", ["a", "-", "s", "-", "a", "-"], [1]),
]


@pytest.mark.parametrize(("name", "stream", "expected", "incidents"), TABLE, ids=[row[0] for row in TABLE])
def test_policy_table(name: str, stream: str, expected: list[str], incidents: list[int]) -> None:
    codes, per_step = run(stream)
    assert compact(codes) == compact(expected)
    seen = sorted({d.incident for ds in per_step for d in ds if d.incident is not None})
    assert seen == incidents


def test_an_incident_closes_after_the_quiet_period_and_a_new_one_opens() -> None:
    eng = engine()
    codes, per_step = run("S" + "." * 10 + "S" + "." * 3, eng)
    assert [d.incident for ds in per_step for d in ds] == [1, 2]
    first = eng.policy.incidents[0]
    assert (first.opened_step, first.closed_step, first.skips, first.rollbacks) == (1, 11, 1, [])
    assert first.outcome.startswith("recovered")


def test_the_rollback_budget_counts_incidents_not_firings() -> None:
    quiet = "." * 12
    # Budget 2: each incident rolls back once however often its damage is seen; the third incident stops.
    codes, per_step = run(("DD" + quiet) * 3, engine(budget=2, window=0))
    acted = [c for c in codes if c != "-"]
    assert acted == ["R", "s", "R", "s", "X", "X"]
    notes = [d.note for ds in per_step for d in ds if d.note]
    assert any("rollback budget of 2 incidents used up" in n for n in notes)


def test_a_second_rollback_incident_soon_after_the_last_cuts_the_rate() -> None:
    quiet = "." * 12
    soon, _ = run("D" + quiet + "D", engine(window=200))
    late, _ = run("D" + quiet + "D", engine(window=5))
    assert [c for c in soon if c != "-"] == ["R", "RL"]
    assert [c for c in late if c != "-"] == ["R", "R"]


def test_gradient_actions_become_alerts_when_the_run_clips_gradients() -> None:
    clipped, _ = run(".G.", engine(clipped=True))
    assert clipped == ["-", "a", "-"]


@pytest.mark.parametrize(("stream", "restore"), [
    ("E", Restore.LAST_GOOD),      # a rule fired: go back to before it
    ("O", Restore.BEST_EVAL),      # the rule asks for the best evaluation's weights
    ("..D..E", Restore.LAST_GOOD),
])
def test_every_stop_leaves_good_weights(stream: str, restore: Restore) -> None:
    _, per_step = run(stream)
    plan = merge(a for d in per_step[-1] for a in d.actions)
    assert plan.stop and plan.skip_update
    assert plan.restore is restore


def test_decisions_say_their_incident_and_why() -> None:
    _, per_step = run(".D...D")
    rollback = next(d for d in per_step[1] if d.rule == "damaged")
    again = per_step[5]
    assert "(incident 1)" in rollback.message and "rollback incident 1 of 3" in rollback.note
    assert any("the damage came back 3 updates after the rollback at step 2" in d.note for d in again)


def test_the_policy_state_survives_a_restart() -> None:
    stream = ".D...D" + "." * 4
    straight = engine()
    run(stream + "D", straight)
    first = engine()
    run(stream, first)
    resumed = engine()
    resumed.load_state_dict(first.state_dict())
    codes, _ = run("D", resumed)
    # The resumed engine knows the incident already rolled back and cut the rate: the third damage stops.
    assert codes == ["X"]
    assert resumed.policy.state_dict()["incident_count"] == straight.policy.state_dict()["incident_count"]


def test_settings_come_from_the_rule_file() -> None:
    ruleset = parse_rules(RULES.format(budget=5, window=7), "policy.yaml")
    assert ruleset.policy == PolicySettings(rollback_budget=5, incident_quiet_steps=10, lr_cut_factor=0.5,
                                            repeat_window_steps=7)
    assert IncidentPolicy(ruleset.policy).settings.rollback_budget == 5
