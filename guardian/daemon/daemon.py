"""The guardian daemon: many runs report to it; it applies their rule sets and answers with decisions.

`Guardian` is the core (no HTTP): runs, their engines and the store. `serve()` wires it to an HTTP server,
the rule-file watcher and the stall ticker. Bind to loopback by default; a token (created on first start,
mode 0600, see guardian.transport.token) is required for every write (reports, control, alerts), and for reads too when
listening beyond loopback. A run id is bound to the key its first report carried (`X-Guardian-Run-Key`): later
reports need the same key until the run has ended. A run's events are taken in seq order without gaps: a report
that skips ahead is answered 409 with the `expected_seq`, and the sender resends from there.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from prometheus_client import Histogram

from guardian.daemon.alertmap import AlertAction, firing_alerts, load_alert_actions
from guardian.daemon.httpserver import HTTPServer, Reply, Request
from guardian.daemon.store import ReportWrite, Store, StoreError, move_aside
from guardian.engine.engine import Engine
from guardian.engine.rules import RuleSet
from guardian import events
from guardian.events import ActionEvent, EndEvent, MetricsEvent, StartEvent
from guardian.errors import RuleFileError
from guardian.exporter import GuardianCollector, KeyBudget, Peaks, RunTracker, RunView, exposition_pieces
from guardian.rulefile.reload import RuleLibrary
from guardian.transport import wire
from guardian.transport.token import RUN_KEY_HEADER, load_or_create_token, new_run_key, token_path, valid_run_key

__all__ = ["Guardian", "SeqGap", "load_or_create_token", "make_server", "serve"]

log = logging.getLogger("guardian.daemon")
DEFAULT_PORT = 8765
REPORT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTROL_ACTIONS = {"stop", "rollback", "reduce_lr", "skip_update"}
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
# A report body over this is judged in the thread pool, so the event loop keeps answering the others.
INLINE_REPORT_BYTES = 256 * 1024


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
        self._alerts_handled: set[tuple[str, str, int]] = set()
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
        for event in self.store.events(state.id, ("action",)):
            state.tracker.apply(events.from_builtins(event))
        last = self.store.last_event(state.id, "metrics")
        if last is not None:
            state.tracker.apply(events.from_builtins(last))
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
        replayed = self.store.events(run_id, ("metrics",), since_seq=since_seq)
        for event in replayed:
            engine.observe(event["step"], wire.metric_values(event))
        if replayed:
            log.info("run %s: rule state brought up to date with %d stored events", run_id, len(replayed))

    def _save_state_now(self, state: RunState, decided: bool) -> bool:
        return decided or state.ended or time.monotonic() - state.state_saved >= STATE_SAVE_SECONDS

    def _commit(self, state: RunState, meta: dict[str, Any], events: list[dict[str, Any]],
                decisions: list[dict[str, Any]], save_state: bool, applied: Sequence[int] = (),
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

    def flush(self) -> None:
        """Save every run's rule state now (on shutdown: a restart then replays nothing)."""
        with self._lock:
            states = list(self._runs.values())
        for state in states:
            with state.lock:
                self._commit(state, {}, [], [], save_state=True)

    def report(self, report: wire.Report, decisions_since_step: int | None = None,
               run_key: str | None = None) -> dict[str, Any]:
        """Ingest a report sent with `run_key`; return the reply body (ack, decisions, commands, and `run_key`
        when the report bound the run to a key)."""
        state = self._state(report.run_id, report.rules)
        with state.lock:
            bound = self._claim(state, run_key)
            if bound is not None and state.key_hash is not None:
                self._check_numbering(state, report.events)
            new = self._continuing(state, report.events)
            decisions: list[dict[str, Any]] = []
            applied: list[int] = []
            assert state.tracker is not None
            state.tracker.view.host = str(report.meta.get("host", state.tracker.view.host))
            for raw in new:
                event = events.from_builtins(raw)
                state.tracker.apply(event)
                match event:
                    case MetricsEvent():
                        for decision in state.engine.observe(event.step, event.values):
                            decisions.append(decision.to_dict())
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
            state.last_seq = new[-1]["seq"] if new else state.last_seq
            state.last_seen = time.time()
            self._commit(state, report.meta, new, decisions, self._save_state_now(state, bool(decisions)), applied,
                         None if bound is None else _key_hash(bound))
            if bound is not None:
                state.key_hash, state.key = _key_hash(bound), bound
            with self._counters_lock:
                self.counters["events_ingested"] += len(new)
                self.counters["events_duplicate"] += len(report.events) - len(new)  # and those after a gap
                self.counters["reports"] += 1
            if decisions_since_step is not None:
                decisions = self.store.decisions(report.run_id, since_step=decisions_since_step)
            reply = {"ack_seq": state.last_seq, "decided_through_step": state.last_step, "decisions": decisions,
                     "commands": self._take_commands(report.run_id)}
            return reply if bound is None else {**reply, "run_key": bound}

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
    def _check_numbering(state: RunState, events: list[dict[str, Any]]) -> None:
        """A new process taking over an ended run continues its numbering; events numbered from 1 again would
        be taken for the earlier process's (acknowledged, never stored), so they are refused."""
        first = min((e["seq"] for e in events), default=state.last_seq + 1)
        if first <= state.last_seq:
            raise wire.WireError(
                f"run '{state.id}' was reported by an earlier process up to seq {state.last_seq}, and this report's "
                f"events start at seq {first}: give this run its own run id", 409)

    @staticmethod
    def _continuing(state: RunState, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events that continue the run from `state.last_seq`, in seq order, each seq once; the ones before
        a gap when there is one, and SeqGap when the very first new one leaves a gap."""
        out: list[dict[str, Any]] = []
        expected = state.last_seq + 1
        for event in sorted((e for e in events if e["seq"] > state.last_seq), key=lambda e: e["seq"]):
            if event["seq"] > expected:
                if not out:
                    raise SeqGap(state.id, event["seq"], expected)
                break
            if event["seq"] == expected:  # a second event with a seq already taken is a duplicate
                out.append(event)
                expected += 1
        return out

    def _take_commands(self, run_id: str) -> list[dict[str, Any]]:
        with self._lock:
            if run_id not in self._commands_waiting:
                return []
            self._commands_waiting.discard(run_id)
        return self.store.take_commands(run_id)

    def control(self, run_id: str, action: str, params: dict[str, Any], source: str) -> int:
        """Queue a manual action for a run; it is delivered with the run's next report."""
        if action not in CONTROL_ACTIONS:
            raise wire.WireError(f"unknown action '{action}'; valid: {', '.join(sorted(CONTROL_ACTIONS))}")
        row = self.store.run(run_id)
        if row is None:
            raise wire.WireError(f"no run '{run_id}'; `guardian runs` lists them", 404)
        if row.ended:
            raise wire.WireError(f"run '{run_id}' has ended: {action} is only for a run still training", 409)
        factor = params.get("factor", 0.5)
        if action == "reduce_lr" and (not isinstance(factor, (int, float)) or not 0 < factor < 1):
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
                self._alerts_handled.add((*key, index))
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
                    self._commit(state, {}, [], [d.to_dict() for d in decisions], save_state=True)

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


# ---- HTTP --------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Routes:
    """The daemon's endpoints: one `Request` in, one `Reply` out (see guardian.daemon.httpserver)."""

    def __init__(self, core: Guardian, token: str, token_path: Path, require_token: bool) -> None:
        self.core, self.token, self.token_path, self.require_token = core, token, token_path, require_token
        self.metrics: Any = None

    @staticmethod
    def inline(request: Request) -> bool:
        """Reports are answered on the event loop, and so are scrapes (rendered there a piece at a time, between
        reports); everything else (listings, control) in the thread pool."""
        path = request.target.split("?")[0].rstrip("/")
        if (request.method, path) == ("POST", "/v1/report"):
            return len(request.body) <= INLINE_REPORT_BYTES  # a large one is judged in the pool, off the loop
        return (request.method, path) == ("GET", "/metrics")

    @staticmethod
    def too_large(size: int) -> Reply:
        return Reply(413, wire.dumps({"error": f"message of {size} bytes is over the limit of "
                                               f"{wire.MAX_BODY_BYTES} bytes; send smaller batches"}))

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _token_needed(self, parts: list[str]) -> str:
        if parts == ["v1", "alerts"]:
            return ("alert webhooks need the token: 'Authorization: Bearer <token>' (Alertmanager: "
                    f"http_config.authorization.credentials_file: {self.token_path})")
        what = "every request" if self.require_token else "writes (reports, control, alerts)"
        return (f"a valid token is required for {what}; the token is in {self.token_path}. The guardian commands "
                "read it from --token or $GUARDIAN_TOKEN, the callback from token= or $GUARDIAN_TOKEN, both else "
                "from $GUARDIAN_HOME/token; over HTTP send 'Authorization: Bearer <token>'")

    def index(self) -> dict[str, Any]:
        """GET /: what this daemon serves, and which requests need the token."""
        from guardian import __version__

        reads = "token needed" if self.require_token else "open on loopback"
        return {"service": "guardian daemon", "version": __version__, "token_file": str(self.token_path),
                "reads": reads, "writes": "token needed (Authorization: Bearer <token>)",
                "endpoints": [{"method": method, "path": path, "token": self.require_token or method == "POST",
                               "what": what} for method, path, what in ENDPOINTS]}

    def handle(self, request: Request) -> Reply:
        method, url = request.method, urlparse(request.target)
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        try:
            if (self.require_token or method not in ("GET", "HEAD")) and not self._authorized(request):
                raise wire.WireError(self._token_needed(parts), 401)
            return self._route(request, parts, parse_qs(url.query))
        except wire.WireError as exc:
            self.core.count("reports_rejected", method == "POST" and parts[-1:] == ["report"])
            body: dict[str, Any] = {"error": str(exc)}
            if isinstance(exc, SeqGap):
                body["expected_seq"] = exc.expected_seq
            return Reply(exc.status, wire.dumps(body))
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the daemon down
            log.exception("error handling %s %s", method, request.target)
            return Reply(500, wire.dumps({"error": f"internal error: {exc}"}))

    def _route(self, request: Request, parts: list[str], query: dict[str, list[str]]) -> Reply:
        core, method = self.core, request.method
        if method == "GET" and parts == ["healthz"]:
            return Reply(200, wire.dumps({"ok": True}))
        if method == "GET" and parts == ["metrics"] and self.metrics is not None:
            pieces, content_type = self.metrics(scraper_of(request, query))
            return Reply(200, content_type=content_type, pieces=pieces)
        if method == "GET" and not parts:
            return _ok(self.index())
        if parts[:1] != ["v1"]:
            raise wire.WireError(f"no such endpoint: {method} {request.target}", 404)
        if method == "POST" and parts == ["v1", "report"]:
            started = time.perf_counter()
            message = wire.loads(request.body)
            since = message.get("decisions_since_step")
            reply = _ok(core.report(wire.parse_report(message), since if isinstance(since, int) else None,
                                    request.headers.get(RUN_KEY_HEADER.lower())))
            core.report_seconds.observe(time.perf_counter() - started)
            return reply
        if method == "GET" and parts == ["v1", "runs"]:
            return _ok({"runs": core.runs()})
        if method == "GET" and len(parts) == 4 and parts[:2] == ["v1", "runs"] and parts[3] == "events":
            return _ok(event_page(core.store, parts[2], query))
        if method == "POST" and len(parts) == 4 and parts[:2] == ["v1", "runs"] and parts[3] == "control":
            message = wire.loads(request.body)
            params = message.get("params", {})
            if not isinstance(params, dict) or not isinstance(message.get("action"), str):
                raise wire.WireError("body must be {\"v\": 1, \"action\": \"stop|rollback|reduce_lr\", \"params\": {}}")
            return _ok({"command_id": core.control(parts[2], message["action"], params, source="ctl")})
        if method == "POST" and parts == ["v1", "alerts"]:
            return _ok({"queued": core.alerts(wire.parse_json(request.body))})
        if method == "GET" and parts == ["v1", "rules"]:
            return _ok({"rule_sets": core.library.names(), "errors": core.library.errors,
                        "reloads": core.store.reloads()})
        raise wire.WireError(f"no such endpoint: {method} {request.target}", 404)


ENDPOINTS = (
    ("GET", "/", "this index"),
    ("GET", "/healthz", "liveness: {\"ok\": true}"),
    ("GET", "/metrics", "Prometheus metrics (?scraper=NAME tells scrapers apart for the *_max gauges)"),
    ("GET", "/v1/runs", "every run with its status, rule states and meta"),
    ("GET", "/v1/runs/{run_id}/events", "a run's events, a page at a time (since_seq, limit, kinds), decisions "
                                        "and commands"),
    ("GET", "/v1/rules", "rule sets, reload errors and reloads"),
    ("POST", "/v1/report", "a run's events (the callback sends these)"),
    ("POST", "/v1/runs/{run_id}/control", "queue stop, rollback, reduce_lr or skip_update for a run"),
    ("POST", "/v1/alerts", "Alertmanager or Grafana webhooks, mapped to actions by alert-actions.yaml"),
)
MAX_SCRAPER_NAME = 200


def scraper_of(request: Request, query: dict[str, list[str]]) -> str:
    """Who is scraping /metrics, for the peaks since its previous scrape: `?scraper=NAME` (Prometheus scrape
    config `params: {scraper: [NAME]}`), else its address and User-Agent."""
    named = query.get("scraper", [""])[0]
    who = f"name {named}" if named else f"{request.peer} {request.headers.get('user-agent', '')}"
    return who[:MAX_SCRAPER_NAME]


EVENTS_PAGE_DEFAULT = 1000
EVENTS_PAGE_MAX = 10_000


def event_page(store: Store, run_id: str, query: dict[str, list[str]]) -> dict[str, Any]:
    """One page of GET /v1/runs/{id}/events: the events after `since_seq` (at most `limit`, default 1000, at most
    10,000; `kinds` a comma-separated filter), `next_since_seq` to ask for the next page with (null when this
    was the last), and the run's decisions and commands."""
    since_seq = _query_int(query, "since_seq", 0, 0, wire.MAX_SEQ)
    limit = _query_int(query, "limit", EVENTS_PAGE_DEFAULT, 1, EVENTS_PAGE_MAX)
    kinds = tuple(query["kinds"][0].split(",")) if query.get("kinds") else ()
    if not set(kinds) <= set(wire.EVENT_KINDS):
        raise wire.WireError(f"query parameter 'kinds' must be a comma-separated list of {', '.join(wire.EVENT_KINDS)}")
    events = store.events(run_id, kinds, since_seq=since_seq, limit=limit)
    more = len(events) == limit
    return {"events": events, "next_since_seq": events[-1]["seq"] if more else None,
            "decisions": store.decisions(run_id), "commands": store.commands(run_id)}


def _query_int(query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    text = query.get(name, [""])[0]
    if not text:
        return default
    if not text.isdigit() or len(text) > 16 or not low <= int(text) <= high:
        raise wire.WireError(f"query parameter '{name}' must be an integer from {low} to {high}, got {text[:20]!r}")
    return int(text)


def _private(db: Path) -> None:
    """The store's files readable by this user only (SQLite gives -wal and -shm files it makes later the mode of
    the database file)."""
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if path.exists():
            os.chmod(path, 0o600)


def _ok(body: dict[str, Any]) -> Reply:
    return Reply(200, wire.dumps(body))


class DaemonServer(HTTPServer):
    """The daemon's HTTP server: `routes` answer, `metrics` (set by `serve`) renders GET /metrics."""

    def __init__(self, routes: _Routes, host: str, port: int, **options: Any) -> None:
        # a web page must not reach the daemon: no Origin, JSON bodies only, and on loopback only requests
        # addressed to loopback (DNS rebinding); `options` (timeouts, limits) go to HTTPServer
        super().__init__(host, port, handle=routes.handle, inline=routes.inline, too_large=routes.too_large,
                         max_body=wire.MAX_BODY_BYTES, refuse_browsers=True, loopback_hosts=_is_loopback(host),
                         **options)
        self.routes = routes

    @property
    def metrics(self) -> Any:
        return self.routes.metrics

    @metrics.setter
    def metrics(self, render: Any) -> None:
        self.routes.metrics = render


def metrics_endpoint(core: Guardian) -> Any:
    """A function returning the Prometheus text format of the core's state as pieces to render one by one on the
    event loop (see `exposition_pieces`), and its content type, for GET /metrics."""
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    def render(scraper: str = "") -> tuple[Any, str]:
        collector = GuardianCollector(lambda: core.views(scraper), core.health)
        return exposition_pieces(collector, (core.report_seconds,)), CONTENT_TYPE_LATEST

    return render


def make_server(core: Guardian, host: str, port: int, token: str, token_path: Path, **options: Any) -> DaemonServer:
    """The daemon's server, listening already; the token is needed for everything off loopback. `options`:
    HTTPServer's timeouts and limits."""
    return DaemonServer(_Routes(core, token, token_path, require_token=not _is_loopback(host)), host, port,
                        **options)


def open_store(state_dir: Path, *, fresh: bool = False) -> Store:
    """The daemon's store in `state_dir`; StoreError (which file, what is wrong, what to do) when it is damaged.
    With `fresh`, a damaged store is moved aside with a timestamp and an empty one started (a sound store is
    kept: the flag can stay in a service file). Warns when a store is created in a state folder that was in
    use before (its token is there): the old store may have been moved or deleted."""
    path = state_dir / "guardian.db"
    used_before = (state_dir / "token").exists()
    try:
        store = Store(path)
    except StoreError as exc:
        if not fresh:
            raise
        moved = move_aside(path)
        log.warning("%s; moved it aside to %s and started an empty store", str(exc).split(";")[0], moved)
        return Store(path)
    if fresh:
        log.warning("--fresh-store: %s is sound, so it is kept", path)
    elif store.created and used_before:
        log.warning("%s is new, but %s was used before (its token is there): runs stored earlier are not in it. "
                    "If the store was moved, stop the daemon and put it back", path, state_dir)
    return store


def daemon_url(host: str, port: int) -> str:
    """The URL clients use for a daemon bound to (host, port): this machine's name for a wildcard address."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(*, host: str = "127.0.0.1", port: int = DEFAULT_PORT, state_dir: Path, rules_dir: Path | None = None,
          alert_actions: Path | None = None, tick_seconds: float = 1.0, maintain_seconds: float = 600.0,
          retain_days: float | None = None, ready: threading.Event | None = None, fresh_store: bool = False) -> None:
    """Run the daemon until SIGINT/SIGTERM. `fresh_store` moves a damaged store aside and starts an empty one."""
    token_path_ = token_path(state_dir)
    store = open_store(state_dir, fresh=fresh_store)  # before the token: a new store in a used folder is warned of
    token = load_or_create_token(state_dir)
    _private(store.path)
    library = RuleLibrary(rules_dir if rules_dir is not None else state_dir / "rules")
    actions_file = alert_actions or state_dir / "alert-actions.yaml"
    mappings = load_alert_actions(actions_file) if alert_actions or actions_file.exists() else []
    core = Guardian(store, library, alert_actions=mappings)
    core.restore()  # the runs in memory before a restart, with their last reports and rule states
    library.watch()
    server = make_server(core, host, port, token, token_path_)
    server.metrics = metrics_endpoint(core)
    stopping = threading.Event()

    def ticker() -> None:
        last_maintained = time.monotonic()
        while not stopping.wait(tick_seconds):
            try:
                core.tick()
                if time.monotonic() - last_maintained > maintain_seconds:
                    core.maintain(retain_days)
                    last_maintained = time.monotonic()
            except Exception:  # noqa: BLE001 - the ticker must outlive one bad pass
                log.exception("stall check or store maintenance failed")

    threading.Thread(target=ticker, daemon=True, name="guardian-ticker").start()

    def stop(*_: Any) -> None:
        stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    url = daemon_url(str(server.server_address[0]), int(server.server_address[1]))
    log.info("guardian daemon listening on %s (state in %s, rules in %s); the token for writes is in %s. "
             "Runs report here with:\n    export GUARDIAN_URL=%s", url, state_dir, library.rules_dir, token_path_, url)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        library.stop()
        server.server_close()
        try:
            core.flush()
        finally:
            store.close()
