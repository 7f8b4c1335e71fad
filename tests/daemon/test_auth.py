"""Who may speak for a run: the token for every write, a run bound to its first sender's key, contiguous seqs,
the token file, and a sender that survives whatever answers at GUARDIAN_URL."""

from __future__ import annotations

import json
import logging
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonkit import DaemonProcess, in_process_daemon, report_intake
from transformers import TrainerCallback

from guardian.daemon.core import Guardian
from guardian.daemon.store import Store
from guardian.errors import ConfigError
from guardian.events import from_builtins
from guardian.rulefile.reload import RuleLibrary
from guardian.transport import wire
from guardian.transport.client import DaemonError, DaemonLink, request
from guardian.transport.token import RUN_KEY_HEADER, find_token, load_or_create_token

KEY = "k" * 40
OTHER_KEY = "o" * 40


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Guardian, str, str]]:
    """An in-process daemon on a free loopback port: (core, url, token)."""
    with in_process_daemon(tmp_path) as served:
        yield served


def metrics(seq: int, step: int, **values: float | str) -> dict[str, Any]:
    return {"seq": seq, "kind": "metrics", "step": step, "phase": "train", "values": values}


def raw(url: str, method: str, path: str, body: dict[str, Any] | None = None,
        headers: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    """One request over a raw socket: (status, JSON body)."""
    port = int(url.rsplit(":", 1)[1])
    data = b"" if body is None else json.dumps({"v": 1, **body}).encode()
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {len(data)}",
            "Content-Type: application/json", *headers]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    reply = b"".join(chunks)
    status = int(reply.split(b" ", 2)[1])
    text = reply.partition(b"\r\n\r\n")[2]
    return status, json.loads(text) if text.startswith(b"{") else {}


def auth(token: str, key: str | None = KEY) -> tuple[str, ...]:
    return (f"Authorization: Bearer {token}",) + ((f"{RUN_KEY_HEADER}: {key}",) if key else ())


def report(run: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    return {"run": {"id": run, "rules": "default"}, "events": events}


# ---- the token for every write ------------------------------------------------------------------------


def test_every_write_needs_the_token_on_loopback_too_and_reads_stay_open(daemon: tuple[Guardian, str, str]) -> None:
    core, url, token = daemon
    for headers in ((), ("Authorization: Bearer wrong",), ("Authorization: Bearer ",)):
        status, body = raw(url, "POST", "/v1/report", report("r", [metrics(1, 1, loss=1.0)]), headers)
        assert status == 401 and "a valid token is required" in body["error"] and "token" in body["error"]
        status, body = raw(url, "POST", "/v1/runs/r/control", {"action": "stop"}, headers)
        assert status == 401
        status, body = raw(url, "POST", "/v1/alerts", {"alerts": []}, headers)
        assert status == 401 and "credentials_file" in body["error"]
    assert core.store.run("r") is None and core.counters["reports_rejected"] == 3
    status, body = raw(url, "POST", "/v1/report", report("r", [metrics(1, 1, loss=1.0)]), auth(token))
    assert status == 200 and body["ack_seq"] == 1
    for path in ("/healthz", "/v1/runs", "/v1/runs/r/events", "/v1/rules"):  # reads: open on loopback
        assert raw(url, "GET", path)[0] == 200


# ---- a run is bound to its first sender ---------------------------------------------------------------


def test_a_run_is_bound_to_the_key_of_its_first_report(daemon: tuple[Guardian, str, str]) -> None:
    core, url, token = daemon
    status, first = raw(url, "POST", "/v1/report", report("r", [metrics(1, 1, loss=1.0)]), auth(token, None))
    assert status == 200 and len(first["run_key"]) >= 32  # none sent: the daemon made one
    issued = first["run_key"]
    for key in (None, OTHER_KEY):
        status, body = raw(url, "POST", "/v1/report", report("r", [metrics(2, 2, loss="nan")]), auth(token, key))
        assert status == 403 and "another process" in body["error"] and RUN_KEY_HEADER in body["error"]
    status, body = raw(url, "POST", "/v1/report", report("r", [metrics(2, 2, loss=1.0)]), auth(token, issued))
    assert status == 200 and body["ack_seq"] == 2 and "run_key" not in body
    status, body = raw(url, "POST", "/v1/report", report("s", [metrics(1, 1, loss=1.0)]), auth(token, "short"))
    assert status == 400 and "32 to 200 printable" in body["error"]  # a key a client proposes must be strong
    status, body = raw(url, "POST", "/v1/report", report("s", []), auth(token, KEY))
    assert status == 200 and body["run_key"] == KEY  # a key the first report carries is the run's key
    assert core.store.event_seqs("r") == [1, 2]


def test_run_keys_survive_a_daemon_restart_and_an_ended_run_may_be_claimed_afresh(tmp_path: Path) -> None:
    first = Guardian(Store(tmp_path / "guardian.db"), RuleLibrary(tmp_path / "rules"))
    first.report(report_intake("r", "default", {}, [metrics(1, 1, loss=1.0)]), run_key=KEY)
    first.store.close()
    core = Guardian(Store(tmp_path / "guardian.db"), RuleLibrary(tmp_path / "rules"))  # restarted
    with pytest.raises(wire.WireError, match="another process") as refused:
        core.report(report_intake("r", "default", {}, [{"seq": 2, "kind": "end", "step": 1}]), run_key=OTHER_KEY)
    assert refused.value.status == 403
    core.report(report_intake("r", "default", {}, [{"seq": 2, "kind": "end", "step": 1}]), run_key=KEY)
    with pytest.raises(wire.WireError, match="earlier process up to seq 2.*its own run id") as renumbered:
        core.report(report_intake("r", "default", {}, [{"seq": 1, "kind": "start", "step": 0}]), run_key=OTHER_KEY)
    assert renumbered.value.status == 409  # numbered from 1 again: would be taken for the old process's events
    reply = core.report(report_intake("r", "default", {}, [{"seq": 3, "kind": "start", "step": 1}]), run_key=OTHER_KEY)
    assert reply.run_key == OTHER_KEY and reply.ack_seq == 3  # ended: a new process took it over
    with pytest.raises(wire.WireError, match="another process"):
        core.report(report_intake("r", "default", {}, [metrics(4, 2, loss=1.0)]), run_key=KEY)


def test_a_restarted_process_continues_its_run_with_the_key_kept_beside_its_files(
        daemon: tuple[Guardian, str, str], tmp_path: Path) -> None:
    core, url, token = daemon
    folder = tmp_path / "run" / "guardian"
    link = DaemonLink(url, "resumed", token=token, run_key_dir=folder)
    link.send(from_builtins(metrics(1, 1, loss=1.0)))
    assert link.wait_for(1, timeout=10)
    link.close()
    key_file = folder / "run_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and key_file.read_text().strip() == link.run_key
    again = DaemonLink(url, "resumed", token=token, run_key_dir=folder)  # the process after a crash or resume
    stranger = DaemonLink(url, "resumed", token=token, run_key_dir=tmp_path / "elsewhere")
    try:
        again.send(from_builtins(metrics(2, 2, loss=1.0)))
        assert again.wait_for(2, timeout=10) and again.failures == 0
        stranger.send(from_builtins(metrics(3, 3, loss="nan")))
        deadline = time.monotonic() + 10
        while not stranger.failures and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "(403)" in stranger.last_error and "another process" in stranger.last_error
    finally:
        again.close()
        stranger.close(flush_seconds=0)
    assert core.store.event_seqs("resumed") == [1, 2]


# ---- contiguous seqs --------------------------------------------------------------------------------


def test_a_jump_to_the_largest_seq_does_not_freeze_the_run(daemon: tuple[Guardian, str, str]) -> None:
    core, url, token = daemon
    assert raw(url, "POST", "/v1/report", report("r", [metrics(1, 1, loss=1.0)]), auth(token))[0] == 200
    status, body = raw(url, "POST", "/v1/report", report("r", [metrics(2**63 - 1, 2, loss=1.0)]), auth(token))
    assert status == 400 and "seq" in body["error"]  # beyond the wire's bound (2^53 - 1) at intake
    status, body = raw(url, "POST", "/v1/report", report("r", [metrics(2**53 - 1, 2, loss=1.0)]), auth(token))
    assert status == 409 and body["expected_seq"] == 2 and "resend from seq 2" in body["error"]
    status, body = raw(url, "POST", "/v1/report",
                       report("r", [metrics(2, 2, loss=1.0), metrics(3, 3, loss="nan"), metrics(9, 9, loss=1.0)]),
                       auth(token))
    assert status == 200 and body["ack_seq"] == 3  # the events before the gap are taken, the rest resent
    assert [(d["step"], d["rule"]) for d in body["decisions"]] == [(3, "non_finite_loss")]  # and judged
    assert core.store.event_seqs("r") == [1, 2, 3]
    status, body = raw(url, "POST", "/v1/report", report("r", [metrics(9, 9, loss=1.0)]), auth(token))
    assert (status, body["expected_seq"]) == (409, 4)


def test_a_sender_resends_from_the_seq_the_daemon_expects(daemon: tuple[Guardian, str, str], tmp_path: Path) -> None:
    """A daemon that lost events (a store from a backup, a full disk) asks for them; they come from the spool."""
    core, url, token = daemon
    spool = tmp_path / "events.jsonl"
    events = [metrics(i, i, loss=1.0) for i in range(1, 11)]
    spool.write_text("".join(json.dumps(e) + "\n" for e in events))
    link = DaemonLink(url, "lost", token=token, spool=spool)
    try:
        for event in events[5:]:  # the sender believes 1-5 delivered (as after a daemon that lost them)
            link.send(from_builtins(event))
        link.acked_seq = 5
        assert link.wait_for(10, timeout=15)
    finally:
        link.close()
    assert core.store.event_seqs("lost") == list(range(1, 11))


# ---- the token file ---------------------------------------------------------------------------------


def test_the_token_file_is_private_refused_when_short_and_replaced_when_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    token = load_or_create_token(state)
    assert len(token) >= 32 and (state / "token").read_text() == token + "\n"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700 and stat.S_IMODE((state / "token").stat().st_mode) == 0o600
    assert [p.name for p in state.iterdir()] == ["token"]  # no temporary file left behind
    state.chmod(0o755)  # as an older version made it
    assert load_or_create_token(state) == token and stat.S_IMODE(state.stat().st_mode) == 0o700
    (state / "token").write_text("")  # a first start on a full disk left it empty
    fresh = load_or_create_token(state)
    assert len(fresh) >= 32 and fresh != token and (state / "token").read_text().strip() == fresh
    (state / "token").write_text("abc\n")
    with pytest.raises(ConfigError, match=r"token.*3 characters.*delete the file"):
        load_or_create_token(state)
    (state / "token").write_text(token)
    (state / "token").chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="guardian.token"):
        assert load_or_create_token(state) == token
    assert "other users can read" in caplog.text and "chmod 600" in caplog.text


def test_the_daemon_keeps_its_store_private(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    try:
        for name in ("guardian.db", "token"):
            assert stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) == 0o600, name
    finally:
        daemon.stop()


def test_writers_find_the_token_in_the_environment_or_the_daemons_state_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from guardian.callbacks.trainer_callback import _daemon_token

    monkeypatch.delenv("GUARDIAN_TOKEN", raising=False)
    monkeypatch.setenv("GUARDIAN_HOME", str(tmp_path))
    token, where = find_token()
    assert token is None and str(tmp_path / "token") in where
    assert _daemon_token("http://127.0.0.1:1") is None  # said loudly (below), and training goes on
    token = load_or_create_token(tmp_path)
    assert find_token() == (token, str(tmp_path / "token"))
    monkeypatch.setenv("GUARDIAN_TOKEN", "from-the-environment")
    assert find_token() == ("from-the-environment", "GUARDIAN_TOKEN")


def test_a_callback_without_a_token_says_so_naming_the_file_and_the_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from guardian.callbacks.trainer_callback import _daemon_token

    monkeypatch.delenv("GUARDIAN_TOKEN", raising=False)
    monkeypatch.setenv("GUARDIAN_HOME", str(tmp_path / "nowhere"))
    with caplog.at_level(logging.WARNING, logger="guardian"):  # a demo run in this process may have set it higher
        assert _daemon_token("http://127.0.0.1:1") is None
    assert "GUARDIAN_TOKEN" in caplog.text and str(tmp_path / "nowhere" / "token") in caplog.text


# ---- the README's attacks, against a real daemon process ------------------------------------------------


def test_a_spoofed_report_cannot_judge_or_end_another_process_run(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    victim = DaemonLink(daemon.url, "victim", token=daemon.token, run_key_dir=tmp_path / "victim" / "guardian")
    try:
        for seq in range(1, 21):
            victim.send(from_builtins(metrics(seq, seq, loss=2.0 - 0.01 * seq, grad_norm=1.0)))
        assert victim.wait_for(20, timeout=15)
        nan = report("victim", [metrics(21, 21, loss="nan", grad_norm="nan"), metrics(22, 22, loss="nan")])
        end = report("victim", [{"seq": 21, "kind": "end", "step": 21}])
        for body in (nan, end):
            assert raw(daemon.url, "POST", "/v1/report", body)[0] == 401  # no token: refused
            for key in (None, OTHER_KEY):  # even a token holder cannot write into another process's run
                status, answer = raw(daemon.url, "POST", "/v1/report", body, auth(daemon.token, key))
                assert status == 403 and "another process" in answer["error"]
        victim.want_decisions_from(1)
        victim.send(from_builtins(metrics(21, 21, loss=1.79, grad_norm=1.0)))
        assert victim.wait_for(21, timeout=15)
        assert victim.take_decisions(10**9) == []  # nothing was decided for the victim
        run = {r["id"]: r for r in request(daemon.url, "GET", "/v1/runs")["runs"]}["victim"]
        assert run["status"] == "running" and run["decisions"] == 0 and run["last_step"] == 21
    finally:
        victim.close()
        daemon.stop()


# ---- the sender against whatever answers --------------------------------------------------------------


class FakeDaemon:
    """A tiny HTTP/1.1 server on loopback: `answer(report)` gives (status, body) for each POST; with
    `one_request_per_connection` it closes each kept-alive connection after one reply (an idle timeout)."""

    def __init__(self, answer: Callable[[dict[str, Any]], tuple[int, bytes]], one_request_per_connection: bool = False):
        self.answer, self.one = answer, one_request_per_connection
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            while True:
                head = []
                while (line := f.readline()) not in (b"\r\n", b""):
                    head.append(line.decode("latin-1").strip())
                if not head:
                    return
                length = next(int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length"))
                status, body = self.answer(json.loads(f.read(length)))
                conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
                if self.one:
                    conn.shutdown(socket.SHUT_RDWR)
                    self.closed.set()
                    return

    def close(self) -> None:
        self.sock.close()


def ok(message: dict[str, Any], **extra: Any) -> tuple[int, bytes]:
    top = max([e["seq"] for e in message["events"]] + [0])
    return 200, json.dumps({"v": 1, "ack_seq": top, "decided_through_step": top, "decisions": [], "commands": [],
                            **extra}).encode()


MALFORMED = [
    (200, b"<html><body>502 Bad Gateway</body></html>"),  # a proxy's page
    (502, b"<html>Bad Gateway</html>"),
    (200, b"[1, 2, 3]"),  # JSON, not an object
    (200, b'{"v": 1, "decisions": []}'),  # no ack_seq
    (200, b'{"v": 1, "ack_seq": "7", "decisions": [], "commands": []}'),
    (200, b'{"v": 1, "ack_seq": 1, "decisions": [{"step": 1}], "commands": []}'),  # a malformed decision
    (200, b'{"v": 1, "ack_seq": 1, "decisions": [], "commands": [{"id": 1, "action": "explode"}]}'),
    (200, b"\xff\xfe garbage"),
]


@pytest.mark.parametrize(("status", "body"), MALFORMED)
def test_a_reply_that_is_not_a_daemons_counts_as_a_failure_and_the_sender_lives_on(status: int, body: bytes) -> None:
    good = threading.Event()
    server = FakeDaemon(lambda message: ok(message) if good.is_set() else (status, body))
    link = DaemonLink(server.url, "r", token="t" * 40)
    try:
        link.send(from_builtins(metrics(1, 1, loss=1.0)))
        deadline = time.monotonic() + 10
        while link.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert link.failures >= 2 and link.unreachable and link.acked_seq == 0
        assert link.wait_for(1, timeout=5) is False  # a step does not wait out the deadline
        good.set()  # the right service answers again: the same sender thread delivers, after its back-off
        deadline = time.monotonic() + 15
        while link.acked_seq < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert link.acked_seq == 1 and link.connected
    finally:
        link.close()
        server.close()


def test_a_kept_alive_connection_closed_while_idle_is_retried_at_once() -> None:
    server = FakeDaemon(ok, one_request_per_connection=True)
    link = DaemonLink(server.url, "r", token="t" * 40)
    try:
        for seq in (1, 2, 3):
            server.closed.clear()
            link.send(from_builtins(metrics(seq, seq, loss=1.0)))
            assert link.wait_for(seq, timeout=10)
            assert server.closed.wait(10)  # the server has hung up the connection the sender keeps
            time.sleep(0.05)
        assert link.failures == 0 and server.connections == 3
    finally:
        link.close()
        server.close()


def test_request_says_what_answered_when_it_is_not_a_daemon() -> None:
    server = FakeDaemon(lambda message: (200, b"<html>hello</html>"))
    try:
        with pytest.raises(DaemonError, match="not a JSON object.*guardian daemon"):
            request(server.url, "POST", "/v1/report", report("r", []), token="t")
    finally:
        server.close()


# ---- a real Trainer run: a crashed process resumed continues its run; a stranger with its id does not ---


class _CrashAt(TrainerCallback):  # type: ignore[misc]
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise RuntimeError("the training process dies here")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_crashed_run_resumed_in_its_folder_continues_at_the_daemon(tmp_path: Path) -> None:
    from guardian.callbacks import GuardianCallback
    from guardian.testing.tinyrun import TinyRun

    daemon = DaemonProcess(tmp_path / "state").start()
    out = tmp_path / "run"
    try:
        first = GuardianCallback(url=daemon.url, run_id="resumed", deadline_seconds=2.0)
        with pytest.raises(RuntimeError, match="dies here"):
            TinyRun(str(out), max_steps=30, eval_steps=0, save_steps=10).trainer([first, _CrashAt(15)]).train()
        assert first.link is not None
        first.link.close()  # what the dead process had sent; no `end`: the run is live at the daemon
        stranger = GuardianCallback(url=daemon.url, run_id="resumed", deadline_seconds=0.2)  # another folder
        TinyRun(str(tmp_path / "other"), max_steps=5, eval_steps=0).trainer([stranger]).train()
        assert stranger.link is not None and "(403)" in stranger.link.last_error  # refused; trained all the same
        again = GuardianCallback(url=daemon.url, run_id="resumed", deadline_seconds=2.0)
        TinyRun(str(out), max_steps=30, eval_steps=0, save_steps=10).trainer([again]).train(
            resume_from_checkpoint=True)
        assert again.link is not None and again.link.failures == 0 and again.verdicts["local_fallback"] == 0
        run = {r["id"]: r for r in request(daemon.url, "GET", "/v1/runs")["runs"]}["resumed"]
        assert run["status"] == "ended" and run["last_step"] == 30
        seqs = request(daemon.url, "GET", "/v1/runs/resumed/events")["events"]
        assert [e["seq"] for e in seqs] == list(range(1, len(seqs) + 1))
    finally:
        daemon.stop()
