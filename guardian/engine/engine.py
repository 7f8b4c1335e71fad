"""Observations in, decisions out: detectors, cooldowns, escalation, then the incident policy.

Pure Python: no torch and no I/O, so the same engine runs embedded in a training process, in a daemon, or
over a saved log in replay.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgspec

from guardian import events
from guardian.detectors.base import Detector, Finding
from guardian.engine.actions import ActionKind, ActionSpec
from guardian.engine.policy import IncidentPolicy
from guardian.engine.rules import Rule, RuleSet
from guardian.events import ActionRequest, DecisionEvent, Severity

STATE_VERSION = 2
TRAIN_KEYS = frozenset({"loss", "grad_norm"})
# Measured by the training process on request (see `Engine.observe`'s probe): the loss of a fixed reference
# batch with the current weights, and the best such loss among the good states it can roll back to.
PROBE_KEYS = frozenset({"probe_loss", "probe_loss_ref"})
MEMORIES_KEPT = 8  # the baselines remembered for rewinding (more than the snapshots a run usually keeps)
MAX_KEY_SETS = 64  # sets of metric keys whose watching rules are remembered


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
    incident: int | None = None

    @property
    def message(self) -> str:
        actions = ", ".join(str(a) for a in self.actions) or "none"
        level = f" (escalation {self.level})" if self.level else ""
        incident = f" (incident {self.incident})" if self.incident is not None else ""
        text = (f"step {self.step} {self.rule} [{self.severity.value}]: {self.finding.message} -> "
                f"{actions}{level}{incident}")
        if self.note:
            text += f"; {self.note}"
        if self.diagnosis:
            text += f". Likely cause: {self.diagnosis}"
        if self.fix:
            text += f". Usual fix: {self.fix}"
        return text

    def to_event(self, source: str | None = None, *, late: bool = False) -> DecisionEvent:
        """The decision as the event that records it (and travels in the daemon's replies)."""
        f = self.finding
        return DecisionEvent(
            step=self.step, rule=self.rule, severity=self.severity, source=source, late=late,
            actions=[ActionRequest(kind=a.kind, params=dict(a.params)) for a in self.actions], level=self.level,
            metric=f.metric, value=float(f.value), threshold=None if f.threshold is None else float(f.threshold),
            onset_step=f.onset_step, message=f.message, evidence=dict(f.evidence), diagnosis=self.diagnosis,
            fix=self.fix, note=self.note, incident=self.incident)

    def to_dict(self) -> dict[str, Any]:
        """The decision as strict-JSON types (non-finite floats as "nan", "inf" or "-inf"), for JSON output."""
        data: dict[str, Any] = events.to_builtins(self.to_event())
        del data["kind"]
        return data


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
    """Runs a rule set over one run's observations and returns decisions.

    `clipped`: the run clips gradients (`max_grad_norm`), so rules with `actions_when_clipped` use those."""

    def __init__(self, ruleset: RuleSet, *, clipped: bool = False) -> None:
        self.ruleset = ruleset
        self.clipped = clipped
        self.last_step: int | None = None
        self._rules = [_RuleRuntime(rule, rule.build_detector()) for rule in ruleset.rules]
        self._by_keys: dict[tuple[str, ...], list[_RuleRuntime]] = {}
        self.policy = IncidentPolicy(ruleset.policy)
        self._memories: dict[int, dict[str, Any]] = {}  # step -> baselines, for `rewind`

    @property
    def rollbacks_used(self) -> int:
        """Incidents that rolled back so far (what the rollback budget counts)."""
        return self.policy.rollback_incidents

    def observe(self, step: int, metrics: Mapping[str, float],
                probe: Callable[[int], Mapping[str, float]] | None = None) -> list[Decision]:
        """Feed one observation (train or eval metrics at a step); return the decisions it triggers.

        `probe`, from a training process that can measure the loss of a reference batch with the current
        weights, is called with the findings' onset step when a rule asks for more than an alert at this step
        (and the observation has no probe values yet); what it returns joins the observation, and the rules
        that judge the weights read it."""
        self.last_step = step
        found = self._run_rules(step, metrics)
        if probe is not None and PROBE_KEYS.isdisjoint(metrics) and any(not _alert_only(r.rule) for r, _ in found):
            onset = min(finding.onset_step for _, finding in found)
            extra = {k: v for k, v in probe(onset).items() if k in PROBE_KEYS}
            if extra:
                found += self._run_rules(step, extra, only_new=metrics)
                order = {id(rt): i for i, rt in enumerate(self._rules)}
                found.sort(key=lambda pair: order[id(pair[0])])
                metrics = {**metrics, **extra}
        decisions = [self._decide(runtime, step, finding) for runtime, finding in found]
        if any(key.startswith("eval_") for key in metrics) and TRAIN_KEYS.isdisjoint(metrics):
            return self.policy.review_eval(step, decisions)
        if TRAIN_KEYS.isdisjoint(metrics):
            return decisions  # neither a train step nor an evaluation (e.g. the daemon's staleness check)
        return self.policy.review(step, decisions, metrics)

    def _watching(self, metrics: Mapping[str, float]) -> list[_RuleRuntime]:
        """The rules that watch any of these metrics, in rule order; remembered per set of keys (a sender sends
        the same few keys at every step)."""
        keys = tuple(metrics)
        rules = self._by_keys.get(keys)
        if rules is None:
            rules = [rt for rt in self._rules if not rt.watches.isdisjoint(keys)]
            if len(self._by_keys) < MAX_KEY_SETS:
                self._by_keys[keys] = rules
        return rules

    def _run_rules(self, step: int, metrics: Mapping[str, float],
                   only_new: Mapping[str, float] | None = None) -> list[tuple[_RuleRuntime, Finding]]:
        found = []
        for runtime in self._watching(metrics):
            if only_new is not None and not runtime.watches.isdisjoint(only_new):
                continue
            finding = runtime.detector.update(step, metrics)  # a detector reads only the metrics it watches
            if finding is None:
                continue
            if runtime.in_cooldown(step):
                runtime.suppressed_total += 1
                runtime.last_suppressed = step
                continue
            found.append((runtime, finding))
        return found

    def _decide(self, runtime: _RuleRuntime, step: int, finding: Finding) -> Decision:
        rule = runtime.rule
        runtime.record(step)
        actions, level = rule.actions, 0
        if self.clipped and rule.actions_when_clipped:
            actions = rule.actions_when_clipped
        for i, esc in enumerate(rule.escalation, start=1):
            if runtime.firings_within(step, esc.within_steps) >= esc.after_firings:
                actions, level = esc.actions, i
        return Decision(step, rule.name, rule.severity, actions, finding, level, rule.diagnosis, rule.fix)

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
        self._by_keys = {}
        self.policy.settings = ruleset.policy
        return fresh

    def rule_status(self) -> dict[str, RuleStatus]:
        return {rt.rule.name: rt.status(self.last_step) for rt in self._rules}

    def rule_counts(self) -> dict[str, tuple[int, int]]:
        """Per rule: (firings acted on, firings suppressed by cooldown)."""
        return {rt.rule.name: (rt.fired_total, rt.suppressed_total) for rt in self._rules}

    def remember(self, step: int) -> None:
        """Keep the detectors' baselines as of `step`, when the training side snapshots the weights there."""
        self._memories[step] = {rt.rule.name: rt.detector.state_dict() for rt in self._rules
                                if getattr(rt.detector, "follows_weights", False)}
        for old in sorted(self._memories)[:-MEMORIES_KEPT]:
            del self._memories[old]

    def rewind(self, step: int, saved: Mapping[str, Any] | None = None) -> bool:
        """After a rollback to `step`: detectors whose baseline follows the weights (a loss level, a gradient
        norm level) go back to what they had seen by then, so the restored weights' losses are judged against
        the losses those weights made, not against the later ones. `saved` is a checkpoint's engine state.
        Without a memory of that step they start afresh (and warm up again). The policy is not rewound.
        Returns whether the baselines came from a memory."""
        memory = self._memories.get(step)
        if memory is None and saved is not None:
            memory = {name: rule["detector"] for name, rule in saved.get("rules", {}).items()}
        for rt in self._rules:
            if not getattr(rt.detector, "follows_weights", False):
                continue
            fresh = rt.rule.build_detector()
            if memory is not None and rt.rule.name in memory:
                fresh.load_state_dict(memory[rt.rule.name])
            rt.detector = fresh
        for later in [s for s in self._memories if s > step]:
            del self._memories[later]
        return memory is not None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this engine is, as JSON types."""
        return {
            "version": STATE_VERSION,
            "clipped": self.clipped,
            "policy": self.policy.state_dict(),
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
        """Restore state saved by `state_dict`; rules not in the state start fresh.

        Version 1 states (before incidents) restore the rules; the policy starts fresh with the rollbacks
        already used counted against its budget."""
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"engine state version {version!r} is not {STATE_VERSION}; start fresh")
        self.policy = IncidentPolicy(self.ruleset.policy)
        self.clipped = bool(state.get("clipped", self.clipped))
        if version == 1:
            self.policy.rollback_incidents = int(state.get("rollbacks_used", 0))
        else:
            self.policy.load_state_dict(state["policy"])
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


def decision_from_event(event: DecisionEvent) -> Decision:
    """Rebuild a Decision from the event that recorded it."""
    finding = Finding(metric=event.metric, value=event.value, threshold=event.threshold,
                      onset_step=event.onset_step, message=event.message, evidence=dict(event.evidence))
    actions = tuple(ActionSpec(a.kind, dict(a.params)) for a in event.actions)
    return Decision(event.step, event.rule, event.severity, actions, finding, event.level, event.diagnosis,
                    event.fix, event.note, event.incident)


def decision_from_dict(data: Mapping[str, Any]) -> Decision:
    """Rebuild a Decision from `Decision.to_dict()` (a decision in a JSON reply)."""
    return decision_from_event(msgspec.convert(data, DecisionEvent, strict=False))


def _alert_only(rule: Rule) -> bool:
    """The rule asks for nothing but alerts, in any of its escalation levels."""
    actions = [*rule.actions, *rule.actions_when_clipped, *(a for e in rule.escalation for a in e.actions)]
    return all(a.kind is ActionKind.ALERT for a in actions)
