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

import os
import time
from dataclasses import dataclass
from pathlib import Path

from guardian import events
from guardian.errors import ConfigError, GuardianError
from guardian.events import Report, RunInfo, StartEvent
from guardian.logs.eventlog import read_events
from guardian.transport.client import DaemonLink, request
from guardian.transport.runid import default_run_id
from guardian.transport.token import find_token, load_or_create_run_key

EVENTS = Path("guardian") / "events.jsonl"


@dataclass(frozen=True)
class Pushed:
    run_id: str
    events: int  # events read from the file
    last_seq: int  # the daemon has acknowledged every event up to this one
    skipped_lines: int  # lines that were not events (a half-written last line after a crash)


def _run_of(path: Path) -> tuple[str | None, str | None, int, int]:
    """From a first pass over the file: the last start event's run_id and rule_set, the events, the last seq."""
    run_id = rule_set = None
    count = last = 0
    for event in read_events(path):
        if event is None:
            continue
        count, last = count + 1, max(last, event.seq)
        if isinstance(event, StartEvent):
            run_id, rule_set = event.run_id or run_id, event.rule_set or rule_set
    return run_id, rule_set, count, last


def push(output_dir: str | os.PathLike[str], url: str, *, token: str | None = None, run_id: str | None = None,
         rule_set: str | None = None, timeout_seconds: float = 60.0, chunk: int = 10_000) -> Pushed:
    """Send every event of the run's event file to the daemon at `url` and wait until it has stored them.

    The file is streamed in chunks of `chunk` events (each acknowledged before the next is read), so a
    long run's file is never held in memory at once."""
    path = Path(output_dir) / EVENTS
    if not path.is_file():
        raise ConfigError(f"{path}: no event file; is {output_dir} the output_dir of a run Guardian watched "
                          "(with GuardianCallback, guardian run or guardian attach)?")
    found_id, found_rules, count, last = _run_of(path)
    if not count:
        raise ConfigError(f"{path}: no events in it")
    run_id = run_id or found_id or default_run_id(output_dir)
    rule_set = rule_set or found_rules or "default"
    # one empty report first: a daemon that is down, a wrong token or a run another process holds (the run's
    # key, kept beside the event file, is not the one it started with) is told at once, not after the timeout
    key = load_or_create_run_key(path.parent)
    token = token or find_token()[0]
    hello = Report(v=1, run=RunInfo(id=run_id, rules=rule_set), events=[])
    request(url, "POST", "/v1/report", events.to_builtins(hello), token=token, run_key=key)
    link = DaemonLink(url, run_id, rules=rule_set, token=token, max_buffered=chunk + 1, run_key_dir=path.parent)
    deadline = time.monotonic() + timeout_seconds
    skipped, pending, top = 0, 0, 0
    try:
        for event in read_events(path):
            if event is None:
                skipped += 1
                continue
            link.send(event)
            pending, top = pending + 1, max(top, event.seq)
            if pending >= chunk:
                _wait(link, top, deadline, url, run_id, last, timeout_seconds)
                pending = 0
        _wait(link, top, deadline, url, run_id, last, timeout_seconds)
    finally:
        link.close(flush_seconds=0)
    return Pushed(run_id, count, link.acked_seq, skipped)


def _wait(link: DaemonLink, seq: int, deadline: float, url: str, run_id: str, last: int,
          timeout_seconds: float) -> None:
    """Until the daemon has acknowledged `seq`; GuardianError at `deadline` (a time.monotonic())."""
    while not link.wait_for(seq, timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            why = f": {link.last_error}" if link.last_error else ""
            raise GuardianError(f"the daemon at {url} did not take run {run_id}'s events within {timeout_seconds:g} s{why}; "
                                f"it has them up to seq {link.acked_seq} of {last}. Check that it runs (guardian "
                                "serve) and the token, then push again")
        time.sleep(0.1)  # unreachable: wait_for returns at once while the sender retries on its back-off
