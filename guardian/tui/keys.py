"""A tiny raw-terminal key reader: cbreak mode, `select` with a timeout, escape sequences decoded.

The terminal's settings are restored on exit from the `with` block, which also runs on an exception or a
SIGTERM turned into `SystemExit` (see `app.exit_on_signals`).
"""

from __future__ import annotations

import os
import select
import sys
import termios
import tty
from types import TracebackType
from typing import IO, Any

ESCAPES = {
    b"\x1b[A": "up", b"\x1bOA": "up", b"\x1b[B": "down", b"\x1bOB": "down",
    b"\x1b[C": "right", b"\x1bOC": "right", b"\x1b[D": "left", b"\x1bOD": "left",
    b"\x1b[5~": "pageup", b"\x1b[6~": "pagedown", b"\x1b[H": "home", b"\x1b[F": "end",
}
SINGLE = {b"\r": "enter", b"\n": "enter", b"\x7f": "backspace", b"\x08": "backspace", b"\x1b": "esc",
          b"\t": "tab"}
ESC_WAIT_SECONDS = 0.03  # a lone ESC byte: wait this long for the rest of a sequence


def parse_keys(data: bytes) -> list[str]:
    """Key names from raw terminal input: "up", "enter", "esc", "q", ... (unknown sequences dropped)."""
    keys, i = [], 0
    while i < len(data):
        if data[i:i + 1] == b"\x1b" and i + 1 < len(data) and data[i + 1:i + 2] in (b"[", b"O"):
            end = i + 2
            while end < len(data) and not (0x40 <= data[end] <= 0x7E):
                end += 1
            sequence = data[i:end + 1]
            if sequence in ESCAPES:
                keys.append(ESCAPES[sequence])
            i = end + 1
            continue
        byte = data[i:i + 1]
        if byte in SINGLE:
            keys.append(SINGLE[byte])
        elif 0x20 <= byte[0] < 0x7F:
            keys.append(byte.decode())
        i += 1
    return keys


class KeyReader:
    """Keys from a terminal in cbreak mode (no echo, no line buffering; Ctrl-C still interrupts)."""

    def __init__(self, stream: IO[Any] | None = None) -> None:
        self.fd = (stream or sys.stdin).fileno()
        self._saved: list[Any] | None = None

    def __enter__(self) -> KeyReader:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.restore()

    def restore(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def read(self, timeout_seconds: float) -> list[str]:
        """The keys pressed within `timeout_seconds` (empty if none)."""
        if not self._ready(timeout_seconds):
            return []
        data = os.read(self.fd, 1024)
        if data == b"":
            raise EOFError("the terminal closed")
        if data.endswith(b"\x1b") and self._ready(ESC_WAIT_SECONDS):
            data += os.read(self.fd, 1024)
        return parse_keys(data)

    def _ready(self, timeout_seconds: float) -> bool:
        readable, _, _ = select.select([self.fd], [], [], max(0.0, timeout_seconds))
        return bool(readable)
