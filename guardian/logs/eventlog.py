"""A run's events as JSON lines: the record of what happened and the spool for the daemon.

Each event gets the next sequence number of the run (continuing across a resumed run, read back from the
file), so the daemon can store every (run, seq) exactly once however often it is resent.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from collections.abc import Iterator
from typing import IO, Any

from guardian.transport.wire import encode_value


def _last_seq(path: Path) -> int:
    """The highest sequence number in an existing event file (reads only its tail)."""
    if not path.exists():
        return 0
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 65536))
        tail = f.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(tail):
        try:
            return int(json.loads(line)["seq"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


class EventLog:
    """Appends events; buffered, flushed on `flush()` and on important events."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.seq = _last_seq(self.path)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def write(self, kind: str, payload: dict[str, Any], *, flush: bool = False) -> dict[str, Any]:
        """Record an event; return it as written (with its `seq`, `kind` and `time`)."""
        seq = self.seq + 1
        event = encode_value({"seq": seq, "kind": kind, "time": round(time.time(), 3), **payload})
        if self._file is not None:
            self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
        self.seq = seq  # only once written: an event that was not leaves no gap (the daemon takes no seq after one)
        if flush and self._file is not None:
            self._file.flush()
        return dict(event)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: Path) -> Iterator[dict[str, Any] | None]:
    """The events of an event file, in file order; None for a line that is not an event (a half-written
    last line after a crash). Blank lines are skipped."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                yield None
                continue
            ok = isinstance(event, dict) and isinstance(event.get("seq"), int) and isinstance(event.get("kind"), str)
            yield event if ok else None
