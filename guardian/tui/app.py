"""`guardian top`: the loop, the keys, the confirmation prompt and the actions.

A poller thread asks the source for a snapshot every `refresh_seconds`; the main thread reads keys and
re-renders (on a key, new data or a resize) with `rich.live.Live(screen=True)` at the console's size.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from rich.console import Console, RenderableType
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from guardian.errors import ConfigError, GuardianError
from guardian.transport.client import DaemonError
from guardian.tui import widgets
from guardian.tui.keys import KeyReader
from guardian.tui.source import OPERATOR, DecisionLine, ReadOnlySourceError, RunSnapshot, Snapshot, Source

MESSAGE_SECONDS = 10.0
NOTES_KEPT = 20  # refused actions kept per run in this screen's decision log
# key -> (action sent to the daemon, its params, what the prompt calls it)
ACTION_KEYS: dict[str, tuple[str, dict[str, Any], str]] = {
    "s": ("stop", {}, "stop"),
    "r": ("rollback", {}, "roll back"),
    "l": ("reduce_lr", {"factor": 0.5}, "reduce the learning rate (×0.5) of"),
}


# the orders `o` steps through; the first is the default. Every order is stable from poll to poll.
SORT_ORDERS = ("started", "id", "status")
_STATUS_RANK = {"stalled": 0, "firing": 1, "running": 2, "ended": 3}


def sort_runs(runs: tuple[RunSnapshot, ...], order: str) -> tuple[RunSnapshot, ...]:
    """The runs in `order`: "started" (oldest first; a run whose start is not known yet last), "id", or
    "status" (stalled, firing, running, ended; then by start). Ties go by id, so rows never swap by chance."""
    def started(run: RunSnapshot) -> tuple[bool, float]:
        return run.started is None, run.started or 0.0

    if order == "id":
        return tuple(sorted(runs, key=lambda r: r.id))
    if order == "status":
        return tuple(sorted(runs, key=lambda r: (_STATUS_RANK.get(r.status, 9), *started(r), r.id)))
    return tuple(sorted(runs, key=lambda r: (*started(r), r.id)))


@dataclass
class Pending:
    """An action waiting for y/n."""

    run_id: str
    action: str
    params: dict[str, Any]
    words: str


class Poller:
    """Takes snapshots from the source in a background thread, so a slow daemon never blocks the keys."""

    def __init__(self, source: Source, refresh_seconds: float) -> None:
        self.source, self.refresh_seconds = source, refresh_seconds
        self.latest = Snapshot((), source.where)
        self.version = 0
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="guardian-top-poller")

    def start(self) -> Poller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                snapshot = self.source.snapshot()
            except Exception as exc:
                snapshot = Snapshot(self.latest.runs, self.source.where, error=f"{type(exc).__name__}: {exc}")
            self.latest, self.version = snapshot, self.version + 1
            self.wake.wait(self.refresh_seconds)
            self.wake.clear()


class TopApp:
    """The state of the screen and what each key does to it; `render()` draws it at the console's size."""

    def __init__(self, source: Source, console: Console, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.console, self.clock = source, console, clock
        self.order = SORT_ORDERS[0]
        self.notes: dict[str, deque[DecisionLine]] = {}  # run -> the operator's actions refused (see `_note`)
        self._raw = self._snapshot = Snapshot((), source.where)
        self.selected_id: str | None = None
        self.selected_index = 0
        self.detail = False
        self.scrolled = 0
        self.pending: Pending | None = None
        self.message: Text | None = None
        self.message_at = 0.0

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @snapshot.setter
    def snapshot(self, snapshot: Snapshot) -> None:
        """Take a new snapshot, its runs in the screen's order (the selection follows its run)."""
        runs = tuple(replace(r, decisions=r.decisions + tuple(self.notes[r.id])) if self.notes.get(r.id) else r
                     for r in snapshot.runs)
        self._snapshot = replace(snapshot, runs=sort_runs(runs, self.order))
        self._raw = snapshot

    def _note(self, run: RunSnapshot | None, run_id: str, action: str, why: str) -> None:
        """Log an action of the operator that never reached the run (refused here or by the daemon): the
        daemon has no record of it, so this screen's decision log keeps it."""
        notes = self.notes.setdefault(run_id, deque(maxlen=NOTES_KEPT))
        notes.append(DecisionLine(run.step if run else None, OPERATOR, OPERATOR, action, f"refused: {why} (by hand)"))
        self.snapshot = self._raw

    def cycle_order(self) -> None:
        self.order = SORT_ORDERS[(SORT_ORDERS.index(self.order) + 1) % len(SORT_ORDERS)]
        self.snapshot = self._raw
        self._say(f"sorted by {self.order}", "dim")

    # ---- selection ---------------------------------------------------------------------------------

    def selected(self) -> RunSnapshot | None:
        """The selected run; if it disappeared, the run now at its place."""
        runs = self.snapshot.runs
        for index, run in enumerate(runs):
            if run.id == self.selected_id:
                self.selected_index = index
                return run
        if not runs or (self.detail and self.selected_id is not None):
            return None
        self.selected_index = min(self.selected_index, len(runs) - 1)
        self.selected_id = runs[self.selected_index].id
        return runs[self.selected_index]

    def move(self, by: int) -> None:
        if self.detail:  # down: older decisions
            run = self.selected()
            self.scrolled = min(max(0, self.scrolled + by), max(0, len(run.decisions) - 1) if run else 0)
            return
        self.selected()
        runs = self.snapshot.runs
        if runs:
            self.selected_index = min(max(0, self.selected_index + by), len(runs) - 1)
            self.selected_id = runs[self.selected_index].id

    # ---- keys --------------------------------------------------------------------------------------

    def handle(self, key: str) -> bool:
        """Act on one key; False to quit."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._answer(pending, key)
            return True
        self.message = None
        if key == "q":
            return False
        if key in ("up", "k", "down", "j"):
            self.move(-1 if key in ("up", "k") else 1)
        elif key == "enter" and self.selected() is not None:
            self.detail, self.scrolled = True, 0
        elif key in ("esc", "backspace"):
            self.detail = False
        elif key in ACTION_KEYS:
            self._ask(key)
        elif key == "o" and not self.detail:
            self.cycle_order()
        return True

    def _ask(self, key: str) -> None:
        run = self.selected()
        if run is None:
            self._say("no run selected", "yellow")
        elif self.source.read_only:
            self._say(f"{self.source.read_only}: start the run with GUARDIAN_URL set and use `guardian top --url`",
                      "yellow")
        elif run.ended:
            self._say(f"refused: {run.id} has ended ({run.ending}); s, r and l are for runs still training",
                      "yellow")
            self._note(run, run.id, ACTION_KEYS[key][0], f"the run has ended ({run.ending})")
        else:
            action, params, words = ACTION_KEYS[key]
            self.pending = Pending(run.id, action, dict(params), words)

    def _answer(self, pending: Pending, key: str) -> None:
        if key not in ("y", "Y"):
            self._say(f"cancelled: {pending.action} of {pending.run_id}", "dim")
            return
        try:
            command = self.source.control(pending.run_id, pending.action, pending.params)
        except (DaemonError, GuardianError) as exc:
            self._say(f"error: {pending.action} {pending.run_id}: {exc}", "bold red")
            if not isinstance(exc, ReadOnlySourceError):
                run = next((r for r in self._raw.runs if r.id == pending.run_id), None)
                self._note(run, pending.run_id, pending.action, str(exc))
            return
        self._say(f"queued {pending.action} for {pending.run_id} (command {command}); it is carried out at the "
                  "run's next step", "bold green")

    def _say(self, message: str, style: str) -> None:
        self.message, self.message_at = Text(message, style=style, no_wrap=True, overflow="ellipsis"), self.clock()

    # ---- drawing -----------------------------------------------------------------------------------

    def footer(self) -> Text:
        if self.pending is not None:
            return Text(f"{self.pending.words} {self.pending.run_id}? y/n", style="bold reverse", no_wrap=True,
                        overflow="ellipsis")
        if self.message is not None and self.clock() - self.message_at < MESSAGE_SECONDS:
            return self.message
        keys = "esc back · ↑/↓ scroll decisions" if self.detail else "↑/↓ select · enter details · o order"
        acts = f" · {self.source.read_only}" if self.source.read_only else " · s stop · r rollback · l LR ×0.5"
        return widgets.footer(f"{keys}{acts} · q quit")

    def render(self) -> RenderableType:
        width, height = self.console.size
        head = widgets.header(self.snapshot, None if self.detail else self.order)
        head_lines = len(head.wrap(self.console, width))
        body_height = max(1, height - head_lines - 1)
        layout = Layout()
        layout.split_column(Layout(head, size=head_lines), Layout(self.body(width, body_height)),
                            Layout(self.footer(), size=1))
        return layout

    def body(self, width: int, height: int) -> RenderableType:
        run = self.selected()
        if not self.detail:
            return widgets.runs_screen(self.snapshot, self.selected_index, width=width, height=height,
                                       waiting=self.source.waiting)
        if run is None:
            return Panel(Text(f"run {self.selected_id} is no longer reported by {self.source.where}; esc to go back",
                              justify="center"), padding=(1, 2))
        return widgets.detail_view(run, width=width, height=height, scrolled=self.scrolled)


@contextmanager
def exit_on_signals(*signals: signal.Signals) -> Iterator[None]:
    """Turn these signals into SystemExit while inside, so `with` blocks restore the terminal."""
    def leave(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, leave) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_top(source: Source, *, refresh_seconds: float = 1.0, console: Console | None = None) -> int:
    """Run the live view until `q`; the terminal is restored however it ends."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise ConfigError("guardian top needs a terminal (stdin and stdout are not a TTY); "
                          "`guardian runs` and `guardian events RUN` print the same facts as text")
    for pinned in ("COLUMNS", "LINES"):  # rich would keep these sizes and never follow a resize; a parent
        os.environ.pop(pinned, None)    # process that loaded GNU readline (pytest does) exports them
    console = console or Console()
    app, poller = TopApp(source, console), Poller(source, refresh_seconds).start()
    try:
        with exit_on_signals(signal.SIGTERM, signal.SIGHUP), KeyReader() as keys, \
                Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
                     redirect_stderr=False) as live:
            _loop(app, poller, keys, live)
    finally:
        poller.stop()
    return 0


def _loop(app: TopApp, poller: Poller, keys: KeyReader, live: Live) -> None:
    seen, size, drawn_at = -1, None, 0.0
    while True:
        pressed = keys.read(0.1)
        for key in pressed:
            if not app.handle(key):
                return
        fresh = poller.version != seen
        if fresh:
            app.snapshot, seen = poller.latest, poller.version
        if pressed or fresh or app.console.size != size or time.monotonic() - drawn_at > 1.0:
            size, drawn_at = app.console.size, time.monotonic()
            live.update(app.render(), refresh=True)
