"""Real Trainer runs reporting to a real daemon process: verdicts in time, fallback, SIGKILL, manual control."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemonkit import DaemonProcess, free_port
from trainkit import AtStep, Recorder, all_finite, events

from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.commands.push import push
from guardian.daemon.store import Store
from guardian.events import MetricsEvent
from guardian.testing.tinyrun import TinyRun
from guardian.transport.client import request

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _stored_seqs(state_dir: Path, run_id: str, expected: int, seconds: float = 15.0) -> list[int]:
    store = Store(state_dir / "guardian.db")
    deadline = time.monotonic() + seconds
    seqs = store.event_seqs(run_id)
    while len(seqs) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        seqs = store.event_seqs(run_id)
    store.close()
    return seqs


def test_daemon_killed_mid_run_loses_nothing_and_training_goes_on(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    guardian = GuardianCallback(url=daemon.url, deadline_seconds=0.2)
    chaos = AtStep({15: daemon.kill, 35: daemon.start})
    out = tmp_path / "run"
    try:
        trainer = TinyRun(str(out), max_steps=60, eval_steps=30).trainer(
            [FaultInjector([Fault("nan", 25)]), guardian, chaos])
        trainer.train()
        assert trainer.state.global_step == 60
        assert all_finite(trainer.model)  # the NaN at step 25, while the daemon was dead, was still skipped
        assert (25, "non_finite_loss") in [(d.step, d.rule) for d in guardian.decisions]
        written = [e["seq"] for e in events(out)]
        assert written == list(range(1, len(written) + 1))
        assert guardian.run_id is not None
        assert _stored_seqs(tmp_path / "state", guardian.run_id, len(written)) == written  # each exactly once
        assert guardian.verdicts["daemon"] > 0 and guardian.verdicts["local_fallback"] > 0
    finally:
        daemon.stop()


def test_training_goes_on_when_the_daemon_never_answers(tmp_path: Path) -> None:
    guardian = GuardianCallback(url=f"http://127.0.0.1:{free_port()}", deadline_seconds=0.05)
    trainer = TinyRun(str(tmp_path), max_steps=30, eval_steps=0).trainer([FaultInjector([Fault("nan", 10)]), guardian])
    trainer.train()
    assert trainer.state.global_step == 30 and all_finite(trainer.model)
    assert guardian.verdicts["daemon"] == 0 and guardian.verdicts["local_fallback"] > 0
    assert guardian.errors == 0
    assert len(events(tmp_path)) >= 30  # everything spooled for when a daemon comes


def test_a_daemon_decision_about_step_n_is_applied_before_update_n_plus_1(tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "halve.yaml").write_text(
        "version: 1\nrules:\n  - name: halve_at_5\n    metric: loss\n"
        "    detector: {kind: threshold, above: 0.0, warmup_steps: 5}\n"
        "    actions: [{reduce_lr: {factor: 0.5}}]\n    cooldown_steps: 1000\n")
    daemon = DaemonProcess(tmp_path / "state", rules_dir=rules_dir).start()
    clean, guarded = Recorder(), Recorder()
    try:
        TinyRun(str(tmp_path / "clean"), max_steps=12, eval_steps=0).trainer([clean]).train()
        guardian = GuardianCallback(url=daemon.url, rule_set="halve", deadline_seconds=5.0)
        TinyRun(str(tmp_path / "guarded"), max_steps=12, eval_steps=0).trainer([guardian, guarded]).train()
    finally:
        daemon.stop()
    [intervention] = guardian.interventions
    assert (intervention.step, intervention.source) == (6, "daemon")
    for step in range(1, 6):
        assert guarded.rates[step] == clean.rates[step]
    for step in range(6, 13):
        assert guarded.rates[step][0] == pytest.approx(0.5 * clean.rates[step][0], rel=1e-12)


def test_manual_stop_through_the_daemon(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    guardian = GuardianCallback(url=daemon.url, run_id="manual", deadline_seconds=1.0)

    def stop() -> None:
        request(daemon.url, "POST", "/v1/runs/manual/control", {"action": "stop"}, token=daemon.token)

    try:
        trainer = TinyRun(str(tmp_path / "run"), max_steps=100, eval_steps=0).trainer([guardian, AtStep({10: stop})])
        trainer.train()
        assert 10 < trainer.state.global_step <= 13
        assert guardian.interventions[-1].rules == ["manual:stop"]
        runs = {r["id"]: r for r in request(daemon.url, "GET", "/v1/runs")["runs"]}
        assert runs["manual"]["status"] == "ended"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            commands = request(daemon.url, "GET", "/v1/runs/manual/events")["commands"]
            if commands[0]["applied"]:
                break
            time.sleep(0.1)
        assert commands[0]["applied"]
    finally:
        daemon.stop()


def test_a_step_does_not_wait_for_a_daemon_that_is_down(tmp_path: Path) -> None:
    from guardian.transport.client import DaemonLink

    link = DaemonLink(f"http://127.0.0.1:{free_port()}", "down")
    try:
        link.send(MetricsEvent(seq=1, step=1, phase="train", values={"loss": 1.0}))
        while not link.unreachable:  # the sender's first attempt fails
            time.sleep(0.01)
        # Without the early return this would wait out the hour-long deadline.
        assert link.wait_for(1, timeout=3600) is False
    finally:
        link.close(flush_seconds=0)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guardian.cli", *args], capture_output=True, text=True, timeout=120)


def test_a_run_that_ended_while_the_daemon_was_down_is_delivered_by_push(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    guardian = GuardianCallback(url=daemon.url, deadline_seconds=0.2)
    out = tmp_path / "run"
    try:
        trainer = TinyRun(str(out), max_steps=40, eval_steps=20).trainer([guardian, AtStep({15: daemon.kill})])
        trainer.train()  # the daemon is gone for the last 25 steps and the end of the run
        written = [e["seq"] for e in events(out)]
        assert events(out)[-1]["kind"] == "end"
        run_id = guardian.run_id
        assert run_id is not None and len(_stored_seqs(tmp_path / "state", run_id, 0, seconds=0)) < len(written)

        missing = _cli("push", str(tmp_path / "nowhere"), "--url", daemon.url)
        assert missing.returncode == 2 and "no event file" in missing.stderr and "nowhere" in missing.stderr
        down = _cli("push", str(out), "--url", daemon.url)  # told at once, not after the 60-s timeout
        assert down.returncode == 2 and "cannot reach the guardian daemon" in down.stderr, down.stderr

        daemon.start()
        pushed = _cli("push", str(out), "--url", daemon.url, "--json")
        assert pushed.returncode == 0, pushed.stderr
        assert json.loads(pushed.stdout) == {"run": run_id, "events": len(written),
                                             "stored_through_seq": written[-1], "skipped_lines": 0}
        assert _stored_seqs(tmp_path / "state", run_id, len(written)) == written  # each exactly once
        runs = {r["id"]: r for r in request(daemon.url, "GET", "/v1/runs")["runs"]}
        assert runs[run_id]["status"] == "ended" and runs[run_id]["last_step"] == 40

        again = _cli("push", str(out), "--url", daemon.url)  # safe to repeat: nothing is stored twice
        assert again.returncode == 0 and f"all {len(written)} events" in again.stdout
        with (out / "guardian" / "events.jsonl").open("a") as f:
            f.write('{"seq": 9999, "kind": "metr')  # a line cut short by a crash
        chunked = push(out, daemon.url, chunk=7)  # a long file goes in acknowledged chunks
        assert (chunked.events, chunked.last_seq, chunked.skipped_lines) == (len(written), written[-1], 1)
        assert _stored_seqs(tmp_path / "state", run_id, len(written)) == written
    finally:
        daemon.stop()
