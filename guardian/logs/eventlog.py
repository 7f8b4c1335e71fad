"""A run's events as JSON lines: the record of what happened and the spool for the daemon.

Each event gets the next sequence number of the run (continuing across a resumed run, read back from the
file), so the daemon can store every (run, seq) exactly once however often it is resent. Lines are written
and read by the one codec in `guardian.events`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import msgspec

from guardian import events
from guardian.events import AnyEvent


def _last_seq(path: Path) -> int:
    """The highest sequence number in an existing event file (reads only its tail)."""
    if not path.exists():
        return 0
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 65536))
        tail = f.read().splitlines()
    for line in reversed(tail):
        event = decode_line(line)
        if event is not None:
            return event.seq
    return 0


class EventLog:
    """Appends events; buffered, flushed on `flush()` and on important events."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.seq = _last_seq(self.path)
        self._file: IO[bytes] | None = self.path.open("ab")

    def write(self, event: AnyEvent, *, flush: bool = False) -> AnyEvent:
        """Record an event; return it as written (numbered, with its time)."""
        seq = self.seq + 1
        event = events.numbered(event, seq, round(time.time(), 3))
        if self._file is not None:
            self._file.write(events.encode(event) + b"\n")
        self.seq = seq  # only once written: an event that was not leaves no gap (the daemon takes no seq after one)
        if flush and self._file is not None:
            self._file.flush()
        return event

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def decode_line(line: bytes | str) -> AnyEvent | None:
    """One line of an event file as an event; None for a line that is not one (a half-written last line after a
    crash, a line of another program)."""
    try:
        event = events.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return event if event.seq >= 1 else None


def read_events(path: Path) -> Iterator[AnyEvent | None]:
    """The events of an event file, in file order; None for a line that is not an event. Blank lines are
    skipped."""
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield decode_line(line)
