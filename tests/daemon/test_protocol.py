"""The daemon's HTTP layer and wire protocol under malformed input: raw sockets and generated garbage.

Every case talks to a real server on a loopback port; after each, the daemon must still answer."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardian.daemon.core import Guardian
from guardian.daemon.serve import load_or_create_token, make_server
from guardian.daemon.store import Store
from guardian.errors import ConfigError
from guardian.rulefile.reload import RuleLibrary
from guardian.transport import wire
from guardian.transport.client import request


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Guardian, int]]:
    tmp = tmp_path_factory.mktemp("protocol")
    (tmp / "token").write_text(TOKEN)
    (tmp / "token").chmod(0o600)
    core = Guardian(Store(tmp / "guardian.db"), RuleLibrary(tmp / "rules"))
    server = make_server(core, "127.0.0.1", 0, load_or_create_token(tmp), tmp / "token")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield core, int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def exchange(port: int, data: bytes, read_all: bool = True) -> bytes:
    """Send raw bytes, return everything the server sends back before it closes (or 2 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(data)
        if not read_all:
            return sock.recv(65536)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def alive(port: int) -> bool:
    return request(f"http://127.0.0.1:{port}", "GET", "/healthz", timeout=5) == {"v": 1, "ok": True}


def body_of(reply: bytes) -> dict[str, Any]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return dict(json.loads(body))


TOKEN = "protocol-test-token-0123456789abcdefghij"
AUTH = (f"Authorization: Bearer {TOKEN}", f"X-Guardian-Run-Key: {TOKEN}")  # writes need the token (and a run key)


def post(path: str, body: bytes, *headers: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"POST {path} {version}", "Host: 127.0.0.1", "Content-Type: application/json", *AUTH, *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


REPORT = json.dumps({"v": 1, "run": {"id": "raw"}, "events": [
    {"seq": 1, "kind": "metrics", "step": 1, "values": {"loss": 1.0}}]}).encode()


def test_keep_alive_serves_several_requests_on_one_connection(served: tuple[Guardian, int]) -> None:
    _, port = served
    two = post("/v1/report", REPORT) + b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    reply = exchange(port, two)
    assert reply.count(b"HTTP/1.1 200 OK") == 2
    assert b'"ack_seq":1' in reply and reply.rstrip().endswith(b'"ok":true}')


def test_expect_continue_and_chunked_bodies_as_curl_sends_them(served: tuple[Guardian, int]) -> None:
    _, port = served
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(REPORT), REPORT)
    reply = exchange(port, post("/v1/report", chunked, "Transfer-Encoding: chunked", "Expect: 100-continue",
                                "Connection: close"))
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert body_of(reply.split(b"\r\n\r\n", 1)[1])["ack_seq"] == 1


def test_http_1_0_gets_an_answer_and_the_connection_closes(served: tuple[Guardian, int]) -> None:
    _, port = served
    reply = exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 200 OK") and b"Connection: close" in reply


@pytest.mark.parametrize(("data", "status", "says"), [
    (b"NONSENSE\r\n\r\n", b"400", "malformed request line"),
    (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", b"400", "malformed header line"),
    (post("/v1/report", b"{}", "Content-Length: ten"), b"400", "bad Content-Length"),
    (post("/v1/report", b"zz\r\n", "Transfer-Encoding: chunked"), b"400", "bad chunk size"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"431", "request headers over"),
    (post("/v1/report", b"x" * (wire.MAX_BODY_BYTES + 1)), b"413", "send smaller batches"),
    (b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", b"404", "no such endpoint"),
])
def test_malformed_http_gets_a_clear_error(served: tuple[Guardian, int], data: bytes, status: bytes,
                                           says: str) -> None:
    _, port = served
    reply = exchange(port, data)
    assert reply.split(b" ")[1] == status, reply[:200]
    assert says in body_of(reply)["error"]
    assert alive(port)


def test_a_client_that_hangs_up_mid_request_does_not_hurt(served: tuple[Guardian, int]) -> None:
    _, port = served
    for partial in (b"POST /v1/report HTTP/1.1\r\nContent-Length: 500\r\n\r\n{\"v\": 1", b"GET /heal"):
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(partial)
    assert alive(port)


def test_a_busy_port_is_a_clear_error(served: tuple[Guardian, int], tmp_path: Path) -> None:
    core, port = served
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}.*pick another --port"):
        make_server(core, "127.0.0.1", port, "t", tmp_path / "token")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
EVENT = st.fixed_dictionaries({}, optional={
    "seq": st.integers(-3, 10**12) | JSON, "kind": st.sampled_from(["metrics", "action", "end", "start", "x"]) | JSON,
    "step": st.integers(-3, 10**9) | JSON, "values": st.dictionaries(st.text(max_size=12), JSON, max_size=5) | JSON,
    "time": JSON})
MESSAGE = st.fixed_dictionaries({}, optional={
    "v": st.just(1) | JSON, "run": st.fixed_dictionaries({}, optional={"id": st.text(max_size=30) | JSON,
                                                                        "rules": JSON, "meta": JSON}) | JSON,
    "events": st.lists(EVENT, max_size=5) | JSON, "decisions_since_step": JSON})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=MESSAGE)
def test_generated_messages_never_crash_the_daemon(served: tuple[Guardian, int], message: dict[str, Any]) -> None:
    _, port = served
    reply = exchange(port, post("/v1/report", json.dumps(message).encode(), "Connection: close"))
    status = int(reply.split(b" ")[1])
    assert status in (200, 400, 404, 409, 413), reply[:300]
    assert status == 200 or body_of(reply)["error"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_generated_bytes_never_crash_the_daemon(served: tuple[Guardian, int], data: bytes) -> None:
    _, port = served
    exchange(port, data)
    exchange(port, post("/v1/report", data, "Connection: close"))
    assert alive(port)
