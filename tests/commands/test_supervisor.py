"""`guardian run`: an unmodified training script gets Guardian and is restarted from good checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from repopaths import SCRIPTS_DIR

from guardian.events import AnyEvent, DecisionEvent, StartEvent
from guardian.logs.eventlog import read_events

SCRIPT = SCRIPTS_DIR / "plain_train.py"
GUARDIAN = [sys.executable, "-m", "guardian.cli", "run", "--backoff", "0.1"]


def guarded(out: Path, *options: str, **faults: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **faults, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*GUARDIAN, *options, "--", sys.executable, str(SCRIPT), str(out)], capture_output=True,
                          text=True, env=env, timeout=600)


def events(out: Path) -> list[AnyEvent]:
    read = list(read_events(out / "guardian" / "events.jsonl"))
    assert None not in read
    return [e for e in read if e is not None]


def test_the_script_really_has_no_guardian_in_it() -> None:
    assert "guardian" not in SCRIPT.read_text().lower().replace("knows nothing of guardian", "")


def test_unguarded_the_nan_ruins_the_run(tmp_path: Path) -> None:
    env = {**os.environ, "FAULT_NAN_STEP": "15", "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, check=True, capture_output=True, timeout=600)
    assert json.loads((tmp_path / "result.json").read_text())["finite"] is False


def test_an_unmodified_script_gets_guardian_and_is_rescued(tmp_path: Path) -> None:
    result = guarded(tmp_path, FAULT_NAN_STEP="15")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "result.json").read_text()) == {"global_step": 40, "finite": True}
    decisions = [e for e in events(tmp_path) if isinstance(e, DecisionEvent)]
    assert [(d.step, d.rule) for d in decisions] == [(15, "non_finite_loss")]
    assert "guardian run: the run finished" in result.stderr


def test_a_trainer_subclass_like_llamafactory_is_guarded_too(tmp_path: Path) -> None:
    result = guarded(tmp_path, FAULT_NAN_STEP="15", SUBCLASS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "result.json").read_text()) == {"global_step": 40, "finite": True}
    assert [e.rule for e in events(tmp_path) if isinstance(e, DecisionEvent)] == ["non_finite_loss"]


def test_a_killed_run_restarts_from_the_last_good_checkpoint_and_finishes(tmp_path: Path) -> None:
    result = guarded(tmp_path, FAULT_KILL_STEP="25")
    assert result.returncode == 0, result.stderr[-3000:]
    good = tmp_path / "guardian" / "good" / "checkpoint-20"
    assert f"was killed by SIGKILL; restart 1 of 3 in 0 s, resuming from {good}" in result.stderr
    starts = [e.step for e in events(tmp_path) if isinstance(e, StartEvent)]
    assert starts == [0, 20]  # the second attempt began at the checkpoint's step
    assert json.loads((tmp_path / "result.json").read_text()) == {"global_step": 40, "finite": True}


def test_a_crash_loop_stops_at_the_restart_budget(tmp_path: Path) -> None:
    result = guarded(tmp_path, "--max-restarts", "2", FAULT_CRASH_STEP="15")
    assert result.returncode == 1
    assert "restart 1 of 2" in result.stderr and "restart 2 of 2" in result.stderr
    assert "exited with code 1; gave up after 2 restarts (the restart budget, --max-restarts)" in result.stderr
    assert "illegal memory access" in result.stderr  # the child's own error is there to read


def test_sigterm_reaches_the_child_and_ends_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "MAX_STEPS": "100000", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([*GUARDIAN, "--", sys.executable, str(SCRIPT), str(tmp_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "guardian" / "events.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "restart" not in stderr  # a deliberate stop is not a crash


def test_bad_usage_is_a_clear_error() -> None:
    result = subprocess.run([*GUARDIAN], capture_output=True, text=True)
    assert result.returncode == 2 and "give the command to run after `--`" in result.stderr
    bad = subprocess.run([*GUARDIAN, "--lr-factor", "3", "--", "true"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--lr-factor must be between 0 and 1" in bad.stderr


@pytest.mark.parametrize("code", ["import transformers.trainer", "import json"])
def test_injection_is_harmless_where_no_trainer_is_made(tmp_path: Path, code: str) -> None:
    result = subprocess.run([*GUARDIAN, "--", sys.executable, "-c", code + "; print('ok')"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout and "guardian:" not in result.stderr


def test_a_sitecustomize_of_the_users_still_runs_in_the_child(tmp_path: Path) -> None:
    """Guardian's sitecustomize comes first on PYTHONPATH and chains to the one it shadows (a cluster's, a
    conda env's, a test harness's): that one runs too, as `sitecustomize`, without an error."""
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['USER_SITE_RAN'] = __name__\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = "import os, sys; print(os.environ.get('USER_SITE_RAN'), 'guardian.testing.inject' in sys.modules)"
    result = subprocess.run([*GUARDIAN, "--", sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sitecustomize", "True"]  # the user's ran, and Guardian's hook is in
    assert "Error in sitecustomize" not in result.stderr


def test_a_restart_request_from_sharded_state_restarts_from_its_checkpoint(tmp_path: Path) -> None:
    """FSDP/DeepSpeed: Guardian stops the run and asks for a restart; the supervisor resumes where it says."""
    good = tmp_path / "good" / "checkpoint-20"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text("{}")
    child = tmp_path / "child.py"
    child.write_text(
        "import json, os, pathlib\n"
        "state = pathlib.Path(os.environ['GUARDIAN_SUPERVISOR_FILE'])\n"
        "log = pathlib.Path(__file__).with_name('resumes.txt')\n"
        "with log.open('a') as f: f.write(os.environ.get('GUARDIAN_RESUME_FROM', '-') + '\\n')\n"
        "with log.with_name('restarts.txt').open('a') as f: f.write(os.environ['GUARDIAN_RESTART'] + '\\n')\n"
        f"request = {{'resume_from': {str(good)!r}, 'onset_step': 25}}\n"
        "first = log.read_text().count('\\n') == 1\n"
        "state.write_text(json.dumps({'good_checkpoints': [], 'restart_request': request if first else None}))\n"
    )
    result = subprocess.run([*GUARDIAN, "--", sys.executable, str(child)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "asked for a restart from its last good checkpoint (sharded state)" in result.stderr
    assert (tmp_path / "resumes.txt").read_text().splitlines() == ["-", str(good)]
    assert (tmp_path / "restarts.txt").read_text().splitlines() == ["0", "1"]  # what is said once per run, once


def test_sharded_state_turns_a_rollback_into_a_restart_request(tmp_path: Path) -> None:
    from guardian.callbacks.actuator import Actuator
    from guardian.callbacks.checkpoints import GoodCheckpoints
    from guardian.engine.actions import Plan

    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    actuator = Actuator(snapshots_kept=1, rollback_margin_steps=5, use_snapshots=False)
    actuator.in_process_rollback = False
    actuator.good = GoodCheckpoints(tmp_path)
    actuator.good.protect(checkpoint, 10, {})
    actuator.restart_request = tmp_path / "guardian" / "restart_request.json"

    class Control:
        should_training_stop = False

    control = Control()
    outcome = actuator.carry_out(Plan(skip_update=True, rollback=True), 30, 25, control, None, None, None,
                                 pre_update=True)
    assert control.should_training_stop and outcome.rollback == "restart"
    request = json.loads(actuator.restart_request.read_text())
    assert request == {"resume_from": str(tmp_path / "guardian" / "good" / "checkpoint-10"), "onset_step": 25}


STARTUP_FAILURE = ("the training command failed before its first step (exit code {}); Guardian restarts only runs "
                   "that crash mid-training — fix the error above and run again")


def test_a_command_that_fails_at_once_is_not_restarted(tmp_path: Path) -> None:
    starts = tmp_path / "starts.txt"
    code = f"import sys; open({str(starts)!r}, 'a').write('start\\n'); sys.exit(3)"
    result = subprocess.run([*GUARDIAN, "--", sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert starts.read_text().splitlines() == ["start"]
    assert STARTUP_FAILURE.format(3) in result.stderr and "restart 1" not in result.stderr


@pytest.mark.slow
def test_a_trainer_script_whose_tokenizer_cannot_load_is_not_restarted(tmp_path: Path) -> None:
    """As with LLaMA-Factory's tokenizer that could not load: restarting it three times only wasted 35 s."""
    broken = tmp_path / "tokenizer"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{ not json")
    script = tmp_path / "train.py"
    script.write_text(
        "import pathlib, sys\n"
        "with open(pathlib.Path(__file__).with_name('starts.txt'), 'a') as f: f.write('start\\n')\n"
        "from transformers import AutoTokenizer, Trainer, TrainingArguments\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "Trainer(model=None, args=TrainingArguments(output_dir=sys.argv[2], report_to=[])).train()\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([*GUARDIAN, "--", sys.executable, str(script), str(broken), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert (tmp_path / "starts.txt").read_text().splitlines() == ["start"]
    assert STARTUP_FAILURE.format(1) in result.stderr and "restart 1" not in result.stderr
    assert "Traceback" in result.stderr  # the child's own error is there to read, above the message


@pytest.mark.slow
def test_a_crash_at_the_first_step_of_a_real_trainer_is_not_restarted(tmp_path: Path) -> None:
    """Training began (Guardian's callback told the supervisor), but no step got through: not a mid-training crash."""
    result = guarded(tmp_path, FAULT_CRASH_STEP="1")
    assert result.returncode == 1, result.stderr[-3000:]
    assert [e.step for e in events(tmp_path) if isinstance(e, StartEvent)] == [0]
    assert STARTUP_FAILURE.format(1) in result.stderr and "restart 1" not in result.stderr


def test_a_resumed_run_that_fails_at_its_start_up_uses_the_budget_and_goes_back_a_checkpoint(tmp_path: Path) -> None:
    """After a crash mid-training the command is known to work: a failed resume (a checkpoint that will not load,
    a GPU the crashed process still holds) may pass, so it is retried within the budget, from an older good
    checkpoint where there is one; the budget still ends it."""
    good = [tmp_path / "guardian" / "good" / f"checkpoint-{step}" for step in (10, 20)]
    for folder in good:
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
    child = tmp_path / "child.py"
    child.write_text(
        "import json, os, pathlib, sys\n"
        "log = pathlib.Path(__file__).with_name('resumes.txt')\n"
        "with log.open('a') as f: f.write(os.environ.get('GUARDIAN_RESUME_FROM', '-') + '\\n')\n"
        "if 'GUARDIAN_RESUME_FROM' in os.environ: sys.exit('the checkpoint will not load')\n"
        "state = pathlib.Path(os.environ['GUARDIAN_SUPERVISOR_FILE'])\n"
        f"state.write_text(json.dumps({{'good_checkpoints': {[str(g) for g in good]!r}, 'restart_request': None}}))\n"
        "sys.exit('crashed mid-training')\n"
    )
    result = subprocess.run([*GUARDIAN, "--", sys.executable, str(child)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert (tmp_path / "resumes.txt").read_text().splitlines() == ["-", str(good[1]), str(good[0]), str(good[0])]
    assert f"exited with code 1 before its first step (resuming from {good[1]}); restart 2 of 3" in result.stderr
    assert "gave up after 3 restarts" in result.stderr and "fix the error above" not in result.stderr
