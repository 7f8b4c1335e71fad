"""An append-only JSON-lines file of a run's metrics and decisions (one object per line)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import IO, Any

SCHEMA_VERSION = 1


def _clean(value: Any) -> Any:
    """JSON has no NaN or inf; write them as the strings Python's float() reads back."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventLog:
    """Writes events as JSON lines; buffered, flushed on `flush()` and on important events."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def write(self, kind: str, payload: dict[str, Any], *, flush: bool = False) -> None:
        if self._file is None:
            return
        record = {"v": SCHEMA_VERSION, "kind": kind, "time": round(time.time(), 3), **_clean(payload)}
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        if flush:
            self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
