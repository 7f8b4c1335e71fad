"""The record a report shows: one run's curves, decisions, actions and checkpoints, whatever its source.

Three sources, one record:

* an embedded run: the run's output directory (or its `guardian/events.jsonl`), with the decisions Guardian
  made and the actions it took;
* a run stored by the daemon (`guardian.db` in its state directory): the same events, plus the daemon's
  decisions;
* any other training log (`trainer_state.json`, `trainer_log.jsonl`, a run directory): the curves, and what
  the rules *would* have done (replay; no action was taken).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardian.daemon.store import stored_run
from guardian.engine.engine import Decision, decision_from_event
from guardian.engine.rules import RuleSet
from guardian.errors import LogFormatError
from guardian.events import (
    ActionEvent,
    AnyEvent,
    CheckpointEvent,
    DecisionEvent,
    EndEvent,
    LrChange,
    MetricsEvent,
    StartEvent,
)
from guardian.logs.badsample import BAD_SAMPLES_FILE, BadSample, read_bad_samples
from guardian.logs.eventlog import decode_line, read_events
from guardian.logs.ondisk import DiskState, read_disk
from guardian.logs.training import EVAL, TRAIN, Observation, read_log

EMBEDDED = "embedded"
STORED = "stored"
REPLAYED = "replayed"


@dataclass(frozen=True)
class Series:
    """One metric over steps (NaN and inf kept)."""

    steps: list[int]
    values: list[float]


@dataclass
class RunRecord:
    """Everything a report shows about one run, whatever its source."""

    name: str
    mode: str  # EMBEDDED, STORED or REPLAYED
    source: str
    train: dict[str, Series]
    eval: dict[str, Series]
    decisions: list[Decision]
    actions: list[ActionEvent] = field(default_factory=list)
    lr_scale: Series = field(default_factory=lambda: Series([], []))
    checkpoints: list[CheckpointEvent] = field(default_factory=list)
    start_time: float | None = None
    notes: list[str] = field(default_factory=list)
    rules: str = ""  # the rule file a replay used
    incidents: list[dict[str, Any]] = field(default_factory=list)  # the policy's, as `Incident.to_dict()`
    bad_samples: list[BadSample] = field(default_factory=list)  # the samples of the updates Guardian skipped
    bad_samples_file: str = ""
    disk: DiskState | None = None  # the run's output directory as it is now, where the source names one

    @property
    def replayed(self) -> bool:
        return self.mode == REPLAYED

    @property
    def last_step(self) -> int:
        steps = [s for series in (*self.train.values(), *self.eval.values()) for s in series.steps]
        steps += [d.step for d in self.decisions] + [a.step for a in self.actions]
        return max(steps, default=0)


def load_run(target: str | os.PathLike[str] | None, *, run_id: str | None = None, state_dir: Path | None = None,
             ruleset: RuleSet) -> RunRecord:
    """The run named by a path (embedded run or training log) or by a daemon run id."""
    if run_id is None and target is not None and not Path(target).exists() and state_dir is not None \
            and (state_dir / "guardian.db").is_file():  # `guardian report RUN_ID`
        try:
            return load_stored(state_dir, str(target))
        except LogFormatError as exc:
            raise LogFormatError(f"{target}: no such file or directory, and {exc}") from None
    if run_id is not None:
        if state_dir is None:
            raise LogFormatError(f"run '{run_id}': give the daemon's --state-dir to read a stored run")
        return load_stored(state_dir, run_id)
    if target is None:
        raise LogFormatError("give a run directory or log file, or --run RUN_ID for a run the daemon stored")
    path = Path(target)
    if not path.exists():
        raise LogFormatError(f"{path}: no such file or directory; give a run's output directory, its "
                             "guardian/events.jsonl, a trainer_state.json or trainer_log.jsonl, or --run RUN_ID")
    events_file = guardian_events_file(path)
    return load_embedded(events_file, _run_name(path)) if events_file is not None else load_replayed(path, ruleset)


def guardian_events_file(path: Path) -> Path | None:
    """Guardian's events.jsonl: the file itself, or `<dir>/guardian/events.jsonl` (preferred to Trainer's logs)."""
    if path.is_dir():
        candidate = path / "guardian" / "events.jsonl"
        return candidate if candidate.is_file() else None
    if path.suffix != ".jsonl":
        return None
    with path.open("rb") as f:
        first = f.readline()
    return path if decode_line(first) is not None else None


def load_embedded(events_file: Path, name: str) -> RunRecord:
    """A run Guardian watched from inside the training process."""
    read = list(read_events(events_file))
    run_events = [e for e in read if e is not None]
    unreadable = len(read) - len(run_events)
    record = _from_events(name, EMBEDDED, str(events_file), run_events)
    if events_file.parent.name == "guardian":
        record.disk = read_disk(events_file.parent.parent)
    if unreadable:
        record.notes.append(f"{unreadable} unreadable lines in {events_file} were skipped")
    _add_bad_samples(record, events_file.parent / BAD_SAMPLES_FILE)
    return record


def _add_bad_samples(record: RunRecord, path: Path) -> None:
    """The run's bad-sample file (written beside its event file), if it has one."""
    samples, unreadable = read_bad_samples(path)
    if samples or unreadable:
        record.bad_samples, record.bad_samples_file = samples, str(path)
    if unreadable:
        record.notes.append(f"{unreadable} unreadable lines in {path} were skipped")


def load_stored(state_dir: Path, run_id: str) -> RunRecord:
    """A run stored by the daemon in `state_dir/guardian.db` (the daemon need not be running)."""
    with stored_run(state_dir, run_id) as store:
        stored = store.events(run_id, limit=10**9)
        rows = store.decision_rows(run_id, limit=10**9)
        decisions = store.decisions(run_id, limit=10**9)  # rows that no longer decode are left out
    return _from_events(run_id, STORED, f"{state_dir / 'guardian.db'}#{run_id}", stored,
                        [decision_from_event(d) for d in decisions], len(rows) - len(decisions))


def load_replayed(path: Path, ruleset: RuleSet) -> RunRecord:
    """A training log without Guardian's record: its curves and what the rules would have done."""
    from guardian.commands.replay import replay_engine

    observations = read_log(path)
    train, evals = _series(observations)
    decisions, engine = replay_engine(observations, ruleset)
    incidents = [i.to_dict() for i in engine.policy.incidents]
    return RunRecord(_run_name(path), REPLAYED, str(path), train, evals, decisions, rules=ruleset.source,
                     incidents=incidents, disk=_replayed_run_dir(path))


def _replayed_run_dir(path: Path) -> DiskState | None:
    """A run directory, or the Trainer's own log file inside one (a checkpoint's: its run directory)."""
    if path.is_file() and path.name in ("trainer_state.json", "trainer_log.jsonl"):
        path = path.parent.parent if re.fullmatch(r"checkpoint-\d+", path.parent.name) else path.parent
    elif not path.is_dir():
        return None
    return read_disk(path)


def _run_name(path: Path) -> str:
    path = path.resolve()
    if path.is_file() and path.name == "events.jsonl" and path.parent.name == "guardian":
        return path.parent.parent.name
    if path.is_file() and path.name in ("trainer_state.json", "trainer_log.jsonl"):
        return path.parent.name
    return path.stem if path.is_file() else path.name


def _from_events(name: str, mode: str, source: str, run_events: Iterable[AnyEvent],
                 extra_decisions: Iterable[Decision] = (), unreadable_decisions: int = 0) -> RunRecord:
    """The record of a run's events; `extra_decisions` (the daemon's) join those the run recorded, once each."""
    observations: list[Observation] = []
    scales: dict[int, float] = {}
    decisions: list[Decision] = []
    actions: list[ActionEvent] = []
    checkpoints: list[CheckpointEvent] = []
    start_time = None
    incidents: list[dict[str, Any]] = []
    for event in run_events:
        match event:
            case MetricsEvent():
                observations.append(Observation(event.step, dict(event.values), event.phase))
                if event.lr_scale is not None and event.phase != EVAL:
                    scales[event.step] = event.lr_scale
            case DecisionEvent():
                decisions.append(decision_from_event(event))
            case ActionEvent():
                actions.append(event)
            case CheckpointEvent():
                checkpoints.append(event)
            case StartEvent() if start_time is None:
                start_time = event.time
            case EndEvent() if event.incidents is not None:
                incidents = [i for i in event.incidents if isinstance(i, dict)]
    seen = {(d.step, d.rule) for d in decisions}
    decisions += [d for d in extra_decisions if (d.step, d.rule) not in seen]
    train, evals = _series(observations)
    ordered = sorted(scales)
    record = RunRecord(name, mode, source, train, evals, sorted(decisions, key=lambda d: d.step), actions,
                       Series(ordered, [scales[s] for s in ordered]), checkpoints, start_time)
    record.incidents = incidents or _incidents_from_decisions(record)
    if unreadable_decisions:
        record.notes.append(f"{unreadable_decisions} decisions could not be read and are left out")
    return record


def _incidents_from_decisions(record: RunRecord) -> list[dict[str, Any]]:
    """A run that never said how its incidents ended (it crashed): what its decisions and actions tell."""
    found: dict[int, dict[str, Any]] = {}
    for d in record.decisions:
        if d.incident is None:
            continue
        item = found.setdefault(d.incident, {"id": d.incident, "opened_step": d.step, "rules": {}, "skips": 0,
                                             "rollbacks": [], "lr_cuts": 0, "lr_restores": 0, "stopped": False,
                                             "notes": [], "outcome": "unknown (the run did not report its end)"})
        item["last_firing_step"] = d.step
        item["rules"][d.rule] = item["rules"].get(d.rule, 0) + 1
        if d.note and d.note not in item["notes"]:
            item["notes"].append(d.note)
    for action in record.actions:
        owner = next((i for i in found.values()
                      if i["opened_step"] <= action.step <= i.get("last_firing_step", -1)), None)
        if owner is None:
            continue
        owner["skips"] += int(action.skipped_update and action.rollback is None)
        owner["rollbacks"] += [action.step] if action.rollback_to_step is not None else []
        owner["lr_cuts"] += int(action.lr_factor is not None and action.lr_factor < 1)
        owner["lr_restores"] += int(isinstance(action.lr_restored, LrChange))
        owner["stopped"] = owner["stopped"] or bool(action.stopped)
    return [found[k] for k in sorted(found)]


def _series(observations: Iterable[Observation]) -> tuple[dict[str, Series], dict[str, Series]]:
    """Per phase and metric, the values by step; a step seen twice (a resumed run) keeps the later value."""
    by_phase: dict[str, dict[str, dict[int, float]]] = {TRAIN: {}, EVAL: {}}
    for obs in observations:
        phase = by_phase[EVAL if obs.phase == EVAL else TRAIN]
        for key, value in obs.metrics.items():
            phase.setdefault(key, {})[obs.step] = value
    out = []
    for phase in (by_phase[TRAIN], by_phase[EVAL]):
        out.append({key: Series(sorted(points), [points[s] for s in sorted(points)]) for key, points in phase.items()})
    return out[0], out[1]
