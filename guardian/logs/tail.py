"""Reading JSON-lines files line by line: the whole of one, or what a growing one appended since the last read.

One splitter for every JSON-lines reader: `guardian.logs.training` reads a whole `trainer_log.jsonl` with
`lines_of`, and `guardian attach` follows a live one with `JsonlTail`, which keeps a half-written last line on
disk until its newline comes and notices a file that was truncated or replaced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def lines_of(text: str) -> list[str]:
    """Every line of a whole file's text, the last one even without its newline (blank lines kept, for numbering)."""
    return text.split("\n")


@dataclass(frozen=True)
class TailRead:
    """What one read of a growing file gave: whether it was read again from its start (it was truncated or
    replaced by another file), and the complete lines that were new."""

    restarted: bool
    lines: list[str]


class JsonlTail:
    """The complete lines appended to a file since the last read; notices truncation and replacement."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset_bytes = 0
        self.inode: int | None = None

    def read(self) -> TailRead:
        """The lines completed since the last read (from the start again when the file was rewritten); a file
        that is not there (yet) gives none."""
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                restarted = self.inode is not None and (st.st_ino != self.inode or st.st_size < self.offset_bytes)
                if restarted:
                    self.offset_bytes = 0
                self.inode = st.st_ino
                f.seek(self.offset_bytes)
                data = f.read()
        except FileNotFoundError:
            return TailRead(False, [])
        end = data.rfind(b"\n")
        if end < 0:
            return TailRead(restarted, [])  # a partial line stays on disk until its newline comes
        self.offset_bytes += end + 1
        return TailRead(restarted, lines_of(data[:end].decode("utf-8", errors="replace")))
