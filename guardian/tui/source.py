"""Where `guardian top` gets its data: the daemon over HTTP, or the event file of one embedded run.

Both sources answer `snapshot()` with every run's status, progress, latest values, GPU memory, rule states,
a bounded history of its curves and its latest decisions. Memory stays bounded however long a run is.

Rule states come from the daemon's `GET /v1/runs` (`rule_status`). For `--dir` they are computed: an
`Engine` with the run's own rule file (the `source` named in its start event; the shipped rules if that
file cannot be read) is fed every metrics event of the file, and, as the daemon's ticker does, the seconds
since the newest event, so the `stalled` rule fires on a run that stopped writing.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import msgspec

from guardian import events
from guardian.engine.engine import Decision, Engine, decision_from_dict, decision_from_event
from guardian.engine.rules import RuleSet
from guardian.errors import GuardianError, RuleFileError
from guardian.events import ActionEvent, AnyEvent, DecisionEvent, MetricsEvent, StartEvent
from guardian.logs.eventlog import decode_line
from guardian.rulefile.reader import load_rules
from guardian.runview import RunTracker
from guardian.transport.client import DaemonError, request
from guardian.transport.eventpages import pages

HISTORY_POINTS = 240  # per curve: enough for the detail view's ~200-point window
DECISIONS_KEPT = 500
CURVES = ("loss", "eval_loss", "grad_norm", "learning_rate")
ACTIONS = ("stop", "rollback", "reduce_lr")


class ReadOnlySourceError(GuardianError, RuntimeError):
    """The source can only watch (an event file on disk); acting on a run needs the daemon."""


@dataclass(frozen=True)
class GpuMemory:
    device: str  # "0", or "RANK:GPU" when several ranks report
    used_bytes: float
    total_bytes: float


OPERATOR = "operator"  # who a manual action (`s`/`r`/`l` in top, `guardian ctl`) is credited to


@dataclass(frozen=True)
class DecisionLine:
    """One line of a run's log: a rule's decision, or an operator's action and its outcome
    (`rule` is then OPERATOR, `severity` "operator", and `step` None while it waits for the run's next step)."""

    step: int | None
    rule: str
    severity: str
    actions: str  # "skip_update, reduce_lr(factor=0.5)"
    reason: str  # the finding: metric, value, threshold, step; for an operator: what became of the action


def ending(status: str, stopped_by: str | None) -> str | None:
    """How a run ended, in words: "finished", "stopped by operator", "stopped by rule X", or for a run that
    stopped reporting without an end event (`stalled`) "no reports: crashed or lost?"; None while it runs."""
    if status == "stalled":
        return "no reports: crashed or lost?"
    if status != "ended":
        return None
    if stopped_by is None:
        return "finished"
    return "stopped by operator" if stopped_by == OPERATOR else f"stopped by rule {stopped_by}"


@dataclass(frozen=True)
class RunSnapshot:
    """One run as the screen shows it."""

    id: str
    status: str  # running | firing | stalled | ended
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    grad_norm: float | None = None
    learning_rate: float | None = None
    lr_scale: float | None = None
    tokens_per_second: float | None = None
    gpus: tuple[GpuMemory, ...] = ()
    rules: Mapping[str, str] = field(default_factory=dict)  # rule -> ok | warming_up | firing | cooling_down
    history: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # curve -> oldest..newest
    decisions: tuple[DecisionLine, ...] = ()  # oldest..newest
    seconds_since_report: float | None = None
    history_steps: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # curve -> the step of each value
    started: float | None = None  # when the run started (its first event's time): the default sort key
    stopped_by: str | None = None  # OPERATOR, or the rules whose decision stopped it

    @property
    def firing(self) -> list[str]:
        return [rule for rule, state in self.rules.items() if state == "firing"]

    @property
    def ended(self) -> bool:
        return self.status == "ended"

    @property
    def ending(self) -> str | None:
        return ending(self.status, self.stopped_by)

    @property
    def rule_decisions(self) -> int:
        return sum(1 for d in self.decisions if d.rule != OPERATOR)


@dataclass(frozen=True)
class Snapshot:
    """Every run a source knows, and the error of the last poll, if it failed (the runs are then the last known)."""

    runs: tuple[RunSnapshot, ...]
    where: str
    error: str | None = None


class Source(Protocol):
    """Data for `guardian top`; `read_only` says why actions are unavailable (None: they are available)."""

    where: str
    waiting: str  # what the screen says while no run has reported
    read_only: str | None

    def snapshot(self) -> Snapshot: ...

    def control(self, run_id: str, action: str, params: Mapping[str, Any]) -> int: ...


def run_status(ended: bool, rules: Mapping[str, str]) -> str:
    """The daemon's phase of a run: ended, stalled (the `stalled` rule fires), firing, or running."""
    if ended:
        return "ended"
    if rules.get("stalled") == "firing":
        return "stalled"
    return "firing" if "firing" in rules.values() else "running"


def decision_line(data: DecisionEvent | Mapping[str, Any]) -> DecisionLine | None:
    """A decision (its event, or `Decision.to_dict()` as a daemon's JSON page holds it) in one line; None if it
    is malformed."""
    if isinstance(data, DecisionEvent):
        return _line_of(decision_from_event(data))
    try:
        return _line_of(decision_from_dict(data))
    except (KeyError, TypeError, ValueError, msgspec.ValidationError):
        return None


def _line_of(decision: Decision) -> DecisionLine:
    actions = ", ".join(str(a) for a in decision.actions) or "none"
    return DecisionLine(decision.step, decision.rule, decision.severity.value, actions, decision.finding.message)


def _manual(rules: list[str]) -> list[str]:
    """The actions of an action event's "manual:ACTION" rules (commands carried out)."""
    return [r.split(":", 1)[1] for r in rules if r.startswith("manual:")]


def _params(params: Any) -> str:
    return f"({', '.join(f'{k}={v}' for k, v in params.items())})" if isinstance(params, dict) and params else ""


class LiveRun:
    """A run as `guardian top` follows it, built up from its events (bounded history and decision log): the
    live counterpart of the report's `RunRecord`, which reads a finished record whole."""

    def __init__(self, run_id: str, *, decisions_from_events: bool = True, history_points: int = HISTORY_POINTS,
                 decisions_kept: int = DECISIONS_KEPT) -> None:
        self.run_id = run_id
        self.decisions_from_events = decisions_from_events
        self.tracker = RunTracker(run_id)
        self.values: dict[str, float] = {}  # latest of each metric, NaN included
        self.history: dict[str, deque[float]] = {key: deque(maxlen=history_points) for key in CURVES}
        self.steps: dict[str, deque[int]] = {key: deque(maxlen=history_points) for key in CURVES}
        self.decisions: deque[DecisionLine] = deque(maxlen=decisions_kept)
        self.operator: deque[DecisionLine] = deque(maxlen=decisions_kept)  # manual actions, from the run's events
        self.carried_out: set[int] = set()  # the ids of the commands the run says it carried out
        self.commands: list[dict[str, Any]] = []  # the daemon's record of the run's commands
        self.stopped_by: str | None = None
        self.first_time: float | None = None
        self.last_seq = 0
        self.last_time: float | None = None
        self.max_steps: int | None = None
        self.rules_source: str | None = None

    def apply(self, event: AnyEvent) -> bool:
        """Take one event (older or repeated sequence numbers are ignored; an unnumbered one, seq 0, is taken);
        True if it was new."""
        if event.seq:
            if event.seq <= self.last_seq:
                return False
            self.last_seq = event.seq
        self.tracker.apply(event)
        if event.time > 0:  # 0: not timed
            self.last_time = max(self.last_time or 0.0, event.time)
            self.first_time = event.time if self.first_time is None else self.first_time
        match event:
            case MetricsEvent():
                self._metrics(event)
            case DecisionEvent() if self.decisions_from_events:
                self._add_decisions([event])
            case ActionEvent():
                self._action(event)
            case StartEvent():
                self._start(event)
        return True

    def _metrics(self, event: MetricsEvent) -> None:
        values = event.values
        self.values.update(values)
        for key in CURVES:
            if key in values:
                self.history[key].append(values[key])
                self.steps[key].append(event.step)

    def _action(self, event: ActionEvent) -> None:
        """An intervention carried out: who stopped the run, and what the operator's commands did."""
        manual = _manual(event.rules)
        if event.stopped is True:
            rules = [r for r in event.rules if not r.startswith("manual:")]
            self.stopped_by = OPERATOR if manual or not rules else ", ".join(rules)
        ids = list(event.command_ids or [])
        self.carried_out.update(ids)
        if manual:
            which = f", command {', '.join(map(str, ids))}" if ids else ""
            self.operator.append(DecisionLine(event.step, OPERATOR, OPERATOR, ", ".join(manual),
                                              f"{event.outcome.describe()} (by hand{which})"))

    def _start(self, event: StartEvent) -> None:
        self.stopped_by = None  # a resumed run: running again
        if event.max_steps is not None and event.max_steps > 0:
            self.max_steps = event.max_steps
        if event.source is not None:
            self.rules_source = event.source

    def _add_decisions(self, decisions: Iterable[DecisionEvent | Mapping[str, Any]]) -> None:
        for data in decisions:
            line = decision_line(data)
            if line is not None:
                self.decisions.append(line)

    def set_decisions(self, decisions: list[dict[str, Any]]) -> None:
        """Replace the decision log (the daemon answers with the whole list)."""
        self.decisions.clear()
        self._add_decisions(decisions[-(self.decisions.maxlen or len(decisions)):])

    def set_commands(self, commands: list[dict[str, Any]]) -> None:
        """The daemon's list of the run's commands (id, action, params, source, delivered, applied)."""
        self.commands = [c for c in commands if isinstance(c, dict) and isinstance(c.get("id"), int)][-DECISIONS_KEPT:]

    def log(self) -> tuple[DecisionLine, ...]:
        """The rules' decisions and the operator's actions, oldest first; the operator's commands not carried
        out yet (queued, or delivered to the run) come last."""
        lines = sorted([*self.decisions, *self.operator], key=lambda line: line.step or 0)
        for command in self.commands:
            if command["id"] in self.carried_out:
                continue
            what = f"{command.get('action')}{_params(command.get('params'))}"
            state = "delivered to the run, not carried out yet" if command.get("delivered") else \
                "queued: carried out at the run's next step"
            lines.append(DecisionLine(None, OPERATOR, OPERATOR, what, f"{state} (by hand, command {command['id']})"))
        return tuple(lines[-(self.decisions.maxlen or 1):])

    @property
    def step(self) -> int | None:
        step = self.tracker.view.latest.get("step")
        return None if step is None else int(step)

    def snapshot(self, rules: Mapping[str, str], *, status: str | None = None, max_steps: int | None = None,
                 seconds_since_report: float | None = None, started: float | None = None) -> RunSnapshot:
        view, values = self.tracker.view, self.values
        return RunSnapshot(
            id=self.run_id, status=status or run_status(view.ended, rules), step=self.step,
            max_steps=max_steps or self.max_steps, loss=values.get("loss"), eval_loss=values.get("eval_loss"),
            grad_norm=values.get("grad_norm"), learning_rate=values.get("learning_rate"),
            lr_scale=view.latest.get("lr_scale"), tokens_per_second=values.get("tokens_per_second"),
            gpus=self._gpus(), rules=dict(rules), history={k: tuple(v) for k, v in self.history.items()},
            decisions=self.log(), seconds_since_report=seconds_since_report,
            history_steps={k: tuple(v) for k, v in self.steps.items()}, started=started or self.first_time,
            stopped_by=self.stopped_by,
        )

    def _gpus(self) -> tuple[GpuMemory, ...]:
        gpus = self.tracker.view.gpus
        ranks = {rank for rank, _ in gpus}
        return tuple(
            GpuMemory(gpu if len(ranks) == 1 else f"{rank}:{gpu}", facts.get("memory_used_bytes", 0.0),
                      facts.get("memory_total_bytes", 0.0))
            for (rank, gpu), facts in sorted(gpus.items())
        )


# ---- the daemon ------------------------------------------------------------------------------------


Fetch = Callable[..., dict[str, Any]]


class DaemonSource:
    """Polls `GET /v1/runs` and each run's events.

    A run's events are read a page at a time from the last one seen (`since_seq`), at most `PAGES_PER_POLL`
    pages a poll (a run of 100k steps catches up over a few polls); they are fetched again only when the run
    changed, and no more often than every `FETCH_COST_FACTOR` times the last fetch took, which keeps the
    daemon and the screen responsive."""

    FETCH_COST_FACTOR = 5.0
    PAGES_PER_POLL = 5

    def __init__(self, url: str, token: str | None = None, *, timeout_seconds: float = 3.0,
                 fetch: Fetch = request, clock: Callable[[], float] = time.monotonic) -> None:
        self.url, self.token, self.timeout_seconds, self._fetch, self.clock = url, token, timeout_seconds, fetch, clock
        self.where = url
        self.waiting = f"no runs have reported to {url} yet — start one with GUARDIAN_URL={url} python train.py"
        self.read_only: str | None = None
        self._records: dict[str, LiveRun] = {}
        self._seen: dict[str, tuple[Any, ...]] = {}  # run -> what /v1/runs said when its events were fetched
        self._next_fetch: dict[str, float] = {}  # run -> clock time before which its events are not fetched
        self._last: tuple[RunSnapshot, ...] = ()

    def _get(self, path: str) -> dict[str, Any]:
        return self._fetch(self.url, "GET", path, token=self.token, timeout=self.timeout_seconds)

    def snapshot(self) -> Snapshot:
        try:
            rows = self._get("/v1/runs")["runs"]
            runs = tuple(self._run(row) for row in rows)
        except DaemonError as exc:
            return Snapshot(self._last, self.where, error=str(exc))
        gone = set(self._records) - {row["id"] for row in rows}
        for run_id in gone:  # deleted by retention: forget it
            for table in (self._records, self._seen, self._next_fetch):
                table.pop(run_id, None)
        self._last = runs
        return Snapshot(runs, self.where)

    def _run(self, row: Mapping[str, Any]) -> RunSnapshot:
        run_id = str(row["id"])
        record = self._records.setdefault(run_id, LiveRun(run_id, decisions_from_events=False))
        changed = (row.get("last_seen"), row.get("last_step"), row.get("decisions"), row.get("status"))
        if self._seen.get(run_id) != changed and self.clock() >= self._next_fetch.get(run_id, 0.0):
            if self._fetch_events(record):
                self._seen[run_id] = changed
        meta = row.get("meta") or {}
        max_steps = meta.get("max_steps") if isinstance(meta.get("max_steps"), int) else None
        first_seen = row.get("first_seen")
        return record.snapshot(row.get("rule_status") or {}, status=str(row.get("status", "running")),
                               max_steps=max_steps, seconds_since_report=row.get("seconds_since_report"),
                               started=float(first_seen) if isinstance(first_seen, (int, float)) else None)

    def _fetch_events(self, record: LiveRun) -> bool:
        """Read the run's new events; True when it is caught up (False: more pages wait for the next poll)."""
        started = self.clock()
        data: dict[str, Any] = {}
        for data in pages(self._get, record.run_id, since_seq=record.last_seq, max_pages=self.PAGES_PER_POLL):
            for event in _decoded(data.get("events", [])):
                record.apply(event)
        record.set_decisions(data.get("decisions", []))
        record.set_commands(data.get("commands", []))
        finished = self.clock()
        self._next_fetch[record.run_id] = finished + self.FETCH_COST_FACTOR * (finished - started)
        return data.get("next_since_seq") is None

    def control(self, run_id: str, action: str, params: Mapping[str, Any]) -> int:
        """Queue an action for a run (as `guardian ctl` does); return the command's id."""
        body = {"action": action, "params": dict(params)}
        reply = self._fetch(self.url, "POST", f"/v1/runs/{quote(run_id, safe='')}/control", body, token=self.token,
                            timeout=self.timeout_seconds)
        return int(reply["command_id"])


def _decoded(page: Iterable[Any]) -> list[AnyEvent]:
    """The events of a daemon's JSON page, decoded; one that is not an event is left out."""
    out = []
    for data in page:
        try:
            out.append(events.from_builtins(data))
        except msgspec.ValidationError:
            continue
    return out


# ---- one run's event file --------------------------------------------------------------------------


class EventTail:
    """The new complete lines of a growing JSON-lines file: it may appear later, end in a partial line,
    or be replaced (a new run in the same folder), which `read()` reports so the reader starts over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._inode: int | None = None

    def read(self) -> tuple[list[AnyEvent], bool]:
        """(the events of the lines completed since the last call, whether the file was replaced)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return [], False
        restarted = self._inode is not None and (stat.st_ino != self._inode or stat.st_size < self._offset)
        if restarted:
            self._offset, self._partial = 0, b""
        self._inode = stat.st_ino
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [event for event in map(decode_line, lines) if event is not None], restarted


def _rules_for(source: str | None) -> RuleSet:
    """The run's rule file if it can still be read, else the shipped rules."""
    if source and Path(source).is_file():
        try:
            return load_rules(Path(source))
        except RuleFileError:
            pass
    return load_rules(None)


class DirSource:
    """Tails `<output_dir>/guardian/events.jsonl` of one embedded run; watching only."""

    def __init__(self, output_dir: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        folder = Path(output_dir)
        self.path = folder / "guardian" / "events.jsonl"
        self.run_id = folder.resolve().name or "run"
        self.where = str(self.path)
        self.waiting = (f"no events in {self.path} yet — waiting for the run to start "
                        "(GuardianCallback writes them when training begins)")
        self.read_only: str | None = "read-only (--dir): actions need the daemon"
        self.clock = clock
        self._tail = EventTail(self.path)
        self._record: LiveRun | None = None
        self._engine: Engine | None = None

    def snapshot(self) -> Snapshot:
        try:
            new_events, restarted = self._tail.read()
        except OSError as exc:
            return Snapshot(self._runs(), self.where, error=f"cannot read {self.path}: {exc}")
        if restarted:
            self._record, self._engine = None, None
        for event in new_events:
            self._apply(event)
        return Snapshot(self._runs(), self.where)

    def _apply(self, event: AnyEvent) -> None:
        if self._record is None:
            self._record = LiveRun(self.run_id)
        if not self._record.apply(event):
            return
        match event:
            case StartEvent() if self._engine is None or self._engine.ruleset.source != self._record.rules_source:
                self._engine = Engine(_rules_for(self._record.rules_source))
            case MetricsEvent():
                if self._engine is None:
                    self._engine = Engine(_rules_for(None))
                self._engine.observe(event.step, dict(event.values))

    def _runs(self) -> tuple[RunSnapshot, ...]:
        record = self._record
        if record is None:
            return ()
        since = None if record.last_time is None else max(0.0, self.clock() - record.last_time)
        rules: dict[str, str] = {}
        if self._engine is not None:
            if since is not None and not record.tracker.view.ended and record.step is not None:
                self._engine.observe(record.step, {"seconds_since_report": since})
            rules = {name: status.value for name, status in self._engine.rule_status().items()}
        return (record.snapshot(rules, seconds_since_report=since),)

    def control(self, run_id: str, action: str, params: Mapping[str, Any]) -> int:
        raise ReadOnlySourceError(f"cannot {action} {run_id}: --dir only reads {self.path}; to act on a run, "
                                  "start it with GUARDIAN_URL set and run `guardian top --url`")
