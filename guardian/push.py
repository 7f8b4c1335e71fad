"""`guardian push OUTPUT_DIR`: deliver a run's event file to the daemon, after the fact.

A run whose daemon was down or out of reach when it ended keeps its undelivered events in
`<output_dir>/guardian/events.jsonl` (the callback spools every event there). Pushing the file sends them
all; the daemon stores each (run, seq) once, so what it already has is ignored and pushing twice is safe.
It processes the new events through the run's rules as if they had come live, so its history, decisions,
metrics and the run's `ended` mark are complete afterwards.

The run's id and rule set come from the file's last `start` event (written by the callback since
2026-12-02), else `--run-id` / the default id (the output folder's name and a hash of its path).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardian.attach import default_run_id
from guardian.client import DaemonLink
from guardian.errors import ConfigError, GuardianError

EVENTS = Path("guardian") / "events.jsonl"


@dataclass(frozen=True)
class Pushed:
    run_id: str
    events: int  # events read from the file
    last_seq: int  # the daemon has stored every event up to this one
    skipped_lines: int  # lines that were not events (a half-written last line after a crash)


def read_events(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The events of an event file, in order, and how many lines were not events."""
    events, skipped = [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(event, dict) and isinstance(event.get("seq"), int) and isinstance(event.get("kind"), str):
                events.append(event)
            else:
                skipped += 1
    return events, skipped


def push(output_dir: str | os.PathLike[str], url: str, *, token: str | None = None, run_id: str | None = None,
         rule_set: str | None = None, timeout_seconds: float = 60.0) -> Pushed:
    """Send every event of the run's event file to the daemon at `url` and wait until it has stored them."""
    path = Path(output_dir) / EVENTS
    if not path.is_file():
        raise ConfigError(f"{path}: no event file; is {output_dir} the output_dir of a run Guardian watched "
                          "(with GuardianCallback, guardian run or guardian attach)?")
    events, skipped = read_events(path)
    if not events:
        raise ConfigError(f"{path}: no events in it ({skipped} unreadable lines)")
    starts = [e for e in events if e["kind"] == "start"]
    started = starts[-1] if starts else {}
    run_id = run_id or started.get("run_id") or default_run_id(output_dir)
    rule_set = rule_set or started.get("rule_set") or "default"
    # events out of order (a resumed run appends after its earlier ones) are sent in seq order
    events.sort(key=lambda e: e["seq"])
    last = events[-1]["seq"]
    link = DaemonLink(url, run_id, rules=rule_set, token=token, spool=path)
    try:
        for event in events:
            link.send(event)
        deadline = time.monotonic() + timeout_seconds
        while not link.wait_for(last, timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                why = f": {link.last_error}" if link.last_error else ""
                raise GuardianError(f"the daemon at {url} did not take run {run_id}'s events within "
                                    f"{timeout_seconds:g} s{why}; it has them up to seq {link.acked_seq} of "
                                    f"{last}. Check that it runs (guardian serve) and the token, then push again")
            time.sleep(0.1)  # unreachable: wait_for returns at once; the sender retries on its back-off
    finally:
        link.close(flush_seconds=0)
    return Pushed(run_id, len(events), link.acked_seq, skipped)
