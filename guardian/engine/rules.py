"""The rule model the engine runs: validated rules (what to watch, how to judge, what to do) and a rule set.

Reading rule files (YAML, problems, did-you-mean) is `guardian.rulefile.reader`'s job; nothing here knows YAML.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from guardian.detectors import DETECTORS
from guardian.detectors.base import Detector
from guardian.engine.actions import ActionSpec
from guardian.engine.policy import PolicySettings
from guardian.errors import Problem
from guardian.events import Severity


@dataclass(frozen=True)
class Escalation:
    """Stronger actions once a rule has fired `after_firings` times within `within_steps` steps."""

    after_firings: int
    within_steps: int
    actions: tuple[ActionSpec, ...]


@dataclass(frozen=True)
class Rule:
    """One validated rule: what to watch, how to judge it, and what to do when it fires."""

    name: str
    detector: str
    params: Mapping[str, Any]
    watches: tuple[str, ...]
    severity: Severity
    actions: tuple[ActionSpec, ...]
    cooldown_steps: int = 0
    escalation: tuple[Escalation, ...] = ()
    description: str = ""
    diagnosis: str = ""
    fix: str = ""
    actions_when_clipped: tuple[ActionSpec, ...] = ()  # instead of `actions` when the run clips gradients

    def build_detector(self) -> Detector:
        """A fresh detector for this rule, with its parameters."""
        return DETECTORS[self.detector](**self.params)

    def to_dict(self) -> dict[str, Any]:
        """The rule as plain JSON types, in the shape of a rule file entry (`guardian rules show --json`)."""
        return {
            "name": self.name, "description": self.description, "watches": list(self.watches),
            "detector": {"kind": self.detector, **self.params}, "severity": self.severity.value,
            "actions": [a.to_dict() for a in self.actions], "cooldown_steps": self.cooldown_steps,
            "escalation": [{"after_firings": e.after_firings, "within_steps": e.within_steps,
                            "actions": [a.to_dict() for a in e.actions]} for e in self.escalation],
            "actions_when_clipped": [a.to_dict() for a in self.actions_when_clipped],
            "diagnosis": self.diagnosis, "fix": self.fix,
        }


@dataclass(frozen=True)
class RuleSet:
    """All rules of a rule file plus the run-wide policy."""

    rules: tuple[Rule, ...]
    policy: PolicySettings = PolicySettings()
    source: str = "<memory>"
    # Not errors: metric names no known source logs (a typo, or a custom metric); `guardian rules check` shows them.
    warnings: tuple[Problem, ...] = ()

    @property
    def rollback_budget(self) -> int:
        """How many rollbacks the policy allows a run."""
        return self.policy.rollback_budget

    def by_name(self, name: str) -> Rule:
        """The rule called `name` (StopIteration when there is none)."""
        return next(rule for rule in self.rules if rule.name == name)
