"""The daemon's store: SQLite in WAL mode, one file, every run's events, decisions and commands.

Each report is committed in one transaction (`ReportWrite`) together with the run's engine state and the
sequence number it has processed up to, so after a crash (even SIGKILL) the stored events, the decisions and
the rule state agree, and a resent event is recognised by its (run, seq) and stored once.

Growth is bounded: a run keeps its newest `metrics_kept` metrics events in full; older ones are thinned to
every `thin_every`-th step (decisions, actions and commands are never thinned); runs not heard from in
`retain_days` are deleted by `prune()`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from guardian import events
from guardian.errors import ConfigError, LogFormatError
from guardian.events import AnyEvent, Command, DecisionEvent, Kind
from guardian.transport import wire
from guardian.transport.intake import StoredEvent, check_tree, phaseless_metrics

log = logging.getLogger("guardian.daemon")
_decision: Final = msgspec.json.Decoder(DecisionEvent, strict=False)  # rows from before typed events have no kind
_json_value: Final = msgspec.json.Decoder(msgspec.Raw)  # checks a row is JSON without building it


class StoreError(ConfigError):
    """The store file cannot be used (truncated, not SQLite, unreadable): says which file and what to do."""


def damaged_store_error(path: Path, exc: BaseException) -> StoreError:
    return StoreError(
        f"{path}: the daemon's store is unreadable ({exc}); it may be truncated or not a guardian store. "
        f"Move it (and {path.name}-wal, {path.name}-shm) aside to keep it, or start with "
        "`guardian serve --fresh-store`, which moves it aside with a timestamp and starts an empty store")


def move_aside(path: Path) -> Path | None:
    """Rename a damaged store (and its -wal/-shm files) to `<name>.damaged-<UTC time>`; return the new path."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("-wal", "-shm", ""):
        part = path.with_name(path.name + suffix)
        if part.exists():
            part.rename(target.with_name(target.name + suffix))
    return target

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, rules TEXT NOT NULL, meta TEXT NOT NULL, first_seen REAL NOT NULL,
    last_seen REAL NOT NULL, last_seq INTEGER NOT NULL DEFAULT 0, last_step INTEGER,
    ended INTEGER NOT NULL DEFAULT 0
);
-- A run's rule state (~20 KB of detector windows) has a table of its own: the runs row is updated with every
-- report, and carrying the state in it made each report's commit a third slower.
CREATE TABLE IF NOT EXISTS run_states (run_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL);
-- The hash of the key a run's sender holds (see Guardian.report): reports for the run must carry the key.
CREATE TABLE IF NOT EXISTS run_keys (run_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, step INTEGER, time REAL,
    body TEXT NOT NULL, PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_kind ON events (run_id, kind, step);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER NOT NULL, rule TEXT NOT NULL,
    severity TEXT NOT NULL, time REAL NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_run ON decisions (run_id, step);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, action TEXT NOT NULL, params TEXT NOT NULL,
    source TEXT NOT NULL, created REAL NOT NULL, delivered REAL, applied REAL
);
CREATE TABLE IF NOT EXISTS reloads (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, source TEXT NOT NULL, ok INTEGER NOT NULL, message TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class RunRow:
    id: str
    rules: str
    meta: dict[str, Any]
    first_seen: float
    last_seen: float
    last_seq: int
    last_step: int | None
    engine_state: dict[str, Any] | None  # read by `run()` only; `runs()` leaves it out
    ended: bool
    engine_seq: int  # the engine state is as of this seq: replay the metrics events after it


@dataclass
class ReportWrite:
    """What one report changes in the store, committed in one transaction by `Store.commit`."""

    run_id: str
    rules: str
    meta: dict[str, Any]
    events: list[StoredEvent]  # stored as the raw JSON they arrived as
    decisions: list[DecisionEvent]
    engine_state: str | None  # JSON, encoded when the state was taken; None leaves the stored state as it was
    last_seq: int
    last_step: int | None
    ended: bool
    applied: list[int] = field(default_factory=list)  # command ids the run reports as applied
    key_hash: str | None = None  # the run's key was bound (anew) with this report; None: unchanged
    # the time of the run's last report (a commit on shutdown, eviction or a stall decision keeps it); None: now
    last_seen: float | None = None


class Store:
    """Thread-safe access to the daemon's SQLite file."""

    def __init__(self, path: str | Path, *, metrics_kept: int = 100_000, thin_every: int = 10) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_kept = metrics_kept
        self.thin_every = thin_every
        self._lock = threading.Lock()
        self.created = not self.path.exists()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._open()
            # Listings and event pages read through a second, read-only connection: in WAL mode a reader never
            # waits for the writer, so a large read does not hold up reports (and cannot write by mistake).
            self._reader = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                           check_same_thread=False, isolation_level=None)
        except sqlite3.DatabaseError as exc:  # not a database, truncated, malformed
            raise damaged_store_error(self.path, exc) from None
        self._read_lock = threading.Lock()

    def _open(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; fsync per checkpoint
        self._db.executescript(SCHEMA)
        if self._db.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("integrity check failed")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        if "engine_state" in columns:  # a store from before run_states: move its states there (once: then NULL)
            seq = "engine_seq" if "engine_seq" in columns else "last_seq"
            with self._tx() as db:
                db.execute(f"INSERT OR IGNORE INTO run_states (run_id, seq, state) SELECT id, {seq}, engine_state "
                           "FROM runs WHERE engine_state IS NOT NULL")
                db.execute("UPDATE runs SET engine_state = NULL WHERE engine_state IS NOT NULL")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A query on the read-only connection (sees every committed write)."""
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    # ---- runs --------------------------------------------------------------------------------------

    def run(self, run_id: str) -> RunRow | None:
        rows = self._query(_RUN_SELECT.format(state="s.state") + " WHERE r.id = ?", (run_id,))
        return _run_row(rows[0]) if rows else None

    def runs(self) -> list[RunRow]:
        """Every run, newest first, without its engine state."""
        return [_run_row(r) for r in self._read(_RUN_SELECT.format(state="NULL") + " ORDER BY r.last_seen DESC")]

    def pending_command_runs(self) -> set[str]:
        """The runs with commands not yet delivered."""
        return {r[0] for r in self._query("SELECT DISTINCT run_id FROM commands WHERE delivered IS NULL")}

    def commit(self, w: ReportWrite) -> int:
        """Store a report's new events, the decisions they caused and the run's progress in one transaction;
        return the event rows added (a resent event is stored once).

        `w.engine_state`, when given, is saved as of `w.last_seq`; without it the stored state stays as it was,
        and the events stored since let `Guardian` bring it up to date by replaying them."""
        now = time.time()
        meta = msgspec.json.encode(w.meta).decode()  # everything is encoded before the lock is taken
        events_ = [(w.run_id, s.event.seq, type(s.event).__struct_config__.tag, s.event.step, s.event.time,
                    s.raw.decode()) for s in w.events]  # the struct's tag: its kind as the wire spells it
        decisions = [(w.run_id, d.step, d.rule, d.severity.value, now, events.encode(d).decode())
                     for d in w.decisions]
        seen = now if w.last_seen is None else w.last_seen
        with self._tx() as db:  # a report that made no decision and applied no command: 3 statements and the events
            db.execute(
                "INSERT INTO runs (id, rules, meta, first_seen, last_seen, last_seq, last_step, ended) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET last_seen = excluded.last_seen, "
                "rules = excluded.rules, last_seq = MAX(last_seq, excluded.last_seq), "
                "last_step = COALESCE(excluded.last_step, last_step), ended = MAX(ended, excluded.ended), "
                "meta = CASE WHEN excluded.meta = '{}' THEN meta ELSE excluded.meta END",
                (w.run_id, w.rules, meta, now, seen, w.last_seq, w.last_step, int(w.ended)),
            )
            added = db.executemany(
                "INSERT OR IGNORE INTO events (run_id, seq, kind, step, time, body) VALUES (?, ?, ?, ?, ?, ?)", events_,
            ).rowcount if events_ else 0
            if decisions:
                db.executemany("INSERT INTO decisions (run_id, step, rule, severity, time, body) "
                               "VALUES (?, ?, ?, ?, ?, ?)", decisions)
            if w.engine_state is not None:
                db.execute("INSERT OR REPLACE INTO run_states (run_id, seq, state) VALUES (?, ?, ?)",
                           (w.run_id, w.last_seq, w.engine_state))
            if w.applied:
                db.executemany("UPDATE commands SET applied = ? WHERE id = ?", [(now, i) for i in w.applied])
            if w.key_hash is not None:
                db.execute("INSERT OR REPLACE INTO run_keys (run_id, key_hash) VALUES (?, ?)", (w.run_id, w.key_hash))
        return added

    def run_key_hash(self, run_id: str) -> str | None:
        rows = self._query("SELECT key_hash FROM run_keys WHERE run_id = ?", (run_id,))
        return str(rows[0][0]) if rows else None

    def touch(self, run_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET last_seen = ? WHERE id = ?", (time.time(), run_id))

    # ---- events and decisions ----------------------------------------------------------------------

    def events(self, run_id: str, kinds: tuple[Kind, ...] = (), since_seq: int = 0,
               limit: int = 100_000) -> list[AnyEvent]:
        """The run's events after `since_seq` in seq order (at most `limit`; `kinds` filters), typed; a row that
        no longer decodes is left out with a warning."""
        return [event for seq, body in self.event_rows(run_id, kinds, since_seq, limit)
                if (event := _event_of(run_id, seq, body)) is not None]

    def event_rows(self, run_id: str, kinds: tuple[Kind, ...] = (), since_seq: int = 0,
                   limit: int = 100_000) -> list[tuple[int, str]]:
        """The run's stored rows after `since_seq` as (seq, raw JSON), for an events page."""
        sql = "SELECT seq, body FROM events WHERE run_id = ? AND seq > ?"
        args: list[Any] = [run_id, since_seq]
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            args.extend(kind.value for kind in kinds)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [(row[0], row[1]) for row in self._read(sql, tuple(args))]

    def last_event(self, run_id: str, kind: Kind) -> AnyEvent | None:
        """The run's newest event of this kind (by seq), or None (also when its row no longer decodes)."""
        rows = self._read("SELECT seq, body FROM events WHERE run_id = ? AND kind = ? ORDER BY seq DESC LIMIT 1",
                          (run_id, kind.value))
        return _event_of(run_id, rows[0][0], rows[0][1]) if rows else None

    def event_seqs(self, run_id: str) -> list[int]:
        return [row[0] for row in self._query("SELECT seq FROM events WHERE run_id = ? ORDER BY seq", (run_id,))]

    def decisions(self, run_id: str, limit: int = 10_000, since_step: int | None = None) -> list[DecisionEvent]:
        """The run's newest decisions (at or after `since_step`), oldest first, typed; unreadable rows left out."""
        return [decision for body in self.decision_rows(run_id, limit, since_step)
                if (decision := _decision_of(run_id, body)) is not None]

    def decision_rows(self, run_id: str, limit: int = 10_000, since_step: int | None = None) -> list[str]:
        """The raw JSON of the run's newest decisions (at or after `since_step`), oldest first."""
        rows = self._read("SELECT body FROM decisions WHERE run_id = ? AND step >= ? ORDER BY id DESC LIMIT ?",
                          (run_id, -1 if since_step is None else since_step, limit))
        return [row[0] for row in reversed(rows)]

    def last_decision_step(self, run_id: str) -> int | None:
        """The step of the run's latest decision, or None when it has none."""
        rows = self._read("SELECT MAX(step) FROM decisions WHERE run_id = ?", (run_id,))
        return rows[0][0] if rows else None

    def decision_counts(self) -> dict[str, int]:
        return dict(self._read("SELECT run_id, COUNT(*) FROM decisions GROUP BY run_id"))

    # ---- commands ----------------------------------------------------------------------------------

    def add_command(self, run_id: str, action: str, params: dict[str, Any], source: str) -> int:
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO commands (run_id, action, params, source, created) VALUES (?, ?, ?, ?, ?)",
                (run_id, action, json.dumps(params), source, time.time()),
            )
            return int(cursor.lastrowid or 0)

    def take_commands(self, run_id: str) -> list[Command]:
        """Commands not yet delivered to the run; marks them delivered."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, action, params, source FROM commands WHERE run_id = ? AND delivered IS NULL ORDER BY id",
                (run_id,),
            ).fetchall()
            db.executemany("UPDATE commands SET delivered = ? WHERE id = ?", [(time.time(), r[0]) for r in rows])
        return [Command(id=r[0], action=events.ActionKind(r[1]), params=json.loads(r[2]), source=r[3]) for r in rows]

    def commands(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._read("SELECT id, action, params, source, created, delivered, applied FROM commands "
                           "WHERE run_id = ? ORDER BY id", (run_id,))
        keys = ("id", "action", "params", "source", "created", "delivered", "applied")
        return [dict(zip(keys, (*r[:2], json.loads(r[2]), *r[3:]))) for r in rows]

    # ---- rule reloads ------------------------------------------------------------------------------

    def record_reload(self, source: str, ok: bool, message: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO reloads (time, source, ok, message) VALUES (?, ?, ?, ?)",
                       (time.time(), source, int(ok), message))

    def reload_counts(self) -> dict[bool, int]:
        return {bool(ok): n for ok, n in self._query("SELECT ok, COUNT(*) FROM reloads GROUP BY ok")}

    def reloads(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._query("SELECT time, source, ok, message FROM reloads ORDER BY id DESC LIMIT ?", (limit,))
        return [{"time": r[0], "source": r[1], "ok": bool(r[2]), "message": r[3]} for r in reversed(rows)]

    # ---- growth ------------------------------------------------------------------------------------

    def thin(self, run_id: str) -> int:
        """Thin a run's oldest metrics events beyond `metrics_kept`; return how many were deleted."""
        metrics = Kind.METRICS.value
        count = self._query("SELECT COUNT(*) FROM events WHERE run_id = ? AND kind = ?", (run_id, metrics))[0][0]
        if count <= self.metrics_kept:
            return 0
        cutoff = self._query(
            "SELECT seq FROM events WHERE run_id = ? AND kind = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
            (run_id, metrics, self.metrics_kept),
        )[0][0]
        with self._tx() as db:
            return db.execute(
                "DELETE FROM events WHERE run_id = ? AND kind = ? AND seq <= ? AND step % ? != 0",
                (run_id, metrics, cutoff, self.thin_every),
            ).rowcount

    def prune(self, retain_days: float) -> int:
        """Delete runs not heard from in `retain_days`, with all their rows; return how many runs."""
        cutoff = time.time() - retain_days * 86400
        with self._tx() as db:
            old = [r[0] for r in db.execute("SELECT id FROM runs WHERE last_seen < ?", (cutoff,)).fetchall()]
            for table, column in (("events", "run_id"), ("decisions", "run_id"), ("commands", "run_id"),
                                  ("run_states", "run_id"), ("run_keys", "run_id"), ("runs", "id")):
                db.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(r,) for r in old])
        return len(old)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()


_RUN_SELECT = ("SELECT r.id, r.rules, r.meta, r.first_seen, r.last_seen, r.last_seq, r.last_step, r.ended, "
               "COALESCE(s.seq, 0), {state} FROM runs r LEFT JOIN run_states s ON s.run_id = r.id")


def _run_row(row: tuple[Any, ...]) -> RunRow:
    return RunRow(row[0], row[1], _meta(row[2]), row[3], row[4], row[5], row[6],
                  json.loads(row[9]) if row[9] else None, bool(row[7]), row[8])


def _event_of(run_id: str, seq: int, body: str | bytes) -> AnyEvent | None:
    """A stored event row decoded, or None (logged) when it no longer decodes."""
    try:
        return events.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        legacy = phaseless_metrics(body)  # stored by a daemon from before typed events
        if legacy is None:
            log.warning("run %s: stored event seq %s is unreadable (%s); left out", run_id, seq, exc)
        return legacy


def _decision_of(run_id: str, body: str | bytes) -> DecisionEvent | None:
    """A stored decision row decoded, or None (logged) when it no longer decodes."""
    try:
        return _decision.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        log.warning("run %s: a stored decision is unreadable (%s); left out", run_id, exc)
        return None


def is_json(body: str | bytes) -> bool:
    """Whether a stored row is JSON (an events page passes rows through as they are)."""
    try:
        _json_value.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def _meta(text: str) -> dict[str, Any]:
    """A run's stored meta; one a daemon before intake checks accepted (too deep, too large, lone surrogates)
    reads as a note, so listing the runs never fails over it."""
    try:
        meta = json.loads(text)
        if len(text) > wire.MAX_META_BYTES or not isinstance(meta, dict):
            raise wire.WireError("too large")
        check_tree(meta, "meta", max_depth=8)
        return meta
    except (RecursionError, ValueError):  # WireError and JSONDecodeError are ValueErrors
        return {"unreadable": f"stored meta of {len(text)} bytes is not valid (from an older daemon); ignored"}


@contextmanager
def stored_run(state_dir: Path, run_id: str) -> Iterator[Store]:
    """The daemon's store in `state_dir`, opened for reading one run (the daemon need not be running)."""
    db = state_dir / "guardian.db"
    if not db.is_file():
        raise LogFormatError(f"{db}: no daemon store here; pass the daemon's --state-dir")
    store = Store(db)
    try:
        if store.run(run_id) is None:
            known = ", ".join(r.id for r in store.runs()[:10]) or "none"
            raise LogFormatError(f"{db}: no run '{run_id}' (runs: {known})")
        yield store
    finally:
        store.close()
