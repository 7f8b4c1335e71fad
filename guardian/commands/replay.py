"""Offline: what would these rules have done on a past run?

Sources: a Hugging Face `trainer_state.json`, a LLaMA-Factory `trainer_log.jsonl`, a run or checkpoint
directory (see `guardian.logs.training`), Guardian's own `events.jsonl`, or a run stored by the daemon.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from guardian.daemon.store import stored_run
from guardian.engine.actions import ActionKind
from guardian.engine.engine import Decision, Engine
from guardian.engine.rules import RuleSet
from guardian.events import AnyEvent, Kind, MetricsEvent
from guardian.logs.eventlog import decode_line, read_events
from guardian.logs.training import EVAL, TRAIN, LogReport, Observation, read_log_with_report

GUARDIAN_EVENTS = "guardian_events"
GUARDIAN_STORE = "guardian_store"


@dataclass(frozen=True)
class ReplayResult:
    path: str
    report: LogReport
    observations: int
    decisions: list[Decision]
    train_steps: int = 0  # training observations (steps logged)
    last_step: int | None = None

    def rules_fired(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for decision in self.decisions:
            counts[decision.rule] = counts.get(decision.rule, 0) + 1
        return counts

    @property
    def stop(self) -> Decision | None:
        """The first decision that stops the run: a guarded run would have ended there."""
        return next((d for d in self.decisions if any(a.kind is ActionKind.STOP for a in d.actions)), None)

    @property
    def until_stop(self) -> list[Decision]:
        """The decisions a guarded run would have seen: all of them, or those up to and including the stop."""
        stop = self.stop
        return self.decisions if stop is None else self.decisions[:self.decisions.index(stop) + 1]

    @property
    def after_stop(self) -> list[Decision]:
        """Decisions the rules made on steps a guarded run would never have trained."""
        return self.decisions[len(self.until_stop):]

    def summary(self) -> str:
        """One line: steps, decisions, the first decision and the stop."""
        steps = f"{self.train_steps} logged steps" + (f" (last step {self.last_step})" if self.last_step is not None
                                                      else "")
        if not self.decisions:
            return f"{steps}, 0 decisions"
        first = self.decisions[0]
        text = f"{steps}, {_count(len(self.decisions), 'decision')}; first at step {first.step} ({first.rule})"
        stop = self.stop
        if stop is None:
            return text + "; no stop"
        return text + f"; would have stopped at step {stop.step} ({stop.rule})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def replay_observations(observations: list[Observation], ruleset: RuleSet) -> list[Decision]:
    """Run the rules over observations in order; return every decision they would have made."""
    return replay_engine(observations, ruleset)[0]


def replay_engine(observations: list[Observation], ruleset: RuleSet) -> tuple[list[Decision], Engine]:
    """Like `replay_observations`, with the engine afterwards (its policy holds the incidents)."""
    engine = Engine(ruleset)
    decisions: list[Decision] = []
    for obs in observations:
        decisions.extend(engine.observe(obs.step, obs.metrics))
    return decisions, engine


def replay(path: str | os.PathLike[str], ruleset: RuleSet) -> ReplayResult:
    """Read a log file or run directory and replay the rules over it."""
    events_file = _guardian_events_file(Path(path))
    if events_file is not None:
        observations = _observations(read_events(events_file))
        report = LogReport(GUARDIAN_EVENTS, str(events_file), 0, 0, 0)
    else:
        observations, report = read_log_with_report(path)
    return _result(str(path), report, observations, ruleset)


def _result(path: str, report: LogReport, observations: list[Observation], ruleset: RuleSet) -> ReplayResult:
    train = [obs.step for obs in observations if obs.phase == TRAIN]
    return ReplayResult(path, report, len(observations), replay_observations(observations, ruleset), len(train),
                        max(train, default=None))


def replay_stored(state_dir: Path, run_id: str, ruleset: RuleSet) -> ReplayResult:
    """Replay a run the daemon stored in `state_dir/guardian.db` (the daemon need not be running)."""
    with stored_run(state_dir, run_id) as store:
        stored = store.events(run_id, (Kind.METRICS,))
    observations = _observations(stored)
    db = state_dir / "guardian.db"
    report = LogReport(GUARDIAN_STORE, str(db), 0, 0, 0)
    return _result(f"{db}#{run_id}", report, observations, ruleset)


def _guardian_events_file(path: Path) -> Path | None:
    """Guardian's events.jsonl, given the file or a run directory with no Trainer log of its own."""
    if path.is_dir():
        has_trainer_log = any((path / name).exists() for name in ("trainer_log.jsonl", "trainer_state.json"))
        has_checkpoints = any(path.glob("checkpoint-*/trainer_state.json"))
        candidate = path / "guardian" / "events.jsonl"
        return candidate if candidate.is_file() and not has_trainer_log and not has_checkpoints else None
    if path.is_file() and path.suffix == ".jsonl":
        with path.open("rb") as f:
            first = f.readline()
        return path if decode_line(first) is not None else None
    return None


def _observations(run_events: Iterable[AnyEvent | None]) -> list[Observation]:
    """The observations of a run's metrics events, in order (unreadable lines, None, are passed over)."""
    return [Observation(e.step, dict(e.values), EVAL if e.phase == EVAL else TRAIN)
            for e in run_events if isinstance(e, MetricsEvent)]
