"""A one-step spike between two scrapes reaches Prometheus: guardian_train_loss_max and guardian_grad_norm_max
hold the highest value since each scraper's previous scrape (over real HTTP, and scraped by a real Prometheus)."""

from __future__ import annotations

import http.client
import json
import math
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from daemonkit import DaemonProcess, free_port, wait_for

from guardian.daemon.core import Guardian
from guardian.daemon.serve import load_or_create_token, make_server, metrics_endpoint
from guardian.daemon.store import Store
from guardian.rulefile.reload import RuleLibrary
from guardian.runview import Peaks
from guardian.transport.client import request

RUN_KEY = "peaks-run-key-0123456789abcdefghijklmnop"


def steps(first_seq: int, losses: list[float | str], norms: list[float]) -> list[dict[str, object]]:
    return [{"seq": first_seq + i, "kind": "metrics", "step": first_seq + i, "phase": "train",
             "values": {"loss": loss, "grad_norm": norm}} for i, (loss, norm) in enumerate(zip(losses, norms))]


def scrape(url: str, user_agent: str, query: str = "") -> dict[str, float]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics" + query, headers={"User-Agent": user_agent})
    text = conn.getresponse().read().decode()
    conn.close()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


LOSS_MAX, NORM_MAX = 'guardian_train_loss_max{run_id="spiky"}', 'guardian_grad_norm_max{run_id="spiky"}'
LOSS = 'guardian_train_loss{run_id="spiky"}'


@contextmanager
def daemon_with_metrics(state_dir: Path) -> Iterator[tuple[str, str]]:
    """The daemon's core and server in this process, /metrics included: (url, token)."""
    token = load_or_create_token(state_dir)
    core = Guardian(Store(state_dir / "guardian.db"), RuleLibrary(state_dir / "rules"))
    server = make_server(core, "127.0.0.1", 0, token, state_dir / "token")
    server.metrics = metrics_endpoint(core)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", token
    finally:
        server.shutdown()
        server.server_close()


def test_a_spike_between_scrapes_is_kept_for_every_scraper(tmp_path: Path) -> None:
    with daemon_with_metrics(tmp_path) as (url, token):
        def report(events: list[dict[str, object]]) -> None:
            request(url, "POST", "/v1/report", {"run": {"id": "spiky"}, "events": events}, token=token, run_key=RUN_KEY)

        report(steps(1, [1.9, 1.8], [1.0, 1.1]))
        first = scrape(url, "Prometheus/a")
        assert first[LOSS_MAX] == 1.8 and first[NORM_MAX] == 1.1  # no window yet: the last value
        scrape(url, "Prometheus/b")
        report(steps(3, [1.5, 6.0, 1.6], [1.0, 50.0, 1.2]))  # the spike and the step after it, between scrapes
        scrape(url, "curl/8")  # someone looking by hand takes the spike from neither Prometheus
        a, b = scrape(url, "Prometheus/a"), scrape(url, "Prometheus/b")
        assert a[LOSS] == b[LOSS] == 1.6
        assert a[LOSS_MAX] == b[LOSS_MAX] == 6.0 and a[NORM_MAX] == b[NORM_MAX] == 50.0
        again = scrape(url, "Prometheus/a")  # no step since its previous scrape: the last value again
        assert (again[LOSS_MAX], again[NORM_MAX]) == (1.6, 1.2)
        # two scrapers on one host with one User-Agent are told apart by ?scraper=NAME
        scrape(url, "Prometheus/a", "?scraper=ha-1")
        scrape(url, "Prometheus/a", "?scraper=ha-2")
        report(steps(6, ["nan", 1.4], [1.0, 1.0]))
        named = scrape(url, "Prometheus/a", "?scraper=ha-1"), scrape(url, "Prometheus/a", "?scraper=ha-2")
        assert all(math.isnan(s[LOSS_MAX]) for s in named)  # a NaN step is never hidden behind a larger value
        assert all(s[LOSS] == 1.4 for s in named)


def test_peaks_drop_the_scraper_not_seen_longest_beyond_the_cap() -> None:
    peaks = Peaks(max_scrapers=2)
    for scraper in ("a", "b", "c"):
        peaks.take(scraper, {"loss": 1.0})
    peaks.observe("loss", 9.0)
    assert peaks.take("b", {"loss": 1.0}) == {"loss": 9.0}
    assert peaks.take("a", {"loss": 1.0}) == {"loss": 1.0}  # dropped: its window starts again at this scrape


def _query(prom: str, expr: str) -> list[dict[str, object]]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _value(prom: str, expr: str) -> float | None:
    result = _query(prom, expr)
    return float(result[0]["value"][1]) if result else None  # type: ignore[index]


def test_prometheus_sees_the_spike_the_plain_gauge_misses(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    daemon = DaemonProcess(tmp_path / "state").start()
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": "guardian", "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}]}]}))
    prom = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{prom_port}"

    def report(events: list[dict[str, object]]) -> None:
        request(daemon.url, "POST", "/v1/report", {"run": {"id": "spiky"}, "events": events}, token=daemon.token,
                run_key=RUN_KEY)

    def answers(expr: str) -> bool:
        try:
            return bool(_query(url, expr))
        except OSError:
            return False

    try:
        report(steps(1, [1.9, 1.8], [1.0, 1.1]))
        wait_for(lambda: answers(f"{LOSS_MAX} == 1.8"), 60)  # scraped before the spike
        report(steps(3, [1.5, 6.0, 1.6], [1.0, 50.0, 1.2]))  # one report: no scrape can fall inside it
        wait_for(lambda: answers(f"{LOSS} == 1.6"), 30)
        wait_for(lambda: answers(f"{LOSS_MAX} == 1.6"), 30)  # and the scrape after the spike's
        assert _value(url, f"max_over_time({LOSS}[5m])") == 1.8  # the plain gauge never saw the 6.0
        assert _value(url, f"max_over_time({LOSS_MAX}[5m])") == 6.0
        assert _value(url, f"max_over_time({NORM_MAX}[5m])") == 50.0
    finally:
        prom.terminate()
        prom.wait(timeout=20)
        daemon.stop()
