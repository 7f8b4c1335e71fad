"""Prometheus metrics for one embedded run, served from the training process (`metrics_port`).

In daemon mode the daemon serves every run's metrics at its own /metrics; this server is for a run judged by the
embedded engine alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from guardian.engine.engine import Engine
from guardian.exporter import GuardianCollector
from guardian.runview import RunTracker, RunView

log = logging.getLogger("guardian")


def serve_run_metrics(tracker: RunTracker, engine: Engine, port: int, host: str = "127.0.0.1") -> Any:
    """Serve the run `tracker` follows, with `engine`'s rule states, on host:port (loopback by default)."""
    from prometheus_client import CollectorRegistry, start_http_server

    def views() -> list[RunView]:
        view = tracker.view
        view.rule_status = {k: v.value for k, v in engine.rule_status().items()}
        view.rule_firings = {k: fired for k, (fired, _) in engine.rule_counts().items()}
        view.last_report = view.last_report or time.time()
        view.peaks = tracker.peaks.take("embedded", view.latest)  # one window, whoever scrapes
        return [view]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GuardianCollector(views))
    server, _ = start_http_server(port, addr=host, registry=registry)
    log.info("Guardian: metrics for this run on http://%s:%d/metrics", host, port)
    return server
