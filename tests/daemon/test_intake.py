"""Input that would break everybody else: bounded sizes, depths and names at intake, series caps, paged reads,
evicted and rate-capped runs, a damaged store, run ids that need quoting.

A real server on a loopback port and raw sockets, as in tests/daemon/test_protocol.py; real daemons for the CLI."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonkit import intake_of

from guardian.daemon.core import Guardian
from guardian.daemon.httpserver import Request
from guardian.daemon.routes import Routes as _Routes
from guardian.daemon.serve import load_or_create_token, make_server, metrics_endpoint
from guardian.daemon.store import Store
from guardian.events import MetricsEvent
from guardian.rulefile.reload import RuleLibrary
from guardian.runview import KeyBudget, RunTracker


class Served:
    """A daemon core and its server on a loopback port, in this process."""

    def __init__(self, tmp: Path, **options: Any) -> None:
        self.core = Guardian(Store(tmp / "guardian.db"), RuleLibrary(tmp / "rules"), **options)
        self.token = load_or_create_token(tmp)
        self.server = make_server(self.core, "127.0.0.1", 0, self.token, tmp / "token")
        self.server.metrics = metrics_endpoint(self.core)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
        self.core.store.close()

    def exchange(self, data: bytes) -> tuple[int, bytes]:
        """Send one raw request; (status, body) of the reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        reply = b"".join(chunks)
        head, _, body = reply.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {self.token}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        status, reply = self.exchange(head.encode() + body)
        return status, json.loads(reply)

    def get(self, path: str) -> tuple[int, bytes]:
        return self.exchange(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                             f"Authorization: Bearer {self.token}\r\nConnection: close\r\n\r\n".encode())

    def get_json(self, path: str) -> dict[str, Any]:
        status, body = self.get(path)
        assert status == 200, body[:300]
        return dict(json.loads(body))

    def still_serves_everyone(self) -> None:
        """The listings and the scrape still answer (these were 500 for everybody after a poisoned report)."""
        for path in ("/v1/runs", "/metrics", "/healthz"):
            status, body = self.get(path)
            assert status == 200, (path, body[:300])


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Served]:
    served = Served(tmp_path)
    yield served
    served.close()


def report(run_id: str, events: list[dict[str, Any]] | None = None, **run: Any) -> dict[str, Any]:
    events = events if events is not None else [{"seq": 1, "kind": "metrics", "step": 1, "values": {"loss": 1.0}}]
    return {"v": 1, "run": {"id": run_id, **run}, "events": events}


def metrics_events(n: int, keys: int = 1, first: int = 1) -> list[dict[str, Any]]:
    return [{"seq": s, "kind": "metrics", "step": s, "values": {f"k{k}": "nan" for k in range(keys)} | {"loss": 1.0}}
            for s in range(first, first + n)]


# ---- bounded JSON ----------------------------------------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for _ in range(depth):
        meta = {"a": meta}
    return meta


@pytest.mark.parametrize(("body", "says"), [
    (b"[" * 100_000 + b"]" * 100_000, "body must be a JSON object"),  # refused as an array before its depth
    (b'{"v": 1, "run": {"id": "x", "meta": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b'}, "events": []}',
     "nested too deeply"),
    (b'{"v": 1, "run": {"id": "x"}, "events": [{"seq": ' + b"9" * 5000 + b', "kind": "end"}]}', "beyond 64 bits"),
    (b'{"v": 1, "run": {"id": "x", "meta": {"n": -' + b"9" * 30 + b'}}, "events": []}', "beyond 64 bits"),
    (json.dumps(report("x", [{"seq": 2**70, "kind": "end"}])).encode(), "events[0].seq: Expected `int` <= 9007199254740991"),
    (json.dumps(report("x", [{"seq": 1, "kind": "end", "time": 2**70}])).encode(), "events[0].time holds the integer"),
    (json.dumps(report("x", [{"seq": 1, "kind": "action", "command_ids": [2**70]}])).encode(),
     "events[0].command_ids[0]: Expected `int` <= 9223372036854775807"),
    (json.dumps(report("x", [{"seq": 1, "kind": "end", "x": _nested(40)}])).encode(), "events[0].x is nested too"),
    (json.dumps({**report("x"), "decisions_since_step": 2**70}).encode(), "decisions_since_step: Expected `int` <="),
    (json.dumps(report("x", [{"seq": 2**60, "kind": "end"}])).encode(), "events[0].seq: Expected `int` <= 9007199254740991"),
    (json.dumps(report("x", [{"seq": 1, "kind": "metrics", "step": 2**60, "values": {}}])).encode(),
     "events[0].step: Expected `int` <= 9007199254740991"),
    (json.dumps(report("x", [{"seq": 1, "kind": "metrics", "step": 2**70, "values": {}}])).encode(),
     "events[0].step: Expected `int` <= 9007199254740991"),
    (json.dumps(report("x", [{"seq": 1, "kind": "metrics", "step": 1, "values": {"loss": 10**400}}])).encode(),
     "values.loss must be a number"),
])
def test_deep_json_and_huge_integers_are_400_not_500(served: Served, body: bytes, says: str) -> None:
    status, reply = served.post("/v1/report", body)
    assert status == 400 and says in reply["error"], reply
    served.still_serves_everyone()


def test_a_600_deep_meta_is_refused_and_the_listing_still_answers(served: Served) -> None:
    status, reply = served.post("/v1/report", json.dumps(report("deep", meta=_nested(600))).encode())
    assert status == 400 and "nested too deeply" in reply["error"]
    status, reply = served.post("/v1/report", json.dumps(report("deep", meta=_nested(20))).encode())
    assert status == 400 and "'run.meta' is nested too deeply" in reply["error"]
    served.still_serves_everyone()


def test_a_big_meta_and_too_many_value_keys_are_refused(served: Served) -> None:
    status, reply = served.post("/v1/report", json.dumps(report("big", meta={"x": "y" * 20_000})).encode())
    assert status == 400 and "'run.meta' is" in reply["error"] and "at most 16384" in reply["error"]
    many = [{"seq": 1, "kind": "metrics", "step": 1, "values": {f"k{i}": 1.0 for i in range(300)}}]
    status, reply = served.post("/v1/report", json.dumps(report("wide", many)).encode())
    assert status == 400 and "events[0].values: Expected `object` of length <= 256" in reply["error"]


SURROGATE = "\\ud800"  # as JSON spells it: json.loads accepts it, no UTF-8 writer can encode it


@pytest.mark.parametrize(("where", "body"), [
    ("values key", '{"v":1,"run":{"id":"s"},"events":[{"seq":1,"kind":"metrics","step":1,"values":{"k%s":1}}]}'),
    ("meta.host", '{"v":1,"run":{"id":"s","meta":{"host":"h%s"}},"events":[]}'),
    ("system rank", '{"v":1,"run":{"id":"s"},"events":[{"seq":1,"kind":"system","step":1,"rank":"r%s","gpus":[]}]}'),
    ("run id", '{"v":1,"run":{"id":"s%s"},"events":[]}'),
])
def test_a_lone_surrogate_is_refused_and_metrics_still_answer(served: Served, where: str, body: str) -> None:
    status, reply = served.post("/v1/report", (body % SURROGATE).encode())
    assert status == 400 and "lone surrogate" in reply["error"], (where, reply)
    status, reply = served.post("/v1/report", (body % "\ud800").encode("utf-8", "surrogatepass"))  # raw
    assert status == 400 and "not valid UTF-8" in reply["error"], (where, reply)
    served.still_serves_everyone()
    ok = (body % "\\ud83d\\ude00").encode()  # a surrogate pair is a real character
    assert served.post("/v1/report", ok)[0] == 200
    served.still_serves_everyone()


@pytest.mark.parametrize(("event", "says"), [
    ({"seq": 1, "kind": "metrics", "step": 1, "values": {"a\nb": 1.0}}, "events[0].values key must not hold control"),
    ({"seq": 1, "kind": "metrics", "step": 1, "values": {"k" * 129: 1.0}},
     "events[0].values key: Expected `str` of length <= 128"),
    ({"seq": 1, "kind": "system", "step": 1, "rank": {"x": 1}, "gpus": []}, "events[0].rank: Expected `int | str`"),
    ({"seq": 1, "kind": "system", "step": 1, "rank": 0, "gpus": [{"gpu": "g\x00"}]}, "gpus[].gpu must not hold"),
    ({"seq": 1, "kind": "system", "step": 1, "rank": 0, "gpus": "all"}, "events[0].gpus: Expected `array`"),
    ({"seq": 1, "kind": "action", "step": 1, "source": "x\r\ny"}, "events[0].source must not hold control"),
])
def test_names_that_become_labels_are_checked_at_intake(served: Served, event: dict[str, Any], says: str) -> None:
    status, reply = served.post("/v1/report", json.dumps(report("names", [event])).encode())
    assert status == 400 and says in reply["error"], reply


def test_runs_and_metrics_survive_bad_rows_an_older_daemon_stored(tmp_path: Path) -> None:
    Store(tmp_path / "guardian.db").close()
    with sqlite3.connect(tmp_path / "guardian.db") as db:
        for run_id, meta in (("deep", json.dumps(_nested(600))), ("surrogate", '{"host": "\\ud800"}'),
                             ("garbage", "{not json")):
            db.execute("INSERT INTO runs (id, rules, meta, first_seen, last_seen) VALUES (?, 'default', ?, 1, 1)",
                       (run_id, meta))
    served = Served(tmp_path)
    try:
        served.still_serves_everyone()
        runs = {r["id"]: r for r in served.get_json("/v1/runs")["runs"]}
        assert set(runs) == {"deep", "surrogate", "garbage"}
        assert all("unreadable" in r["meta"] for r in runs.values())
    finally:
        served.close()


# ---- series caps -----------------------------------------------------------------------------------


def _series(text: bytes, family: bytes, run_id: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith(family) and f'run_id="{run_id}"'.encode() in line)


def test_value_keys_are_capped_per_run_and_the_drops_counted(served: Served) -> None:
    events = [{"seq": s, "kind": "metrics", "step": s, "values": {f"k{s}_{k}": "nan" for k in range(256)}}
              for s in range(1, 4)]  # 768 new keys
    assert served.post("/v1/report", json.dumps(report("wide", events)).encode())[0] == 200
    status, text = served.get("/metrics")
    assert status == 200
    assert _series(text, b"guardian_nonfinite_values_total{", "wide") == 512 + 3  # + loss, grad_norm, eval_loss
    assert b"guardian_value_keys_dropped_total 256.0" in text


def test_value_keys_are_capped_across_the_daemon(served: Served) -> None:
    served.core.budget = KeyBudget(limit=600)
    for run_id in ("a", "b"):
        events = [{"seq": s, "kind": "metrics", "step": s, "values": {f"k{s}_{k}": "nan" for k in range(200)}}
                  for s in range(1, 3)]  # 400 new keys each
        served.core.report(intake_of(report(run_id, events)))
    status, text = served.get("/metrics")
    assert status == 200
    assert _series(text, b"guardian_nonfinite_values_total{", "a") == 400 + 3
    assert _series(text, b"guardian_nonfinite_values_total{", "b") == 200 + 3
    assert b"guardian_value_keys_dropped_total 200.0" in text
    served.core.evict_idle(now=time.time() + 86400)
    assert served.core.budget.used == 0  # evicted runs give their keys back


def test_a_tracker_keeps_known_keys_past_the_cap() -> None:
    tracker = RunTracker("r", max_keys=2)
    tracker.apply(MetricsEvent(step=1, phase="train", values={"a": 1.0, "b": 2.0, "c": 3.0}))
    tracker.apply(MetricsEvent(step=2, phase="train", values={"a": 4.0, "c": 5.0}))
    assert tracker.view.latest == {"a": 4.0, "b": 2.0, "step": 2.0} and tracker.dropped == 2


# ---- big reports and paged reads -------------------------------------------------------------------


def test_a_large_report_is_judged_off_the_event_loop(tmp_path: Path) -> None:
    routes = _Routes(Guardian(Store(tmp_path / "g.db"), RuleLibrary(tmp_path / "rules")), "t" * 40,
                     tmp_path / "token", require_token=False)
    small = json.dumps(report("r")).encode()
    large = json.dumps(report("r", metrics_events(5000, keys=3))).encode()
    assert routes.inline(Request("POST", "/v1/report", {}, small))
    assert not routes.inline(Request("POST", "/v1/report", {}, large))
    assert routes.inline(Request("GET", "/metrics", {}))


def test_events_are_read_a_page_at_a_time(served: Served) -> None:
    assert served.post("/v1/report", json.dumps(report("paged", metrics_events(2500))).encode())[0] == 200
    first = served.get_json("/v1/runs/paged/events")
    assert len(first["events"]) == 1000 and first["next_since_seq"] == 1000
    seqs = [e["seq"] for e in first["events"]]
    since = first["next_since_seq"]
    while since is not None:
        page = served.get_json(f"/v1/runs/paged/events?since_seq={since}&limit=1000")
        seqs += [e["seq"] for e in page["events"]]
        since = page["next_since_seq"]
    assert seqs == list(range(1, 2501))
    assert len(served.get_json("/v1/runs/paged/events?limit=10000")["events"]) == 2500
    for query, says in (("limit=10001", "'limit'"), ("limit=0", "'limit'"), ("since_seq=-1", "'since_seq'"),
                        ("since_seq=" + "9" * 40, "'since_seq'"), ("kinds=metrics,bogus", "'kinds'")):
        status, body = served.get(f"/v1/runs/paged/events?{query}")
        assert status == 400 and says in json.loads(body)["error"]


def test_guardian_top_reads_events_a_page_at_a_time(served: Served) -> None:
    from guardian.tui.source import DaemonSource

    assert served.post("/v1/report", json.dumps(report("top", metrics_events(2500))).encode())[0] == 200
    source = DaemonSource(f"http://127.0.0.1:{served.port}", served.token, clock=lambda: 0.0)
    source.PAGES_PER_POLL = 1
    steps = [source.snapshot().runs[0].step for _ in range(4)]
    assert steps == [1000, 2000, 2500, 2500]


# ---- runs in memory --------------------------------------------------------------------------------


def test_idle_and_ended_runs_leave_memory_and_come_back_from_the_store(served: Served) -> None:
    core = served.core
    core.report(intake_of(report("idle", metrics_events(5))))
    core.report(intake_of(report("ended", [*metrics_events(3), {"seq": 4, "kind": "end", "step": 3}])))
    now = time.time()
    assert core.evict_idle(now + 60) == 0
    assert core.evict_idle(now + core.ended_run_seconds + 1) == 1 and set(core._runs) == {"idle"}
    assert core.evict_idle(now + core.idle_run_seconds + 1) == 1 and not core._runs
    runs = {r["id"]: r["status"] for r in served.get_json("/v1/runs")["runs"]}
    assert runs == {"idle": "running", "ended": "ended"}  # (silent for less than idle_run_seconds in fact)
    state = core._state("idle", "default")  # what the next report does: reload it
    assert (state.last_seq, state.last_step) == (5, 5)
    served.still_serves_everyone()


def test_new_runs_are_capped_per_minute_with_a_clear_429(tmp_path: Path) -> None:
    served = Served(tmp_path, new_runs_per_minute=3)
    try:
        for i in range(3):
            assert served.post("/v1/report", json.dumps(report(f"new-{i}")).encode())[0] == 200
        status, reply = served.post("/v1/report", json.dumps(report("new-3")).encode())
        assert status == 429 and "too many new runs" in reply["error"] and "retry" in reply["error"]
        assert "new-3" not in {r["id"] for r in served.get_json("/v1/runs")["runs"]}
    finally:
        served.close()


def test_counters_are_counted_under_a_lock(tmp_path: Path) -> None:
    core = Guardian(Store(tmp_path / "g.db"), RuleLibrary(tmp_path / "rules"))
    threads = [threading.Thread(target=lambda: [core.count("reports_rejected") for _ in range(20_000)])
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert core.counters["reports_rejected"] == 160_000


# ---- a damaged store -------------------------------------------------------------------------------


def _serve(state_dir: Path, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guardian.cli", "serve", "--port", "0", "--state-dir",
                           str(state_dir), *extra], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_store_is_a_clear_error_and_fresh_store_moves_it_aside(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "guardian.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a database\n" * 500)
    else:
        store = Store(db)
        core = Guardian(store, RuleLibrary(tmp_path / "rules"))
        for i in range(50):
            core.report(intake_of(report(f"r{i}", metrics_events(40), meta={"x": "y" * 2000})))
        store.close()
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 2])
    done = _serve(tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(db) in done.stderr and "--fresh-store" in done.stderr, done.stderr
    output = _serve_fresh_store(tmp_path)
    moved = [p.name for p in tmp_path.glob("guardian.db.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(moved) == 1 and "moved it aside" in output and moved[0] in output
    fresh = Store(db)
    assert fresh.runs() == []  # the new store; a sound one is kept by --fresh-store:
    fresh.close()
    output = _serve_fresh_store(tmp_path)
    assert "is sound, so it is kept" in output and len(list(tmp_path.glob("guardian.db.damaged-*[0-9Z]"))) == 1


def _serve_fresh_store(state_dir: Path) -> str:
    """What `guardian serve --fresh-store` says until it answers /healthz (then it is stopped)."""
    from daemonkit import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "guardian.cli", "serve", "--port", str(port),
                             "--state-dir", str(state_dir), "--fresh-store"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
    return proc.communicate(timeout=30)[0]


def _wait_healthy(url: str, proc: subprocess.Popen[str]) -> None:
    from guardian.transport.client import DaemonError, request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            request(url, "GET", "/healthz", timeout=1)
            return
        except DaemonError:
            assert proc.poll() is None, "the daemon exited"
            time.sleep(0.1)
    raise AssertionError("the daemon did not come up")


def test_a_new_store_in_a_used_state_folder_is_warned_about(tmp_path: Path) -> None:
    from daemonkit import DaemonProcess

    load_or_create_token(tmp_path)  # the folder was used before; its store is gone
    daemon = DaemonProcess(tmp_path).start()
    daemon.stop()
    assert "is new, but" in daemon.log.read_text()
    fresh = DaemonProcess(tmp_path / "first-start").start()  # a first start: no warning
    fresh.stop()
    assert "is new, but" not in fresh.log.read_text()


# ---- the CLI quotes run ids ------------------------------------------------------------------------


def test_cli_events_and_ctl_reach_a_run_whose_id_needs_quoting(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from daemonkit import DaemonProcess

    from guardian.cli import main

    run_id = "team/a?b#c%d é[x]"
    daemon = DaemonProcess(tmp_path).start()
    try:
        body = json.dumps(report(run_id, metrics_events(1500))).encode()
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
            sock.sendall((f"POST /v1/report HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nContent-Type: "
                          f"application/json\r\nAuthorization: Bearer {daemon.token}\r\nContent-Length: {len(body)}"
                          "\r\nConnection: close\r\n\r\n").encode() + body)
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        args = ["--url", daemon.url, "--token", daemon.token]
        assert main(["events", run_id, "--all", "--json", *args]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["run"] == run_id and [e["seq"] for e in data["events"]] == list(range(1, 1501))
        assert main(["ctl", "stop", run_id, "--json", *args]) == 0
        assert json.loads(capsys.readouterr().out)["command_id"] >= 1
        assert main(["events", run_id, *args]) == 0
        out = capsys.readouterr().out
        assert run_id in out and "command 1: stop" in out
    finally:
        daemon.stop()


def test_a_stored_row_is_the_raw_event_json_as_sent_byte_for_byte(served: Served) -> None:
    sent = [b'{"seq": 1,  "kind": "metrics", "time": 1.5, "step": 1, "phase": "train", "values": {"loss": "nan"}}',
            b'{"kind":"action","seq":2,"step":1,"skipped_update":true,"rules":["spike"],"extra":{"kept":[1]}}',
            b'{"seq":3,"kind":"end","step":1}']
    body = b'{"v": 1, "run": {"id": "raw"}, "events": [' + b", ".join(sent) + b"]}"
    status, reply = served.post("/v1/report", body)
    assert status == 200 and reply["ack_seq"] == 3
    with sqlite3.connect(served.core.store.path) as db:
        rows = db.execute("SELECT body FROM events WHERE run_id = 'raw' ORDER BY seq").fetchall()
    assert [row[0].encode() for row in rows] == sent
    page = served.get_json("/v1/runs/raw/events")
    assert [e["seq"] for e in page["events"]] == [1, 2, 3] and page["events"][1]["extra"] == {"kept": [1]}
    [metrics, action, end] = served.core.store.events("raw")
    assert isinstance(metrics, MetricsEvent) and metrics.values["loss"] != metrics.values["loss"]  # NaN
    assert action.rules == ["spike"] and end.step == 1


@pytest.mark.parametrize(("event", "says"), [
    ({"seq": 4, "kind": "metrics", "step": "four", "phase": "train", "values": {}}, "events[3].step: Expected `int`"),
    ({"seq": 4, "kind": "decision", "step": 4}, "events[3]: Object missing required field `rule`"),
    ({"seq": 4, "kind": "metrics", "step": 4, "phase": "later", "values": {}}, "events[3].phase: Invalid enum value"),
    ({"seq": 4, "kind": "system", "step": 4, "gpus": [{"gpu": 0, "power_watts": "hot"}]},
     "events[3].gpus[0].power_watts: Expected `float"),
])
def test_a_report_with_a_bad_event_names_its_index_and_field(served: Served, event: dict[str, Any], says: str) -> None:
    status, reply = served.post("/v1/report", json.dumps(report("bad", [*metrics_events(3), event])).encode())
    assert status == 400 and says in reply["error"], reply
    assert served.core.store.run("bad") is None  # nothing of the report was taken


@pytest.mark.parametrize("body", [
    b'{"v": 2, "run": {"id": "x"}, "events": []}',
    b'{"v": 2, "run": {"id": 7}, "events": "whatever a version 2 sends"}',
    b'{"run": {"id": "x"}, "events": []}',
])
def test_a_report_of_another_protocol_version_gets_409(served: Served, body: bytes) -> None:
    status, reply = served.post("/v1/report", body)
    assert status == 409 and "unsupported protocol version" in reply["error"] and "version 1" in reply["error"]
