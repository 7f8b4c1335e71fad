"""A small HTTP/1.1 server on one asyncio event loop, for the daemon.

Why not `http.server`: a thread per connection. With a thousand runs each holding a keep-alive connection,
the daemon ran a thousand threads fighting over the interpreter lock, and parsing each request's headers
through the `email` package cost more than the rules did (benchmarks/scale.py: verdicts of seconds at
1,000 runs). Here every connection is a coroutine; a request is parsed with a few byte splits; the reply
goes out in one write (so Nagle's algorithm never holds half of it back).

What it speaks: HTTP/1.1 and 1.0, keep-alive, `Content-Length` and chunked request bodies,
`Expect: 100-continue` (curl sends it for larger bodies). Handlers are plain functions
`(Request) -> Reply`. A handler marked `inline` runs on the event loop (the report path: short, and the
training steps wait for it); the others run in a thread pool, so a slow `/metrics` scrape over a thousand
runs never holds up a report.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from guardian.errors import ConfigError

MAX_HEADER_BYTES = 64 * 1024
log = logging.getLogger(__name__)


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
class BodyTooLarge(Exception):
    """Raised by the server (not a handler) when a request body is over `max_body`; the handler's
    `too_large` reply is sent and the connection closed."""

    size: int


Handler = Callable[[Request], Reply]


class HTTPServer:
    """Listens on (host, port) at construction; `serve_forever()` runs the loop in the calling thread until
    `shutdown()` is called from another one (the interface of `socketserver`, which tests and `serve` use)."""

    def __init__(self, host: str, port: int, *, handle: Handler, inline: Callable[[Request], bool],
                 too_large: Callable[[int], Reply], max_body: int, backlog: int = 1024, workers: int = 4) -> None:
        self.handle, self.inline, self.too_large, self.max_body = handle, inline, too_large, max_body
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.socket = socket.create_server((host, port), family=family, backlog=backlog)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                              "is another guardian running there? pick another --port") from None
        self.server_address: tuple[Any, ...] = self.socket.getsockname()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="guardian-http")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._finished = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:  # noqa: ARG002 - socketserver's signature
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
        server = await asyncio.start_server(self._connection, sock=self.socket, limit=MAX_HEADER_BYTES)
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            # Open keep-alive connections would hold `wait_closed` forever: their tasks are cancelled by
            # asyncio.run on the way out.

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer_name = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        try:
            while not await self._one_request(reader, writer, peer_name):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the client went away or sent something we will not read: drop the connection
        finally:
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> bool:
        """Serve one request; True when the connection should close."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                await self._send(writer, Reply(400, _error("incomplete request"), close=True), "HTTP/1.1")
            return True
        except asyncio.LimitOverrunError:
            await self._send(writer, Reply(431, _error(f"request headers over {MAX_HEADER_BYTES} bytes"), close=True),
                             "HTTP/1.1")
            return True
        request, version, problem = _parse_head(head, peer)
        if request is None:
            await self._send(writer, Reply(400, _error(problem), close=True), "HTTP/1.1")
            return True
        close = version == "HTTP/1.0" or request.headers.get("connection", "").lower() == "close"
        if version == "HTTP/1.0" and request.headers.get("connection", "").lower() == "keep-alive":
            close = False
        try:
            request.body = await self._read_body(request, reader, writer, version)
        except BodyTooLarge as exc:
            reply = self.too_large(exc.size)
            reply.close = True
            await self._send(writer, reply, version)
            return True
        except ValueError as exc:
            await self._send(writer, Reply(400, _error(str(exc)), close=True), version)
            return True
        if self.inline(request):
            reply = self.handle(request)
            if reply.pieces is not None:
                reply = await self._assemble(reply)
        else:
            assert self._loop is not None
            reply = await self._loop.run_in_executor(self._pool, self.handle, request)
        reply.close = reply.close or close
        await self._send(writer, reply, version)
        return reply.close

    async def _read_body(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         version: str) -> bytes:
        headers = request.headers
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length_text = headers.get("content-length")
        if not chunked and not length_text:
            return b""
        if not chunked:
            if not length_text or not length_text.isdigit():
                raise ValueError(f"bad Content-Length {length_text!r}")
            length = int(length_text)
            if length > self.max_body:
                await _drain(reader, length)
                raise BodyTooLarge(length)
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(f"{version} 100 Continue\r\n\r\n".encode())
        if not chunked:
            return await reader.readexactly(length)
        parts: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                n = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise ValueError("bad chunk size in a chunked body") from None
            if n == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            size += n
            if size > self.max_body:
                raise BodyTooLarge(size)
            parts.append(await reader.readexactly(n))
            await reader.readexactly(2)

    @staticmethod
    async def _assemble(reply: Reply, patience: float = 2.0) -> Reply:
        """Produce a reply's body from its pieces, letting the requests that arrive meanwhile through, for
        `patience` seconds at most: a loop saturated with reports would otherwise starve it (a /metrics
        scrape took 16 s behind batched reports, past Prometheus' 10-s scrape timeout); then it finishes
        in one go."""
        assert reply.pieces is not None
        body = []
        loop = asyncio.get_running_loop()
        give_up = loop.time() + patience
        try:
            for piece in reply.pieces:
                body.append(piece)
                if loop.time() < give_up:
                    await asyncio.sleep(0)
        except Exception as exc:  # noqa: BLE001 - a failed rendering must not take the server down
            log.exception("error producing a reply")
            return Reply(500, _error(f"internal error: {exc}"))
        reply.body, reply.pieces = b"".join(body), None
        return reply

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: Reply, version: str) -> None:
        try:
            reason = HTTPStatus(reply.status).phrase
        except ValueError:
            reason = ""
        lines = [f"{version if version in ('HTTP/1.0', 'HTTP/1.1') else 'HTTP/1.1'} {reply.status} {reason}",
                 f"Content-Type: {reply.content_type}", f"Content-Length: {len(reply.body)}",
                 *(f"{k}: {v}" for k, v in reply.headers.items())]
        if reply.close:
            lines.append("Connection: close")
        elif version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body)
        await writer.drain()


def _parse_head(head: bytes, peer: str) -> tuple[Request | None, str, str]:
    """(request, HTTP version, problem): request is None when the head is malformed."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None, "", "request head is not text"
    lines = text.split("\r\n")
    start = lines[0].split(" ")
    if len(start) != 3 or not start[2].startswith("HTTP/1."):
        return None, "", f"malformed request line {lines[0][:100]!r}"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None, "", f"malformed header line {line[:100]!r}"
        headers[name.lower()] = value.strip()
    return Request(start[0], start[1], headers, peer=peer), start[2], ""


async def _drain(reader: asyncio.StreamReader, length: int) -> None:
    """Read and drop `length` bytes in bounded chunks, so the sender gets our answer, not a broken pipe."""
    while length > 0:
        chunk = await reader.read(min(length, 1 << 20))
        if not chunk:
            return
        length -= len(chunk)


def _error(message: str) -> bytes:
    import json

    return json.dumps({"error": message}).encode()
