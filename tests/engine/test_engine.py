"""The engine's policy, driven with plain dicts: cooldowns, escalation, the rollback budget, status and state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from guardian.detectors import Finding
from guardian.engine.actions import ActionKind, ActionSpec, Plan, Restore, merge
from guardian.engine.engine import Decision, Engine, RuleStatus
from guardian.engine.rules import RuleSet
from guardian.events import Severity
from guardian.rulefile.reader import parse_rules

NAN, INF = float("nan"), float("inf")
HIGH, LOW = 50.0, 1.0  # grad_norm above and below the limit of 10 used by the rules below


def rules(body: str, *, budget: int | None = None) -> RuleSet:
    """A rule file from its `rules:` entries (indented by two spaces), with an optional rollback budget (and
    then no LR cut for repeated rollback incidents, so escalation levels read plainly)."""
    policy = "" if budget is None else f"policy: {{rollback_budget: {budget}, repeat_window_steps: 0}}\n"
    return parse_rules(f"version: 1\n{policy}rules:\n{body}", "test.yaml")


def grad_rule(*, name: str = "grad", extra: str = "", actions: str = "[skip_update]") -> str:
    """A rule that fires whenever grad_norm is above 10."""
    return (
        f"  - name: {name}\n    metric: grad_norm\n    detector: {{kind: threshold, above: 10.0}}\n"
        f"    actions: {actions}\n{extra}"
    )


def pattern(text: str) -> list[tuple[int, dict[str, float]]]:
    """'H' is a step with grad_norm above the limit, '.' one below it; one step per character from 0."""
    return [(step, {"grad_norm": HIGH if c == "H" else LOW}) for step, c in enumerate(text)]


def drive(engine: Engine, stream: list[tuple[int, dict[str, float]]]) -> list[Decision]:
    return [d for step, metrics in stream for d in engine.observe(step, metrics)]


# --- cooldown ------------------------------------------------------------------------------------------------

COOLDOWNS = [
    # cooldown_steps, observations ('H' fires) -> steps acted on, (acted, suppressed)
    (3, "HHHHHHHHHHHH", [0, 4, 8], (3, 9)),
    (0, "HHHHH", [0, 1, 2, 3, 4], (5, 0)),
    (1, "HHHHH", [0, 2, 4], (3, 2)),
    (3, "H..HH", [0, 4], (2, 1)),          # step 3 is within 3 of step 0; step 4 is not
    (2, "H.H.H", [0, 4], (2, 1)),          # a suppressed firing does not restart the cooldown
    (2, "H..H..H", [0, 3, 6], (3, 0)),
    (5, ".....", [], (0, 0)),
]


@pytest.mark.parametrize(("cooldown", "observed", "acted", "counts"), COOLDOWNS)
def test_cooldown(cooldown: int, observed: str, acted: list[int], counts: tuple[int, int]) -> None:
    engine = Engine(rules(grad_rule(extra=f"    cooldown_steps: {cooldown}\n")))
    decisions = drive(engine, pattern(observed))
    assert [d.step for d in decisions] == acted
    assert engine.rule_counts() == {"grad": counts}


def test_a_rule_only_sees_the_metrics_it_watches() -> None:
    engine = Engine(rules(grad_rule()))
    assert engine.observe(0, {"loss": 1e9, "eval_loss": NAN}) == []
    assert engine.observe(1, {}) == []
    assert [d.rule for d in engine.observe(2, {"grad_norm": HIGH, "loss": 1.0})] == ["grad"]


# --- escalation ----------------------------------------------------------------------------------------------

ESCALATION = """\
    escalation:
      - after_firings: 3
        within_steps: 5
        actions: [rollback]
      - after_firings: 4
        within_steps: 50
        actions: [{stop: {restore_best: true}}]
"""


@pytest.mark.parametrize(
    ("fire_at", "levels"),
    [
        ([0, 1, 2, 3], [0, 0, 1, 2]),                  # 3 in 5 steps, then 4 in 50: the later entry wins
        ([0, 10, 20, 30], [0, 0, 0, 2]),               # never 3 in 5, but 4 in 50
        ([0, 1, 2, 60, 61, 62], [0, 0, 1, 0, 0, 1]),   # old firings age out of both windows
        ([0, 2, 4], [0, 0, 1]),                        # within 5 steps: step 4 - 0 < 5
        ([0, 3, 5], [0, 0, 0]),                        # 5 - 0 is not < 5: step 0 is out of the window
        ([0, 5, 9, 10], [0, 0, 0, 2]),
    ],
)
def test_escalation_level_by_firings_within_the_window(fire_at: list[int], levels: list[int]) -> None:
    engine = Engine(rules(grad_rule(extra=ESCALATION), budget=10))
    decisions = drive(engine, [(step, {"grad_norm": HIGH}) for step in fire_at])
    assert [d.level for d in decisions] == levels
    by_level = {0: (ActionKind.SKIP_UPDATE,), 1: (ActionKind.ROLLBACK,), 2: (ActionKind.STOP,)}
    assert [tuple(a.kind for a in d.actions) for d in decisions] == [by_level[level] for level in levels]


def test_firings_suppressed_by_cooldown_do_not_count_towards_escalation() -> None:
    engine = Engine(rules(grad_rule(extra="    cooldown_steps: 1\n" + ESCALATION), budget=10))
    decisions = drive(engine, pattern("HHHHHHH"))
    assert [(d.step, d.level) for d in decisions] == [(0, 0), (2, 0), (4, 1), (6, 2)]


# --- the rollback budget and the incident policy: see test_policy.py ----------------------------------------

# --- what a decision says ------------------------------------------------------------------------------------

EXPLAINED = """\
  - name: grad_explosion
    metric: grad_norm
    detector: {kind: threshold, above: 10.0}
    severity: critical
    actions: [skip_update, {reduce_lr: {factor: 0.5}}]
    diagnosis: learning rate too high
    fix: set max_grad_norm to 1.0
"""


def test_decision_message_states_metric_value_threshold_step_actions_and_advice() -> None:
    (decision,) = Engine(rules(EXPLAINED)).observe(7, {"grad_norm": 123.0})
    assert decision.message == (
        "step 7 grad_explosion [critical]: grad_norm 123 at step 7 is above the limit 10 "
        "-> skip_update, reduce_lr(factor=0.5) (incident 1). Likely cause: learning rate too high. "
        "Usual fix: set max_grad_norm to 1.0"
    )
    assert (decision.finding.metric, decision.finding.value, decision.finding.threshold) == ("grad_norm", 123.0, 10.0)


def test_decision_message_shows_the_escalation_level_and_note() -> None:
    engine = Engine(rules(grad_rule(extra=ESCALATION), budget=0))
    decisions = drive(engine, pattern("HHH"))
    assert decisions[-1].message == (
        "step 2 grad [warning]: grad_norm 50 at step 2 is above the limit 10 for 3 consecutive observations "
        "since step 0 -> stop(restore=last_good) (escalation 1) (incident 1); "
        "rollback budget of 0 incidents used up: stopping with the last good weights in place"
    )


def test_decision_to_dict_is_strict_json_for_a_nan_loss() -> None:
    body = "  - name: nan\n    metric: loss\n    detector: {kind: non_finite}\n    actions: [skip_update]\n"
    (decision,) = Engine(rules(body)).observe(3, {"loss": NAN})
    data = json.loads(json.dumps(decision.to_dict(), allow_nan=False))
    assert data["value"] == "nan"
    assert (data["step"], data["rule"], data["metric"], data["threshold"]) == (3, "nan", "loss", None)
    assert data["actions"] == [{"kind": "skip_update", "params": {}}]


def test_decision_to_dict_converts_non_finite_floats_anywhere() -> None:
    evidence = {
        "nan": NAN, "inf": INF, "minus_inf": -INF, "nested": {"list": [1.0, NAN, (INF, 2)]},
        "np_float": np.float64("nan"), "np_float32": np.float32(1.5), "np_int": np.int64(4), "flag": True,
        "none": None, "text": "x",
    }
    finding = Finding("loss", INF, -INF, 2, "loss is inf", evidence)
    decision = Decision(5, "r", Severity.INFO, (ActionSpec(ActionKind.ALERT),), finding)
    data = decision.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert (data["value"], data["threshold"]) == ("inf", "-inf")
    assert data["evidence"] == {
        "nan": "nan", "inf": "inf", "minus_inf": "-inf", "nested": {"list": [1.0, "nan", ["inf", 2]]},
        "np_float": "nan", "np_float32": 1.5, "np_int": 4, "flag": True, "none": None, "text": "x",
    }
    assert type(data["evidence"]["np_int"]) is int
    assert math.isnan(finding.evidence["nan"])  # the decision itself is left alone


# --- rule status ---------------------------------------------------------------------------------------------

STATUS_RULE = """\
  - name: grad
    metric: grad_norm
    detector: {kind: threshold, above: 10.0, warmup_steps: 2}
    actions: [skip_update]
    cooldown_steps: 2
"""
W, OK, F, C = RuleStatus.WARMING_UP, RuleStatus.OK, RuleStatus.FIRING, RuleStatus.COOLING_DOWN


@pytest.mark.parametrize(
    ("observed", "statuses"),
    [
        ("...H...H", [W, W, OK, F, C, C, OK, F]),
        ("HH.H.H..", [W, W, OK, F, C, C, OK, OK]),   # a firing suppressed in the cooldown stays cooling_down
        ("..HHHH", [W, W, F, C, C, F]),
    ],
)
def test_rule_status_transitions(observed: str, statuses: list[RuleStatus]) -> None:
    engine = Engine(rules(STATUS_RULE))
    assert engine.rule_status() == {"grad": W}
    seen = []
    for step, metrics in pattern(observed):
        engine.observe(step, metrics)
        seen.append(engine.rule_status()["grad"])
    assert seen == statuses


# --- merging actions into a plan -----------------------------------------------------------------------------

def spec(kind: str, **params: object) -> ActionSpec:
    return ActionSpec(ActionKind(kind), params)


MERGES = [
    ([], Plan()),
    ([spec("alert")], Plan()),
    ([spec("skip_update")], Plan(skip_update=True)),
    ([spec("rollback")], Plan(skip_update=True, rollback=True)),
    ([spec("reduce_lr")], Plan(lr_factor=0.5)),
    ([spec("reduce_lr", factor=0.5), spec("reduce_lr", factor=0.1), spec("reduce_lr", factor=0.8)], Plan(lr_factor=0.1)),
    ([spec("reduce_lr", factor=0.5, min_lr=1e-6), spec("reduce_lr", factor=0.9, min_lr=1e-5)],
     Plan(lr_factor=0.5, min_lr=1e-5)),
    ([spec("restore_lr")], Plan(restore_lr=True)),
    ([spec("stop")], Plan(skip_update=True, stop=True)),   # `auto` not resolved by a policy: the current weights
    ([spec("stop", restore="last_good")], Plan(skip_update=True, stop=True, restore=Restore.LAST_GOOD)),
    ([spec("stop"), spec("stop", restore_best=True), spec("stop", restore_best=False)],
     Plan(skip_update=True, stop=True, restore=Restore.BEST_EVAL)),
    ([spec("stop", restore="best_eval"), spec("stop", restore="last_good")],
     Plan(skip_update=True, stop=True, restore=Restore.BEST_EVAL)),
    ([spec("alert"), spec("rollback"), spec("reduce_lr", factor=0.25), spec("stop", restore_best=True)],
     Plan(skip_update=True, rollback=True, lr_factor=0.25, stop=True, restore=Restore.BEST_EVAL)),
]


@pytest.mark.parametrize(("actions", "plan"), MERGES)
def test_merge(actions: list[ActionSpec], plan: Plan) -> None:
    assert merge(actions) == plan
    assert merge(actions).empty == (plan == Plan())


def test_decisions_of_one_step_merge_into_one_plan() -> None:
    body = (
        grad_rule(name="a", actions="[skip_update, {reduce_lr: {factor: 0.5}}]")
        + grad_rule(name="b", actions="[rollback, {reduce_lr: {factor: 0.2}}]")
    )
    decisions = Engine(rules(body)).observe(0, {"grad_norm": HIGH})
    plan = merge(a for d in decisions for a in d.actions)
    assert plan == Plan(skip_update=True, rollback=True, lr_factor=0.2)


# --- state that survives a restart ---------------------------------------------------------------------------

STATEFUL = """\
  - name: nan
    metrics: [loss, grad_norm]
    detector: {kind: non_finite}
    actions: [skip_update]
    escalation:
      - after_firings: 2
        within_steps: 10
        actions: [rollback]
  - name: spike
    metric: loss
    detector: {kind: robust_zscore, window_steps: 20, warmup_steps: 5, z_threshold: 6.0}
    actions: [skip_update]
    cooldown_steps: 2
    escalation:
      - after_firings: 2
        within_steps: 30
        actions: [rollback, {reduce_lr: {factor: 0.5}}]
  - name: grad
    metric: grad_norm
    detector: {kind: threshold, above: 10.0, consecutive_steps: 2}
    actions: [alert]
    cooldown_steps: 3
  - name: overfit
    metric: eval_loss
    detector: {kind: overfitting, patience_evals: 2}
    actions: [{stop: {restore_best: true}}]
"""


def run_stream(n: int = 80) -> list[tuple[int, dict[str, float]]]:
    """Train steps with spikes, NaNs and gradient bursts; an evaluation every 10 steps that worsens late on."""
    stream: list[tuple[int, dict[str, float]]] = []
    for step in range(n):
        loss = 2.0 - 0.005 * step + 0.01 * math.sin(1.7 * step)
        if step % 13 == 12:
            loss *= 3.0
        grad = 30.0 if step % 17 in (15, 16, 0) and step else 1.0 + 0.1 * math.cos(step)
        if step in (33, 35, 61):
            loss = NAN
        stream.append((step, {"loss": loss, "grad_norm": grad}))
        if step % 10 == 9:
            stream.append((step, {"eval_loss": 1.5 - 0.1 * step / 10 if step < 40 else 1.0 + 0.05 * step / 10}))
    return stream


@pytest.mark.parametrize("split", [1, 20, 34, 45, 60, 79])
def test_state_round_trip_continues_identically(split: int) -> None:
    ruleset = rules(STATEFUL, budget=2)
    stream = run_stream()
    head, tail = [o for o in stream if o[0] < split], [o for o in stream if o[0] >= split]

    straight = Engine(ruleset)
    drive(straight, head)
    expected = [d.to_dict() for d in drive(straight, tail)]

    first = Engine(ruleset)
    drive(first, head)
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = Engine(ruleset)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == saved
    assert [d.to_dict() for d in drive(resumed, tail)] == expected
    assert resumed.state_dict() == straight.state_dict()
    assert (resumed.rule_counts(), resumed.rule_status()) == (straight.rule_counts(), straight.rule_status())


def test_the_round_trip_stream_exercises_every_policy() -> None:
    """Guard the test above: the stream must reach cooldowns, escalation and the budget."""
    engine = Engine(rules(STATEFUL, budget=2))
    decisions = drive(engine, run_stream())
    assert {d.rule for d in decisions} == {"nan", "spike", "grad", "overfit"}
    assert any(d.level for d in decisions)
    assert any("used up" in d.note or "already cut" in d.note or "skipping instead" in d.note for d in decisions)
    assert any(suppressed for _, suppressed in engine.rule_counts().values())


def test_rules_missing_from_the_state_start_fresh() -> None:
    old = Engine(rules(grad_rule(name="a", extra="    cooldown_steps: 5\n")))
    old.observe(0, {"grad_norm": HIGH})
    new = Engine(rules(grad_rule(name="a", extra="    cooldown_steps: 5\n") + grad_rule(name="b")))
    new.load_state_dict(json.loads(json.dumps(old.state_dict())))
    assert [d.rule for d in new.observe(1, {"grad_norm": HIGH})] == ["b"]
    assert new.rule_counts() == {"a": (1, 1), "b": (1, 0)}


@pytest.mark.parametrize("version", [99, None, "1"])
def test_an_unknown_state_version_is_refused(version: object) -> None:
    engine = Engine(rules(grad_rule()))
    state = engine.state_dict()
    state["version"] = version
    with pytest.raises(ValueError, match=rf"engine state version {version!r} is not 2; start fresh"):
        engine.load_state_dict(state)
