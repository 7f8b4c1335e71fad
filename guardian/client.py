"""The training side of the wire: a background sender that never blocks the training step.

Events are appended to the run's event file first (the spool), then queued in memory; a sender thread
posts them in batches and keeps what the daemon answered. If the daemon is down, nothing is lost: events
stay queued (the oldest beyond `max_buffered` are read back from the spool when the daemon returns), and
the sender retries with back-off. The daemon stores each (run, seq) once, so resending is safe.

A daemon that is slow (a whole fleet coming back after an outage, each run with a backlog) is told apart from
one that is down: a reply that times out makes the sender wait longer for the next one and send smaller
batches (`Pacing`), so it does not resend a batch the daemon is still working on. With a fixed timeout, a
thousand runs resending 500-event batches every few seconds kept a daemon saturated for ten minutes.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from guardian import wire

log = logging.getLogger("guardian.client")


class DaemonError(RuntimeError):
    """The daemon refused a request; the message says why."""


def request(url: str, method: str, path: str, body: dict[str, Any] | None = None, *, token: str | None = None,
            timeout: float = 5.0) -> dict[str, Any]:
    """One JSON request to a daemon (used by the CLI); raises DaemonError with the daemon's reason."""
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port or 80, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=wire.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        data = response.read()
    except OSError as exc:
        raise DaemonError(f"cannot reach the guardian daemon at {url}: {exc}; is `guardian serve` running?") from None
    finally:
        conn.close()
    try:
        message = json.loads(data) if data else {}
    except json.JSONDecodeError:
        raise DaemonError(f"{url}{path}: answered {response.status} with a body that is not JSON") from None
    if response.status >= 400:
        raise DaemonError(message.get("error", f"HTTP {response.status}"))
    return dict(message)


@dataclass
class Pacing:
    """How a run's sender paces itself against the daemon.

    - A refused or reset connection (the daemon is down): retry after a back-off of 0.2 s doubling to 5 s.
    - A reply that does not come within `timeout` (the daemon is up but busy): the request is still queued
      there and will be processed, so resending it at once only adds work. The timeout doubles (up to
      `max_timeout`), the batch halves (down to `min_batch`) and the sender backs off as above.
    - A reply: the back-off resets, the batch doubles back towards `max_batch`, and once replies come well
      inside the timeout it halves back towards `base_timeout`.
    Every back-off is jittered by ±50 % so runs that failed together do not retry together.
    """

    base_timeout: float = 5.0
    max_timeout: float = 60.0
    max_batch: int = 500
    min_batch: int = 25
    timeout: float = field(init=False)
    batch: int = field(init=False)
    backoff: float = field(init=False, default=0.2)

    def __post_init__(self) -> None:
        self.timeout, self.batch = self.base_timeout, self.max_batch

    def replied(self, seconds: float) -> None:
        self.backoff = 0.2
        self.batch = min(self.max_batch, self.batch * 2)
        if seconds < self.timeout / 4:
            self.timeout = max(self.base_timeout, self.timeout / 2)

    def timed_out(self) -> float:
        """The seconds to wait before resending."""
        self.timeout = min(self.max_timeout, self.timeout * 2)
        self.batch = max(self.min_batch, self.batch // 2)
        return self.failed()

    def failed(self) -> float:
        """The seconds to wait before retrying."""
        delay = self.backoff * random.uniform(0.5, 1.5)
        self.backoff = min(self.backoff * 2, 5.0)
        return delay


class DaemonLink:
    """Streams one run's events to the daemon and collects its verdicts and commands."""

    def __init__(self, url: str, run_id: str, *, rules: str = "default", meta: dict[str, Any] | None = None,
                 token: str | None = None, spool: Path | None = None, max_buffered: int = 50_000,
                 batch_size: int = 500, timeout_seconds: float = 5.0) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"GUARDIAN_URL must look like http://HOST:PORT, got {url!r}")
        self.url, self.run_id, self.rules, self.meta = url, run_id, rules, dict(meta or {})
        self.token, self.spool = token, spool
        self.max_buffered = max_buffered
        self.pacing = Pacing(base_timeout=timeout_seconds, max_batch=batch_size, min_batch=min(25, batch_size))
        self.acked_seq = 0
        self._taken_through_step = -1
        self.connected = False
        self.failures = 0
        self.last_error = ""  # why the last attempt failed, for messages
        self.sent_reports = 0
        self._host, self._port = parsed.hostname, parsed.port or 80
        self._queue: deque[dict[str, Any]] = deque()
        self._spilled = False
        self._decisions: dict[int, list[dict[str, Any]]] = {}
        self._commands: list[dict[str, Any]] = []
        self._want_decisions_from: int | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"guardian-sender-{run_id}")
        self._thread.start()

    # ---- called from the training loop (never blocks beyond `wait_for`) ---------------------------

    def send(self, event: dict[str, Any]) -> None:
        with self._cond:
            if len(self._queue) >= self.max_buffered:
                self._queue.popleft()
                self._spilled = True
            self._queue.append(event)
            self._cond.notify()

    def want_decisions_from(self, step: int) -> None:
        with self._cond:
            if self._want_decisions_from is None:
                self._want_decisions_from = step

    def wait_for(self, seq: int, timeout: float) -> bool:
        """Wait until the daemon has processed event `seq`, at most `timeout` seconds.

        Returns False at once while the daemon is unreachable: a step does not wait out the deadline for a
        daemon that is down (the sender keeps retrying, and steps wait again once it answers)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify()
            while self.acked_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0 or self.unreachable:
                    return False
                self._cond.wait(left)
            return True

    def take_decisions(self, up_to_step: int) -> list[dict[str, Any]]:
        with self._cond:
            steps = [s for s in self._decisions if s <= up_to_step]
            taken = [d for s in sorted(steps) for d in self._decisions.pop(s)]
            self._want_decisions_from = None
            self._taken_through_step = max(self._taken_through_step, up_to_step)
            return taken

    def take_commands(self) -> list[dict[str, Any]]:
        with self._cond:
            commands, self._commands = self._commands, []
            return commands

    def close(self, flush_seconds: float = 5.0) -> None:
        """Try to deliver what is queued, then stop the sender.

        The notify cuts short the sender's back-off, so a daemon that is down gets one more attempt at once;
        when that fails too, the wait ends there instead of running out `flush_seconds` (what was not
        delivered is in the spool file)."""
        deadline = time.monotonic() + flush_seconds
        with self._cond:
            failures = self.failures
            self._cond.notify()
            while self._queue and time.monotonic() < deadline:
                if self.unreachable and self.failures > failures:
                    break
                self._cond.wait(0.05)
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=2)

    # ---- the sender thread -------------------------------------------------------------------------

    def _run(self) -> None:
        pacing = self.pacing
        while True:
            with self._cond:
                while not self._queue and not self._stop and not self._spilled:
                    self._cond.wait(1.0)
                if self._stop:
                    return
                batch = list(itertools.islice(self._queue, pacing.batch))
                want = self._want_decisions_from
            if self._spilled:
                batch = self._refill(batch)
            started = time.monotonic()
            try:
                reply = self._post(batch, want)
            except TimeoutError:
                self._failed(f"no reply within {pacing.timeout:g} s: busy, not down; the sender now waits longer "
                             "and sends smaller batches")
                delay = pacing.timed_out()
            except (OSError, http.client.HTTPException, DaemonError) as exc:
                self._failed(exc)
                delay = pacing.failed()
            else:
                pacing.replied(time.monotonic() - started)
                self._accept(reply)
                continue
            with self._cond:
                if not self._stop:
                    self._cond.wait(delay)

    def _refill(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Events dropped from memory are read back from the spool file, in order."""
        first_in_memory = batch[0]["seq"] if batch else None
        missing = []
        if self.spool is not None and self.spool.exists():
            with self.spool.open() as f:
                for line in f:
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    seq = event.get("seq", 0)
                    if seq > self.acked_seq and (first_in_memory is None or seq < first_in_memory):
                        missing.append(event)
                        if len(missing) >= self.pacing.batch:
                            break
        if not missing:
            with self._cond:
                self._spilled = False
            return batch
        return missing

    def _post(self, batch: list[dict[str, Any]], want: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"run": {"id": self.run_id, "rules": self.rules, "meta": self.meta}, "events": batch}
        if want is not None:
            body["decisions_since_step"] = want
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.pacing.timeout)
        elif self._conn.sock is not None:
            self._conn.sock.settimeout(self.pacing.timeout)
        try:
            self._conn.request("POST", "/v1/report", body=wire.dumps(body), headers=headers)
            response = self._conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self._conn.close()
            self._conn = None
            raise
        message = json.loads(data)
        if response.status >= 400:
            raise DaemonError(f"daemon refused the report ({response.status}): {message.get('error')}")
        return dict(message)

    @property
    def unreachable(self) -> bool:
        """The last attempt to reach the daemon failed."""
        return not self.connected and self.failures > 0

    def _failed(self, why: Exception | str) -> None:
        with self._cond:
            self.failures += 1
            self.last_error = str(why)
            if self.connected or self.failures == 1:
                log.warning("guardian daemon at %s unreachable (%s); spooling events and retrying", self.url, why)
            self.connected = False
            self._cond.notify_all()

    def _accept(self, reply: dict[str, Any]) -> None:
        with self._cond:
            if not self.connected and self.failures:
                log.warning("guardian daemon at %s is back; delivering spooled events", self.url)
            self.connected = True
            ack = int(reply.get("ack_seq", 0))
            self.acked_seq = max(self.acked_seq, ack)
            while self._queue and self._queue[0]["seq"] <= self.acked_seq:
                self._queue.popleft()
            for decision in reply.get("decisions", []):
                if int(decision["step"]) <= self._taken_through_step:
                    continue  # already acted on (or decided locally past the deadline)
                bucket = self._decisions.setdefault(int(decision["step"]), [])
                if decision not in bucket:
                    bucket.append(decision)
            self._commands.extend(reply.get("commands", []))
            self.sent_reports += 1
            self._cond.notify_all()


