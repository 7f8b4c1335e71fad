"""`guardian attach`'s event sink: the followed run's events, recorded in its folder and streamed to a daemon."""

from __future__ import annotations

from pathlib import Path

import msgspec

from guardian.events import AnyEvent
from guardian.logs.eventlog import EventLog
from guardian.transport.client import DaemonLink

SOURCE = "attach"


class EventSink:
    """Writes events to `<output_dir>/guardian/events.jsonl` (opened at the first event, so nothing is
    created in the output directory before the run writes there) and, when linked, streams them."""

    def __init__(self, path: Path, link: DaemonLink | None = None) -> None:
        self.path, self.link = path, link
        self._log: EventLog | None = None

    def emit(self, event: AnyEvent, *, flush: bool = False) -> None:
        """Record `event` (its source: attach) and, when linked, send it to the daemon."""
        if self._log is None:
            self._log = EventLog(self.path)
        event = self._log.write(msgspec.structs.replace(event, source=SOURCE), flush=flush)
        if self.link is not None:
            self.link.send(event)

    def flush(self) -> None:
        """Write what is buffered to the file."""
        if self._log is not None:
            self._log.flush()

    def close(self) -> None:
        """Close the file and the link (which delivers what it still holds first)."""
        if self._log is not None:
            self._log.close()
        if self.link is not None:
            self.link.close()
