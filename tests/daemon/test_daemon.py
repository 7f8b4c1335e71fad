"""The daemon over real HTTP: protocol checks, decisions, exactly-once storage, control, stalls, reloads."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonkit import DaemonProcess, free_port, in_process_daemon, intake_of, report_intake, wait_for

from guardian.daemon.core import Guardian
from guardian.daemon.routes import is_loopback as _is_loopback
from guardian.daemon.serve import load_or_create_token, make_server
from guardian.daemon.store import Store
from guardian.events import from_builtins
from guardian.rulefile.reload import RuleLibrary
from guardian.transport import wire
from guardian.transport.client import DaemonError, headers_for, request
from guardian.transport.token import find_token

# every report of these tests carries this run key (the first report of a run binds the run to it)
RUN_KEY = "test-run-key-0123456789abcdefghijklmnop"


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Guardian, str, str]]:
    """An in-process daemon on a free loopback port: (core, url, token); GUARDIAN_HOME is its state folder."""
    monkeypatch.setenv("GUARDIAN_HOME", str(tmp_path))
    with in_process_daemon(tmp_path) as served:
        yield served


def metrics(seq: int, step: int, **values: float | str) -> dict[str, object]:
    return {"seq": seq, "kind": "metrics", "step": step, "phase": "train", "values": values}


def report(url: str, events: list[dict[str, object]], run: str = "r1", **extra: object) -> dict[str, object]:
    return request(url, "POST", "/v1/report", {"run": {"id": run, "rules": "default"}, "events": events, **extra},
                   token=find_token()[0], run_key=RUN_KEY)


def raw_post(url: str, body: bytes, path: str = "/v1/report") -> tuple[int, dict[str, object]]:
    import http.client
    from urllib.parse import urlparse

    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=5)
    conn.request("POST", path, body=body, headers=headers_for(find_token()[0], RUN_KEY))
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "body is not valid JSON"),
        (b"[1, 2]", 400, "body must be a JSON object"),
        (b'{"v": 2, "run": {"id": "x"}, "events": []}',
         409, "unsupported protocol version 2; this guardian speaks version 1"),
        (b'{"v": 1, "events": []}', 400, "'run' must be an object with a non-empty string 'id'"),
        (b'{"v": 1, "run": {"id": "x"}, "events": [{"seq": 0, "kind": "metrics"}]}',
         400, "events[0].seq must be an integer >= 1"),
        (b'{"v": 1, "run": {"id": "x"}, "events": [{"seq": 1, "kind": "weird"}]}', 400, "events[0].kind must be one of"),
        (b'{"v": 1, "run": {"id": "x"}, "events": [{"seq": 1, "kind": "metrics", "step": 1, "values": {"loss": "high"}}]}',
         400, "events[0].values.loss must be a number"),
        (b'{"v": 1, "run": {"id": "x", "rules": "nope"}, "events": []}', 404, "no rule set named 'nope'"),
    ],
)
def test_bad_messages_get_a_clear_error(daemon: tuple[Guardian, str, str], body: bytes, status: int, message: str) -> None:
    _, url, _ = daemon
    code, reply = raw_post(url, body)
    assert code == status
    assert message in str(reply["error"])


def test_oversized_message_is_refused(daemon: tuple[Guardian, str, str]) -> None:
    _, url, _ = daemon
    code, reply = raw_post(url, b" " * (wire.MAX_BODY_BYTES + 1))
    assert code == 413 and "over the limit" in str(reply["error"])


def test_decisions_come_back_and_events_are_stored_once(daemon: tuple[Guardian, str, str]) -> None:
    core, url, _ = daemon
    events = [metrics(i, i, loss=2.0, grad_norm=1.0, learning_rate=1e-4) for i in range(1, 6)]
    events.append(metrics(6, 6, loss="nan", grad_norm="nan", learning_rate=1e-4))
    reply = report(url, events)
    assert reply["ack_seq"] == 6
    assert [(d["step"], d["rule"]) for d in reply["decisions"]] == [(6, "non_finite_loss")]
    again = report(url, events)  # a sender that never saw the answer resends: nothing is stored twice
    assert again["ack_seq"] == 6 and again["decisions"] == []
    assert core.store.event_seqs("r1") == [1, 2, 3, 4, 5, 6]
    assert core.counters["events_duplicate"] == 6


def test_stored_decisions_are_resent_on_request(daemon: tuple[Guardian, str, str]) -> None:
    _, url, _ = daemon
    report(url, [metrics(1, 1, loss="nan")])
    reply = report(url, [], decisions_since_step=1)
    assert [d["rule"] for d in reply["decisions"]] == ["non_finite_loss"]


def test_control_needs_the_token_and_reaches_the_run(daemon: tuple[Guardian, str, str]) -> None:
    core, url, token = daemon
    report(url, [metrics(1, 1, loss=1.0)])
    with pytest.raises(DaemonError, match="a valid token is required"):
        request(url, "POST", "/v1/runs/r1/control", {"action": "stop"})
    with pytest.raises(DaemonError, match="a valid token is required"):
        request(url, "POST", "/v1/runs/r1/control", {"action": "stop"}, token="wrong")
    with pytest.raises(DaemonError, match="unknown action 'explode'"):
        request(url, "POST", "/v1/runs/r1/control", {"action": "explode"}, token=token)
    with pytest.raises(DaemonError, match="no run 'r9'"):
        request(url, "POST", "/v1/runs/r9/control", {"action": "stop"}, token=token)
    command = request(url, "POST", "/v1/runs/r1/control", {"action": "reduce_lr", "params": {"factor": 0.3}}, token=token)
    reply = report(url, [metrics(2, 2, loss=1.0)])
    assert reply["commands"] == [{"id": command["command_id"], "action": "reduce_lr", "params": {"factor": 0.3},
                                  "source": "ctl"}]
    assert report(url, [metrics(3, 3, loss=1.0)])["commands"] == []  # delivered once
    report(url, [{"seq": 4, "kind": "action", "step": 3, "command_ids": [command["command_id"]]}])
    [stored] = core.store.commands("r1")
    assert stored["applied"] is not None


def test_token_file_is_private(tmp_path: Path) -> None:
    load_or_create_token(tmp_path / "state")
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / "token").st_mode)
    assert mode == 0o600


def test_non_loopback_listener_requires_the_token_for_everything(tmp_path: Path) -> None:
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.0.0.1")
    token = load_or_create_token(tmp_path)
    core = Guardian(Store(tmp_path / "g.db"), RuleLibrary(None))
    server = make_server(core, "0.0.0.0", 0, token, tmp_path / "token")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(DaemonError, match="a valid token is required"):
            report(url, [metrics(1, 1, loss=1.0)])
        ok = request(url, "POST", "/v1/report", {"run": {"id": "r"}, "events": [metrics(1, 1, loss=1.0)]}, token=token)
        assert ok["ack_seq"] == 1
    finally:
        server.shutdown()
        server.server_close()


def test_a_run_that_stops_reporting_is_marked_stalled(daemon: tuple[Guardian, str, str]) -> None:
    core, url, _ = daemon
    report(url, [metrics(1, 1, loss=1.0)])
    core.tick(now=time.time() + 10)
    assert core.runs()[0]["status"] == "running"
    core.tick(now=time.time() + 301)
    assert core.runs()[0]["status"] == "stalled"
    core.tick(now=time.time() + 302)  # one decision per stall, not one per tick
    assert [d.rule for d in core.store.decisions("r1")] == ["stalled"]


def test_rule_state_survives_a_daemon_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.db")
    first = Guardian(store, RuleLibrary(None))
    events = [metrics(i, i, loss=2.0 + 0.01 * (i % 3), grad_norm=1.0) for i in range(1, 40)]
    first.report(report_intake("r", "default", {}, events), run_key=RUN_KEY)
    saved = first._state("r", "default").engine.state_dict()
    store.close()
    second = Guardian(Store(tmp_path / "g.db"), RuleLibrary(None))
    restored = second._state("r", "default")
    assert restored.engine.state_dict() == json.loads(json.dumps(saved))
    assert restored.last_seq == 39


def test_rule_state_is_saved_now_and_then_and_a_crash_replays_the_rest(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.db")
    first = Guardian(store, RuleLibrary(None))
    steps = [metrics(i, i, loss=2.0 + 0.01 * (i % 3), grad_norm=1.0 + 0.01 * (i % 5)) for i in range(1, 80)]
    first.report(report_intake("r", "default", {}, steps[:30]), run_key=RUN_KEY)
    first.flush()
    for event in steps[30:]:  # one report per step, as a run sends them; none of them saves the state
        first.report(report_intake("r", "default", {}, [event]), run_key=RUN_KEY)
    row = store.run("r")
    assert row is not None and (row.engine_seq, row.last_seq) == (30, 79)
    saved = first._state("r", "default").engine.state_dict()
    store.close()  # a crash: no flush
    second = Guardian(Store(tmp_path / "g.db"), RuleLibrary(None))
    assert second._state("r", "default").engine.state_dict() == json.loads(json.dumps(saved))


def test_hot_reload_reaches_live_runs_and_keeps_the_last_good_rules(tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    spike = ("  - name: spike\n    metric: loss\n    detector: {kind: robust_zscore, window_steps: 20, warmup_steps: 5}\n"
             "    actions: [skip_update]\n")
    high = "  - name: high\n    metric: loss\n    detector: {kind: threshold, above: THRESHOLD}\n    actions: [alert]\n"
    (rules_dir / "mine.yaml").write_text("version: 1\nrules:\n" + spike + high.replace("THRESHOLD", "100"))
    store = Store(tmp_path / "g.db")
    core = Guardian(store, RuleLibrary(rules_dir, debounce_seconds=0.05))
    core.library.watch()
    try:
        core.report(report_intake("r", "mine", {}, [metrics(i, i, loss=1.0 + 0.01 * (i % 2)) for i in range(1, 11)]),
                    run_key=RUN_KEY)
        spike_state = core._state("r", "mine").engine.state_dict()["rules"]["spike"]
        (rules_dir / "mine.yaml").write_text("version: 1\nrules:\n" + spike + high.replace("THRESHOLD", "5"))
        wait_for(lambda: core._state("r", "mine").engine.ruleset.by_name("high").params["above"] == 5.0)
        engine = core._state("r", "mine").engine
        assert engine.state_dict()["rules"]["spike"] == spike_state  # unchanged rule kept its state
        reply = core.report(report_intake("r", "mine", {}, [metrics(11, 11, loss=6.0)]), run_key=RUN_KEY)
        assert "high" in [d.rule for d in reply.decisions]

        (rules_dir / "mine.yaml").write_text("version: 1\nrules:\n  - name: broken\n    detector: {kind: nope}\n")
        wait_for(lambda: "mine" in core.library.errors)
        assert "mine.yaml:4: rule 'broken': unknown detector kind 'nope'" in core.library.errors["mine"]
        assert core._state("r", "mine").engine.ruleset.by_name("high").params["above"] == 5.0
        failed = [r for r in store.reloads() if not r["ok"]]
        assert failed and "unknown detector kind 'nope'" in failed[-1]["message"]
    finally:
        core.library.stop()




def test_cli_talks_to_a_real_daemon_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = DaemonProcess(tmp_path / "state").start()
    try:
        report(proc.url, [metrics(1, 1, loss=1.0), metrics(2, 2, loss="nan")], run="cli-run")
        env = {**os.environ, "GUARDIAN_URL": proc.url, "GUARDIAN_HOME": str(tmp_path / "state"), "COLUMNS": "200"}
        cli = [sys.executable, "-m", "guardian.cli"]
        runs = subprocess.run([*cli, "runs"], capture_output=True, text=True, env=env)
        assert runs.returncode == 0 and "cli-run" in runs.stdout and "non_finite_loss" in runs.stdout
        events = subprocess.run([*cli, "events", "cli-run"], capture_output=True, text=True, env=env)
        assert "non_finite_loss" in events.stdout and "likely cause" in events.stdout
        ctl = subprocess.run([*cli, "ctl", "stop", "cli-run"], capture_output=True, text=True, env=env)
        assert ctl.returncode == 0 and "queued stop for cli-run" in ctl.stdout
        no_token = subprocess.run([*cli, "ctl", "stop", "cli-run"], capture_output=True, text=True,
                                  env={**env, "GUARDIAN_HOME": str(tmp_path / "elsewhere")})
        assert no_token.returncode == 2 and "--token" in no_token.stderr and "GUARDIAN_TOKEN" in no_token.stderr
        down = subprocess.run([*cli, "runs", "--url", f"http://127.0.0.1:{free_port()}"], capture_output=True,
                              text=True, env=env)
        assert down.returncode == 2 and "is `guardian serve` running?" in down.stderr
        # --json: the same facts for scripts, strict JSON (the NaN loss travels as "nan")
        runs_json = json.loads(subprocess.run([*cli, "runs", "--json"], capture_output=True, text=True, env=env).stdout)
        (run,) = runs_json["runs"]
        assert run["id"] == "cli-run" and run["rule_status"]["non_finite_loss"] == "firing" and run["last_step"] == 2
        events_json = json.loads(subprocess.run([*cli, "events", "cli-run", "--json", "--all"], capture_output=True,
                                                text=True, env=env).stdout)
        assert [d["rule"] for d in events_json["decisions"]] == ["non_finite_loss"]
        assert events_json["decisions"][0]["value"] == "nan"
        assert [c["action"] for c in events_json["commands"]] == ["stop"]
        ctl_json = subprocess.run([*cli, "ctl", "reduce-lr", "cli-run", "--factor", "0.25", "--json"],
                                  capture_output=True, text=True, env=env)
        queued = json.loads(ctl_json.stdout)
        assert (queued["action"], queued["params"], queued["run"]) == ("reduce_lr", {"factor": 0.25}, "cli-run")
        assert isinstance(queued["command_id"], int)
    finally:
        proc.stop()


def test_store_growth_is_bounded(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.db", metrics_kept=100, thin_every=10)
    core = Guardian(store, RuleLibrary(None))
    core.report(report_intake("r", "default", {}, [metrics(i, i, loss=1.0) for i in range(1, 301)]), run_key=RUN_KEY)
    core.report(report_intake("r", "default", {}, [{"seq": 301, "kind": "end", "step": 300}]), run_key=RUN_KEY)
    core.maintain(retain_days=None)
    seqs = store.event_seqs("r")
    old, recent = [s for s in seqs if s <= 200], [s for s in seqs if s > 200]
    assert recent == list(range(201, 302))  # the newest 100 metrics (and the end event) in full
    assert old == list(range(10, 201, 10))  # older ones thinned to every 10th step
    core.maintain(retain_days=0)
    assert store.runs() == []


def test_replay_of_a_stored_run_and_of_guardian_events(tmp_path: Path) -> None:
    from guardian.commands.replay import replay, replay_stored
    from guardian.rulefile.reader import load_rules

    store = Store(tmp_path / "state" / "guardian.db")
    core = Guardian(store, RuleLibrary(None))
    events = [metrics(i, i, loss=1.0, grad_norm=0.5) for i in range(1, 20)] + [metrics(20, 20, loss="inf")]
    core.report(report_intake("stored", "default", {}, events), run_key=RUN_KEY)
    assert [d.rule for d in replay_stored(tmp_path / "state", "stored", load_rules()).decisions] == ["non_finite_loss"]
    log = tmp_path / "run" / "guardian" / "events.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    for source in (log, tmp_path / "run"):
        result = replay(source, load_rules())
        assert result.report.format == "guardian_events" and result.observations == 20
        assert [d.step for d in result.decisions] == [20]


def test_real_messages_follow_the_published_schema(daemon: tuple[Guardian, str, str], tmp_path: Path) -> None:
    """What the callback writes and the daemon answers matches guardian/schema/wire-v1.schema.json."""
    from importlib import resources

    import jsonschema

    schema = json.loads(resources.files("guardian").joinpath("schema/wire-v1.schema.json").read_text())

    def check(kind: str, body: dict[str, object]) -> None:
        jsonschema.validate(body, {**schema, "$ref": f"#/$defs/{kind}"})

    core, url, token = daemon
    events = [metrics(i, i, loss=2.0, grad_norm=1.0) for i in range(1, 5)] + [metrics(5, 5, loss="nan", grad_norm="inf")]
    body = {"v": 1, "run": {"id": "s", "rules": "default", "meta": {}}, "events": events}
    check("report", body)
    request(url, "POST", "/v1/report", {k: v for k, v in body.items() if k != "v"}, token=token, run_key=RUN_KEY)
    control = {"v": 1, "action": "reduce_lr", "params": {"factor": 0.5}}
    check("control", control)
    request(url, "POST", "/v1/runs/s/control", {"action": "reduce_lr", "params": {"factor": 0.5}}, token=token)
    reply = request(url, "POST", "/v1/report", {"run": {"id": "s"}, "events": [], "decisions_since_step": 0},
                    token=token, run_key=RUN_KEY)
    check("reply", reply)
    assert reply["decisions"] and reply["commands"]
    with pytest.raises(jsonschema.ValidationError):
        check("report", {"v": 2, "run": {"id": "s"}, "events": []})


def test_a_report_the_store_cannot_take_is_not_acknowledged_and_its_resend_is_stored(tmp_path: Path) -> None:
    import sqlite3

    store = Store(tmp_path / "g.db")
    core = Guardian(store, RuleLibrary(None))
    core.report(report_intake("r", "default", {}, [metrics(i, i, loss=2.0) for i in range(1, 6)]), run_key=RUN_KEY)
    store._db.execute("PRAGMA query_only = 1")  # the disk refuses writes (full, read-only, ...)
    lost = [metrics(i, i, loss=2.0) for i in range(6, 9)]
    with pytest.raises(sqlite3.OperationalError):
        core.report(report_intake("r", "default", {}, lost), run_key=RUN_KEY)
    store._db.execute("PRAGMA query_only = 0")
    reply = core.report(report_intake("r", "default", {}, lost), run_key=RUN_KEY)  # the client resends what it lost
    assert reply.ack_seq == 8
    assert store.event_seqs("r") == list(range(1, 9))
    assert core.counters["events_ingested"] == 8  # counted when stored: the failed attempt is not


def test_a_store_from_before_run_states_keeps_its_rule_state(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "g.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, rules TEXT NOT NULL, meta TEXT NOT NULL, first_seen REAL "
                "NOT NULL, last_seen REAL NOT NULL, last_seq INTEGER NOT NULL DEFAULT 0, last_step INTEGER, "
                "engine_state TEXT, ended INTEGER NOT NULL DEFAULT 0, engine_seq INTEGER NOT NULL DEFAULT 0)")
    old.execute("INSERT INTO runs VALUES ('r', 'default', '{}', 1.0, 2.0, 40, 40, '{\"rules\": {}}', 0, 30)")
    old.commit()
    old.close()
    store = Store(path)
    row = store.run("r")
    assert row is not None and (row.engine_state, row.engine_seq, row.last_seq) == ({"rules": {}}, 30, 40)
    store.close()
    again = Store(path)  # the move happens once; opening again changes nothing
    assert again.run("r") == row


def test_pacing_waits_longer_and_sends_less_while_the_daemon_is_slow() -> None:
    from guardian.transport.client import Pacing

    pacing = Pacing(base_timeout=5.0, max_batch=500)
    delays = [pacing.timed_out() for _ in range(6)]
    assert (pacing.timeout, pacing.batch) == (60.0, 25)  # 5 -> 10 -> ... capped; 500 -> 250 -> ... floored
    assert all(0.5 * b <= d <= 1.5 * b for d, b in zip(delays, [0.2, 0.4, 0.8, 1.6, 3.2, 5.0]))
    pacing.replied(40.0)  # a slow reply: keep waiting that long, but send more again
    assert (pacing.timeout, pacing.batch, pacing.backoff) == (60.0, 50, 0.2)
    for _ in range(8):
        pacing.replied(0.01)
    assert (pacing.timeout, pacing.batch) == (5.0, 500)
    pacing.failed()  # refused: the daemon is down, not slow
    assert (pacing.timeout, pacing.batch) == (5.0, 500)


def test_a_sender_facing_a_stalled_daemon_backs_off_then_delivers_everything_once(daemon: tuple[Guardian, str, str]) -> None:
    from guardian.transport.client import DaemonLink

    core, url, token = daemon
    link = DaemonLink(url, "slow", timeout_seconds=0.3, batch_size=100, token=token)
    try:
        with core.store._lock:  # the daemon's event loop stalls on its store, as under a flood of reports
            for seq in range(1, 101):
                link.send(from_builtins(metrics(seq, seq, loss=1.0)))
            give_up = time.monotonic() + 30
            while link.pacing.timeout < 1.2 and time.monotonic() < give_up:  # two replies timed out
                time.sleep(0.01)
            assert link.unreachable and link.pacing.batch == 25
            assert link.wait_for(100, timeout=60) is False  # a step does not wait on a daemon this slow
        deadline = time.monotonic() + 30
        while link.acked_seq < 100 and time.monotonic() < deadline:  # the sender retries after its back-off
            time.sleep(0.05)
        assert link.acked_seq == 100 and link.connected
        assert core.store.event_seqs("slow") == list(range(1, 101))
        assert core.counters["events_duplicate"] > 0  # the timed-out batches arrived too, and were stored once
    finally:
        link.close(flush_seconds=0)


def test_closing_with_the_daemon_down_makes_one_more_attempt_then_returns() -> None:
    """At the end of training with no daemon listening, close() does not sit out its flush time retrying."""
    from guardian.transport.client import DaemonLink

    link = DaemonLink(f"http://127.0.0.1:{free_port()}", "down")
    link.send(from_builtins(metrics(1, 1, loss=1.0)))
    give_up = time.monotonic() + 30
    while not link.unreachable and time.monotonic() < give_up:
        time.sleep(0.01)
    assert link.unreachable
    before = link.failures
    link.close(flush_seconds=60)  # the sender's back-off reaches 5 s: waiting it out would take a dozen more tries
    assert link.failures == before + 1
    assert [e.seq for e in link._queue] == [1]  # undelivered, not dropped (the callback's spool file has it)


def test_the_daemon_measures_how_long_it_takes_to_answer_reports(daemon: tuple[Guardian, str, str]) -> None:
    from guardian.daemon.serve import metrics_endpoint

    core, url, _ = daemon
    for seq in (1, 2, 3):
        report(url, [metrics(seq, seq, loss=1.0)])
    with pytest.raises(DaemonError):
        request(url, "POST", "/v1/report", {"events": []})  # refused: not counted as answered
    text = b"".join(metrics_endpoint(core)()[0]).decode()
    assert "guardian_report_duration_seconds_count 3.0" in text
    assert 'guardian_report_duration_seconds_bucket{le="0.0005"}' in text


def test_metrics_rendered_in_pieces_are_the_library_s_exposition_byte_for_byte(tmp_path: Path) -> None:
    """/metrics is produced a slice at a time on the event loop; the result must be what prometheus_client
    renders in one go (same families, same order, no repeated HELP/TYPE)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from guardian.exporter import GuardianCollector, exposition_pieces

    core = Guardian(Store(tmp_path / "guardian.db"), RuleLibrary(tmp_path / "rules"))
    for r in range(30):
        events = [metrics(s, s, loss=1.0 + 0.1 * (s % 3), grad_norm=float(r + 1)) for s in range(1, 8)]
        events.append(metrics(8, 8, loss=float("nan")) if r % 4 == 0 else metrics(8, 8, loss=1.0))
        core.report(intake_of({"v": 1, "run": {"id": f'run "{r}"\\n', "rules": "default"},
                                       "events": events}), None)
        core.report_seconds.observe(0.001 * r)
    collector = GuardianCollector(core.views, core.health)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    registry.register(core.report_seconds)
    whole = generate_latest(registry)
    pieces = list(exposition_pieces(collector, (core.report_seconds,), runs_per_piece=7, samples_per_piece=5))
    assert len(pieces) > 50  # really in pieces
    assert b"".join(pieces) == whole
    assert whole.count(b"# TYPE guardian_rule_state gauge") == 1 and b'run_id="run \\"3\\"\\\\n"' in whole


@pytest.mark.parametrize(("patience", "slice_seconds", "interleaved"),
                         [(60.0, 60.0, True), (0.0, 0.0, True), (0.0, 60.0, False)])
def test_a_reply_in_pieces_lets_other_requests_through_until_its_patience_runs_out(
        patience: float, slice_seconds: float, interleaved: bool) -> None:
    """Within its patience a long reply yields after every piece; after it, once per slice (here: never again
    within the test when the slice is 60 s, at every piece when it is 0)."""
    import asyncio

    from guardian.daemon.httpserver import HTTPServer, Reply

    order: list[str] = []

    def pieces() -> Iterator[bytes]:
        for i in range(4):
            order.append("piece")
            yield str(i).encode()

    async def other_requests() -> None:
        for _ in range(4):
            order.append("other")
            await asyncio.sleep(0)

    async def main() -> bytes:
        others = asyncio.create_task(other_requests())
        await asyncio.sleep(0)
        order.clear()
        reply = await HTTPServer._assemble(Reply(200, pieces=pieces()), patience=patience,
                                           slice_seconds=slice_seconds)
        await others
        return reply.body

    assert asyncio.run(main()) == b"0123"
    at = [i for i, what in enumerate(order) if what == "piece"]
    # the first piece always lets others through once; after that, do the other pieces come back to back?
    assert (at[1:] != list(range(at[1], at[1] + 3))) is interleaved


def test_metrics_tell_a_run_that_ended_on_nan_from_a_healthy_one(tmp_path: Path) -> None:
    """A run whose last loss was NaN exports NaN (not its last finite loss), and once it has ended no rule of it
    is exported as firing (dashboards and the GuardianRuleFiring alert would show it alive and in trouble)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from guardian.exporter import GuardianCollector

    core = Guardian(Store(tmp_path / "guardian.db"), RuleLibrary(tmp_path / "rules"))
    events = [metrics(s, s, loss=1.0 + 0.01 * (s % 3), grad_norm=1.0) for s in range(1, 30)]
    events.append(metrics(30, 30, loss="nan", grad_norm="inf"))
    key = core.report(intake_of({"v": 1, "run": {"id": "r", "rules": "default"}, "events": events}), None).run_key
    assert isinstance(key, str)

    def scrape() -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(GuardianCollector(core.views, core.health))
        return generate_latest(registry).decode()

    text = scrape()
    assert 'guardian_train_loss{run_id="r"} NaN' in text and 'guardian_grad_norm{run_id="r"} +Inf' in text
    assert 'guardian_rule_firing{rule="non_finite_loss",run_id="r"} 1.0' in text
    core.report(report_intake("r", "default", {}, [{"seq": 31, "kind": "end", "step": 30}]), run_key=key)
    text = scrape()
    assert 'guardian_rule_firing{rule="non_finite_loss",run_id="r"} 0.0' in text
    assert 'guardian_run_ended{run_id="r"} 1.0' in text
