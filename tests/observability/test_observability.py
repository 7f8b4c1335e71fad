"""A real Prometheus scrapes a real daemon while a real faulted run reports to it; every dashboard query
must then return data, and the exposition must pass `promtool check metrics`."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonkit import DaemonProcess, free_port
from dashboardkit import annotation_queries, load_dashboard, panel_queries
from repopaths import REPO_ROOT
from trainkit import AtStep, CorruptWeight

from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.testing.tinyrun import TinyRun
from guardian.transport.client import request

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
REPO = REPO_ROOT


def _require(binary: str | None, name: str) -> str:
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it from Debian")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return binary


def _get(url: str, token: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as response:
        return bytes(response.read())


def _query(prom: str, expr: str, path: str = "query", **params: Any) -> list[Any]:
    url = f"{prom}/api/v1/{path}?" + urllib.parse.urlencode({"query": expr, **params})
    body = json.loads(_get(url))
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A daemon with a faulted run and a GPU node reporting, scraped by Prometheus every second."""
    prometheus = _require(PROMETHEUS, "prometheus")
    tmp = tmp_path_factory.mktemp("observability")
    daemon = DaemonProcess(tmp / "state").start()
    prom_port = free_port()
    config = tmp / "prometheus.yml"
    shutil.copy(REPO / "dashboards" / "prometheus" / "alerts.yml", tmp / "alerts.yml")
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "guardian", "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}]}],
    }))
    prom = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("wb"))
    prom_url = f"http://127.0.0.1:{prom_port}"
    try:
        _wait(lambda: _query(prom_url, 'up{job="guardian"} == 1'), 60, tmp / "prometheus.log")
        # The faulted run: three NaNs in a row (three skips), a corrupted weight (rollback), the same again in a
        # second incident (rollback + LR cut), a poisoned batch, and a manual stop through the daemon.
        guardian = GuardianCallback(url=daemon.url, run_id="faulted-run", deadline_seconds=2.0, snapshot_every_steps=5)

        def stop() -> None:
            request(daemon.url, "POST", "/v1/runs/faulted-run/control", {"action": "stop"}, token=daemon.token)

        def scraped_before_the_faults() -> None:
            # Prometheus must hold the run's series before the faults: a counter first scraped at 1 shows no
            # change, so an annotation could not mark it (in a real run the first scrape comes long before).
            _wait(lambda: all(_query(prom_url, f'{name}{{run_id="faulted-run"}}') for name in (
                "guardian_lr_scale", "guardian_rollbacks_total", "guardian_skipped_updates_total",
                "guardian_rule_firings_total")), 60, tmp / "prometheus.log")

        faults = [Fault("nan", 20), Fault("nan", 21), Fault("nan", 22), Fault("poison", 80)]
        TinyRun(str(tmp / "run"), max_steps=200, eval_steps=20).trainer(
            [FaultInjector(faults), CorruptWeight(30, math.inf), CorruptWeight(55, math.inf), guardian,
             AtStep({5: scraped_before_the_faults, 90: stop})]).train()
        # No GPU on this machine: a node reports GPU facts over the same wire, so the GPU panels are exercised
        # end to end (daemon -> exporter -> Prometheus -> query). On a GPU the callback sends these from NVML.
        request(daemon.url, "POST", "/v1/report", {"run": {"id": "gpu-node", "meta": {"host": "h100"}}, "events": [
            {"seq": 1, "kind": "metrics", "step": 1, "phase": "train", "values": {"loss": 2.0}},
            {"seq": 2, "kind": "system", "step": 1, "rank": 0, "gpus": [
                {"gpu": 0, "memory_used_bytes": 6.2e10, "memory_total_bytes": 8.5e10, "utilization_ratio": 0.93,
                 "temperature_celsius": 61.0, "power_watts": 512.0}]}]}, token=daemon.token)
        _wait(lambda: _query(prom_url, 'guardian_gpu_memory_used_bytes{run_id="gpu-node"}'), 30, tmp / "prometheus.log")
        time.sleep(3)  # a few more scrapes, so rates and increases have two points
        yield {"prometheus": prom_url, "daemon": daemon, "guardian": guardian}
    finally:
        prom.terminate()
        prom.wait(timeout=20)
        daemon.stop()


def _wait(condition: Any, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"condition not met in {seconds} s; prometheus log:\n{log.read_text()[-3000:]}")


def test_the_run_was_rescued_and_stopped_by_hand(observed: dict[str, Any]) -> None:
    guardian = observed["guardian"]
    sources = {(tuple(i.rules), i.source) for i in guardian.interventions}
    assert any("rollback" in str(i.rollback or "") or i.rollback == "memory" for i in guardian.interventions)
    assert ((("manual:stop",), "command")) in sources


def test_every_dashboard_panel_query_returns_data(observed: dict[str, Any]) -> None:
    empty = [(title, expr) for title, expr in panel_queries(load_dashboard())
             if not _query(observed["prometheus"], expr)]
    assert empty == [], "panel queries with no data"


def test_annotations_mark_guardian_interventions(observed: dict[str, Any]) -> None:
    now = time.time()
    marked = {title for title, expr in annotation_queries(load_dashboard())
              if _query(observed["prometheus"], expr, "query_range", start=now - 300, end=now, step="1s")}
    assert {"Rollbacks", "Skipped updates", "LR cuts", "Stops", "Rule fired"} <= marked


def test_exposition_passes_promtool_check_metrics(observed: dict[str, Any]) -> None:
    promtool = _require(PROMTOOL, "promtool")
    scrape = _get(f"{observed['daemon'].url}/metrics")
    assert b'guardian_train_loss{run_id="faulted-run"}' in scrape
    assert b'guardian_gpu_memory_used_bytes{gpu="0",rank="0",run_id="gpu-node"}' in scrape
    result = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_alert_rules_load_in_the_real_prometheus(observed: dict[str, Any]) -> None:
    groups = json.loads(_get(f"{observed['prometheus']}/api/v1/rules"))["data"]["groups"]
    names = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"GuardianNaNReported", "GuardianRunStalled", "GuardianDown", "GuardianRuleFiring"} <= names
    nan_alert = next(r for g in groups for r in g["rules"] if r["name"] == "GuardianNaNReported")
    assert nan_alert["state"] in ("pending", "firing")  # the run reported NaN: the alert is on its way


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_embedded_run_serves_its_own_metrics(tmp_path: Path) -> None:
    promtool = _require(PROMTOOL, "promtool")
    port = free_port()
    scrapes: list[bytes] = []
    guardian = GuardianCallback(metrics_port=port)
    grab = AtStep({step: lambda: scrapes.append(_get(f"http://127.0.0.1:{port}/metrics")) for step in (15, 19)})
    TinyRun(str(tmp_path), max_steps=20, eval_steps=0).trainer(
        [FaultInjector([Fault("nan", 10), Fault("nan", 17)]), guardian, grab]).train()
    scrape, later = scrapes
    # the NaN of step 17 came between the two scrapes: the peak gauge keeps it though step 18 was finite
    assert re.search(rb"^guardian_train_loss_max\{[^}]*\} NaN$", later, re.M), later
    assert re.search(rb"^guardian_train_loss_max\{[^}]*\} [0-9.]+$", scrape, re.M), scrape
    assert b"guardian_global_step{" in scrape and b"guardian_skipped_updates_total{" in scrape
    assert b'guardian_nonfinite_values_total{metric="loss"' in scrape
    assert subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True).returncode == 0
