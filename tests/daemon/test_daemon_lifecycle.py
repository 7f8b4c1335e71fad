"""A real `guardian serve` process: what it says at start-up, its index at `/`, a clean stop on SIGTERM and
SIGINT, and the runs' last reports and firing rules after a restart (in /metrics and `guardian runs`)."""

from __future__ import annotations

import http.client
import signal
import time
from pathlib import Path

import pytest
from daemonkit import DaemonProcess, report_intake, wait_for

from guardian.transport.client import DaemonError, request

RUN_KEY = "lifecycle-run-key-0123456789abcdefghij"


def metrics(seq: int, step: int, **values: float | str) -> dict[str, object]:
    return {"seq": seq, "kind": "metrics", "step": step, "phase": "train", "values": values}


def report(daemon: DaemonProcess, run: str, events: list[dict[str, object]]) -> None:
    request(daemon.url, "POST", "/v1/report", {"run": {"id": run, "rules": "default", "meta": {"host": "node7"}},
                                               "events": events}, token=daemon.token, run_key=RUN_KEY)


def scrape(url: str) -> dict[str, float]:
    """/metrics as {series: value} (series as written, labels sorted by the library)."""
    conn = http.client.HTTPConnection(url.removeprefix("http://").split(":")[0], int(url.rsplit(":", 1)[1]))
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_last_reports_and_firing_rules_come_back_after_a_restart(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    try:
        report(daemon, "nan-run", [metrics(1, 1, loss=1.0, grad_norm=1.0), metrics(2, 2, loss="nan", grad_norm=1.0)])
        report(daemon, "quiet-run", [metrics(1, 1, loss=2.0, grad_norm=0.5)])
        before = scrape(daemon.url)
        runs_before = {r["id"]: r for r in request(daemon.url, "GET", "/v1/runs")["runs"]}
        assert before['guardian_rule_firing{rule="non_finite_loss",run_id="nan-run"}'] == 1.0
        time.sleep(1.5)  # the restart is later than the last report: a timestamp of the shutdown would show it
        daemon.stop()
        daemon.start()
        after = scrape(daemon.url)
        runs_after = {r["id"]: r for r in request(daemon.url, "GET", "/v1/runs")["runs"]}
    finally:
        daemon.stop()
    for run in ("nan-run", "quiet-run"):
        stamp = f'guardian_last_report_timestamp_seconds{{run_id="{run}"}}'
        assert after[stamp] == pytest.approx(before[stamp], abs=1e-3)
        assert runs_after[run]["last_seen"] == pytest.approx(runs_before[run]["last_seen"], abs=1e-3)
        assert runs_after[run]["rule_status"] == runs_before[run]["rule_status"]
    assert after['guardian_rule_firing{rule="non_finite_loss",run_id="nan-run"}'] == 1.0
    assert runs_after["nan-run"]["status"] == "firing"
    assert after['guardian_train_loss{run_id="quiet-run"}'] == 2.0
    assert after['guardian_run_info{host="node7",rules="default",run_id="quiet-run"}'] == 1.0


def test_start_up_line_says_where_to_point_runs_and_where_the_token_is(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    try:
        wait_for(lambda: "export GUARDIAN_URL" in daemon.log.read_text())
        log = daemon.log.read_text()
    finally:
        daemon.stop()
    line = next(line for line in log.splitlines() if "listening on" in line)
    assert " INFO " in line and "WARNING" not in line
    assert str(tmp_path / "state" / "token") in line
    assert f"    export GUARDIAN_URL={daemon.url}" in log.splitlines()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_daemon_cleanly_with_connections_open(tmp_path: Path, sig: signal.Signals) -> None:
    state = tmp_path / "state"
    daemon = DaemonProcess(state).start()
    assert daemon.proc is not None
    report(daemon, "r", [metrics(1, 1, loss=1.0)])
    host, port = "127.0.0.1", daemon.port
    idle = [http.client.HTTPConnection(host, port) for _ in range(3)]  # keep-alive connections left open
    for conn in idle:
        conn.request("GET", "/healthz")
        conn.getresponse().read()
    daemon.proc.send_signal(sig)
    try:
        code = daemon.proc.wait(timeout=20)
    finally:
        for conn in idle:
            conn.close()
        daemon.stop()
    log = daemon.log.read_text()
    assert code == 0, log
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_the_index_lists_the_endpoints_and_writes_still_need_the_token(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    try:
        index = request(daemon.url, "GET", "/")  # no token: reads are open on loopback
        with pytest.raises(DaemonError) as refused:
            request(daemon.url, "POST", "/v1/report", {"run": {"id": "x"}, "events": []})
    finally:
        daemon.stop()
    paths = {(e["method"], e["path"]): e["token"] for e in index["endpoints"]}
    assert paths[("GET", "/metrics")] is False and paths[("GET", "/v1/runs")] is False
    assert paths[("POST", "/v1/report")] is True and paths[("POST", "/v1/runs/{run_id}/control")] is True
    assert index["token_file"] == str(tmp_path / "state" / "token")
    assert refused.value.status == 401



def test_saving_a_stall_decision_keeps_the_time_of_the_last_report(tmp_path: Path) -> None:
    from guardian.daemon.core import Guardian
    from guardian.daemon.store import Store
    from guardian.rulefile.reload import RuleLibrary

    core = Guardian(Store(tmp_path / "g.db"), RuleLibrary(None))
    core.report(report_intake("r", "default", {}, [metrics(1, 1, loss=1.0)]), run_key=RUN_KEY)
    reported = core.runs()[0]["last_seen"]
    time.sleep(0.3)
    core.tick(now=reported + 400)  # the stall decision is committed...
    core.flush()  # ...and so is the state on shutdown
    (run,) = core.runs()
    assert run["status"] == "stalled" and run["last_seen"] == reported  # ...without moving the last report
