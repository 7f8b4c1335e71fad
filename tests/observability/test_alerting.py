"""Alerts that act: the real Alertmanager posts to the daemon's webhook, and a real run stops."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from daemonkit import DaemonProcess, free_port
from trainkit import AtStep

from guardian.callbacks import GuardianCallback
from guardian.daemon.alertmap import load_alert_actions
from guardian.errors import RuleFileError
from guardian.testing.tinyrun import TinyRun
from guardian.transport.client import request

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
needs_alertmanager = pytest.mark.skipif(
    ALERTMANAGER is None, reason="Alertmanager is not installed (apt-get install prometheus-alertmanager)")

MAPPING = """version: 1
mappings:
  - match: {alertname: TrainingFleetEmergency}
    action: stop
    runs: labelled
"""


def test_alert_actions_file_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "alert-actions.yaml"
    bad.write_text("version: 1\nmappings:\n  - match: {alertname: X}\n    action: explode\n    runz: all\n")
    with pytest.raises(RuleFileError) as info:
        load_alert_actions(bad)
    text = str(info.value)
    assert f"{bad}:5: unknown key 'runz'" in text
    assert f"{bad}:4: 'action' must be one of stop, rollback, reduce_lr, skip_update, got 'explode'" in text


def test_webhook_needs_the_token(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    try:
        with pytest.raises(Exception, match="alert webhooks need the token"):
            request(daemon.url, "POST", "/v1/alerts", {"alerts": []})
    finally:
        daemon.stop()


def _alertmanager(tmp_path: Path, webhook: str, token_file: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = tmp_path / "alertmanager.yml"
    config.write_text(json.dumps({
        "route": {"receiver": "guardian", "group_by": ["alertname", "run_id"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "guardian", "webhook_configs": [{
            "url": webhook, "send_resolved": False,
            "http_config": {"authorization": {"credentials_file": str(token_file)}}}]}],
    }))
    assert ALERTMANAGER is not None
    proc = subprocess.Popen([ALERTMANAGER, f"--config.file={config}", f"--storage.path={tmp_path / 'am-data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "alertmanager.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError((tmp_path / "alertmanager.log").read_text())


def _fire(alertmanager: str, labels: dict[str, str]) -> None:
    body = json.dumps([{"labels": labels, "annotations": {"summary": "test"}}]).encode()
    req = urllib.request.Request(f"{alertmanager}/api/v2/alerts", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5)


@needs_alertmanager
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_alertmanager_alert_stops_a_real_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "alert-actions.yaml").write_text(MAPPING)
    daemon = DaemonProcess(state).start()
    alertmanager, am_url = _alertmanager(tmp_path, f"{daemon.url}/v1/alerts", state / "token")
    guardian = GuardianCallback(url=daemon.url, run_id="fleet-run", deadline_seconds=1.0)
    fired: dict[str, Any] = {}

    def fire() -> None:
        fired["at"] = time.monotonic()
        _fire(am_url, {"alertname": "TrainingFleetEmergency", "run_id": "fleet-run", "severity": "critical"})
        _fire(am_url, {"alertname": "SomethingElse", "run_id": "fleet-run"})  # no mapping: no action

    try:
        trainer = TinyRun(str(tmp_path / "run"), max_steps=5000, eval_steps=0, batch_size=2,
                          logging_steps=1000).trainer([guardian, AtStep({5: fire})])
        trainer.train()
        assert trainer.state.global_step < 5000, "the alert never stopped the run"
        assert guardian.interventions[-1].rules == ["manual:stop"]
        commands = request(daemon.url, "GET", "/v1/runs/fleet-run/events")["commands"]
        assert [(c["action"], c["source"]) for c in commands] == [("stop", "alert:TrainingFleetEmergency")]
    finally:
        alertmanager.terminate()
        alertmanager.wait(timeout=10)
        daemon.stop()


def test_alerts_already_acted_on_are_remembered_within_a_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An Alertmanager resending ever-new alerts cannot grow the daemon's memory of handled alerts; a resent
    alert it still remembers is not acted on twice."""
    from guardian.daemon import core as daemon_core
    from guardian.daemon.alertmap import AlertAction
    from guardian.daemon.core import Guardian
    from guardian.daemon.store import Store
    from guardian.rulefile.reload import RuleLibrary

    monkeypatch.setattr(daemon_core, "ALERTS_REMEMBERED", 50)
    core = Guardian(Store(tmp_path / "guardian.db"), RuleLibrary(None),
                    alert_actions=[AlertAction(match={"alertname": "GuardianStalled"}, action="stop")])

    def alert(n: int) -> dict[str, Any]:
        return {"status": "firing", "labels": {"alertname": "GuardianStalled", "run_id": "gone"},
                "fingerprint": f"f{n}", "startsAt": "2026-12-06T00:00:00Z"}

    for n in range(200):
        core.alerts({"version": "4", "alerts": [alert(n)]})
    assert len(core._alerts_handled) == 50
    assert ("f199", "2026-12-06T00:00:00Z", 0) in core._alerts_handled
    assert ("f0", "2026-12-06T00:00:00Z", 0) not in core._alerts_handled
