"""The HTTP server held to RFC 9112 and against starvation and browsers, over raw sockets.

Every case talks to a real server on a loopback port: the daemon's own (`make_server`, with timeouts made
small so a test can wait them out), or an `HTTPServer` with a small handler where a case needs a handler
that blocks. Waits are generous; nothing asserts on how long something took."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from guardian.daemon.core import Guardian
from guardian.daemon.httpserver import HTTPServer, Reply, Request
from guardian.daemon.serve import load_or_create_token, make_server
from guardian.daemon.store import Store
from guardian.rulefile.reload import RuleLibrary
from guardian.transport import wire

BIG = 2_000_000
SMALL = {"head_timeout": 0.5, "body_timeout": 0.5, "idle_timeout": 1.0, "write_timeout": 1.0}
REPORT = json.dumps({"v": 1, "run": {"id": "strict"}, "events": [
    {"seq": 1, "kind": "metrics", "step": 1, "values": {"loss": 1.0}}]}).encode()


TOKEN = "strict-test-token-0123456789abcdefghijkl"
AUTH = (f"Authorization: Bearer {TOKEN}", f"X-Guardian-Run-Key: {TOKEN}")  # every write needs the token, a run its key


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The daemon's server with small timeouts."""
    tmp = tmp_path_factory.mktemp("strict")
    core = Guardian(Store(tmp / "guardian.db"), RuleLibrary(tmp / "rules"))
    (tmp / "token").write_text(TOKEN + "\n")
    (tmp / "token").chmod(0o600)
    server = make_server(core, "127.0.0.1", 0, load_or_create_token(tmp), tmp / "token", **SMALL)
    with serving(server):
        yield int(server.server_address[1])


@contextmanager
def serving(server: HTTPServer) -> Iterator[HTTPServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def bare_server(**options: Any) -> Iterator[tuple[int, threading.Event]]:
    """An HTTPServer whose handler echoes the request; `GET /block` waits for the event first."""
    release = threading.Event()

    def handle(request: Request) -> Reply:
        if request.target == "/block":
            release.wait(30)
        if request.target == "/big":
            return Reply(200, b"x" * BIG, content_type="text/plain")
        return Reply(200, wire.dumps({"method": request.method, "target": request.target,
                                      "body": request.body.decode("latin-1")}))

    server = HTTPServer("127.0.0.1", 0, handle=handle, inline=lambda r: r.target == "/inline",
                        too_large=lambda n: Reply(413, wire.dumps({"error": f"{n} bytes"})), max_body=1000,
                        **options)
    try:
        with serving(server):
            yield int(server.server_address[1]), release
    finally:
        release.set()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection, which it must do within 10 s."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open; it sent {b''.join(chunks)[:300]!r}") from None
    return b"".join(chunks)


def exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    with connect(port) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def replies(data: bytes, *, head_only_first: bool = False) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream into (status, headers, body) replies by their Content-Length."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data[:200]
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        status = int(lines[0].split(" ")[1])
        n = 0 if status == 100 or (head_only_first and not out) else int(headers["content-length"])
        out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


def request(method: str, path: str, *headers: str, body: bytes = b"", version: str = "HTTP/1.1",
            host: str | None = "127.0.0.1") -> bytes:
    lines = [f"{method} {path} {version}", *([f"Host: {host}"] if host is not None else []), *headers]
    if body and not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def post(body: bytes, *headers: str, path: str = "/v1/report") -> bytes:
    return request("POST", path, "Content-Type: application/json", "Connection: close", *headers, body=body)


def only_error(data: bytes) -> tuple[int, str]:
    """The single reply in `data`, an error in the daemon's shape: (status, message)."""
    (status, headers, body), = replies(data)
    message = json.loads(body)
    assert set(message) == {"v", "error"} and message["v"] == 1, message
    assert headers["content-type"] == "application/json" and "date" in headers
    return status, message["error"]


def alive(port: int) -> bool:
    (status, _, body), = replies(exchange(port, request("GET", "/healthz", "Connection: close")))
    return status == 200 and json.loads(body) == {"v": 1, "ok": True}


# ---- timeouts, limits ------------------------------------------------------------------------------


def test_an_idle_keep_alive_connection_is_closed(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request("GET", "/healthz"))
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 OK")
        assert read_all(sock) == b""  # then nothing, and the server closes it (idle_timeout 1 s)
    with connect(port) as sock:  # a connection that never sends anything, too
        assert read_all(sock) == b""
    assert alive(port)


@pytest.mark.parametrize("partial", [
    b"POST /v1/report HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",  # half a head
    request("POST", "/v1/report", "Content-Type: application/json", "Content-Length: 100") + b'{"v": 1',
    request("POST", "/v1/report", "Content-Type: application/json", "Transfer-Encoding: chunked") + b"10\r\nabc",
])
def test_a_request_that_stops_half_way_gets_408_and_is_closed(port: int, partial: bytes) -> None:
    with connect(port) as sock:
        sock.sendall(partial)
        status, message = only_error(read_all(sock))
    assert status == 408 and "did not arrive within 0.5 s" in message
    assert alive(port)


def test_connections_over_the_cap_get_503_and_idle_ones_make_room() -> None:
    with bare_server(max_connections=2, **SMALL) as (port, _):
        busy = [connect(port) for _ in range(2)]
        for sock in busy:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # half a head: not idle, not evictable
        time.sleep(0.2)
        status, message = only_error(exchange(port, request("GET", "/x", "Connection: close")))
        assert status == 503 and "2 connections open, its limit" in message
        for sock in busy:
            sock.close()
    with bare_server(max_connections=2, idle_timeout=30) as (port, _):
        idle = [connect(port) for _ in range(2)]
        time.sleep(0.2)
        (status, _, _), = replies(exchange(port, request("GET", "/x", "Connection: close")))
        assert status == 200  # the connection idle longest was closed to make room
        idle[0].settimeout(10)
        assert idle[0].recv(100) == b""
        for sock in idle:
            sock.close()


def test_a_full_pool_answers_503() -> None:
    with bare_server(workers=1, max_pending=1) as (port, release):
        with connect(port) as blocked:
            blocked.sendall(request("GET", "/block", "Connection: close"))
            time.sleep(0.3)
            status, message = only_error(exchange(port, request("GET", "/other", "Connection: close")))
            assert status == 503 and "waiting for the daemon's workers" in message
            (status, _, _), = replies(exchange(port, request("GET", "/inline", "Connection: close")))
            assert status == 200  # inline handlers (the report path) do not wait for the pool
            release.set()
            (status, _, body), = replies(read_all(blocked))
            assert status == 200 and json.loads(body)["target"] == "/block"


def test_a_reply_the_client_does_not_read_does_not_hold_the_connection() -> None:
    with bare_server(write_timeout=0.5) as (port, _), socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(request("GET", "/big") * 10)  # 20 MB of replies, and the client reads none of it
        time.sleep(3)
        received, ended = 0, False
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
            ended = True
        except ConnectionResetError:
            ended = True
        except TimeoutError:
            pass
        assert ended and received < 10 * BIG  # the server gave up on it


CHILD = textwrap.dedent("""
    import logging, os, resource, sys, threading, time
    from guardian.daemon.httpserver import HTTPServer, Reply
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    soft, hard = map(int, sys.argv[1:3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    server = HTTPServer("127.0.0.1", 0, handle=lambda r: Reply(200, b"{}"), inline=lambda r: True,
                        too_large=lambda n: Reply(413), max_body=100, accept_log_seconds=1.0)
    print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if sys.argv[3] == "exhaust":
        time.sleep(0.3)
        held = []
        try:
            while True:
                held.append(open(os.devnull))
        except OSError:
            pass
        print("full", flush=True)
        sys.stdin.readline()
        for f in held:
            f.close()
        print("freed", flush=True)
        sys.stdin.readline()
""")


def child(tmp_path: Path, soft: int, hard: int, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), str(soft), str(hard), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 4096 if hard == resource.RLIM_INFINITY else hard
    proc = child(tmp_path, 256, hard, "report")
    out, err = proc.communicate(timeout=30)
    assert int(out.split()[0]) == hard, err


def test_accept_errors_at_the_file_limit_are_logged_once_a_second_with_a_count(tmp_path: Path) -> None:
    proc = child(tmp_path, 200, 200, "exhaust")
    assert proc.stdout is not None and proc.stdin is not None
    port = int(proc.stdout.readline().split()[1])
    assert proc.stdout.readline().strip() == "full"
    waiting = [connect(port) for _ in range(3)]
    time.sleep(3.5)  # asyncio retries the accept every second, 100 failures each time
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "freed"
    waiting[0].sendall(request("GET", "/", "Connection: close"))
    served = read_all(waiting[0])  # once descriptors are free again, the waiting clients are served
    proc.stdin.write("\n")
    proc.stdin.flush()
    _, err = proc.communicate(timeout=30)
    for sock in waiting:
        sock.close()
    lines = [line for line in err.splitlines() if "cannot accept connections" in line]
    assert 1 <= len(lines) <= 6, err[-3000:]
    assert any("more such errors since the last message" in line and "(0 more" not in line for line in lines), lines
    assert served.startswith(b"HTTP/1.1 200 OK"), err[-3000:]


# ---- framing (RFC 9112) ----------------------------------------------------------------------------

SMUGGLED = b"GET /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize(("data", "status", "says"), [
    (post(b"0\r\n\r\n" + SMUGGLED, "Content-Length: 5", "Transfer-Encoding: chunked"), 400,
     "Content-Length together with Transfer-Encoding"),
    (post(REPORT, f"Content-Length: {len(REPORT)}", "Content-Length: 5"), 400, "content-length header is given twice"),
    (post(REPORT, f"Content-Length: {len(REPORT)}", f"Content-Length: {len(REPORT)}"), 400, "given twice"),
    (post(REPORT, f"Content-Length: +{len(REPORT)}"), 400, "bad Content-Length"),
    (post(REPORT, "Content-Length: 0x10"), 400, "bad Content-Length"),
    (post(REPORT, "Content-Length: \xb2"), 400, "bad Content-Length"),  # '²' passes str.isdigit()
    (post(REPORT, "Transfer-Encoding: gzip"), 501, "Transfer-Encoding 'gzip' is not supported"),
    (post(REPORT, "Transfer-Encoding: xchunked"), 501, "not supported"),
    (post(REPORT, "Transfer-Encoding: chunked, gzip"), 501, "not supported"),
    (post(REPORT, "Transfer-Encoding: gzip, chunked"), 501, "not supported"),
    (post(b"0\r\n\r\n", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), 400, "given twice"),
    (request("POST", "/v1/report", "Content-Type: application/json", "Transfer-Encoding: chunked",
             body=b"0\r\n\r\n", version="HTTP/1.0"), 400, "Transfer-Encoding in an HTTP/1.0 request"),
    (post(b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), 400, "bad chunk size"),
    (post(b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), 400, "bad chunk size"),
    (post(b"+10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), 400, "bad chunk size"),
    (post(b" 10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), 400, "bad chunk size"),
    (post(b"1" * 17 + b"\r\n", "Transfer-Encoding: chunked"), 400, "bad chunk size"),
    (post(b"5\r\n" + b"x" * 9 + b"\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), 400, "not followed by CRLF"),
    (post(b"0\r\n" + b"X-T: 1\r\n" * 40 + b"\r\n", "Transfer-Encoding: chunked"), 400, "more than 32 trailer"),
    (post(b"0\r\nX-T: " + b"a" * 9000 + b"\r\n\r\n", "Transfer-Encoding: chunked"), 400, "trailer field over"),
    (post(b"0\r\nno colon\r\n\r\n", "Transfer-Encoding: chunked"), 400, "malformed trailer field"),
    (post(REPORT, "X-No-Colon"), 400, "no colon"),
    (post(REPORT, "X-Space : 1"), 400, "whitespace before the colon"),
    (post(REPORT, "X-Folded: 1", " continued"), 400, "folded lines"),
    (post(REPORT, "X-Bare: a\nContent-Length: 0"), 400, "bare CR or LF"),
    (post(REPORT, "X-Nul: a\x00b"), 400, "control character in the value"),
    (request("GET", "/healthz", "Host: 127.0.0.1"), 400, "host header is given twice"),
    (request("GET", "/healthz", host=None), 400, "needs a Host header"),
    (request("GET", "/healthz", version="HTTP/2.0"), 505, "speak HTTP/1.1"),
    (b"GET  /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "malformed request line"),
])
def test_ambiguous_framing_is_refused_and_the_connection_closed(port: int, data: bytes, status: int,
                                                               says: str) -> None:
    reply = exchange(port, data + SMUGGLED)
    got, message = only_error(reply)  # one reply: nothing after the refusal is read as a request
    assert (got, says in message) == (status, True), message
    assert b"Connection: close" in reply
    assert alive(port)


@pytest.mark.parametrize("target", [b"/v1/runs\x01", b"/a\tb", b"/\x7f", b"/caf\xe9", b"/x\x1b[31mFORGED"])
def test_control_characters_in_the_target_are_refused_and_never_logged_raw(
        port: int, target: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        status, message = only_error(exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert status == 400 and "percent-encode it" in message
    assert not any(c in record.getMessage() for record in caplog.records for c in "\x01\t\x7f\x1b")


def test_a_body_over_the_limit_is_refused_at_once_without_reading_it(port: int) -> None:
    with connect(port) as sock:  # 10^11 bytes announced; the client waits for an answer before sending
        sock.sendall(post(b"", "Content-Length: 100000000000", "Expect: 100-continue"))
        reply = read_all(sock)
    status, message = only_error(reply)
    assert status == 413 and "send smaller batches" in message and b"100 Continue" not in reply
    chunked = post(b"%x\r\n" % (wire.MAX_BODY_BYTES + 1), "Transfer-Encoding: chunked")
    assert only_error(exchange(port, chunked, half_close=False))[0] == 413


def test_100_continue_goes_to_http_1_1_clients_only(port: int) -> None:
    for version, continued in (("HTTP/1.1", True), ("HTTP/1.0", False)):
        with connect(port) as sock:
            sock.sendall(request("POST", "/v1/report", "Content-Type: application/json", "Expect: 100-continue",
                                 f"Content-Length: {len(REPORT)}", *AUTH, version=version))
            if continued:
                assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(REPORT)
            answers = replies(read_all(sock))
        assert [status for status, _, _ in answers] == [200]


# ---- replies: Date, HEAD, Connection, one error shape ----------------------------------------------


def test_every_reply_has_a_date_and_errors_have_the_daemons_shape(port: int) -> None:
    for data in (request("GET", "/healthz", "Connection: close"), request("GET", "/nowhere", "Connection: close"),
                 b"NONSENSE\r\n\r\n", post(b"{", "Content-Length: x")):
        (status, headers, body), = replies(exchange(port, data))
        assert headers["date"].endswith(" GMT"), headers
        if status >= 400:
            assert set(json.loads(body)) == {"v", "error"}


def test_head_answers_like_get_without_a_body(port: int) -> None:
    data = exchange(port, request("HEAD", "/healthz") + request("GET", "/healthz", "Connection: close"))
    (head_status, head, empty), (status, got, body) = replies(data, head_only_first=True)
    assert (head_status, status, empty) == (200, 200, b"")
    assert head["content-length"] == got["content-length"] == str(len(body))


@pytest.mark.parametrize(("version", "connection", "closes"), [
    ("HTTP/1.1", "keep-alive, Close", True),
    ("HTTP/1.1", "Upgrade,close", True),
    ("HTTP/1.1", "keep-alive", False),
    ("HTTP/1.0", "Keep-Alive", False),
    ("HTTP/1.0", "TE, keep-alive", False),
    ("HTTP/1.0", None, True),
])
def test_connection_is_a_token_list(port: int, version: str, connection: str | None, closes: bool) -> None:
    header = [f"Connection: {connection}"] if connection else []
    data = exchange(port, request("GET", "/healthz", *header, version=version) * 2)
    assert len(replies(data)) == (1 if closes else 2)


# ---- browser-shaped requests -----------------------------------------------------------------------


@pytest.mark.parametrize(("data", "status", "says"), [
    (post(REPORT, "Origin: http://evil.example"), 403, "requests from web pages"),
    (request("GET", "/v1/runs", "Origin: null", "Connection: close"), 403, "requests from web pages"),
    (request("POST", "/v1/report", "Content-Type: text/plain", body=REPORT), 415, "Content-Type 'text/plain'"),
    (request("POST", "/v1/report", "Content-Type: application/x-www-form-urlencoded", body=REPORT), 415,
     "'Content-Type: application/json'"),
    (request("POST", "/v1/report", "Content-Type: multipart/form-data; boundary=x", body=REPORT), 415, "send"),
    (request("POST", "/v1/report", body=REPORT), 415, "no Content-Type"),
    (request("POST", "/v1/runs/x/control", "Content-Length: 0"), 415, "no Content-Type"),
    (request("GET", "/v1/runs", "Connection: close", host="evil.example:8765"), 421, "is not this daemon"),
    (request("GET", "/v1/runs", "Connection: close", host="127.0.0.1.evil.example"), 421, "is not this daemon"),
    (request("GET", "/v1/runs", "Connection: close", host="[::1]x"), 421, "is not this daemon"),
])
def test_browser_shaped_requests_are_refused(port: int, data: bytes, status: int, says: str) -> None:
    got, message = only_error(exchange(port, data))
    assert (got, says in message) == (status, True), message


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:8765", "LOCALHOST", "[::1]:8765", "127.0.0.2:1",
                                  "guardian.localhost"])
def test_loopback_hosts_and_json_bodies_are_served(port: int, host: str) -> None:
    data = request("POST", "/v1/report", "Content-Type: Application/JSON; charset=utf-8", "Connection: close",
                   *AUTH, body=REPORT, host=host)
    (status, _, body), = replies(exchange(port, data))
    assert status == 200 and json.loads(body)["ack_seq"] == 1


def test_browser_checks_are_options_the_bare_server_leaves_off() -> None:
    with bare_server() as (port, _):
        data = request("POST", "/x", "Origin: http://a.example", "Content-Type: text/plain", "Connection: close",
                       body=b"hi", host="a.example")
        (status, _, body), = replies(exchange(port, data))
    assert status == 200 and json.loads(body)["body"] == "hi"
