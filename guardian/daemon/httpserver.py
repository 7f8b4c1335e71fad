"""A small HTTP/1.1 server on one asyncio event loop, for the daemon.

Why not `http.server`: a thread per connection. With a thousand runs each holding a keep-alive connection,
the daemon ran a thousand threads fighting over the interpreter lock, and parsing each request's headers
through the `email` package cost more than the rules did (benchmarks/scale.py: verdicts of seconds at
1,000 runs). Here every connection is a coroutine; a request head is checked by one regular expression and
parsed with a few splits; the reply goes out in one write (so Nagle's algorithm never holds half of it back).

What it speaks: HTTP/1.1 and 1.0, keep-alive, `Content-Length` and chunked request bodies, `HEAD`,
`Expect: 100-continue` (curl sends it for larger bodies). Handlers are plain functions `(Request) -> Reply`.
A handler marked `inline` runs on the event loop (the report path: short, and the training steps wait for
it); the others run in a bounded thread pool, so a slow `/metrics` scrape over a thousand runs never holds
up a report.

What it refuses (every refusal is the daemon's JSON error shape `{"v": 1, "error": ...}`, then close):
- framing that two parsers could read differently (RFC 9112; request smuggling): `Content-Length` with
  `Transfer-Encoding`, a repeated `Content-Length`, one that is not digits, a transfer coding other than
  `chunked`, chunk sizes that are not plain hex, chunk data not followed by CRLF, header lines without a
  colon, with whitespace before it or folded, bare CR or LF, control characters in the target: 400 (501 for
  an unknown transfer coding); a missing `Host` on HTTP/1.1: 400; a body over `max_body`: 413 at once;
- with `refuse_browsers`, what a web page can send: an `Origin` header (403), a POST/PUT/PATCH/DELETE
  whose `Content-Type` is not `application/json` (415); with `loopback_hosts`, a `Host` that is not a
  loopback name or address (421: a page on a rebound DNS name pointing at 127.0.0.1);
- starvation: a head or body not received within its timeout (408), a keep-alive connection idle longer
  than `idle_timeout`, a reply the client does not read within `write_timeout` (the connection is closed);
  beyond `max_connections` the connection idle longest is closed to make room, or the newcomer gets 503;
  beyond `max_pending` requests waiting for the pool, 503. All deadlines are checked by one sweep a few
  times a second, so the report path only stores a number per phase.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from guardian import events
from guardian.errors import ConfigError, GuardianError

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_CHUNK_LINE_BYTES = 1024
MAX_TRAILERS = 32
MAX_TRAILER_BYTES = 8 * 1024
DEFAULT_MAX_CONNECTIONS = 4096
FILE_RESERVE = 128  # descriptors kept free of connections: the store, rule files, logs, the pool
MAX_TURNED_AWAY = 64  # connections being answered 503 at once; beyond it they are reset
LINGER_SECONDS = 2.0  # after a refusal, how long to read and drop what the client still sends
log = logging.getLogger(__name__)

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
# the whole head in one pass: request line, then header lines `name:value` (a token before the colon, no
# control characters but tab, no bare CR or LF, no folding), then the empty line
_HEAD = re.compile(rb"(%s) ([!-~]+) HTTP/1\.([01])\r\n((?:%s:%s\r\n)*)\r\n" % (_TOKEN, _TOKEN, _FIELD_VALUE))
_FIELD_LINE = re.compile(rb"%s:%s\r\n" % (_TOKEN, _FIELD_VALUE))
_TOKEN_TEXT = re.compile(_TOKEN.decode())
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;%s)?\r\n" % _FIELD_VALUE)
_UNIQUE_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "authorization", "content-type"})
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_REASONS = {status.value: status.phrase for status in HTTPStatus}

# what a connection is waiting for; the sweep closes it when its deadline passes
_IDLE, _HEAD_PHASE, _BODY, _BUSY, _SEND, _LINGER = range(6)


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes = b""
    peer: str = ""


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    close: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    # an inline handler's long body: produced a piece at a time, with the event loop free between pieces
    pieces: Iterator[bytes] | None = None


@dataclass
class BodyTooLarge(GuardianError, ValueError):
    """Raised by the server (not a handler) when a request body is over `max_body`; the handler's
    `too_large` reply is sent and the connection closed."""

    size: int


class Refused(GuardianError, ValueError):
    """A request the server itself refuses: answered with `status` and the error shape, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Handler = Callable[[Request], Reply]


def error_reply(status: int, message: str, *, close: bool = True) -> Reply:
    """An error in the daemon's one error shape, events.ErrorReply: `{"v": 1, "error": message}`."""
    return Reply(status, events.encode(events.ErrorReply(error=message)), close=close)


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # macOS refuses more than OPEN_MAX
            log.info("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    phase: int = _IDLE
    deadline: float = math.inf  # event-loop time
    expired: bool = False  # closed by the server (timeout, eviction): send nothing more


class _AcceptErrorLog:
    """The event loop's exception handler: asyncio reports every failed `accept()` (out of file descriptors:
    EMFILE), a hundred a second at the file limit (40,000 lines in 22 s); this logs one line per
    `every_seconds` with the count of those left out, and passes everything else to the default handler."""

    def __init__(self, every_seconds: float) -> None:
        self.every_seconds, self.last, self.suppressed = every_seconds, -math.inf, 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if "accept" not in message:
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.last < self.every_seconds:
            self.suppressed += 1
            return
        log.error("cannot accept connections: %s (%d more such errors since the last message); raise the "
                  "open-file limit (ulimit -n) or lower max_connections", context.get("exception", message),
                  self.suppressed)
        self.last, self.suppressed = now, 0


class HTTPServer:
    """Listens on (host, port) at construction; `serve_forever()` runs the loop in the calling thread until
    `shutdown()` is called from another one (the interface of `socketserver`, which tests and `serve` use).

    Timeouts are in seconds: `head_timeout` from a request's first byte to the end of its head,
    `body_timeout` for the whole body, `idle_timeout` between requests on a kept-alive connection,
    `write_timeout` for the client to take a reply. `max_connections` (clamped below the open-file limit,
    which is raised to its hard limit at start) and `max_pending` (requests in or waiting for the pool)
    bound what a crowd of clients can hold. `refuse_browsers` and `loopback_hosts`: see the module."""

    def __init__(self, host: str, port: int, *, handle: Handler, inline: Callable[[Request], bool],
                 too_large: Callable[[int], Reply], max_body: int, backlog: int = 1024, workers: int = 4,
                 head_timeout: float = 20.0, body_timeout: float = 20.0, idle_timeout: float = 60.0,
                 write_timeout: float = 60.0, max_connections: int | None = None, max_pending: int = 64,
                 refuse_browsers: bool = False, loopback_hosts: bool = False,
                 accept_log_seconds: float = 10.0) -> None:
        timeouts = (head_timeout, body_timeout, idle_timeout, write_timeout)
        if min(timeouts) <= 0 or max_pending < 1 or (max_connections is not None and max_connections < 1):
            raise ConfigError("HTTP server timeouts must be > 0 s, max_connections and max_pending >= 1")
        self.handle, self.inline, self.too_large, self.max_body = handle, inline, too_large, max_body
        self.head_timeout, self.body_timeout, self.idle_timeout, self.write_timeout = timeouts
        self.max_pending, self.refuse_browsers, self.loopback_hosts = max_pending, refuse_browsers, loopback_hosts
        files = raise_open_file_limit()
        wanted = DEFAULT_MAX_CONNECTIONS if max_connections is None else max_connections
        self.max_connections = max(1, min(wanted, files - FILE_RESERVE))
        if self.max_connections < wanted and max_connections is not None:
            log.warning("max_connections %d lowered to %d: the open-file limit is %d", wanted,
                        self.max_connections, files)
        self._accept_errors = _AcceptErrorLog(accept_log_seconds)
        self._sweep_seconds = min(1.0, max(0.05, min(timeouts) / 4))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.socket = socket.create_server((host, port), family=family, backlog=backlog)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                              "is another guardian running there? pick another --port") from None
        self.server_address: tuple[Any, ...] = self.socket.getsockname()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="guardian-http")
        self._pool_load = 0  # requests in the pool or waiting for it (touched on the loop only)
        self._conns: dict[_Connection, None] = {}  # admitted connections, an ordered set
        self._idle: dict[_Connection, None] = {}  # those waiting for a next request, longest-idle first
        self._turned_away: dict[_Connection, None] = {}
        self._hosts: dict[str, bool] = {}  # Host header -> loopback?, cached
        self._date = (0, "")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._finished = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._finished.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait for it to return (call from another thread)."""
        self._started.wait()
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._finished.wait()

    def server_close(self) -> None:
        self.socket.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._loop.set_exception_handler(self._accept_errors)
        server = await asyncio.start_server(self._connection, sock=self.socket, limit=MAX_HEADER_BYTES)
        sweeper = asyncio.create_task(self._sweep())
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            sweeper.cancel()
            server.close()
            # Open keep-alive connections would hold `wait_closed` forever: their tasks are cancelled by
            # asyncio.run on the way out.

    # ---- connections and their deadlines -----------------------------------------------------------

    async def _sweep(self) -> None:
        """Close every connection past its deadline, a few times a second."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._sweep_seconds)
            now = loop.time()
            for conn in [c for c in (*self._conns, *self._turned_away) if c.deadline < now]:
                self._expire(conn)

    def _expire(self, conn: _Connection) -> None:
        conn.expired = True
        self._conns.pop(conn, None)
        self._idle.pop(conn, None)
        transport = conn.writer.transport
        if conn.phase in (_HEAD_PHASE, _BODY):
            what = "request head" if conn.phase == _HEAD_PHASE else "request body"
            seconds = self.head_timeout if conn.phase == _HEAD_PHASE else self.body_timeout
            transport.write(self._encode(error_reply(408, f"the {what} did not arrive within {seconds:g} s; "
                                                          "send the whole request at once"), "HTTP/1.1"))
            transport.close()
            assert self._loop is not None
            self._loop.call_later(LINGER_SECONDS, transport.abort)
        elif conn.phase == _IDLE:
            transport.close()
        else:  # a reply the client does not read, or a refused client that keeps sending
            transport.abort()

    def _evict_idle(self) -> bool:
        """Make room by closing the connection idle longest; False when none is idle."""
        if not self._idle:
            return False
        conn = next(iter(self._idle))
        conn.expired = True
        del self._idle[conn]
        self._conns.pop(conn, None)
        conn.writer.transport.close()
        return True

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer)
        if len(self._conns) >= self.max_connections and not self._evict_idle():
            await self._turn_away(conn, reader, writer)
            return
        self._conns[conn] = None
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer_name = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        try:
            while not await self._one_request(conn, reader, writer, peer_name):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the client went away, or the sweep closed the connection
        except asyncio.CancelledError:
            # the server is shutting down (asyncio.run cancels the keep-alive connections): end quietly, or
            # Python 3.11's stream callback logs a CancelledError traceback for each open connection
            pass
        finally:
            self._conns.pop(conn, None)
            self._idle.pop(conn, None)
            self._close(writer)

    async def _turn_away(self, conn: _Connection, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if len(self._turned_away) >= MAX_TURNED_AWAY:
            writer.transport.abort()
            return
        self._turned_away[conn] = None
        try:
            reply = error_reply(503, f"the daemon has {self.max_connections} connections open, its limit; "
                                     "retry in a second")
            reply.headers["Retry-After"] = "1"
            await self._refuse(conn, reader, writer, reply, "HTTP/1.1")
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._turned_away.pop(conn, None)
            self._close(writer)

    def _close(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        if writer.transport.get_write_buffer_size() and self._loop is not None:
            self._loop.call_later(self.write_timeout, writer.transport.abort)  # a client that never reads

    # ---- one request -------------------------------------------------------------------------------

    async def _one_request(self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           peer: str) -> bool:
        """Serve one request; True when the connection should close."""
        assert self._loop is not None
        conn.phase, conn.deadline = _IDLE, self._loop.time() + self.idle_timeout
        self._idle[conn] = None
        try:
            first = await reader.readexactly(1)
            self._idle.pop(conn, None)
            conn.phase, conn.deadline = _HEAD_PHASE, self._loop.time() + self.head_timeout
            head = first + await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip() and conn.phase == _HEAD_PHASE and not conn.expired:
                await self._refuse(conn, reader, writer, error_reply(400, "incomplete request head"), "HTTP/1.1")
            return True
        except asyncio.LimitOverrunError:
            await self._refuse(conn, reader, writer, error_reply(431, f"request headers over {MAX_HEADER_BYTES} "
                                                                      "bytes"), "HTTP/1.1")
            return True
        version = "HTTP/1.1"
        try:
            request, version = _parse_head(head, peer)
            self._check(request, version)
            head_only = request.method == "HEAD"
            if head_only:
                request.method = "GET"
            length = _body_length(request.headers, version)
            if length is not None and length > self.max_body:
                raise BodyTooLarge(length)
            if length != 0:
                if version == "HTTP/1.1" and request.headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                conn.phase, conn.deadline = _BODY, self._loop.time() + self.body_timeout
                request.body = await (reader.readexactly(length) if length is not None else self._chunked(reader))
        except Refused as exc:
            await self._refuse(conn, reader, writer, error_reply(exc.status, str(exc)), version)
            return True
        except BodyTooLarge as exc:
            await self._refuse(conn, reader, writer, self.too_large(exc.size), version)
            return True
        conn.phase, conn.deadline = _BUSY, math.inf
        reply = await self._dispatch(request)
        reply.close = reply.close or _wants_close(request.headers, version)
        await self._send(conn, writer, reply, version, head_only)
        return reply.close

    def _check(self, request: Request, version: str) -> None:
        """The rules on a parsed head that do not concern framing: Host, and what a browser would send."""
        headers = request.headers
        host = headers.get("host")
        if host is None:
            if version == "HTTP/1.1":
                raise Refused(400, "an HTTP/1.1 request needs a Host header")
        elif self.loopback_hosts and not self._loopback_host(host):
            raise Refused(421, f"Host {host[:100]!r} is not this daemon: it listens on loopback and answers "
                               "requests addressed to localhost, 127.0.0.1 or [::1] only")
        if not self.refuse_browsers:
            return
        if "origin" in headers:
            raise Refused(403, f"requests from web pages (Origin {headers['origin'][:100]!r}) are refused: "
                               "talk to the daemon with guardian's client, curl or Prometheus")
        if request.method in _WRITE_METHODS:
            content_type = headers.get("content-type")
            if content_type is None or content_type.partition(";")[0].strip().lower() != "application/json":
                given = "no Content-Type" if content_type is None else f"Content-Type {content_type[:100]!r}"
                raise Refused(415, f"{given}: send the body as JSON with 'Content-Type: application/json'")

    def _loopback_host(self, host: str) -> bool:
        known = self._hosts.get(host)
        if known is None:
            known = _is_loopback_host(host)
            if len(self._hosts) >= 256:
                self._hosts.clear()
            self._hosts[host] = known
        return known

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        """A chunked body (RFC 9112 §7.1), strictly: hex sizes, CRLF after every chunk, bounded trailers."""
        parts: list[bytes] = []
        size = 0
        while True:
            line = await _read_line(reader, MAX_CHUNK_LINE_BYTES, "chunk size line")
            match = _CHUNK_LINE.fullmatch(line)
            if match is None:
                raise Refused(400, f"bad chunk size line {line[:40]!r}: a chunk starts with its size in hex "
                                   "digits (at most 16, no 0x, no sign) and CRLF")
            n = int(match[1], 16)
            if n == 0:
                await _read_trailers(reader)
                return b"".join(parts)
            size += n
            if size > self.max_body:
                raise BodyTooLarge(size)
            parts.append(await reader.readexactly(n))
            if await reader.readexactly(2) != b"\r\n":
                raise Refused(400, f"chunk data is not followed by CRLF: a chunk is longer than its size {n:x}")

    async def _dispatch(self, request: Request) -> Reply:
        if self.inline(request):
            reply = _call(self.handle, request)
            return await self._assemble(reply) if reply.pieces is not None else reply
        if self._pool_load >= self.max_pending:
            reply = error_reply(503, f"{self._pool_load} requests are waiting for the daemon's workers; "
                                     "retry in a second", close=False)
            reply.headers["Retry-After"] = "1"
            return reply
        assert self._loop is not None
        self._pool_load += 1
        try:
            return await self._loop.run_in_executor(self._pool, _call, self.handle, request)
        finally:
            self._pool_load -= 1

    @staticmethod
    async def _assemble(reply: Reply, patience: float = 2.0, slice_seconds: float = 0.02) -> Reply:
        """Produce a reply's body from its pieces, letting the requests that arrive meanwhile through, for
        `patience` seconds after every piece: a loop saturated with reports would otherwise starve it (a
        /metrics scrape took 16 s behind batched reports, past Prometheus' 10-s scrape timeout); after that
        it still lets them through every `slice_seconds`, so no report waits behind a long scrape for more
        than that."""
        assert reply.pieces is not None
        body = []
        loop = asyncio.get_running_loop()
        give_up = loop.time() + patience
        next_yield = 0.0
        try:
            for piece in reply.pieces:
                body.append(piece)
                now = loop.time()
                if now < give_up or now >= next_yield:
                    await asyncio.sleep(0)
                    next_yield = now + slice_seconds
        except Exception as exc:
            log.exception("error producing a reply")
            return error_reply(500, f"internal error: {exc}", close=False)
        reply.body, reply.pieces = b"".join(body), None
        return reply

    # ---- replies -----------------------------------------------------------------------------------

    async def _send(self, conn: _Connection, writer: asyncio.StreamWriter, reply: Reply, version: str,
                    head_only: bool = False) -> None:
        assert self._loop is not None
        conn.phase, conn.deadline = _SEND, self._loop.time() + self.write_timeout
        writer.write(self._encode(reply, version, head_only))
        await writer.drain()

    async def _refuse(self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      reply: Reply, version: str) -> None:
        """Send a refusal, then read and drop what the client still sends for a moment before closing (a
        close with unread data resets the connection, and the client might never see the answer)."""
        reply.close = True
        await self._send(conn, writer, reply, version)
        assert self._loop is not None
        conn.phase, conn.deadline = _LINGER, self._loop.time() + LINGER_SECONDS
        if writer.can_write_eof():
            writer.write_eof()
        while not conn.expired and await reader.read(1 << 16):
            pass

    def _encode(self, reply: Reply, version: str, head_only: bool = False) -> bytes:
        lines = [f"{version} {reply.status} {_REASONS.get(reply.status, '')}", f"Date: {self._http_date()}",
                 f"Content-Type: {reply.content_type}", f"Content-Length: {len(reply.body)}",
                 *(f"{k}: {v}" for k, v in reply.headers.items())]
        if reply.close:
            lines.append("Connection: close")
        elif version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + reply.body

    def _http_date(self) -> str:
        now = int(time.time())
        if now != self._date[0]:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]


def _call(handle: Handler, request: Request) -> Reply:
    try:
        return handle(request)
    except Exception as exc:
        log.exception("error handling %s %r", request.method, request.target)
        return error_reply(500, f"internal error: {exc}", close=False)


def _parse_head(head: bytes, peer: str) -> tuple[Request, str]:
    """(request, HTTP version) of a head ending in CRLF CRLF; raises Refused when it is malformed."""
    match = _HEAD.fullmatch(head)
    if match is None:
        status, problem = _diagnose(head)
        raise Refused(status, problem)
    fields = match[4].decode("latin-1").split("\r\n")
    if len(fields) > MAX_HEADERS + 1:
        raise Refused(431, f"{len(fields) - 1} header fields; at most {MAX_HEADERS} are accepted")
    headers: dict[str, str] = {}
    for line in fields[:-1]:
        name, _, value = line.partition(":")
        name, value = name.lower(), value.strip(" \t")
        if name in headers:
            if name in _UNIQUE_HEADERS:
                raise Refused(400, f"the {name} header is given twice; send it once")
            value = f"{headers[name]}, {value}"
        headers[name] = value
    version = "HTTP/1.1" if match[3] == b"1" else "HTTP/1.0"
    return Request(match[1].decode(), match[2].decode(), headers, peer=peer), version


def _diagnose(head: bytes) -> tuple[int, str]:
    """What is wrong with a head that `_HEAD` does not match (the slow path: bad requests only)."""
    text = head.decode("latin-1")
    if "\r" in text.replace("\r\n", "") or "\n" in text.replace("\r\n", ""):
        return 400, "a bare CR or LF in the request head: every line ends with CRLF"
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN_TEXT.fullmatch(parts[0]) or not parts[2].startswith("HTTP/"):
        return 400, f"malformed request line {lines[0][:100]!r}: send METHOD /path HTTP/1.1"
    if parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        return 505, f"{parts[2][:20]!r} is not supported; speak HTTP/1.1"
    if not re.fullmatch(r"[!-~]+", parts[1]):
        return 400, (f"the request target {parts[1][:100]!r} holds a control character, space or non-ASCII "
                     "byte; percent-encode it")
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            return 400, f"malformed header line {line[:100]!r}: folded lines (starting with whitespace) are refused"
        name, colon, _ = line.partition(":")
        if line and not colon:
            return 400, f"malformed header line {line[:100]!r}: no colon"
        if line and name != name.rstrip(" \t"):
            return 400, f"malformed header line {line[:100]!r}: whitespace before the colon"
        if line and not _TOKEN_TEXT.fullmatch(name):
            return 400, f"malformed header line {line[:100]!r}: the name is not a token"
        if line and not _FIELD_LINE.fullmatch(line.encode("latin-1") + b"\r\n"):
            return 400, f"malformed header line {line[:100]!r}: a control character in the value"
    return 400, "malformed request head"


def _body_length(headers: dict[str, str], version: str) -> int | None:
    """The body's length from the framing headers, None for chunked; raises Refused when ambiguous."""
    coding = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if coding is not None:
        if length is not None:
            raise Refused(400, "Content-Length together with Transfer-Encoding: send one of them")
        if version == "HTTP/1.0":
            raise Refused(400, "Transfer-Encoding in an HTTP/1.0 request: send a Content-Length")
        if coding.lower() != "chunked":
            raise Refused(501, f"Transfer-Encoding {coding[:100]!r} is not supported: send the body with a "
                               "Content-Length or 'Transfer-Encoding: chunked'")
        return None
    if length is None:
        return 0
    if not (length.isascii() and length.isdigit()):
        raise Refused(400, f"bad Content-Length {length[:100]!r}: it must be the body's size in decimal digits")
    return int(length) if len(length) <= 18 else 10**18


def _wants_close(headers: dict[str, str], version: str) -> bool:
    """Whether the connection closes after this request: `Connection` is a comma-separated token list."""
    value = headers.get("connection")
    if value is None:
        return version == "HTTP/1.0"
    tokens = {token.strip().lower() for token in value.split(",")}
    return "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)


def _is_loopback_host(host: str) -> bool:
    """Whether a Host header names a loopback address or `localhost`, with or without a port."""
    host = host.lower()
    if host.startswith("["):
        name, bracket, port = host[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
        port = port[1:]
    else:
        name, _, port = host.partition(":")
    if port and not (port.isascii() and port.isdigit()):
        return False
    if name in ("localhost", "localhost.") or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def _read_line(reader: asyncio.StreamReader, limit: int, what: str) -> bytes:
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise Refused(400, f"{what} over {limit} bytes") from None
    if len(line) > limit:
        raise Refused(400, f"{what} over {limit} bytes")
    return line


async def _read_trailers(reader: asyncio.StreamReader) -> None:
    """Read and drop a chunked body's trailer fields: at most MAX_TRAILERS, MAX_TRAILER_BYTES together."""
    total = 0
    for _ in range(MAX_TRAILERS + 1):
        line = await _read_line(reader, MAX_TRAILER_BYTES, "trailer field")
        if line == b"\r\n":
            return
        total += len(line)
        if total > MAX_TRAILER_BYTES:
            raise Refused(400, f"trailer fields over {MAX_TRAILER_BYTES} bytes")
        if not _FIELD_LINE.fullmatch(line):
            raise Refused(400, f"malformed trailer field {line[:100]!r}")
    raise Refused(400, f"more than {MAX_TRAILERS} trailer fields")
