"""Observations in, decisions out: detectors, cooldowns, escalation and the rollback budget.

Pure Python: no torch and no I/O, so the same engine runs embedded in a training process, in a daemon, or
over a saved log in replay.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from guardian.actions import ActionKind, ActionSpec
from guardian.detectors.base import Detector, Finding
from guardian.ruleset import Rule, RuleSet, Severity

STATE_VERSION = 1


class RuleStatus(str, Enum):
    OK = "ok"
    WARMING_UP = "warming_up"
    FIRING = "firing"
    COOLING_DOWN = "cooling_down"


@dataclass(frozen=True)
class Decision:
    """What a rule decided at a step, and why: the single record fed to logs, UI, metrics and store."""

    step: int
    rule: str
    severity: Severity
    actions: tuple[ActionSpec, ...]
    finding: Finding
    level: int = 0
    diagnosis: str = ""
    fix: str = ""
    note: str = ""

    @property
    def message(self) -> str:
        actions = ", ".join(str(a) for a in self.actions) or "none"
        level = f" (escalation {self.level})" if self.level else ""
        text = f"step {self.step} {self.rule} [{self.severity.value}]: {self.finding.message} -> {actions}{level}"
        if self.note:
            text += f"; {self.note}"
        if self.diagnosis:
            text += f". Likely cause: {self.diagnosis}"
        if self.fix:
            text += f". Usual fix: {self.fix}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The decision as strict-JSON types: non-finite floats anywhere become "nan", "inf" or "-inf"."""
        f = self.finding
        return _json_safe({
            "step": self.step, "rule": self.rule, "severity": self.severity.value,
            "actions": [a.to_dict() for a in self.actions], "level": self.level,
            "metric": f.metric, "value": f.value, "threshold": f.threshold,
            "onset_step": f.onset_step, "message": f.message, "evidence": f.evidence,
            "diagnosis": self.diagnosis, "fix": self.fix, "note": self.note,
        })


@dataclass
class _RuleRuntime:
    rule: Rule
    detector: Detector
    firings: deque[int] = field(default_factory=deque)
    last_fired: int | None = None
    last_suppressed: int | None = None
    fired_total: int = 0
    suppressed_total: int = 0
    watches: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.watches = frozenset(self.rule.watches)

    def in_cooldown(self, step: int) -> bool:
        """Within `cooldown_steps` after the last firing; a second firing at the same step is always held back."""
        return self.last_fired is not None and 0 <= step - self.last_fired <= self.rule.cooldown_steps

    def status(self, step: int | None) -> RuleStatus:
        if step is not None and self.last_fired is not None:
            if step == self.last_fired:
                return RuleStatus.FIRING
            if step - self.last_fired <= self.rule.cooldown_steps:
                return RuleStatus.COOLING_DOWN
        return RuleStatus.WARMING_UP if self.detector.warming_up else RuleStatus.OK

    def record(self, step: int) -> int:
        """Record a firing; return how many firings fall within the longest escalation window."""
        window = max((e.within_steps for e in self.rule.escalation), default=0)
        self.firings.append(step)
        while self.firings and step - self.firings[0] >= window:
            self.firings.popleft()
        self.last_fired, self.fired_total = step, self.fired_total + 1
        return len(self.firings)

    def firings_within(self, step: int, steps: int) -> int:
        return sum(1 for s in self.firings if step - s < steps)


class Engine:
    """Runs a rule set over one run's observations and returns decisions."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.rollbacks_used = 0
        self.last_step: int | None = None
        self._rules = [_RuleRuntime(rule, rule.build_detector()) for rule in ruleset.rules]

    def observe(self, step: int, metrics: Mapping[str, float]) -> list[Decision]:
        """Feed one observation (train or eval metrics at a step); return the decisions it triggers."""
        self.last_step = step
        decisions = []
        for runtime in self._rules:
            if runtime.watches.isdisjoint(metrics):
                continue
            finding = runtime.detector.update(step, metrics)  # a detector reads only the metrics it watches
            if finding is None:
                continue
            if runtime.in_cooldown(step):
                runtime.suppressed_total += 1
                runtime.last_suppressed = step
                continue
            decisions.append(self._decide(runtime, step, finding))
        return decisions

    def _decide(self, runtime: _RuleRuntime, step: int, finding: Finding) -> Decision:
        rule = runtime.rule
        runtime.record(step)
        actions, level = rule.actions, 0
        for i, esc in enumerate(rule.escalation, start=1):
            if runtime.firings_within(step, esc.within_steps) >= esc.after_firings:
                actions, level = esc.actions, i
        actions, note = self._apply_budget(actions)
        return Decision(step, rule.name, rule.severity, actions, finding, level, rule.diagnosis, rule.fix, note)

    def _apply_budget(self, actions: tuple[ActionSpec, ...]) -> tuple[tuple[ActionSpec, ...], str]:
        if not any(a.kind is ActionKind.ROLLBACK for a in actions):
            return actions, ""
        budget = self.ruleset.rollback_budget
        if self.rollbacks_used < budget:
            self.rollbacks_used += 1
            return actions, f"rollback {self.rollbacks_used} of {budget}"
        kept = tuple(a for a in actions if a.kind is not ActionKind.ROLLBACK)
        return (*kept, ActionSpec(ActionKind.STOP)), f"rollback budget of {budget} used up, stopping instead"

    def replace_rules(self, ruleset: RuleSet) -> list[str]:
        """Switch to a new rule set; rules whose definition did not change keep their state.

        Returns the names of the rules that start fresh."""
        old = {rt.rule.name: rt for rt in self._rules}
        fresh: list[str] = []
        runtimes = []
        for rule in ruleset.rules:
            kept = old.get(rule.name)
            if kept is None or kept.rule != rule:
                kept = _RuleRuntime(rule, rule.build_detector())
                fresh.append(rule.name)
            runtimes.append(kept)
        self.ruleset, self._rules = ruleset, runtimes
        return fresh

    def rule_status(self) -> dict[str, RuleStatus]:
        return {rt.rule.name: rt.status(self.last_step) for rt in self._rules}

    def rule_counts(self) -> dict[str, tuple[int, int]]:
        """Per rule: (firings acted on, firings suppressed by cooldown)."""
        return {rt.rule.name: (rt.fired_total, rt.suppressed_total) for rt in self._rules}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this engine is, as JSON types."""
        return {
            "version": STATE_VERSION,
            "rollbacks_used": self.rollbacks_used,
            "last_step": self.last_step,
            "rules": {
                rt.rule.name: {
                    "detector": rt.detector.state_dict(), "firings": list(rt.firings),
                    "last_fired": rt.last_fired, "fired_total": rt.fired_total,
                    "suppressed_total": rt.suppressed_total,
                }
                for rt in self._rules
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state saved by `state_dict`; rules not in the state start fresh."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"engine state version {state.get('version')!r} is not {STATE_VERSION}; start fresh")
        self.rollbacks_used = int(state["rollbacks_used"])
        self.last_step = state.get("last_step")
        for rt in self._rules:
            saved = state["rules"].get(rt.rule.name)
            if saved is None:
                continue
            rt.detector.load_state_dict(saved["detector"])
            rt.firings = deque(saved["firings"])
            rt.last_fired = saved["last_fired"]
            rt.fired_total = saved["fired_total"]
            rt.suppressed_total = saved["suppressed_total"]


def _json_safe(value: Any) -> Any:
    """`value` with non-finite floats as strings, numpy scalars as Python numbers and tuples as lists."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def decision_from_dict(data: Mapping[str, Any]) -> Decision:
    """Rebuild a Decision from `Decision.to_dict()` (as it travels on the wire or sits in the store)."""
    def number(value: Any) -> float:
        return float(value) if value is not None else math.nan

    finding = Finding(
        metric=data["metric"], value=number(data["value"]),
        threshold=None if data.get("threshold") is None else number(data["threshold"]),
        onset_step=int(data["onset_step"]), message=data["message"], evidence=dict(data.get("evidence", {})),
    )
    actions = tuple(ActionSpec(ActionKind(a["kind"]), dict(a.get("params", {}))) for a in data["actions"])
    return Decision(int(data["step"]), data["rule"], Severity(data["severity"]), actions, finding,
                    int(data.get("level", 0)), data.get("diagnosis", ""), data.get("fix", ""), data.get("note", ""))
