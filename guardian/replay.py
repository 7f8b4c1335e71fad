"""Offline: what would these rules have done on a past run?"""

from __future__ import annotations

import os
from dataclasses import dataclass

from guardian.engine import Decision, Engine
from guardian.logs import LogReport, Observation, read_log_with_report
from guardian.ruleset import RuleSet


@dataclass(frozen=True)
class ReplayResult:
    path: str
    report: LogReport
    observations: int
    decisions: list[Decision]

    def rules_fired(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for decision in self.decisions:
            counts[decision.rule] = counts.get(decision.rule, 0) + 1
        return counts


def replay_observations(observations: list[Observation], ruleset: RuleSet) -> list[Decision]:
    """Run the rules over observations in order; return every decision they would have made."""
    engine = Engine(ruleset)
    decisions: list[Decision] = []
    for obs in observations:
        decisions.extend(engine.observe(obs.step, obs.metrics))
    return decisions


def replay(path: str | os.PathLike[str], ruleset: RuleSet) -> ReplayResult:
    """Read a trainer_state.json, trainer_log.jsonl or run directory and replay the rules over it."""
    observations, report = read_log_with_report(path)
    return ReplayResult(str(path), report, len(observations), replay_observations(observations, ruleset))
