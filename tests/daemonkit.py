"""Start a real `guardian serve` process for a test, and talk to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from guardian import events
from guardian.daemon.core import Guardian
from guardian.daemon.serve import load_or_create_token, make_server
from guardian.daemon.store import Store
from guardian.rulefile.reload import RuleLibrary
from guardian.transport.client import DaemonError, request
from guardian.transport.intake import ReportIntake, parse_report


def report_intake(run_id: str, rules: str = "default", meta: dict[str, Any] | None = None,
                  events: list[dict[str, Any]] | None = None, **extra: Any) -> ReportIntake:
    """A report as the daemon's intake takes it from a body of JSON-shaped events (the wire's own path)."""
    return intake_of({"v": 1, "run": {"id": run_id, "rules": rules, "meta": meta or {}}, "events": events or [],
                      **extra})


def intake_of(body: dict[str, Any]) -> ReportIntake:
    """A JSON-shaped report body through the daemon's intake."""
    return parse_report(json.dumps(events.to_builtins(body)).encode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonProcess:
    """`guardian serve` in a child process, on a port of its own, with its state in `state_dir`.

    While it runs, GUARDIAN_HOME points at its state folder in this process, as it would for a user whose
    daemon it is: callbacks and CLI calls made by the test find its token there."""

    def __init__(self, state_dir: Path, port: int | None = None, rules_dir: Path | None = None) -> None:
        self.state_dir, self.port, self.rules_dir = state_dir, port or free_port(), rules_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir / "daemon.log"
        self._home: str | None = None

    def start(self) -> DaemonProcess:
        args = [sys.executable, "-m", "guardian.cli", "serve", "--port", str(self.port), "--state-dir", str(self.state_dir)]
        if self.rules_dir is not None:
            args += ["--rules-dir", str(self.rules_dir)]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        if self._home is None:
            self._home = os.environ.get("GUARDIAN_HOME", "")
        os.environ["GUARDIAN_HOME"] = str(self.state_dir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                request(self.url, "GET", "/healthz", timeout=1)
                return self
            except DaemonError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited: {self.log.read_text()}") from None
                time.sleep(0.1)
        raise RuntimeError(f"daemon did not come up: {self.log.read_text()}")

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self._home is not None:
            if self._home:
                os.environ["GUARDIAN_HOME"] = self._home
            else:
                os.environ.pop("GUARDIAN_HOME", None)
            self._home = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextmanager
def in_process_daemon(state_dir: Path) -> Iterator[tuple[Guardian, str, str]]:
    """The daemon's core and server in this process, on a free loopback port: (core, url, token)."""
    token = load_or_create_token(state_dir)
    core = Guardian(Store(state_dir / "guardian.db"), RuleLibrary(state_dir / "rules"))
    server = make_server(core, "127.0.0.1", 0, token, state_dir / "token")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield core, f"http://127.0.0.1:{server.server_address[1]}", token
    finally:
        server.shutdown()
        server.server_close()


def wait_for(condition: Callable[[], object], seconds: float = 10.0) -> None:
    """Poll `condition` until it holds; AssertionError after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")
