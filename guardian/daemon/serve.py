"""The daemon wired up: its store opened, its HTTP server (guardian.daemon.routes) on the core
(guardian.daemon.core), the /metrics endpoint, the rule-file watcher and the stall ticker; `serve()` runs it.

Bind to loopback by default; a token (created on first start, mode 0600, see guardian.transport.token) is required
for every write (reports, control, alerts), and for reads too when listening beyond loopback.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from guardian.daemon.alertmap import load_alert_actions
from guardian.daemon.core import Guardian
from guardian.daemon.httpserver import HTTPServer
from guardian.daemon.routes import Routes, is_loopback
from guardian.daemon.store import Store, StoreError, move_aside
from guardian.exporter import GuardianCollector, exposition_pieces
from guardian.rulefile.reload import RuleLibrary
from guardian.transport import wire
from guardian.transport.token import load_or_create_token, token_path

__all__ = ["DEFAULT_PORT", "DaemonServer", "daemon_url", "make_server", "metrics_endpoint", "open_store", "serve"]

log = logging.getLogger("guardian.daemon")
DEFAULT_PORT = 8765


def _private(db: Path) -> None:
    """The store's files readable by this user only (SQLite gives -wal and -shm files it makes later the mode of
    the database file)."""
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if path.exists():
            os.chmod(path, 0o600)


class DaemonServer(HTTPServer):
    """The daemon's HTTP server: `routes` answer, `metrics` (set by `serve`) renders GET /metrics."""

    def __init__(self, routes: Routes, host: str, port: int, **options: Any) -> None:
        # a web page must not reach the daemon: no Origin, JSON bodies only, and on loopback only requests
        # addressed to loopback (DNS rebinding); `options` (timeouts, limits) go to HTTPServer
        super().__init__(host, port, handle=routes.handle, inline=routes.inline, too_large=routes.too_large,
                         max_body=wire.MAX_BODY_BYTES, refuse_browsers=True, loopback_hosts=is_loopback(host),
                         **options)
        self.routes = routes

    @property
    def metrics(self) -> Any:
        return self.routes.metrics

    @metrics.setter
    def metrics(self, render: Any) -> None:
        self.routes.metrics = render


def metrics_endpoint(core: Guardian) -> Any:
    """A function returning the Prometheus text format of the core's state as pieces to render one by one on the
    event loop (see `exposition_pieces`), and its content type, for GET /metrics."""
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    def render(scraper: str = "") -> tuple[Any, str]:
        collector = GuardianCollector(lambda: core.views(scraper), core.health)
        return exposition_pieces(collector, (core.report_seconds,)), CONTENT_TYPE_LATEST

    return render


def make_server(core: Guardian, host: str, port: int, token: str, token_path: Path, **options: Any) -> DaemonServer:
    """The daemon's server, listening already; the token is needed for everything off loopback. `options`:
    HTTPServer's timeouts and limits."""
    return DaemonServer(Routes(core, token, token_path, require_token=not is_loopback(host)), host, port,
                        **options)


def open_store(state_dir: Path, *, fresh: bool = False) -> Store:
    """The daemon's store in `state_dir`; StoreError (which file, what is wrong, what to do) when it is damaged.
    With `fresh`, a damaged store is moved aside with a timestamp and an empty one started (a sound store is
    kept: the flag can stay in a service file). Warns when a store is created in a state folder that was in
    use before (its token is there): the old store may have been moved or deleted."""
    path = state_dir / "guardian.db"
    used_before = (state_dir / "token").exists()
    try:
        store = Store(path)
    except StoreError as exc:
        if not fresh:
            raise
        moved = move_aside(path)
        log.warning("%s; moved it aside to %s and started an empty store", str(exc).split(";")[0], moved)
        return Store(path)
    if fresh:
        log.warning("--fresh-store: %s is sound, so it is kept", path)
    elif store.created and used_before:
        log.warning("%s is new, but %s was used before (its token is there): runs stored earlier are not in it. "
                    "If the store was moved, stop the daemon and put it back", path, state_dir)
    return store


def daemon_url(host: str, port: int) -> str:
    """The URL clients use for a daemon bound to (host, port): this machine's name for a wildcard address."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(*, host: str = "127.0.0.1", port: int = DEFAULT_PORT, state_dir: Path, rules_dir: Path | None = None,
          alert_actions: Path | None = None, tick_seconds: float = 1.0, maintain_seconds: float = 600.0,
          retain_days: float | None = None, ready: threading.Event | None = None, fresh_store: bool = False) -> None:
    """Run the daemon until SIGINT/SIGTERM. `fresh_store` moves a damaged store aside and starts an empty one."""
    token_path_ = token_path(state_dir)
    store = open_store(state_dir, fresh=fresh_store)  # before the token: a new store in a used folder is warned of
    token = load_or_create_token(state_dir)
    _private(store.path)
    library = RuleLibrary(rules_dir if rules_dir is not None else state_dir / "rules")
    actions_file = alert_actions or state_dir / "alert-actions.yaml"
    mappings = load_alert_actions(actions_file) if alert_actions or actions_file.exists() else []
    core = Guardian(store, library, alert_actions=mappings)
    core.restore()  # the runs in memory before a restart, with their last reports and rule states
    library.watch()
    server = make_server(core, host, port, token, token_path_)
    server.metrics = metrics_endpoint(core)
    stopping = threading.Event()

    def ticker() -> None:
        last_maintained = time.monotonic()
        while not stopping.wait(tick_seconds):
            try:
                core.tick()
                if time.monotonic() - last_maintained > maintain_seconds:
                    core.maintain(retain_days)
                    last_maintained = time.monotonic()
            except Exception:
                log.exception("stall check or store maintenance failed")

    threading.Thread(target=ticker, daemon=True, name="guardian-ticker").start()

    def stop(*_: Any) -> None:
        stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    url = daemon_url(str(server.server_address[0]), int(server.server_address[1]))
    log.info("guardian daemon listening on %s (state in %s, rules in %s); the token for writes is in %s. "
             "Runs report here with:\n    export GUARDIAN_URL=%s", url, state_dir, library.rules_dir, token_path_, url)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        library.stop()
        server.server_close()
        try:
            core.flush()
        finally:
            store.close()
