"""The bad-sample file, `<output_dir>/guardian/bad_samples.jsonl`: the samples of every update Guardian skipped.

One JSON line per sample: the optimizer step, the rules that fired, the incident (when decisions carry one),
where the sample sat in the step (micro-batch, row), its dataset index (null when it cannot be trusted) and
whether that index was checked against the dataset, a fingerprint of its tokens, its token count and the start
of its text. The training side (`guardian.callbacks.samples`) writes it and masks the fingerprints it lists
in later runs; `guardian report` reads it. Pure Python: no torch, so reports work anywhere.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BAD_SAMPLES_FILE = "bad_samples.jsonl"
EXCERPT_CHARS = 160


def bad_samples_path(output_dir: str | Path) -> Path:
    """Where a run in `output_dir` keeps its bad-sample file."""
    return Path(output_dir) / "guardian" / BAD_SAMPLES_FILE


def fingerprint(token_ids: Sequence[int]) -> str:
    """sha1 of a sample's non-padding token ids (as little-endian int64): the same in every run and batch."""
    return hashlib.sha1(struct.pack(f"<{len(token_ids)}q", *token_ids)).hexdigest()


@dataclass(frozen=True)
class BadSample:
    """One sample of an optimizer step whose update was skipped."""

    step: int
    rules: tuple[str, ...]
    micro_batch: int
    row: int
    index: int | None  # the dataset index; None when the loader's order could not be trusted
    index_verified: bool  # the dataset item at `index` has exactly these tokens
    fingerprint: str
    tokens: int
    excerpt: str | None  # the first EXCERPT_CHARS characters, decoded with the run's tokenizer
    incident: int | None = None  # the incident of the decisions, when they carry one
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rules": list(self.rules)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BadSample:
        """A record read back from the file; KeyError, TypeError or ValueError when it is not one."""
        index = data.get("index")
        incident = data.get("incident")
        excerpt = data.get("excerpt")
        return cls(step=int(data["step"]), rules=tuple(str(r) for r in data["rules"]),
                   micro_batch=int(data["micro_batch"]), row=int(data["row"]),
                   index=None if index is None else int(index), index_verified=bool(data["index_verified"]),
                   fingerprint=_hex(data["fingerprint"]), tokens=int(data["tokens"]),
                   excerpt=None if excerpt is None else str(excerpt),
                   incident=None if incident is None else int(incident), rank=int(data.get("rank", 0)))


def read_bad_samples(path: Path) -> tuple[list[BadSample], int]:
    """The records of a bad-sample file in file order, and how many lines could not be read (a crash can
    leave half a line). A missing file has none."""
    if not path.is_file():
        return [], 0
    samples, unreadable = [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                samples.append(BadSample.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError):
                unreadable += 1
    return samples, unreadable


def _hex(value: Any) -> str:
    text = str(value)
    int(text, 16)  # ValueError when it is not a fingerprint
    return text
