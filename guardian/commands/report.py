"""`guardian report`: what happened in one run, as a picture (report.png) and a summary (report.md).

Three sources, one record:

* an embedded run: the run's output directory (or its `guardian/events.jsonl`), with the decisions Guardian
  made and the actions it took;
* a run stored by the daemon (`guardian.db` in its state directory): the same events, plus the daemon's
  decisions;
* any other training log (`trainer_state.json`, `trainer_log.jsonl`, a run directory): the curves, and what
  the rules *would* have done (replay; no action was taken).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from guardian.daemon.store import stored_run
from guardian.engine.actions import ActionKind, Restore, describe_outcome, merge, stop_restore
from guardian.engine.engine import Decision, decision_from_dict
from guardian.engine.ruleset import RuleSet
from guardian.errors import LogFormatError
from guardian.logs.badsample import BAD_SAMPLES_FILE, BadSample, read_bad_samples
from guardian import events
from guardian.events import ActionEvent, AnyEvent, CheckpointEvent, DecisionEvent, EndEvent, MetricsEvent, StartEvent
from guardian.logs.eventlog import read_events
from guardian.logs.ondisk import DiskState, describe, read_disk
from guardian.logs.training import EVAL, TRAIN, Observation, read_log

EMBEDDED = "embedded"
STORED = "stored"
REPLAYED = "replayed"
PNG_NAME = "report.png"
MD_NAME = "report.md"
TIMELINE_ROWS_MAX = 200
BAD_SAMPLE_ROWS_MAX = 40  # samples of skipped updates listed in report.md (and --json); the file has them all
BAD_SAMPLE_LINES_MAX = 10  # ... and printed in the terminal

SEVERITY_COLOURS = {"info": "#1f77b4", "warning": "#ff9f1c", "critical": "#d62728"}
ACTION_STYLES = {  # action -> (colour, marker, legend label)
    "skip": ("#555555", "v", "update skipped"),
    "rollback": ("#9467bd", "<", "rollback (arrow: back to the target step)"),
    "lr_cut": ("#2ca02c", "D", "learning-rate cut"),
    "stop": ("#000000", "s", "stop"),
    "lr_restore": ("#17becf", "o", "learning rate put back on its schedule"),
}

# DIGEST.md's pathologies: key -> (symptom, usual cause, usual fix).
PATHOLOGIES: dict[str, tuple[str, str, str]] = {
    "explosion": ("gradient explosion", "LR too high, no clipping", "lower the LR; `max_grad_norm` 0.5–1.0"),
    "vanishing": ("vanishing gradient", "deep net, bad initialisation", "check the initialisation"),
    "oscillation": ("gradient or loss oscillation", "batch too small, LR too high",
                    "raise `gradient_accumulation_steps`, lower the LR, more warm-up"),
    "abnormal": ("single abnormal samples", "bad data", "skip the update above a gradient threshold"),
    "spike": ("loss spike", "—", "roll back to a checkpoint"),
    "nan": ("NaN loss", "—", "roll back"),
    "overfitting": ("overfitting: train loss ↓ while eval loss ↑", "too many epochs, too little data",
                    "early stopping (patience 3), weight decay 0.1, dropout 0.2, fewer epochs"),
    "underfitting": ("underfitting: both losses fall slowly", "LR too low, too few steps", "raise the LR / train longer"),
    "slow_start": ("slow convergence early", "LR too low", "raise the LR"),
}


# ---- the record -------------------------------------------------------------------------------------


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
    actions: list[dict[str, Any]] = field(default_factory=list)
    lr_scale: Series = field(default_factory=lambda: Series([], []))
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
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
        steps += [d.step for d in self.decisions] + [int(a["step"]) for a in self.actions]
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
    events = guardian_events_file(path)
    return load_embedded(events, _run_name(path)) if events is not None else load_replayed(path, ruleset)


def guardian_events_file(path: Path) -> Path | None:
    """Guardian's events.jsonl: the file itself, or `<dir>/guardian/events.jsonl` (preferred to Trainer's logs)."""
    if path.is_dir():
        candidate = path / "guardian" / "events.jsonl"
        return candidate if candidate.is_file() else None
    if path.suffix != ".jsonl":
        return None
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline()
    try:
        head = json.loads(first)
    except json.JSONDecodeError:
        return None
    return path if isinstance(head, dict) and "seq" in head and "kind" in head else None


def load_embedded(events_file: Path, name: str) -> RunRecord:
    """A run Guardian watched from inside the training process."""
    read = list(read_events(events_file))
    run_events = [e for e in read if e is not None]
    unreadable = len(read) - len(run_events)
    record = _from_events(name, EMBEDDED, str(events_file), run_events, [])
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
        stored, daemon_decisions = store.events(run_id, limit=10**9), store.decisions(run_id, limit=10**9)
    return _from_events(run_id, STORED, f"{state_dir / 'guardian.db'}#{run_id}",
                        stored, [events.to_builtins(d) for d in daemon_decisions])


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


def _from_events(name: str, mode: str, source: str, run_events: list[AnyEvent],
                 extra_decisions: list[dict[str, Any]]) -> RunRecord:
    observations: list[Observation] = []
    scales: dict[int, float] = {}
    decisions: list[dict[str, Any]] = []
    actions, checkpoints, bad = [], [], 0
    start_time = None
    incidents: list[dict[str, Any]] = []
    for event in run_events:
        match event:
            case MetricsEvent():
                observations.append(Observation(event.step, dict(event.values), event.phase))
                if event.lr_scale is not None and event.phase != EVAL:
                    scales[event.step] = event.lr_scale
            case DecisionEvent():
                decisions.append(events.to_builtins(event))
            case ActionEvent():
                actions.append(events.to_builtins(event))
            case CheckpointEvent():
                checkpoints.append(events.to_builtins(event))
            case StartEvent() if start_time is None:
                start_time = event.time
            case EndEvent() if event.incidents is not None:
                incidents = [i for i in event.incidents if isinstance(i, dict)]
    seen = {(d.get("step"), d.get("rule")) for d in decisions}
    decisions += [d for d in extra_decisions if (d.get("step"), d.get("rule")) not in seen]
    parsed = []
    for data in decisions:
        try:
            parsed.append(decision_from_dict(data))
        except (KeyError, ValueError, TypeError):
            bad += 1
    train, evals = _series(observations)
    ordered = sorted(scales)
    record = RunRecord(name, mode, source, train, evals, sorted(parsed, key=lambda d: d.step), actions,
                       Series(ordered, [scales[s] for s in ordered]), checkpoints, start_time)
    record.incidents = incidents or _incidents_from_decisions(record)
    if bad:
        record.notes.append(f"{bad} decisions could not be read and are left out")
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
                      if i["opened_step"] <= action.get("step", -1) <= i.get("last_firing_step", -1)), None)
        if owner is None:
            continue
        owner["skips"] += int(bool(action.get("skipped_update")) and "rollback" not in action)
        owner["rollbacks"] += [action["step"]] if "rollback_to_step" in action else []
        owner["lr_cuts"] += int(isinstance(action.get("lr_factor"), (int, float)) and action["lr_factor"] < 1)
        owner["lr_restores"] += int(bool(action.get("lr_restored")))
        owner["stopped"] = owner["stopped"] or bool(action.get("stopped"))
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


# ---- the numbers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interventions:
    """What Guardian did (or, in replay, would have done, up to the first stop)."""

    skipped: list[int]
    rollbacks: list[dict[str, Any]]  # action events (replay: {"step": ...})
    lr_cuts: list[int]
    stops: list[int]
    lr_scale: float
    lr_restores: list[int] = field(default_factory=list)  # steps where a jumped rate was put back on its schedule


def is_operator(action: Mapping[str, Any]) -> bool:
    """An action an operator asked for (`guardian ctl`, the TUI, the control API), not one a rule asked for."""
    rules = [str(r) for r in action.get("rules") or []]
    return action.get("source") == "command" or (bool(rules) and all(r.startswith("manual:") for r in rules))


def operator_actions(record: RunRecord) -> list[dict[str, Any]]:
    return [a for a in record.actions if is_operator(a)]


def interventions(record: RunRecord) -> Interventions:
    """What Guardian did (an operator's commands are not Guardian's: see `operator_actions`)."""
    if record.replayed:
        return _would_do(record.decisions)
    acts = [a for a in record.actions if not is_operator(a)]
    rollbacks = [a for a in acts if "rollback" in a]
    cuts = [a for a in acts if isinstance(a.get("lr_factor"), (int, float)) and a["lr_factor"] < 1.0]
    scale = next((float(a["lr_scale"]) for a in reversed(record.actions) if isinstance(a.get("lr_scale"), (int, float))), None)
    if scale is None:
        scale = record.lr_scale.values[-1] if record.lr_scale.values else 1.0
    # A stop skips its step's update too, but it is the stop (as in `_would_do`).
    return Interventions([int(a["step"]) for a in acts if a.get("skipped_update") and not a.get("stopped")], rollbacks,
                         [int(a["step"]) for a in cuts], [int(a["step"]) for a in acts if a.get("stopped")], scale,
                         [int(a["step"]) for a in acts if a.get("lr_restored")])


def _would_do(decisions: list[Decision]) -> Interventions:
    by_step: dict[int, list[Decision]] = {}
    for d in decisions:
        by_step.setdefault(d.step, []).append(d)
    skipped, rollbacks, cuts, stops, restores, scale = [], [], [], [], [], 1.0
    for step in sorted(by_step):
        plan = merge(a for d in by_step[step] for a in d.actions)
        if plan.skip_update and not plan.stop:  # a stop skips its step's update too, but it is the stop
            skipped.append(step)
        if plan.rollback:
            rollbacks.append({"step": step})
        if plan.lr_factor < 1.0:
            cuts.append(step)
            scale *= plan.lr_factor
        if plan.restore_lr:
            restores.append(step)
        if plan.stop:
            stops.append(step)
            break  # the run would have ended here
    return Interventions(skipped, rollbacks, cuts, stops, scale, restores)


def _restored_best(record: RunRecord) -> tuple[int, float] | None:
    """(step, eval loss) of the best evaluation whose weights a stop restored (or, replayed, would restore)."""
    evals = dict(_finite(record.eval.get("eval_loss")))
    if record.replayed:
        acts = interventions(record)
        stop = next((d for d in record.decisions if acts.stops and d.step == acts.stops[0]), None)
        restores = stop is not None and any(a.kind is ActionKind.STOP and stop_restore(a) is Restore.BEST_EVAL
                                            for a in stop.actions)
        step = stop.finding.evidence.get("best_step") if stop is not None and restores else None
    else:
        text = next((str(a.get("restored") or a["restored_best"]) for a in record.actions
                     if a.get("restored") or a.get("restored_best")), "")
        found = re.search(r"step (\d+)", text)
        step = int(found.group(1)) if found else None
    return (step, evals[step]) if isinstance(step, int) and step in evals else None


def _finite(series: Series | None) -> list[tuple[int, float]]:
    return [(s, v) for s, v in zip(series.steps, series.values) if math.isfinite(v)] if series else []


def _non_finite_steps(record: RunRecord) -> set[int]:
    steps: set[int] = set()
    for key in ("loss", "grad_norm"):
        series = record.train.get(key)
        if series:
            steps.update(s for s, v in zip(series.steps, series.values) if not math.isfinite(v))
    return steps


def _final_and_best(series: Series | None) -> str:
    points = _finite(series)
    if not points:
        return "not logged"
    last_step, last = points[-1]
    best_step, best = min(points, key=lambda p: p[1])
    text = f"final {last:.4g} (step {last_step}), best {best:.4g} (step {best_step})"
    if series is not None and series.values and not math.isfinite(series.values[-1]):
        text += f"; the last value logged (step {series.steps[-1]}) is {series.values[-1]}"
    return text


def verdict(record: RunRecord) -> str:
    """One line: how the run went and what Guardian did about it."""
    acts = interventions(record)
    loss = record.train.get("loss")
    if record.replayed:
        if not record.decisions:
            return "replayed: no rule would have fired"
        until = acts.stops[0] if acts.stops else record.last_step
        fired = ", ".join(sorted({d.rule for d in record.decisions if d.step <= until}))
        would = _did(acts, replayed=True)
        if acts.stops:
            would = (would + ", and " if would else "") + f"stopped this run at step {acts.stops[0]}"
        text = f"replayed: the rules would have {would or 'raised ' + _plural(len(record.decisions), 'alert')} ({fired})"
        improved = _improved_after_stop(record)
        if improved is not None:
            text += f", but the run improved later ({improved[0]} {improved[2]:.4g} at step {improved[1]})"
        return text
    return _verdict_of_guarded(record, acts, loss) + _operator_clause(record) + _weights_clause(record)


def _verdict_of_guarded(record: RunRecord, acts: Interventions, loss: Series | None) -> str:
    # A NaN loss whose update Guardian skipped (and stopped on) never reached the weights: that is not divergence.
    if loss and loss.values and not math.isfinite(loss.values[-1]) and loss.steps[-1] not in acts.skipped \
            and not acts.stops:
        return f"diverged: the training loss is {loss.values[-1]} at the last step ({loss.steps[-1]})"
    done = _did(acts)
    if acts.stops:
        rules = ", ".join(sorted({r for a in record.actions if a.get("stopped") and not is_operator(a)
                                  for r in a.get("rules", [])}))
        left = next((str(a.get("restored") or a.get("restored_best")) for a in record.actions
                     if a.get("stopped") and not is_operator(a) and (a.get("restored") or a.get("restored_best"))), "")
        return (f"stopped at step {acts.stops[0]} by {rules or 'Guardian'}" + (f", leaving {left}" if left else "")
                + (f"; {done}" if done else ""))
    if done:
        return f"Guardian stepped in: {done}; ended at step {record.last_step}{_end_loss(record)}"
    if record.decisions:
        return f"{_plural(len(record.decisions), 'alert')}, no action taken by Guardian; ended at step {record.last_step}"
    if operator_actions(record):
        return f"no rule fired in {record.last_step} steps"
    return f"healthy: no rule fired in {record.last_step} steps"


def _operator_clause(record: RunRecord) -> str:
    """"; the operator stopped the run at step 41" — manual actions are the operator's, never Guardian's."""
    done = [_operator_did(a) for a in operator_actions(record)]
    return f"; the operator {_join(done)}" if done else ""


def _operator_did(action: Mapping[str, Any]) -> str:
    parts = []
    if "rollback" in action:
        parts.append("rolled back" if "rollback_to_step" in action else "asked for a rollback")
    if isinstance(action.get("lr_factor"), (int, float)) and action["lr_factor"] < 1:
        parts.append(f"cut the LR x{action['lr_factor']:.3g}")
    if action.get("stopped"):
        parts.append("stopped the run")
    return f"{_join(parts) or 'acted'} at step {action['step']}"


def _operator_cut(record: RunRecord) -> bool:
    return any(isinstance(a.get("lr_factor"), (int, float)) and a["lr_factor"] < 1 for a in operator_actions(record))


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1] if parts else ""


def _weights_clause(record: RunRecord) -> str:
    """"; the final weights are NaN/inf: resume from …" when the newest weights on disk are not finite."""
    disk = record.disk
    latest = disk.latest if disk is not None else None
    if disk is None or latest is None or latest.finite is not False:
        return ""
    resume = disk.resume_from()
    where = f"resume from {resume.path}" if resume is not None else \
        "no checked checkpoint on disk has finite weights" if disk.unchecked() else "no checkpoint on disk has finite weights"
    return f"; the final weights ({latest.folder.name}) are NaN/inf: {where}"


def _end_loss(record: RunRecord) -> str:
    for label, series in (("eval loss", record.eval.get("eval_loss")), ("train loss", record.train.get("loss"))):
        points = _finite(series)
        if points:
            return f" with {label} {points[-1][1]:.4g}"
    return ""


def _did(acts: Interventions, *, replayed: bool = False) -> str:
    parts = []
    if replayed:
        if acts.skipped:
            parts.append(f"skipped {_plural(len(acts.skipped), 'update')}")
        if acts.rollbacks:
            parts.append(f"rolled back {_plural(len(acts.rollbacks), 'time')}")
        if acts.lr_restores:
            parts.append(f"put the LR back on its schedule {_plural(len(acts.lr_restores), 'time')}")
        if acts.lr_cuts:
            parts.append(f"cut the LR to x{acts.lr_scale:.3g}")
        return ", ".join(parts)
    if acts.skipped:
        parts.append(f"{_plural(len(acts.skipped), 'update')} skipped")
    if acts.rollbacks:
        parts.append(_plural(len(acts.rollbacks), "rollback"))
    if acts.lr_restores:
        parts.append(f"LR put back on its schedule {_plural(len(acts.lr_restores), 'time')}")
    if acts.lr_cuts:
        parts.append(f"LR x{acts.lr_scale:.3g}")
    return ", ".join(parts)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# ---- the markdown -----------------------------------------------------------------------------------


def render_markdown(record: RunRecord, *, image: str = PNG_NAME) -> str:
    """The summary, timeline, what was saved and what to try next time, as Markdown."""
    parts = [f"# Guardian report: {record.name}", "", f"**{verdict(record)}**", "", _source_line(record), ""]
    parts += [f"> {note}" for note in record.notes]
    parts += [f"![Loss, gradient norm, learning rate and Guardian's decisions for {record.name}]({image})", ""]
    parts += _summary(record) + _incidents(record) + _operator(record) + _timeline(record) + _saved(record)
    parts += _on_disk(record) + _bad_samples(record)
    parts += _next_time(record)
    return "\n".join(parts).rstrip() + "\n"


def _source_line(record: RunRecord) -> str:
    if record.replayed:
        return (f"Source: `{record.source}`, rules `{record.rules}`. **Replayed: what the rules would have done.** "
                "No action was taken in this run; after a stop the run would have ended, so later decisions are "
                "hypothetical.")
    if record.mode == STORED:
        return f"Source: the daemon's store, `{record.source}` (decisions: the run's and the daemon's)."
    return f"Source: Guardian's event log, `{record.source}`."


def _summary(record: RunRecord) -> list[str]:
    acts = interventions(record)
    would = "would be " if record.replayed else ""
    nan_skips = len(set(acts.skipped) & _non_finite_steps(record))
    severities = _count(d.severity.value for d in record.decisions)
    rows = [
        ("steps", str(record.last_step)),
        ("train loss", _final_and_best(record.train.get("loss"))),
        ("eval loss", _final_and_best(record.eval.get("eval_loss"))),
        ("decisions", f"{len(record.decisions)}" + (f" ({severities})" if severities else "")),
        (f"updates {would}skipped", f"{len(acts.skipped)}" + (f" ({nan_skips} with a NaN/inf loss or gradient)" if nan_skips else "")),
        (f"rollbacks{' (would be)' if would else ''}", str(len(acts.rollbacks))),
        (f"LR put back on its schedule{' (would be)' if would else ''}",
         f"{len(acts.lr_restores)}" + (f" (steps {_ranges(acts.lr_restores)})" if acts.lr_restores else "")),
        (f"LR cuts{' (would be)' if would else ''}", f"{len(acts.lr_cuts)} (final LR scale {acts.lr_scale:.3g}"
         + (", the operator's cuts included)" if _operator_cut(record) else ")")),
        (f"stops{' (would be)' if would else ''}", ", ".join(f"step {s}" for s in acts.stops) or "0"),
    ]
    operator = operator_actions(record)
    if operator:
        rows.append(("operator actions (not Guardian's)", "; ".join(_operator_did(a) for a in operator)))
    return ["## Summary", "", "| | |", "| --- | --- |", *(f"| {k} | {_cell(v)} |" for k, v in rows), ""]


def _incidents(record: RunRecord) -> list[str]:
    """One row per incident: when, which rules, what was tried, and how it ended."""
    if not record.incidents:
        return []
    out = ["## Incidents", "",
           "An incident runs from the first firing of a rule that acts until no rule has fired for a while; "
           "within one, the policy keeps the actions from compounding." + (" (Replay: what would have happened.)"
                                                                               if record.replayed else ""), "",
           "| # | steps | rules | what was tried | outcome |", "| ---: | --- | --- | --- | --- |"]
    for item in record.incidents[:TIMELINE_ROWS_MAX]:
        end = item.get("closed_step")
        steps = f"{item.get('opened_step')}–{item.get('last_firing_step', item.get('opened_step'))}"
        steps += f" (quiet again by {end})" if isinstance(end, int) else ""
        rules = ", ".join(f"{rule} ×{count}" for rule, count in dict(item.get("rules", {})).items())
        out.append(f"| {item.get('id')} | {steps} | {_cell(rules)} | {_cell(_tried(item))} | "
                   f"{_cell(str(item.get('outcome', '')))} |")
    if len(record.incidents) > TIMELINE_ROWS_MAX:
        out.append(f"\n{len(record.incidents) - TIMELINE_ROWS_MAX} later incidents are not listed.")
    notes = [(item.get("id"), note) for item in record.incidents[:TIMELINE_ROWS_MAX] for note in item.get("notes", [])
             if "rollback incident" not in note]
    if notes:
        out += ["", "Why the policy changed course:", ""]
        out += [f"- incident {number}: {note}" for number, note in notes[:TIMELINE_ROWS_MAX]]
    return out + [""]


def _tried(item: Mapping[str, Any]) -> str:
    parts = []
    if item.get("skips"):
        parts.append(_plural(int(item["skips"]), "update") + " skipped")
    if item.get("lr_restores"):
        parts.append(f"rate put back on its schedule {_plural(int(item['lr_restores']), 'time')}")
    rollbacks = item.get("rollbacks") or []
    if rollbacks:
        parts.append(f"rolled back at step {', '.join(str(s) for s in rollbacks)}")
    if item.get("lr_cuts"):
        parts.append(f"learning rate cut {_plural(int(item['lr_cuts']), 'time')}")
    if item.get("stopped"):
        parts.append("stopped the run")
    return "; ".join(parts) or "alerts only"


def _operator(record: RunRecord) -> list[str]:
    """The manual actions (`guardian ctl`, the TUI's keys, the control API): the operator's, listed apart."""
    actions = operator_actions(record)
    if not actions:
        return []
    out = ["## What the operator did", "",
           "Manual commands, carried out by the run at its next step; no rule asked for them.", "",
           "| step | command | outcome |", "| ---: | --- | --- |"]
    for action in actions:
        commands = ", ".join(str(r).removeprefix("manual:") for r in action.get("rules", [])) or "manual"
        out.append(f"| {action['step']} | {_cell(commands)} | {_cell(describe_outcome(dict(action)))} |")
    return out + [""]


def _timeline(record: RunRecord) -> list[str]:
    out = ["## Timeline of decisions", ""]
    if not record.decisions:
        return out + ["No rule fired.", ""]
    out += ["| step | rule | severity | evidence | action | outcome |", "| ---: | --- | --- | --- | --- | --- |"]
    for d in record.decisions[:TIMELINE_ROWS_MAX]:
        actions = ", ".join(map(str, d.actions)) or "none"
        if d.level:
            actions += f" (escalation {d.level})"
        out.append(f"| {d.step} | {d.rule} | {d.severity.value} | {_cell(d.finding.message)} | {_cell(actions)} "
                   f"| {_cell(_outcome(record, d))} |")
    if len(record.decisions) > TIMELINE_ROWS_MAX:
        out.append(f"\n{len(record.decisions) - TIMELINE_ROWS_MAX} later decisions are not listed.")
    return out + [""]


def _outcome(record: RunRecord, decision: Decision) -> str:
    if record.replayed:
        return "not taken (replay)"
    for action in record.actions:
        if action.get("step") == decision.step and decision.rule in action.get("rules", []):
            return describe_outcome(action) + (f"; {decision.note}" if decision.note else "")
    if all(a.kind is ActionKind.ALERT for a in decision.actions):
        return "logged (alert)"
    return "no action reported by the run" if record.mode == STORED else "—"


def _saved(record: RunRecord) -> list[str]:
    acts = interventions(record)
    out = ["## What the rules would have done" if record.replayed else "## What Guardian did", ""]
    bad = _non_finite_steps(record)
    nan_skips = sorted(set(acts.skipped) & bad)
    other_skips = sorted(set(acts.skipped) - bad)
    for action in acts.rollbacks:
        out.append("- " + _rollback_line(record, action))
    if nan_skips:
        verb = "would have been skipped" if record.replayed else "skipped"
        out.append(f"- Updates with a NaN/inf loss or gradient {verb} (they never reach the weights or the "
                   f"optimizer's moments): steps {_ranges(nan_skips)}.")
    if other_skips:
        verb = "would have been skipped" if record.replayed else "skipped"
        out.append(f"- Other updates {verb} (spikes, learning-rate jumps): steps {_ranges(other_skips)}.")
    if acts.lr_restores:
        verb = "would have been put" if record.replayed else "put"
        out.append(f"- Learning rate {verb} back on its schedule after it jumped: steps {_ranges(acts.lr_restores)}.")
    unguarded = sorted(bad - set(acts.skipped))
    if unguarded and record.replayed:
        out.append(f"- NaN/inf values in this log at steps {_ranges(unguarded)} (after the run would have stopped, "
                   "or not watched by a rule).")
    for action in record.actions:
        restored = action.get("restored") or action.get("restored_best")
        if restored and not is_operator(action):
            out.append(f"- At step {action['step']}: stopped and left {restored} in place.")
    if record.replayed and acts.stops:
        out.append("- " + _would_stop_line(record, acts.stops[0]))
    if len(out) == 2:
        out.append("Nothing: no rule would have acted." if record.replayed else "Nothing: Guardian took no action.")
    return out + [""]


def _on_disk(record: RunRecord) -> list[str]:
    """The checkpoints that exist now (and the protected ones rotation removed), the final weights, where to resume."""
    protected_steps = sorted({int(c["step"]) for c in record.checkpoints if isinstance(c.get("step"), int)})
    disk = record.disk
    if disk is None:
        if not protected_steps:
            return []
        return ["## On disk now", "", f"- Guardian protected good checkpoints at steps {_ranges(protected_steps)}; "
                "this source does not say which are still on disk (run `guardian report` on the run's output "
                "directory).", ""]
    out = ["## On disk now", "", f"In `{disk.run_dir}`:", ""]
    for item in disk.checkpoints:
        where = "Guardian's protected copy" if item.protected else "Trainer's checkpoint"
        out.append(f"- `{item.path.relative_to(disk.run_dir)}` (step {item.step}, {where}): weights "
                   f"{describe(item.weights)}.")
    if not disk.checkpoints and disk.final is None:
        out.append("- No checkpoint folders and no saved weights: nothing to resume from.")
    elif not disk.checkpoints:
        out.append("- No checkpoint folders.")
    gone = sorted(set(protected_steps) - disk.steps(protected=True))
    if gone:
        out.append(f"- Protected by Guardian at steps {_ranges(gone)}, removed since by rotation (Guardian keeps "
                   "the newest good checkpoints; Trainer's `save_total_limit` removes the originals): not on disk.")
    if disk.final is not None:
        out.append(f"- Final weights saved in the output directory: {describe(disk.final)}.")
    latest, resume = disk.latest, disk.resume_from()
    if latest is not None and latest.finite is False:
        out.append(f"- **The final weights (`{latest.folder}`) are not finite (NaN/inf).**")
    if resume is not None and latest is not None and latest.finite is False:
        out.append(f"- Resume from `{resume.path}` (the newest checkpoint with finite weights): "
                   f"`trainer.train(resume_from_checkpoint=\"{resume.path}\")`.")
    elif latest is not None and latest.finite is False and disk.unchecked():
        out.append("- No checked checkpoint has finite weights; these were not checked: "
                   + ", ".join(f"`{c.path.relative_to(disk.run_dir)}`" for c in disk.unchecked()) + ".")
    elif latest is not None and latest.finite is False:
        out.append("- No checkpoint on disk has finite weights: start again from the base model.")
    elif resume is not None:
        out.append(f"- To continue: the newest checkpoint with finite weights is `{resume.path}`.")
    return out + [""]


def _bad_samples(record: RunRecord) -> list[str]:
    """The samples of the skipped updates, from the run's bad-sample file (the first BAD_SAMPLE_ROWS_MAX)."""
    samples = record.bad_samples
    if not samples:
        return []
    steps = sorted({s.step for s in samples})
    verified = sum(s.index_verified for s in samples)
    out = ["## Samples of the skipped updates", "",
           f"{_plural(len(samples), 'sample')} of {_plural(len(steps), 'skipped step')} ({_ranges(steps)}) in "
           f"`{record.bad_samples_file}`; {verified} with a dataset index checked against the dataset. A later "
           "run in the same output folder masks them (labels -100) unless `mask_known_bad_samples=False`.", "",
           "| step | rules | micro-batch, row | index | verified | excerpt |",
           "| ---: | --- | --- | ---: | --- | --- |"]
    for s in samples[:BAD_SAMPLE_ROWS_MAX]:
        excerpt = "`" + _cell(_flat(s.excerpt, 80).replace("`", "'")) + "`" if s.excerpt else "—"
        out.append(f"| {s.step} | {_cell(', '.join(s.rules))} | {s.micro_batch}, {s.row} | {_index(s)} "
                   f"| {'yes' if s.index_verified else 'no'} | {excerpt} |")
    if len(samples) > BAD_SAMPLE_ROWS_MAX:
        out.append(f"\n{len(samples) - BAD_SAMPLE_ROWS_MAX} more samples are not listed (see the file).")
    return out + [""]


def bad_sample_lines(record: RunRecord, limit: int = BAD_SAMPLE_LINES_MAX) -> list[str]:
    """The samples of the skipped updates as plain lines for the terminal (the first `limit`, then a count)."""
    samples = record.bad_samples
    if not samples:
        return []
    steps = sorted({s.step for s in samples})
    lines = [f"{_plural(len(samples), 'sample')} of skipped updates (steps {_ranges(steps)}) in "
             f"{record.bad_samples_file}:"]
    for s in samples[:limit]:
        checked = " (verified)" if s.index_verified else ""
        excerpt = f"  {_flat(s.excerpt, 60)!r}" if s.excerpt else ""
        lines.append(f"  step {s.step:>7}  {', '.join(s.rules):<22} index {_index(s)}{checked}{excerpt}")
    if len(samples) > limit:
        lines.append(f"  ... and {len(samples) - limit} more")
    return lines


def bad_samples_json(record: RunRecord, limit: int = BAD_SAMPLE_ROWS_MAX) -> dict[str, Any]:
    """The samples of the skipped updates for `guardian report --json` (the first `limit`, and the total)."""
    return {"file": record.bad_samples_file or None, "total": len(record.bad_samples),
            "listed": [s.to_dict() for s in record.bad_samples[:limit]]}


def disk_json(record: RunRecord) -> dict[str, Any] | None:
    """What is on disk now, for `guardian report --json` (None where the source names no output directory)."""
    disk = record.disk
    if disk is None:
        return None
    latest, resume = disk.latest, disk.resume_from()
    return {"run_dir": str(disk.run_dir),
            "checkpoints": [{"path": str(c.path), "step": c.step, "protected": c.protected,
                             "weights_finite": c.weights.finite} for c in disk.checkpoints],
            "final_weights": None if latest is None else {"path": str(latest.folder), "finite": latest.finite},
            "resume_from": None if resume is None else str(resume.path)}


def _index(sample: BadSample) -> str:
    return "null" if sample.index is None else str(sample.index)


def _flat(text: str | None, chars: int) -> str:
    """Text on one line, cut to `chars` characters (an ellipsis marks the cut)."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= chars else flat[:chars - 1] + "…"


def _rollback_line(record: RunRecord, action: Mapping[str, Any]) -> str:
    step = action["step"]
    if record.replayed:
        return f"Step {step}: would have rolled back to the newest good snapshot or checkpoint before the anomaly."
    if "rollback_to_step" not in action:
        return f"Step {step}: {describe_outcome(dict(action))}."
    target = int(action["rollback_to_step"])
    when = ""
    if isinstance(action.get("time"), (int, float)):
        when = " at " + datetime.fromtimestamp(action["time"], tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        if record.start_time is not None:
            when += f" ({_duration(action['time'] - record.start_time)} into the run)"
    seconds = action.get("rollback_seconds")
    took = f", restored in {seconds * 1000:.1f} ms" if isinstance(seconds, (int, float)) else ""
    return (f"Step {step}{when}: rolled back to step {target} from {action['rollback']}{took}; the "
            f"{step - target} steps since then were discarded, and the data that caused the trouble was not replayed.")


def _would_stop_line(record: RunRecord, step: int) -> str:
    stop = next(d for d in record.decisions if d.step == step and any(a.kind is ActionKind.STOP for a in d.actions))
    line = f"Step {step}: {stop.rule} would have stopped the run"
    restore = any(a.kind is ActionKind.STOP and stop_restore(a) is Restore.BEST_EVAL for a in stop.actions)
    best = stop.finding.evidence.get("best")
    if restore and isinstance(best, (int, float)):
        line += f" and restored the weights of its best evaluation (step {stop.finding.evidence.get('best_step')}, " \
                f"{stop.finding.metric} {best:.4g})"
    metric = stop.finding.metric
    points = _finite(record.eval.get(metric) or record.train.get(metric))
    if points:
        line += f"; the run went on to step {record.last_step} and ended at {metric} {points[-1][1]:.4g}"
    return line + "." + _after_the_stop(points, step, metric)


def _improved_after_stop(record: RunRecord) -> tuple[str, int, float] | None:
    """(metric, step, value) where a replayed run did better after the stop the rules would have made than the
    best before it (the stop would have cost that); None when it did not, or there was no stop."""
    stops = interventions(record).stops
    if not record.replayed or not stops:
        return None
    stop = next(d for d in record.decisions if d.step == stops[0] and any(a.kind is ActionKind.STOP for a in d.actions))
    metric = stop.finding.metric
    points = _finite(record.eval.get(metric) or record.train.get(metric))
    before = [v for s, v in points if s <= stops[0]]
    later = [(s, v) for s, v in points if s > stops[0]]
    if not before or not later:
        return None
    step, value = min(later, key=lambda p: p[1])
    return (metric, step, value) if value < min(before) else None


def _after_the_stop(points: list[tuple[int, float]], step: int, metric: str) -> str:
    """What the log shows after a stop the rules would have made: the evidence for (or against) stopping."""
    later = [(s, v) for s, v in points if s > step]
    if not later:
        return " The log ends there: it cannot say whether the run would have improved later."
    best_later = min(later, key=lambda p: p[1])
    reference = min((v for s, v in points if s <= step), default=None)
    if reference is None:
        return ""
    if best_later[1] < reference:
        return (f" **The run went on to improve:** {metric} {best_later[1]:.4g} at step {best_later[0]}, below "
                f"{reference:.4g}; this stop would have cost that improvement.")
    return (f" The run never did better afterwards (its best later: {metric} {best_later[1]:.4g} at step "
            f"{best_later[0]}), so the stop would have kept the better weights.")


def _next_time(record: RunRecord) -> list[str]:
    out = ["## What to try next time", ""]
    if not record.decisions:
        return out + ["Nothing fired; keep these settings.", ""]
    pathologies: list[str] = []
    for rule, group in _by_rule(record.decisions).items():
        first = group[0]
        out.append(f"### {rule} ({len(group)}×, steps {_ranges(sorted({d.step for d in group}))})")
        out.append("")
        if first.diagnosis:
            out.append(f"- Likely cause: {first.diagnosis}.")
        if first.fix:
            out.append(f"- Usual fix: {first.fix}.")
        if not first.diagnosis and not first.fix:
            out.append(f"- {first.finding.message}")
        out.append("")
        pathologies += [p for p in pathology_keys(first) if p not in pathologies]
    if pathologies:
        out += ["### Common pathologies behind these rules", "", "| symptom | usual cause | usual fix |",
                "| --- | --- | --- |"]
        out += ["| " + " | ".join(PATHOLOGIES[key]) + " |" for key in pathologies]
        out.append("")
    return out


def pathology_keys(decision: Decision) -> list[str]:
    """Which of DIGEST.md's pathologies a decision points at, judged from its metric and evidence."""
    evidence, metric = decision.finding.evidence, decision.finding.metric
    if "non_finite" in evidence:
        return ["nan", "explosion"]
    if "best_step" in evidence or "evals_since_best" in evidence:
        return ["overfitting"]
    if evidence.get("condition") == "no_improvement":
        return ["underfitting", "slow_start"]
    if evidence.get("condition") == "stuck_at_zero":
        return []
    if "ratio" in evidence and metric == "learning_rate":
        return ["explosion", "oscillation"]
    if metric == "grad_norm":
        return ["vanishing"] if evidence.get("side") == "below" else ["explosion", "abnormal", "oscillation"]
    if metric == "loss":
        return ["spike", "abnormal", "oscillation"]
    return []


# ---- small helpers ----------------------------------------------------------------------------------


def _by_rule(decisions: list[Decision]) -> dict[str, list[Decision]]:
    groups: dict[str, list[Decision]] = {}
    for d in decisions:
        groups.setdefault(d.rule, []).append(d)
    return groups


def _count(items: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 7] -> "1–3, 7"."""
    spans: list[list[int]] = []
    for s in sorted(set(steps)):
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def default_out_dir(name: str) -> Path:
    return Path(f"guardian-report-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:80]}")


def write_report(record: RunRecord, out_dir: Path) -> tuple[Path, Path]:
    """Write report.png and report.md into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / PNG_NAME, out_dir / MD_NAME
    from guardian.commands.reportplot import render_png

    render_png(record, png, verdict(record))
    md.write_text(render_markdown(record), encoding="utf-8")
    return png, md


