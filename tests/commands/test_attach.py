"""`guardian attach`: a real attach process following logs as a writer (or a real Trainer) produces them."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemonkit import DaemonProcess
from realpaths import REAL_LOGS, needs_fixtures

from guardian.commands.attach import Follower, StopPolicy, for_log_interval, log_interval
from guardian.commands.eventsink import EventSink
from guardian.commands.replay import replay
from guardian.events import (
    ActionEvent,
    AnyEvent,
    CheckpointEvent,
    DecisionEvent,
    EndEvent,
    MetricsEvent,
    StartEvent,
    from_builtins,
)
from guardian.logs.eventlog import read_events
from guardian.logs.training import Observation, read_log
from guardian.rulefile.reader import load_rules, parse_rules
from guardian.transport.client import request

GUARDIAN = [sys.executable, "-m", "guardian.cli"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("GUARDIAN_")} | {"COLUMNS": "200"}

# Appends a log line by line at training-like pace; every fifth line is written in two halves with a
# flush and a pause between, so the follower sees half-written lines.
WRITER = """
import sys, time
src, dst, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(src, "rb") as f:
    lines = f.read().splitlines(keepends=True)
with open(dst, "ab") as out:
    for i, line in enumerate(lines):
        if i % 5 == 2:
            out.write(line[: len(line) // 2]); out.flush(); time.sleep(pause)
            line = line[len(line) // 2:]
        out.write(line); out.flush(); time.sleep(pause)
"""

# Rules that fire often on the rameyjm7 run, before and after its resume, so the comparison means something.
BUSY_RULES = """version: 1
rules:
  - name: loss_above_0_39
    metric: loss
    detector: {kind: threshold, above: 0.39}
    severity: warning
    actions: [alert]
    cooldown_steps: 100
  - name: loss_jump
    metric: loss
    detector: {kind: robust_zscore, window_steps: 50, warmup_steps: 10, z_threshold: 3.0, min_relative_change: 0.02}
    severity: warning
    actions: [skip_update]
"""

TRAIN = """
import sys, time
from transformers import TrainerCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.testing.tinyrun import TinyRun

class Pace(TrainerCallback):
    def on_step_end(self, *args, **kwargs):
        time.sleep(0.05)

# logging every step: attach marks a checkpoint good only on steps the log shows
trainer = TinyRun(sys.argv[1], max_steps=60, eval_steps=20, save_steps=10, logging_steps=1).trainer(
    [FaultInjector([Fault("nan", 35)]), Pace()])
trainer.args.logging_nan_inf_filter = False  # else Trainer leaves the NaN losses out of its logs
trainer.train()
print("finished at step", trainer.state.global_step)
"""


# ---- helpers ------------------------------------------------------------------------------------------


def start_attach(run: Path, *args: str, log: Path) -> subprocess.Popen[str]:
    out = log.open("w")
    return subprocess.Popen([*GUARDIAN, "attach", str(run), "--linger", "1", "--poll-seconds", "0.5", *args],
                            stdout=out, stderr=subprocess.STDOUT, text=True, env=ENV)


def finish(proc: subprocess.Popen[str], log: Path, timeout_seconds: float = 60) -> str:
    try:
        proc.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"attach did not end within {timeout_seconds} s:\n{log.read_text()}")
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
    return text


def events(run: Path) -> list[AnyEvent]:
    found = list(read_events(run / "guardian" / "events.jsonl"))
    assert None not in found  # every line attach wrote is an event
    return [event for event in found if event is not None]


def effective(run: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(decisions, observations) as the run stands: a `start` event with `resumed` voids what came before
    about its step and later, as a resume does in `guardian.logs.training`."""
    decisions: list[tuple[int, str]] = []
    observations: list[tuple[int, str]] = []
    for event in events(run):
        match event:
            case StartEvent(resumed=True, step=int(step)):
                decisions = [d for d in decisions if d[0] < step]
                observations = [o for o in observations if o[0] < step]
            case DecisionEvent():
                decisions.append((event.step, event.rule))
            case MetricsEvent():
                observations.append((event.step, event.phase))
    return decisions, observations


def as_json(observations: list[Observation]) -> str:
    return json.dumps([(o.step, o.phase, o.metrics) for o in observations])


def printed_decisions(text: str) -> list[tuple[int, str]]:
    return [(int(m[1]), m[2]) for m in re.finditer(r"^step +(\d+)  (\S+)", text, re.MULTILINE)]


def wait_for(predicate: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for attach")
        time.sleep(0.05)


def count_events(run: Path, kind: type[AnyEvent], **match: Any) -> int:
    path = run / "guardian" / "events.jsonl"
    if not path.exists():
        return 0
    found = 0
    for event in read_events(path):  # None: a line being written
        found += isinstance(event, kind) and all(getattr(event, k) == v for k, v in match.items())
    return found


# ---- following a live trainer_log.jsonl -----------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("name, rules, pause, expect", [
    ("syGOAT__Mistral-v0.2-Translator-bf16__trainer_log.jsonl", None, 0.005, []),
    ("AolinGuo__graduate_agent__trainer_log.jsonl", None, 0.005, [(210, "loss_stuck_at_zero")]),
    ("rameyjm7__SFT-Training-LLM__trainer_log.jsonl", BUSY_RULES, 0.002, None),  # two writers and a resume
])
def test_attach_live_decides_as_replay_does_on_the_whole_file(tmp_path: Path, name: str, rules: str | None,
                                                              pause: float, expect: list[Any] | None) -> None:
    run = tmp_path / "run"
    run.mkdir()
    args: list[str] = []
    if rules is not None:
        (tmp_path / "rules.yaml").write_text(rules)
        args += ["--rules", str(tmp_path / "rules.yaml")]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(REAL_LOGS / name), str(run / "trainer_log.jsonl"),
                               str(pause)])
    if "rameyjm7" in name:  # its log never says the run ended: attach ends when the writer does
        args += ["--pid", str(writer.pid)]
    attach = start_attach(run, *args, log=tmp_path / "attach.out")
    assert writer.wait(timeout=120) == 0
    text = finish(attach, tmp_path / "attach.out")

    ruleset, _ = for_log_interval(load_rules(tmp_path / "rules.yaml" if rules else None),
                                  log_interval(read_log(REAL_LOGS / name)) or 1)  # as attach scales warm-ups
    expected = [(d.step, d.rule) for d in replay(REAL_LOGS / name, ruleset).decisions]
    decisions, observations = effective(run)
    assert decisions == expected
    if expect is not None:
        assert expected == expect
    assert observations == [(o.step, o.phase) for o in read_log(REAL_LOGS / name)]
    assert printed_decisions(text) == [(e.step, e.rule) for e in events(run) if isinstance(e, DecisionEvent)]
    assert all(e.source == "attach" for e in events(run))
    if "rameyjm7" in name:
        assert "resume at step 5010" in text
        assert any(step >= 5010 for step, _ in expected)  # decisions after the resume were compared too
        assert f"the training process {writer.pid} has exited" in text


@needs_fixtures
def test_a_truncated_or_replaced_log_is_followed_as_a_resume(tmp_path: Path) -> None:
    lines = (REAL_LOGS / "syGOAT__Mistral-v0.2-Translator-bf16__trainer_log.jsonl").read_bytes().splitlines(True)
    run = tmp_path / "run"
    run.mkdir()
    log = run / "trainer_log.jsonl"
    attach = start_attach(run, log=tmp_path / "attach.out")

    def append(chunk: list[bytes]) -> None:
        with log.open("ab") as f:
            for line in chunk:
                f.write(line)
                f.flush()
                time.sleep(0.002)

    append(lines[:60])
    wait_for(lambda: count_events(run, MetricsEvent) >= 60)
    replacement = run / "trainer_log.jsonl.new"  # rotation: a shorter file takes the name (another inode)
    replacement.write_bytes(b"".join(lines[:30]))
    os.replace(replacement, log)
    wait_for(lambda: count_events(run, StartEvent, resumed=True) == 1)
    append(lines[30:100])
    wait_for(lambda: count_events(run, MetricsEvent) >= 130)
    with log.open("r+b") as f:  # truncation in place: the same inode, fewer bytes
        f.truncate(len(b"".join(lines[:50])))
    wait_for(lambda: count_events(run, StartEvent, resumed=True) == 2)
    append(lines[50:])
    text = finish(attach, tmp_path / "attach.out")

    assert text.count("was truncated or replaced") == 2
    assert "resume at step 310" in text and "resume at step 510" in text
    decisions, observations = effective(run)
    assert observations == [(o.step, o.phase) for o in read_log(log)]
    assert decisions == [(d.step, d.rule) for d in replay(log, load_rules()).decisions]


# ---- a real Trainer run, followed through its checkpoints, stopped from outside -------------------------


@pytest.mark.slow
def test_attach_stops_a_real_run_on_nan_and_names_the_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = subprocess.Popen([sys.executable, "-c", TRAIN, str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=ENV)
    attach = start_attach(out, "--pid", str(trainer.pid), log=tmp_path / "attach.out")
    train_output, _ = trainer.communicate(timeout=600)
    text = finish(attach, tmp_path / "attach.out")

    assert trainer.returncode == -signal.SIGTERM, train_output
    assert "finished at step" not in train_output
    assert not (out / "checkpoint-60").exists()  # it ended early
    assert (35, "non_finite_loss") in printed_decisions(text)
    assert f"sent SIGTERM to process {trainer.pid}" in text
    good = Path((out / "guardian" / "last_good_checkpoint").read_text().strip())
    assert good == out / "checkpoint-30"  # the newest checkpoint before the NaN at step 35
    assert f"--resume_from_checkpoint {good}" in text
    assert json.loads((good / "guardian_good.json").read_text())["step"] == 30
    assert not (out / "checkpoint-40" / "guardian_good.json").exists()
    stops = [e for e in events(out) if isinstance(e, ActionEvent) and e.stopped]
    assert len(stops) == 1 and stops[0].signal == "SIGTERM" and stops[0].resume_from == str(good)


# ---- the daemon -----------------------------------------------------------------------------------------


@needs_fixtures
def test_attach_reports_to_the_daemon(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    try:
        run = tmp_path / "aolin"
        run.mkdir()
        shutil.copy(REAL_LOGS / "AolinGuo__graduate_agent__trainer_log.jsonl", run / "trainer_log.jsonl")
        result = subprocess.run([*GUARDIAN, "attach", str(run), "--once", "--url", daemon.url, "--run-id", "aolin"],
                                capture_output=True, text=True, timeout=60,
                                env={**ENV, "GUARDIAN_HOME": str(daemon.state_dir)})  # where its token is
        assert result.returncode == 0, result.stdout + result.stderr
        runs = {r["id"]: r for r in request(daemon.url, "GET", "/v1/runs")["runs"]}
        assert runs["aolin"]["decisions"] == 1
        assert runs["aolin"]["status"] == "ended" and runs["aolin"]["last_step"] == 370
        assert runs["aolin"]["meta"]["attached"] is True
        stored = request(daemon.url, "GET", "/v1/runs/aolin/events?kinds=decision,action,start,end")
        assert [(d["step"], d["rule"]) for d in stored["decisions"]] == [(210, "loss_stuck_at_zero")]
        stored_events = [from_builtins(e) for e in stored["events"]]
        assert {type(e) for e in stored_events} == {StartEvent, DecisionEvent, ActionEvent, EndEvent}
        assert all(e.source == "attach" for e in stored_events)
    finally:
        daemon.stop()


# ---- in-process: checkpoints only, resumes, options -----------------------------------------------------


def write_checkpoints(run: Path, history: list[dict[str, Any]], steps: list[int], max_steps: int) -> None:
    for step in steps:
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {"global_step": step, "max_steps": max_steps, "log_history": [e for e in history if e["step"] <= step]}
        (folder / "trainer_state.json").write_text(json.dumps(state))


def follower(run: Path, **kwargs: Any) -> tuple[Follower, io.StringIO]:
    out = io.StringIO()
    return Follower(run, load_rules(), EventSink(run / "guardian" / "events.jsonl"), out=out, **kwargs), out


@needs_fixtures
def test_a_plain_hf_run_is_followed_through_its_checkpoints(tmp_path: Path) -> None:
    source = REAL_LOGS / "MemaSp__FT-Llama2-HRChatbot__outputs__trainer_state.json"  # grad_norm inf at step 33
    history = json.loads(source.read_text())["log_history"]
    kills: list[tuple[int, int]] = []
    f, out = follower(tmp_path, policy=StopPolicy(pid=4242), kill=lambda pid, sig: kills.append((pid, sig)))
    for step in range(10, 80, 10):
        write_checkpoints(tmp_path, history, [step], max_steps=70)
        f.poll()
    f.finish()
    text = out.getvalue()

    assert [(d.step, d.rule) for d in f.decisions] == [(d.step, d.rule) for d in replay(source, load_rules()).decisions]
    assert kills == [(4242, signal.SIGTERM)]
    assert f"--resume_from_checkpoint {tmp_path / 'checkpoint-30'}" in text
    assert "checkpoint-40 is not marked good: non_finite_loss fired at step 33" in text
    assert (tmp_path / "guardian" / "last_good_checkpoint").read_text() == f"{tmp_path / 'checkpoint-70'}\n"
    assert f.ended and isinstance(events(tmp_path)[-1], EndEvent)


def test_a_checkpoint_with_another_history_is_a_resume(tmp_path: Path) -> None:
    def entry(step: int, loss: float) -> dict[str, Any]:
        return {"step": step, "loss": loss, "grad_norm": 1.0, "learning_rate": 1e-4}

    first = [entry(s, 2.0 - s / 100) for s in range(1, 31)]
    write_checkpoints(tmp_path, first, [10, 20, 30], max_steps=40)
    f, out = follower(tmp_path)
    f.poll()
    resumed = first[:20] + [entry(s, float("nan") if s == 25 else 1.5) for s in range(21, 41)]  # from checkpoint-20
    write_checkpoints(tmp_path, resumed, [30, 40], max_steps=40)
    os.utime(tmp_path / "checkpoint-40" / "trainer_state.json")
    f.poll()
    f.finish()

    assert "resume at step 21" in out.getvalue()
    assert as_json(f.observations) == as_json(read_log(tmp_path))  # NaN == NaN in JSON
    assert [(d.step, d.rule) for d in f.decisions] == [(25, "non_finite_loss")]
    assert f.resume_point(before=25) == tmp_path / "checkpoint-20"


def test_unknown_stop_on_rule_and_signal_are_clear_errors(tmp_path: Path) -> None:
    for args, message in [(["--stop-on", "nan_loss"], "--stop-on nan_loss: no such rule"),
                          (["--stop-signal", "TERMINATE"], "--stop-signal 'TERMINATE' is not a signal")]:
        result = subprocess.run([*GUARDIAN, "attach", str(tmp_path), "--once", *args], capture_output=True,
                                text=True, env=ENV)
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_ends_attach_with_status_0(tmp_path: Path, sig: signal.Signals) -> None:
    attach = start_attach(tmp_path / "not-yet", log=tmp_path / "attach.out")
    wait_for(lambda: "waiting for" in (tmp_path / "attach.out").read_text())
    attach.send_signal(sig)
    text = finish(attach, tmp_path / "attach.out", timeout_seconds=20)
    assert "attach: nothing read yet" in text
    assert not (tmp_path / "not-yet").exists()  # nothing created before the run writes there


def test_once_on_a_directory_without_logs_says_what_it_expected(tmp_path: Path) -> None:
    result = subprocess.run([*GUARDIAN, "attach", str(tmp_path), "--once"], capture_output=True, text=True, env=ENV)
    assert result.returncode == 2
    assert "holds no trainer_log.jsonl or checkpoint-*/trainer_state.json" in result.stderr


def test_stop_policy_defaults_to_critical_or_stop_and_rollback() -> None:
    rules = parse_rules("""version: 1
rules:
  - {name: warn, metric: loss, detector: {kind: threshold, above: 1}, severity: warning, actions: [alert]}
  - {name: crit, metric: loss, detector: {kind: threshold, above: 1}, severity: critical, actions: [alert]}
  - {name: back, metric: loss, detector: {kind: threshold, above: 1}, severity: warning, actions: [rollback]}
""")
    from guardian.engine.engine import Engine

    decisions = {d.rule: d for d in Engine(rules).observe(1, {"loss": 5.0})}
    assert {name for name, d in decisions.items() if StopPolicy().wants_stop(d)} == {"crit", "back"}
    assert {name for name, d in decisions.items() if StopPolicy(rules=frozenset({"warn"})).wants_stop(d)} == {"warn"}


# ---- sparse logs: LLaMA-Factory at logging_steps 5 ------------------------------------------------------


def llamafactory_run(run: Path, *, total: int = 60, every: int = 5, spike_at: int | None = None,
                     grad_spike_at: int | None = None, checkpoints: tuple[int, ...] = (20, 40, 60),
                     state_beside: bool = False) -> None:
    """A LLaMA-Factory-style output directory: trainer_log.jsonl (no grad_norm, as LLaMA-Factory writes it)
    and each checkpoint-N/trainer_state.json (HF's log_history, with grad_norm), a line every `every` steps."""
    run.mkdir(parents=True, exist_ok=True)
    history, lines = [], []
    for step in range(every, total + 1, every):
        loss = 2.0 - step / 100 + (0.02 if step % 10 else -0.02)
        loss = loss * 7.7 if step == spike_at else loss
        grad = 1.0e6 if step == grad_spike_at else 0.8 + (0.05 if step % 10 else -0.05)
        history.append({"step": step, "epoch": step / total, "loss": round(loss, 4), "grad_norm": grad,
                        "learning_rate": 5e-5})
        lines.append({"current_steps": step, "total_steps": total, "loss": round(loss, 4), "lr": 5e-5,
                      "epoch": round(step / total, 2), "percentage": round(100 * step / total, 2),
                      "elapsed_time": f"0:00:{step:02d}", "remaining_time": f"0:00:{total - step:02d}"})
    (run / "trainer_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for n, step in enumerate(checkpoints):
        folder = run / f"checkpoint-{step}"
        folder.mkdir()
        state = {"global_step": step, "max_steps": total, "logging_steps": every,
                 "log_history": [e for e in history if e["step"] <= step]}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        os.utime(folder / "trainer_state.json", ns=(10**18 + n, 10**18 + n))  # saved in step order
    if state_beside:
        state = {"global_step": total, "max_steps": total, "logging_steps": every, "log_history": history}
        (run / "trainer_state.json").write_text(json.dumps(state))
        os.utime(run / "trainer_state.json", ns=(10**18 + 99, 10**18 + 99))


def attach_once(run: Path, *args: str) -> str:
    result = subprocess.run([*GUARDIAN, "attach", str(run), "--once", *args], capture_output=True, text=True,
                            timeout=60, env=ENV)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    return result.stdout


def test_a_spike_in_a_short_run_logged_every_5_steps_is_caught(tmp_path: Path) -> None:
    run = tmp_path / "run"
    llamafactory_run(run, spike_at=40)
    text = attach_once(run)

    # loss_spike's warm-up of 20 would have been 20 lines, 100 steps: longer than the run
    assert printed_decisions(text) == [(40, "loss_spike")]
    assert "the log has a line every 5 steps" in text and "loss_spike 20 -> 5 lines (25 steps)" in text
    healthy = tmp_path / "healthy"  # the same run without the spike: nothing fires
    llamafactory_run(healthy)
    assert printed_decisions(attach_once(healthy)) == []


def test_no_checkpoint_is_marked_good_on_steps_the_log_does_not_show(tmp_path: Path) -> None:
    run = tmp_path / "run"
    llamafactory_run(run)  # healthy as logged; what happened at the steps between its lines is not known
    text = attach_once(run)

    for step in (20, 40, 60):
        assert f"checkpoint-{step} is not marked good: the log covers only every 5th step" in text
        assert not (run / f"checkpoint-{step}" / "guardian_good.json").exists()
    assert not (run / "guardian" / "last_good_checkpoint").exists()
    checkpoints = [e for e in events(run) if isinstance(e, CheckpointEvent)]
    assert [(e.step, e.good) for e in checkpoints] == [(20, False), (40, False), (60, False)]


def test_a_checkpoint_needs_every_step_since_the_one_before_logged_and_healthy(tmp_path: Path) -> None:
    def entry(step: int) -> dict[str, Any]:
        return {"step": step, "loss": 2.0 - step / 100, "grad_norm": 1.0, "learning_rate": 1e-4}

    history = [entry(s) for s in range(1, 41) if s not in (24, 25)]  # two steps lost from the log
    write_checkpoints(tmp_path, history, [10, 20, 30, 40], max_steps=40)
    f, out = follower(tmp_path)
    f.poll()
    f.finish()
    text = out.getvalue()

    assert "checkpoint-10 is good (every step 1-10 logged, no rule fired)" in text
    assert "checkpoint-20 is good" in text
    assert "checkpoint-30 is not marked good: step 24 is not in the log" in text
    assert "checkpoint-40 is good (every step 30-40 logged, no rule fired)" in text


@pytest.mark.parametrize("beside", [True, False])
def test_grad_norm_comes_from_the_trainer_state_beside_a_llamafactory_log(tmp_path: Path, beside: bool) -> None:
    run = tmp_path / "run"
    llamafactory_run(run, grad_spike_at=55, checkpoints=(20, 40, 60) if beside else (), state_beside=beside)
    text = attach_once(run)

    if beside:  # the run's own trainer_state.json is the newest: every line gets its step's grad norm
        assert (55, "grad_explosion") in printed_decisions(text)
        assert "grad_norm for 12 of 12 logged steps read from trainer_state.json" in text
        assert "for lack of grad_norm" not in text
        metrics = [e for e in events(run) if isinstance(e, MetricsEvent)]
        assert all("grad_norm" in e.values for e in metrics)
    else:
        assert printed_decisions(text) == []
        lacking = re.search(r"^attach: cannot fire for lack of grad_norm in the log: (.*)$", text, re.MULTILINE)
        assert lacking is not None, text
        assert {"grad_explosion", "grad_explosion_absolute", "vanishing_gradient"} <= set(lacking[1].split(", "))


def test_grad_norms_that_come_after_their_lines_are_judged_when_their_checkpoint_appears(tmp_path: Path) -> None:
    """Following a live LLaMA-Factory log: each line (no grad_norm) is written before the checkpoint whose
    trainer_state.json holds its grad norm. A gradient explosion at step 55 is found when a trainer_state.json
    holding step 55 appears, reported with its own step, and the checkpoint it falls before is not good."""
    def line(step: int) -> str:
        return json.dumps({"current_steps": step, "total_steps": 60, "loss": 2.0 - step / 100, "lr": 1e-4,
                           "epoch": step / 60}) + "\n"

    history = [{"step": s, "loss": 2.0 - s / 100, "grad_norm": 1e6 if s == 55 else 1.0 + (s % 3) / 10,
                "learning_rate": 1e-4} for s in range(1, 61)]
    f, out = follower(tmp_path)
    log = tmp_path / "trainer_log.jsonl"
    for upto in range(10, 61, 10):  # the lines of ten steps, then the checkpoint saved at the last of them
        with log.open("a") as handle:
            handle.writelines(line(s) for s in range(upto - 9, upto + 1))
        f.poll()
        write_checkpoints(tmp_path, history, [upto], max_steps=60)
        if upto == 60:  # not yet seen when attach judges checkpoint-60 (its file is older than checkpoint-50's)
            past = (tmp_path / "checkpoint-50" / "trainer_state.json").stat().st_mtime_ns - 10**9
            os.utime(tmp_path / "checkpoint-60" / "trainer_state.json", ns=(past, past))
    f.poll()
    assert "checkpoint-60 is good" in out.getvalue() and printed_decisions(out.getvalue()) == []
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 60, "max_steps": 60,
                                                             "log_history": history}))  # the run's end
    f.poll()
    f.finish()
    text = out.getvalue()

    assert printed_decisions(text) == [(55, "grad_explosion_absolute"), (55, "grad_explosion")], text
    assert text.count("(judged late: its grad_norm came with a checkpoint)") == 2
    assert [e.step for e in events(tmp_path) if isinstance(e, DecisionEvent) and e.late] == [55, 55]
    assert "checkpoint-50 is good" in text
    assert "checkpoint-60 is not marked good: grad_explosion fired at step 55" in text
    assert not (tmp_path / "checkpoint-60" / "guardian_good.json").exists()
    assert (tmp_path / "guardian" / "last_good_checkpoint").read_text().strip() == str(tmp_path / "checkpoint-50")
    assert "grad_norm for 60 of 60 logged steps read from trainer_state.json (60 after their line" in text
    assert "for lack of grad_norm" not in text
    # the same decisions as with every grad norm known at once (attach after the run)
    whole = tmp_path / "whole"
    whole.mkdir()
    shutil.copy(log, whole / "trainer_log.jsonl")
    shutil.copy(tmp_path / "trainer_state.json", whole / "trainer_state.json")
    g, _ = follower(whole)
    g.poll()
    assert [(d.step, d.rule, d.actions) for d in f.decisions] == [(d.step, d.rule, d.actions) for d in g.decisions]


@needs_fixtures
def test_attach_stays_quiet_on_the_real_logs(tmp_path: Path) -> None:
    """Scaled warm-ups and grad norms from beside add no alarm on real runs: attach decides as replay does
    (on the trainer_state.json, with its grad norms, where a LLaMA-Factory run has one beside its log)."""
    names = sorted(p.name for p in REAL_LOGS.glob("*trainer_*.json*"))
    for name in names:
        run = tmp_path / name
        run.mkdir()
        target = "trainer_log.jsonl" if name.endswith(".jsonl") else "trainer_state.json"
        shutil.copy(REAL_LOGS / name, run / target)
        twin = REAL_LOGS / name.replace("trainer_log.jsonl", "trainer_state.json")
        reference = REAL_LOGS / name
        if target == "trainer_log.jsonl" and twin.is_file():
            shutil.copy(twin, run / "trainer_state.json")
            reference = twin
        f, _ = follower(run)
        f.poll()
        f.finish()
        expected = [(d.step, d.rule) for d in replay(reference, load_rules()).decisions]
        assert [(d.step, d.rule) for d in f.decisions] == expected, name
