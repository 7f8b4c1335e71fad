"""The guardian daemon's core: many runs report to it; it applies their rule sets and answers with decisions.

`Guardian` knows nothing of HTTP: it holds the runs in memory (their engines, exporter views and keys), ingests
their reports, queues operators' and alerts' commands, feeds stalls, and evicts idle runs to the store. A run id is
bound to the key its first report carried (`X-Guardian-Run-Key`): later reports need the same key until the run
has ended. A run's events are taken in seq order without gaps: a report that skips ahead is answered 409 with the
`expected_seq`, and the sender resends from there. guardian.daemon.routes answers HTTP with it,
guardian.daemon.serve wires it up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import Histogram

from guardian.daemon.alertmap import AlertAction, firing_alerts
from guardian.daemon.store import ReportWrite, Store
from guardian.engine.engine import Engine
from guardian.engine.rules import RuleSet
from guardian.errors import RuleFileError
from guardian.events import ActionEvent, ActionKind, Command, DecisionEvent, EndEvent, Kind, MetricsEvent, Reply, StartEvent
from guardian.rulefile.reload import RuleLibrary
from guardian.runview import KeyBudget, Peaks, RunTracker, RunView
from guardian.transport import wire
from guardian.transport.intake import ReportIntake, StoredEvent
from guardian.transport.token import RUN_KEY_HEADER, new_run_key, valid_run_key

__all__ = ["CONTROL_ACTIONS", "Guardian", "RunState", "SeqGap"]

log = logging.getLogger("guardian.daemon")
REPORT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# What an operator or an alert may queue for a run (an alert and restore_lr are a rule's to ask for)
CONTROL_ACTIONS: Final = frozenset({ActionKind.STOP, ActionKind.ROLLBACK, ActionKind.REDUCE_LR,
                                    ActionKind.SKIP_UPDATE})
# A run's rule state is saved with a report that made decisions or ended the run, and otherwise about this
# often: encoding it (~20 KB of detector windows, ~0.8 ms) with every report cost more than everything else a
# report does, and with 1,000 runs saving every 5 s the saves alone wrote 4 MB/s and held replies up to a second.
# After a crash the metrics events stored since the last save are replayed, so nothing is lost.
STATE_SAVE_SECONDS = 60.0
# Runs in memory: one silent this long, or ended this long ago, is saved and dropped (its next report reloads
# it from the store): a live run after a day (its stall alert fires all night first), an ended one after minutes.
# New runs (not in the store) are admitted at most NEW_RUNS_PER_MINUTE a minute (a fleet of 1,000 runs started
# together, a sweep or scale.py, gets in at once).
IDLE_RUN_SECONDS = 24 * 3600.0
ENDED_RUN_SECONDS = 5 * 60.0
NEW_RUNS_PER_MINUTE = 2000
ALERTS_REMEMBERED = 10_000  # (alert, mapping) pairs already acted on; the oldest are forgotten first


def _first_save_due() -> float:
    """A new run's clock for state saves, set back by a random part of the interval: runs that start together
    (a fleet coming back after a daemon restart) then do not all save in the same second."""
    return time.monotonic() - random.uniform(0.0, STATE_SAVE_SECONDS)


class SeqGap(wire.WireError):
    """A report whose events do not continue the run's sequence: answered 409 with the seq expected next."""

    def __init__(self, run_id: str, first: int, expected: int) -> None:
        super().__init__(f"run '{run_id}': events must continue from seq {expected} without gaps, got {first}; "
                         f"resend from seq {expected}", 409)
        self.expected_seq = expected


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class RunState:
    """A run in memory: its rule set and engine, its progress, its key, its exporter view, its lock."""

    id: str
    rules: str
    engine: Engine
    last_seq: int = 0
    last_step: int | None = None
    last_seen: float = field(default_factory=time.time)
    ended: bool = False
    key_hash: str | None = None  # of the key its reports must carry (None: not bound yet)
    key: str | None = None  # that key itself, once a report showed it (memory only: no hash on every report)
    tracker: RunTracker | None = None
    state_saved: float = field(default_factory=_first_save_due)
    last_decision_step: int = -1  # of its latest stored decision (-1: none): a report asking from a later step
    # gets none without a query
    lock: threading.Lock = field(default_factory=threading.Lock)
    evicted: bool = False


class Guardian:
    """Runs, their engines and the store; thread-safe; knows nothing of HTTP."""

    def __init__(self, store: Store, library: RuleLibrary, *, alert_actions: list[AlertAction] | None = None,
                 idle_run_seconds: float = IDLE_RUN_SECONDS, ended_run_seconds: float = ENDED_RUN_SECONDS,
                 new_runs_per_minute: int = NEW_RUNS_PER_MINUTE) -> None:
        self.store = store
        self.library = library
        self.alert_actions = alert_actions or []
        # insertion-ordered, bounded: an Alertmanager resending ever-new alerts cannot grow the daemon
        self._alerts_handled: dict[tuple[str, str, int], None] = {}
        # written from the event loop and the pool threads: change them through `count`
        self.counters = {"events_ingested": 0, "events_duplicate": 0, "reports": 0, "reports_rejected": 0}
        self._counters_lock = threading.Lock()
        self.budget = KeyBudget()  # value keys the runs in memory may show in /metrics, together
        self.idle_run_seconds, self.ended_run_seconds = idle_run_seconds, ended_run_seconds
        self.new_runs_per_minute = new_runs_per_minute
        self._new_runs: deque[float] = deque()  # when the new runs of the last minute arrived
        # from a report's arrival (body read) to its reply: parsing, the rules, the store; the daemon's own
        # share of a run's verdict latency (the rest is the network and the run's sender)
        self.report_seconds = Histogram(
            "guardian_report_duration_seconds", "Time the daemon took to answer a report (parse, rules, store).",
            buckets=REPORT_BUCKETS, registry=None)
        self._runs: dict[str, RunState] = {}
        self._lock = threading.Lock()
        self._commands_waiting = store.pending_command_runs()  # saves a write transaction per report
        library.on_change = self._rules_changed
        library.on_error = self._rules_failed

    # ---- runs --------------------------------------------------------------------------------------

    def _state(self, run_id: str, rules: str) -> RunState:
        with self._lock:
            state = self._runs.get(run_id)
            if state is not None:
                return state
            row = self.store.run(run_id)
            name = rules if row is None else row.rules
            ruleset = self.library.get(name)
            if ruleset is None:
                raise wire.WireError(f"no rule set named '{name}'; available: {', '.join(self.library.names())}", 404)
            if row is None:
                self._admit_new_run()
            engine = Engine(ruleset)
            state = RunState(run_id, name, engine, tracker=RunTracker(run_id, name, budget=self.budget))
            if row is not None:
                state.last_seq, state.last_step, state.ended = row.last_seq, row.last_step, row.ended
                state.last_seen = row.last_seen  # its last report, not now: a stall is measured from there
                self._restore_view(state, row.meta)
                state.key_hash = self.store.run_key_hash(run_id)
                last_decision = self.store.last_decision_step(run_id)
                state.last_decision_step = -1 if last_decision is None else last_decision
                since_seq = 0  # no state saved yet: replay every stored event
                if row.engine_state:
                    try:
                        engine.load_state_dict(row.engine_state)
                        since_seq = row.engine_seq
                    except (KeyError, ValueError) as exc:
                        log.warning("run %s: stored rule state unusable (%s); rules start fresh", run_id, exc)
                        engine = state.engine = Engine(ruleset)
                self._catch_up(engine, run_id, since_seq)
            self._runs[run_id] = state
            return state

    def _restore_view(self, state: RunState, meta: dict[str, Any]) -> None:
        """A stored run's exporter view: its latest values (its newest metrics event), its host and its action
        counters (its action events), as they were before a restart or eviction."""
        assert state.tracker is not None
        state.tracker.view.host = str(meta.get("host", ""))
        for event in self.store.events(state.id, (Kind.ACTION,)):
            state.tracker.apply(event)
        last = self.store.last_event(state.id, Kind.METRICS)
        if last is not None:
            state.tracker.apply(last)
        state.tracker.peaks = Peaks()  # what came before the restart is not a new peak

    def restore(self, now: float | None = None) -> int:
        """Bring back into memory the runs a daemon had there before it stopped (live ones heard from within
        `idle_run_seconds`, ended ones within `ended_run_seconds`), with their rule states, so /metrics and
        `guardian runs` show their last reports and firing rules after a restart; return how many."""
        now = time.time() if now is None else now
        restored = 0
        for row in self.store.runs():
            if now - row.last_seen >= (self.ended_run_seconds if row.ended else self.idle_run_seconds):
                continue
            try:
                self._state(row.id, row.rules)
            except wire.WireError as exc:  # its rule set is gone: it comes back if it reports again
                log.warning("run %s not restored: %s", row.id, exc)
                continue
            restored += 1
        if restored:
            log.info("%d runs restored from the store with their rule states", restored)
        return restored

    def _admit_new_run(self) -> None:
        """Count a new run against the per-minute cap (call holding `self._lock`); 429 when it is spent."""
        now = time.monotonic()
        while self._new_runs and now - self._new_runs[0] >= 60.0:
            self._new_runs.popleft()
        if len(self._new_runs) >= self.new_runs_per_minute:
            raise wire.WireError(f"too many new runs: {self.new_runs_per_minute} started in the last minute, the "
                                 "most this daemon admits; retry this report in a minute (runs that reported "
                                 "before are not limited)", 429)
        self._new_runs.append(now)

    def count(self, name: str, n: int = 1) -> None:
        """Add to one of `counters` (thread-safe)."""
        with self._counters_lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def evict_idle(self, now: float | None = None) -> int:
        """Save and drop from memory the runs silent for `idle_run_seconds` (ended: `ended_run_seconds`); their
        next report reloads them from the store. Return how many were dropped."""
        now = time.time() if now is None else now
        with self._lock:
            states = list(self._runs.values())
        dropped = 0
        for state in states:
            if now - state.last_seen < (self.ended_run_seconds if state.ended else self.idle_run_seconds):
                continue
            if not state.lock.acquire(blocking=False):
                continue  # a report is being answered: it is not idle
            try:
                if state.evicted or now - state.last_seen < (self.ended_run_seconds if state.ended
                                                             else self.idle_run_seconds):
                    continue
                self._commit(state, {}, [], [], save_state=True)
                state.evicted = True
                with self._lock:
                    if self._runs.get(state.id) is state:
                        del self._runs[state.id]
                if state.tracker is not None:
                    state.tracker.release()
                dropped += 1
            finally:
                state.lock.release()
        if dropped:
            log.info("%d idle or ended runs left memory (their state is in the store)", dropped)
        return dropped

    def _catch_up(self, engine: Engine, run_id: str, since_seq: int) -> None:
        """Replay the stored metrics events after `since_seq` through `engine` (their decisions are stored)."""
        replayed = self.store.events(run_id, (Kind.METRICS,), since_seq=since_seq)
        for event in replayed:
            if isinstance(event, MetricsEvent):
                engine.observe(event.step, event.values)
        if replayed:
            log.info("run %s: rule state brought up to date with %d stored events", run_id, len(replayed))

    def _save_state_now(self, state: RunState, decided: bool) -> bool:
        return decided or state.ended or time.monotonic() - state.state_saved >= STATE_SAVE_SECONDS

    def _commit(self, state: RunState, meta: dict[str, Any], events: list[StoredEvent],
                decisions: list[DecisionEvent], save_state: bool, applied: Sequence[int] = (),
                key_hash: str | None = None) -> None:
        """Store a run's new events, decisions and progress in one transaction (call holding `state.lock`).

        If that fails (a full or read-only disk), the run is dropped from memory and the error raised: nothing
        was acknowledged, the client resends, and the run's next report starts again from what is stored."""
        engine_state = json.dumps(state.engine.state_dict()) if save_state else None
        try:
            self.store.commit(ReportWrite(state.id, state.rules, meta, events, decisions, engine_state,
                                          state.last_seq, state.last_step, state.ended, list(applied), key_hash,
                                          last_seen=state.last_seen))
        except Exception:
            with self._lock:
                if self._runs.get(state.id) is state:
                    del self._runs[state.id]
            if state.tracker is not None:
                state.tracker.release()
            raise
        if save_state:
            state.state_saved = time.monotonic()
        if decisions:
            state.last_decision_step = max(state.last_decision_step, *(d.step for d in decisions))

    def flush(self) -> None:
        """Save every run's rule state now (on shutdown: a restart then replays nothing)."""
        with self._lock:
            states = list(self._runs.values())
        for state in states:
            with state.lock:
                self._commit(state, {}, [], [], save_state=True)

    def report(self, report: ReportIntake, run_key: str | None = None) -> Reply:
        """Ingest a report sent with `run_key`; return the reply (ack, decisions, commands, and `run_key` when the
        report bound the run to a key)."""
        state = self._state(report.run_id, report.rules)
        with state.lock:
            bound = self._claim(state, run_key)
            if bound is not None and state.key_hash is not None:
                self._check_numbering(state, report.events)
            new = self._continuing(state, report.events)
            decisions, applied = self._apply(state, report.meta, new)
            state.last_seq = new[-1].event.seq if new else state.last_seq
            state.last_seen = time.time()
            self._commit(state, report.meta, new, decisions, self._save_state_now(state, bool(decisions)), applied,
                         None if bound is None else _key_hash(bound))
            if bound is not None:
                state.key_hash, state.key = _key_hash(bound), bound
            with self._counters_lock:
                self.counters["events_ingested"] += len(new)
                self.counters["events_duplicate"] += len(report.events) - len(new)  # and those after a gap
                self.counters["reports"] += 1
            since = report.decisions_since_step
            if since is not None:
                decisions = self.store.decisions(report.run_id, since_step=since) if (
                    state.last_decision_step >= since) else []
            reply = Reply(ack_seq=state.last_seq, decided_through_step=state.last_step, decisions=decisions,
                          commands=self._take_commands(report.run_id))
            if bound is not None:
                reply.run_key = bound
            return reply

    @staticmethod
    def _apply(state: RunState, meta: dict[str, Any], new: list[StoredEvent]) -> tuple[list[DecisionEvent], list[int]]:
        """Run a report's new events through the run's view and engine (holding `state.lock`); return the
        decisions they caused and the command ids they report applied."""
        decisions: list[DecisionEvent] = []
        applied: list[int] = []
        assert state.tracker is not None
        state.tracker.view.host = str(meta.get("host", state.tracker.view.host))
        for stored in new:
            event = stored.event
            state.tracker.apply(event)
            match event:
                case MetricsEvent():
                    decisions.extend(decision.to_event() for decision in state.engine.observe(event.step, event.values))
                    state.last_step = event.step
                case ActionEvent():
                    applied.extend(event.command_ids or ())
                    if event.rollback_to_step is not None:  # the run went back: so do the baselines
                        state.engine.rewind(event.rollback_to_step)
                case EndEvent():
                    state.ended = True
                case StartEvent():
                    state.ended = False
                    state.engine.clipped = event.clipped is True  # rules' actions_when_clipped
        return decisions, applied

    @staticmethod
    def _claim(state: RunState, given: str | None) -> str | None:
        """Check a report's run key (holding `state.lock`); return the key the run is bound to anew, if it is.

        A run is bound to the key of its first report (the daemon makes one when none was sent); after that a
        report without that key is refused (403) until the run has ended, when a new process may claim it."""
        if given is not None and state.key is not None and hmac.compare_digest(given, state.key):
            return None
        if given is not None and state.key_hash is not None and hmac.compare_digest(_key_hash(given), state.key_hash):
            state.key = given
            return None
        if state.key_hash is not None and not state.ended:
            why = "carries no run key" if given is None else "carries another run key"
            raise wire.WireError(
                f"run '{state.id}' is being reported by another process and this report {why} "
                f"({RUN_KEY_HEADER}); give this run its own run id, or resume it from its output_dir (its key is "
                "kept in <output_dir>/guardian/run_key)", 403)
        if given is None:
            return new_run_key()
        if not valid_run_key(given):
            raise wire.WireError(f"{RUN_KEY_HEADER} must be 32 to 200 printable ASCII characters without spaces; "
                                 "leave it out to have the daemon make one (the reply's run_key)")
        return given

    @staticmethod
    def _check_numbering(state: RunState, events: list[StoredEvent]) -> None:
        """A new process taking over an ended run continues its numbering; events numbered from 1 again would
        be taken for the earlier process's (acknowledged, never stored), so they are refused."""
        first = min((e.event.seq for e in events), default=state.last_seq + 1)
        if first <= state.last_seq:
            raise wire.WireError(
                f"run '{state.id}' was reported by an earlier process up to seq {state.last_seq}, and this report's "
                f"events start at seq {first}: give this run its own run id", 409)

    @staticmethod
    def _continuing(state: RunState, events: list[StoredEvent]) -> list[StoredEvent]:
        """The events that continue the run from `state.last_seq`, in seq order, each seq once; the ones before
        a gap when there is one, and SeqGap when the very first new one leaves a gap."""
        out: list[StoredEvent] = []
        expected = state.last_seq + 1
        if all(e.event.seq == expected + i for i, e in enumerate(events)):  # the usual report: nothing to sort
            return list(events)
        for stored in sorted((e for e in events if e.event.seq > state.last_seq), key=lambda e: e.event.seq):
            seq = stored.event.seq
            if seq > expected:
                if not out:
                    raise SeqGap(state.id, seq, expected)
                break
            if seq == expected:  # a second event with a seq already taken is a duplicate
                out.append(stored)
                expected += 1
        return out

    def _take_commands(self, run_id: str) -> list[Command]:
        with self._lock:
            if run_id not in self._commands_waiting:
                return []
            self._commands_waiting.discard(run_id)
        return self.store.take_commands(run_id)

    def control(self, run_id: str, action: str, params: dict[str, Any], source: str) -> int:
        """Queue a manual action for a run; it is delivered with the run's next report."""
        if action not in CONTROL_ACTIONS:
            valid = ", ".join(sorted(kind.value for kind in CONTROL_ACTIONS))
            raise wire.WireError(f"unknown action '{action}'; valid: {valid}")
        row = self.store.run(run_id)
        if row is None:
            raise wire.WireError(f"no run '{run_id}'; `guardian runs` lists them", 404)
        if row.ended:
            raise wire.WireError(f"run '{run_id}' has ended: {action} is only for a run still training", 409)
        factor = params.get("factor", 0.5)
        if action == ActionKind.REDUCE_LR.value and (not isinstance(factor, (int, float)) or not 0 < factor < 1):
            raise wire.WireError(f"reduce_lr factor must be between 0 and 1, got {factor!r}")
        command = self.store.add_command(run_id, action, params, source)
        with self._lock:
            self._commands_waiting.add(run_id)
        return command

    def alerts(self, payload: Any) -> list[dict[str, Any]]:
        """Turn a webhook's firing alerts into commands, through the alert-actions mappings."""
        try:
            alerts = firing_alerts(payload)
        except ValueError as exc:
            raise wire.WireError(str(exc)) from None
        live = [r.id for r in self.store.runs() if not r.ended]
        queued = []
        for alert in alerts:
            labels = {str(k): str(v) for k, v in alert["labels"].items()}
            key = str(alert.get("fingerprint") or sorted(labels.items())), str(alert.get("startsAt", ""))
            for index, mapping in enumerate(self.alert_actions):
                if not mapping.matches(labels) or (*key, index) in self._alerts_handled:
                    continue
                self._alerts_handled[(*key, index)] = None
                if len(self._alerts_handled) > ALERTS_REMEMBERED:
                    del self._alerts_handled[next(iter(self._alerts_handled))]
                targets = live if mapping.runs == "all" else [labels["run_id"]] if labels.get("run_id") in live else []
                for run_id in targets:
                    command = self.control(run_id, mapping.action, mapping.params,
                                           source=f"alert:{labels.get('alertname', '?')}")
                    queued.append({"run_id": run_id, "action": mapping.action, "command_id": command})
        if queued:
            log.warning("alerts queued %d actions: %s", len(queued), queued)
        return queued

    def tick(self, now: float | None = None) -> None:
        """Feed `seconds_since_report` to every live run, so a `stalled` rule can fire."""
        now = time.time() if now is None else now
        self.evict_idle(now)
        with self._lock:
            states = [s for s in self._runs.values() if not s.ended and s.last_step is not None]
        for state in states:
            with state.lock:
                decisions = state.engine.observe(state.last_step or 0, {"seconds_since_report": now - state.last_seen})
                if decisions:
                    self._commit(state, {}, [], [d.to_event() for d in decisions], save_state=True)

    def maintain(self, retain_days: float | None) -> None:
        """Keep the store bounded: thin old metrics of every run, delete runs past retention."""
        for row in self.store.runs():
            self.store.thin(row.id)
        if retain_days is not None:
            pruned = self.store.prune(retain_days)
            if pruned:
                log.info("deleted %d runs not heard from in %g days", pruned, retain_days)

    def views(self, scraper: str = "") -> list[RunView]:
        """The exporter's view of every run in memory, built now for a scrape by `scraper` (its peaks since its
        previous scrape: see exporter.Peaks)."""
        with self._lock:
            states = list(self._runs.values())
        views = []
        for state in states:
            with state.lock:
                assert state.tracker is not None
                view = state.tracker.view
                view.rule_status = {k: v.value for k, v in state.engine.rule_status().items()}
                view.rule_firings = {k: fired for k, (fired, _) in state.engine.rule_counts().items()}
                view.stalled = view.rule_status.get("stalled") == "firing"
                view.ended = state.ended
                view.last_report = state.last_seen
                view.peaks = state.tracker.peaks.take(scraper, view.latest)
                views.append(view.copy())
        return views

    def health(self) -> dict[str, Any]:
        reloads = self.store.reload_counts()
        statuses: dict[str, int] = {}
        for run in self.runs():
            statuses[run["status"]] = statuses.get(run["status"], 0) + 1
        with self._counters_lock:
            counters = dict(self.counters)
        return {**counters, "value_keys_dropped": self.budget.dropped,
                "store_size_bytes": self.store.size_bytes(), "runs": statuses,
                "reloads_ok": reloads.get(True, 0), "reloads_error": reloads.get(False, 0)}

    def runs(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        counts = self.store.decision_counts()
        for row in self.store.runs():
            with self._lock:
                state = self._runs.get(row.id)
            status = {k: v.value for k, v in state.engine.rule_status().items()} if state else {}
            # a run not in memory and silent this long was dropped as idle: it is stalled by any measure
            stalled = status.get("stalled") == "firing" or (state is None and now - row.last_seen >= self.idle_run_seconds)
            phase = "ended" if row.ended else "stalled" if stalled else (
                "firing" if "firing" in status.values() else "running")
            out.append({"id": row.id, "rules": row.rules, "status": phase, "last_step": row.last_step,
                        "first_seen": row.first_seen, "last_seen": row.last_seen,
                        "seconds_since_report": round(now - row.last_seen, 1),
                        "rule_status": status, "meta": row.meta, "decisions": counts.get(row.id, 0)})
        return out

    # ---- hot reload --------------------------------------------------------------------------------

    def _rules_changed(self, name: str, ruleset: RuleSet) -> None:
        with self._lock:
            states = [s for s in self._runs.values() if s.rules == name]
        for state in states:
            with state.lock:
                fresh = state.engine.replace_rules(ruleset)
            log.info("run %s: rules '%s' reloaded (%d rules start fresh: %s)", state.id, name, len(fresh), fresh)
        self.store.record_reload(name, True, f"{len(ruleset.rules)} rules from {ruleset.source}")

    def _rules_failed(self, name: str, error: RuleFileError) -> None:
        self.store.record_reload(name, False, str(error))


