"""The training side of the wire: a background sender that never blocks the training step.

Events are appended to the run's event file first (the spool), then queued in memory; a sender thread
posts them in batches and keeps what the daemon answered. If the daemon is down, nothing is lost: events
stay queued (the oldest beyond `max_buffered` are read back from the spool when the daemon returns), and
the sender retries with back-off. The daemon stores each (run, seq) once, so resending is safe.

A daemon that is slow (a whole fleet coming back after an outage, each run with a backlog) is told apart from
one that is down: a reply that times out makes the sender wait longer for the next one and send smaller
batches (`Pacing`), so it does not resend a batch the daemon is still working on. With a fixed timeout, a
thousand runs resending 500-event batches every few seconds kept a daemon saturated for ten minutes.

Every report carries the daemon's token and the run's key (see guardian.transport.token). A reply is used only if it is
a well-formed answer (status checked first, then JSON, then its fields and decisions); anything else (the wrong
service at `GUARDIAN_URL`, a proxy's HTML page) counts as a failed attempt and the sender carries on.
"""

from __future__ import annotations

import http.client
import ipaddress
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

import msgspec

from guardian import events
from guardian.errors import ConfigError, GuardianError
from guardian.events import AnyEvent, Command, DecisionEvent, Reply, Report, RunInfo
from guardian.logs.eventlog import read_events
from guardian.transport import wire
from guardian.transport.token import RUN_KEY_HEADER, find_token, load_or_create_run_key, new_run_key

log = logging.getLogger("guardian.client")


class DaemonError(GuardianError, RuntimeError):
    """The daemon refused a request (`status`), or what answered was not a guardian daemon; the message says why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SeqGapError(DaemonError):
    """The daemon expects the run's events from `expected_seq` on (409): resend from there."""

    def __init__(self, message: str, expected_seq: int) -> None:
        super().__init__(message, 409)
        self.expected_seq = expected_seq


# A kept-alive connection the server has closed meanwhile (its idle timeout) fails like this before any byte
# of a reply: the request is sent again at once on a new connection.
STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def headers_for(token: str | None, run_key: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if run_key:
        headers[RUN_KEY_HEADER] = run_key
    return headers


def parse_reply(status: int, data: bytes, where: str) -> dict[str, Any]:
    """A daemon's JSON object reply; DaemonError with the daemon's reason for an error status, or saying what
    came instead of a guardian reply."""
    try:
        message = json.loads(data) if data else {}
    except (UnicodeDecodeError, ValueError):
        message = None
    if not isinstance(message, dict):
        snippet = data[:80].decode("utf-8", "replace")
        raise DaemonError(f"{where} answered {status} with a body that is not a JSON object ({snippet!r}); is "
                          "that a guardian daemon?")
    if status >= 400:
        error = message.get("error", f"HTTP {status}")
        expected = message.get("expected_seq")
        if status == 409 and isinstance(expected, int) and not isinstance(expected, bool) and expected >= 1:
            raise SeqGapError(str(error), expected)
        raise DaemonError(str(error), status)
    return message


def daemon_url(url: str) -> str:
    """A daemon's URL, http://HOST[:PORT]; a loopback HOST:PORT written without the scheme gets http:// (the
    daemon speaks plain HTTP). ValueError saying exactly what to write otherwise."""
    text = url.strip()
    if "://" not in text:
        host = urlparse(f"http://{text}").hostname or ""
        if host == "localhost" or _loopback_address(host):
            return f"http://{text}"
        raise ValueError(f"the daemon URL {url!r} has no scheme: write http://{text} (the daemon speaks plain HTTP)")
    parsed = urlparse(text)
    if parsed.scheme != "http" or not parsed.hostname:
        rest = text.split("://", 1)[1]
        raise ValueError(f"the daemon URL {url!r} must look like http://HOST:PORT: write http://{rest} (the daemon "
                         "speaks plain HTTP)")
    try:
        parsed.port  # noqa: B018 - read for its check: urllib raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"the daemon URL {url!r} has a port that is not a number: write http://HOST:PORT, e.g. "
                         "http://127.0.0.1:8765") from None
    return text


def _loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def request(url: str, method: str, path: str, body: dict[str, Any] | None = None, *, token: str | None = None,
            run_key: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """One JSON request to a daemon (used by the CLI); raises DaemonError with the daemon's reason."""
    try:
        url = daemon_url(url)
    except ValueError as exc:
        raise DaemonError(str(exc)) from None
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port or 80, timeout=timeout)
    headers = headers_for(token, run_key)
    try:
        conn.request(method, path, body=wire.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        data = response.read()
    except OSError as exc:
        raise DaemonError(f"cannot reach the guardian daemon at {url}: {exc}; is `guardian serve` running?") from None
    finally:
        conn.close()
    return parse_reply(response.status, data, f"{url}{path}")


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
    """Streams one run's events to the daemon and collects its verdicts and commands.

    `run_key_dir` (the run's `<output_dir>/guardian`) keeps the run's key, so that a restarted process continues
    the run; without it the key lives as long as this link."""

    def __init__(self, url: str, run_id: str, *, rules: str = "default", meta: dict[str, Any] | None = None,
                 token: str | None = None, spool: Path | None = None, max_buffered: int = 50_000,
                 batch_size: int = 500, timeout_seconds: float = 5.0, run_key_dir: Path | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"GUARDIAN_URL must look like http://HOST:PORT, got {url!r}")
        self.url, self.run_id, self.rules, self.meta = url, run_id, rules, dict(meta or {})
        self.token = token or find_token()[0]  # $GUARDIAN_TOKEN, else the daemon's token file
        self.spool = spool
        self.run_key = _run_key(run_key_dir)
        self.max_buffered = max_buffered
        self.pacing = Pacing(base_timeout=timeout_seconds, max_batch=batch_size, min_batch=min(25, batch_size))
        self.acked_seq = 0
        self._taken_through_step = -1
        self.connected = False
        self.failures = 0
        self.last_error = ""  # why the last attempt failed, for messages
        self.sent_reports = 0
        self._host, self._port = parsed.hostname, parsed.port or 80
        self._queue: deque[AnyEvent] = deque()
        self._spilled = False
        self._decisions: dict[int, list[DecisionEvent]] = {}
        self._commands: list[Command] = []
        self._want_decisions_from: int | None = None
        self._gap_at: int | None = None  # the seq the daemon last asked to resend from
        self._cond = threading.Condition()
        self._stop = False
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"guardian-sender-{run_id}")
        self._thread.start()

    # ---- called from the training loop (never blocks beyond `wait_for`) ---------------------------

    def send(self, event: AnyEvent) -> None:
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

    def take_decisions(self, up_to_step: int) -> list[DecisionEvent]:
        with self._cond:
            steps = [s for s in self._decisions if s <= up_to_step]
            taken = [d for s in sorted(steps) for d in self._decisions.pop(s)]
            self._want_decisions_from = None
            self._taken_through_step = max(self._taken_through_step, up_to_step)
            return taken

    def take_commands(self) -> list[Command]:
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
            except SeqGapError as exc:
                delay = self._resend_from(exc)
                if not delay:
                    continue
            except TimeoutError:
                self._failed(f"no reply within {pacing.timeout:g} s: busy, not down; the sender now waits longer "
                             "and sends smaller batches")
                delay = pacing.timed_out()
            except (OSError, http.client.HTTPException, DaemonError) as exc:
                self._failed(exc)
                delay = pacing.failed()
            else:
                pacing.replied(time.monotonic() - started)
                self._gap_at = None
                self._accept(reply)
                continue
            with self._cond:
                if not self._stop:
                    self._cond.wait(delay)

    def _resend_from(self, gap: SeqGapError) -> float:
        """The daemon has the run's events up to `gap.expected_seq - 1` only (it lost some, or never stored
        them): send again from there, reading them back from the spool. Returns the seconds to wait: none, or
        a back-off when the same gap comes back (the events are nowhere to be found)."""
        if gap.expected_seq == self._gap_at:
            self._failed(f"the daemon needs this run's events from seq {gap.expected_seq}, which are neither in "
                         f"memory nor in the spool file {self.spool}; it cannot take later ones")
            return self.pacing.failed()
        self._gap_at = gap.expected_seq
        log.warning("guardian daemon at %s has run %s's events up to seq %d only; resending from there",
                    self.url, self.run_id, gap.expected_seq - 1)
        with self._cond:
            self.acked_seq = gap.expected_seq - 1
            self._spilled = True
        return 0.0

    def _refill(self, batch: list[AnyEvent]) -> list[AnyEvent]:
        """Events dropped from memory are read back from the spool file, in order."""
        first_in_memory = batch[0].seq if batch else None
        missing = []
        if self.spool is not None and self.spool.exists():
            for event in read_events(self.spool):
                if event is not None:
                    seq = event.seq
                    if seq > self.acked_seq and (first_in_memory is None or seq < first_in_memory):
                        missing.append(event)
                        if len(missing) >= self.pacing.batch:
                            break
        if not missing:
            with self._cond:
                self._spilled = False
            return batch
        return missing

    def _post(self, batch: list[AnyEvent], want: int | None) -> Reply:
        data = events.encode(Report(v=1, run=RunInfo(id=self.run_id, rules=self.rules, meta=self.meta),
                                    events=batch, decisions_since_step=want))
        headers = headers_for(self.token, self.run_key)
        reused = self._conn is not None
        try:
            status, answer = self._exchange(data, headers)
        except STALE_CONNECTION:
            if not reused:
                raise
            status, answer = self._exchange(data, headers)  # closed while idle: once more, on a new connection
        try:
            return _checked_reply(parse_reply(status, answer, self.url))
        except SeqGapError:
            raise
        except DaemonError as exc:
            raise DaemonError(f"daemon refused the report ({status}): {exc}" if exc.status else str(exc),
                              exc.status) from None

    def _exchange(self, data: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """POST one report on the kept-alive connection (a new one if there is none); (status, body)."""
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.pacing.timeout)
        elif self._conn.sock is not None:
            self._conn.sock.settimeout(self.pacing.timeout)
        try:
            self._conn.request("POST", "/v1/report", body=data, headers=headers)
            response = self._conn.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException):
            self._conn.close()
            self._conn = None
            raise
        if response.will_close:
            self._conn.close()
            self._conn = None
        return response.status, answer

    @property
    def unreachable(self) -> bool:
        """The last attempt to reach the daemon failed."""
        return not self.connected and self.failures > 0

    def _failed(self, why: Exception | str) -> None:
        with self._cond:
            self.failures += 1
            self.last_error = str(why)
            if self.connected or self.failures == 1:
                if isinstance(why, DaemonError):
                    log.warning("guardian daemon at %s: %s; spooling events and retrying", self.url, why)
                else:
                    log.warning("guardian daemon at %s unreachable (%s); spooling events and retrying", self.url, why)
            self.connected = False
            self._cond.notify_all()

    def _accept(self, reply: Reply) -> None:
        with self._cond:
            if not self.connected and self.failures:
                log.warning("guardian daemon at %s is back; delivering spooled events", self.url)
            self.connected = True
            self.acked_seq = max(self.acked_seq, reply.ack_seq)
            if isinstance(reply.run_key, str) and reply.run_key != self.run_key:
                self.run_key = reply.run_key  # the daemon made one (we sent ours: it should not)
            while self._queue and self._queue[0].seq <= self.acked_seq:
                self._queue.popleft()
            for decision in reply.decisions:
                if decision.step <= self._taken_through_step:
                    continue  # already acted on (or decided locally past the deadline)
                bucket = self._decisions.setdefault(decision.step, [])
                if all(d.rule != decision.rule for d in bucket):  # a rule fires at most once a step
                    bucket.append(decision)
            self._commands.extend(reply.commands)
            self.sent_reports += 1
            self._cond.notify_all()




def _checked_reply(reply: dict[str, Any]) -> Reply:
    """A report's reply, checked field by field (DaemonError when it is not what a guardian daemon sends): the
    training process then never trips on a malformed decision or command."""
    try:
        return msgspec.convert(reply, Reply, strict=False)
    except msgspec.ValidationError as exc:
        raise DaemonError(f"the reply is not a guardian daemon's ({exc}): {str(reply)[:120]}") from None


def _run_key(folder: Path | None) -> str:
    """The run's key: kept in `folder` (made there on first use), else one for this process only."""
    if folder is None:
        return new_run_key()
    try:
        return load_or_create_run_key(folder)
    except ConfigError as exc:
        log.warning("Guardian: %s; this process reports with a key of its own, so a restart cannot continue the "
                    "run at the daemon", exc)
        return new_run_key()
