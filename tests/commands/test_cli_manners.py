"""The `guardian` command is polite: clear errors for a run that does not exist, a URL without its scheme and
a missing token; help on every argument; `guardian rules` alone shows its own help; `demo --steps 0` refused;
`replay` sums each log up in one line and stops listing where a guarded run would have stopped."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemonkit import DaemonProcess
from realpaths import REAL_LOGS, needs_fixtures

from guardian.cli import _parser
from guardian.transport.client import request

GUARDIAN = [sys.executable, "-m", "guardian.cli"]
RUN_KEY = "manners-run-key-0123456789abcdefghijklm"


def guardian(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARDIAN, *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> DaemonProcess:
    state = tmp_path_factory.mktemp("manners") / "state"
    proc = DaemonProcess(state).start()
    request(proc.url, "POST", "/v1/report", {"run": {"id": "known-run"}, "events": [
        {"seq": 1, "kind": "metrics", "step": 1, "phase": "train", "values": {"loss": 1.0}}]},
        token=proc.token, run_key=RUN_KEY)
    yield proc  # type: ignore[misc]
    proc.stop()


def test_events_of_a_run_that_does_not_exist_is_an_error(daemon: DaemonProcess) -> None:
    result = guardian("events", "nosuchrun", "--url", daemon.url)
    assert result.returncode == 2, result.stdout
    assert "no run 'nosuchrun'" in result.stderr and "known-run" in result.stderr
    assert "Decisions of the daemon" not in result.stdout
    assert guardian("events", "known-run", "--url", daemon.url).returncode == 0


def test_a_loopback_url_without_scheme_is_taken_as_http(daemon: DaemonProcess) -> None:
    result = guardian("runs", "--json", "--url", f"127.0.0.1:{daemon.port}")
    assert result.returncode == 0, result.stderr
    assert [r["id"] for r in json.loads(result.stdout)["runs"]] == ["known-run"]
    from_env = guardian("runs", "--json", env={"GUARDIAN_URL": f"localhost:{daemon.port}"})
    assert from_env.returncode == 0, from_env.stderr


def test_run_and_attach_take_the_same_urls_as_the_other_commands(tmp_path: Path) -> None:
    for argv in (["run", "--url", "127.0.0.1:8765", "--", "true"], ["attach", str(tmp_path), "--url", "127.0.0.1:8765"]):
        assert _parser().parse_args(argv).url == "http://127.0.0.1:8765", argv
    result = guardian("attach", str(tmp_path), "--url", "gpu-box.internal:8765")
    assert result.returncode == 2 and "write http://gpu-box.internal:8765" in result.stderr


def test_a_remote_url_without_scheme_says_what_to_write() -> None:
    result = guardian("runs", "--url", "gpu-box.internal:8765")
    assert result.returncode == 2
    assert "write http://gpu-box.internal:8765" in result.stderr and "Traceback" not in result.stderr
    https = guardian("runs", "--url", "https://127.0.0.1:8765")
    assert https.returncode == 2 and "write http://127.0.0.1:8765" in https.stderr


def test_a_missing_token_names_the_option_the_variable_and_the_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    env = {"GUARDIAN_HOME": str(tmp_path / "elsewhere"), "GUARDIAN_TOKEN": ""}
    result = guardian("ctl", "stop", "known-run", "--url", daemon.url, env=env)
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "--token" in message and "GUARDIAN_TOKEN" in message and str(tmp_path / "elsewhere" / "token") in message
    assert "Authorization" not in message
    wrong = guardian("ctl", "stop", "known-run", "--url", daemon.url, "--token", "x" * 40, env=env)
    assert wrong.returncode == 2 and "is not its token" in " ".join(wrong.stderr.split())


def _walk(parser: argparse.ArgumentParser, name: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                missing += _walk(sub, f"{name} {sub_name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
            missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_positional_and_option_has_help() -> None:
    assert _walk(_parser(), "guardian") == []


def test_rules_alone_prints_the_rules_help() -> None:
    result = guardian("rules")
    assert result.returncode == 2
    assert "usage: guardian rules" in result.stdout
    assert "check" in result.stdout and "detectors" in result.stdout


def test_demo_refuses_too_few_steps() -> None:
    result = guardian("demo", "--steps", "0")
    assert result.returncode == 2
    assert "--steps" in result.stderr and "at least 200" in result.stderr and "Traceback" not in result.stderr


@needs_fixtures
def test_replay_sums_each_log_up_and_stops_listing_at_the_stop() -> None:
    stopped = REAL_LOGS / "ANDA-Researchers__MCFED_DRL__trainer_state.json"
    quiet = REAL_LOGS / "Dheena731__tinyLlama-finetune__trainer_state.json"
    result = guardian("replay", str(stopped), str(quiet))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    summary = lines[1].strip()
    assert summary.startswith("2815 logged steps (last step 2815), 12 decisions"), summary
    assert "12 decisions; first at step" in summary and "would have stopped at step 1400" in summary
    listed = [int(line.split()[1]) for line in lines if line.startswith("  step ")]
    assert listed and max(listed) == 1400  # nothing after the stop is listed as if the run had gone on
    assert any("a guarded run would have stopped at step 1400" in line and "11 later decisions" in line for line in lines)
    quiet_at = next(i for i, line in enumerate(lines) if "Dheena731" in line)
    assert lines[quiet_at + 1].strip().endswith(", 0 decisions")
    data = json.loads(guardian("replay", "--json", str(stopped)).stdout)["results"][0]
    assert (data["stopped_at_step"], data["decisions_after_stop"], len(data["decisions"])) == (1400, 11, 12)
