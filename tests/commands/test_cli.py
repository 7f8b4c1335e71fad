"""The `guardian` command as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from realpaths import REAL_LOGS, needs_fixtures
from repopaths import REPO_ROOT

GUARDIAN = [sys.executable, "-m", "guardian.cli"]


def guardian(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARDIAN, *args], capture_output=True, text=True, cwd=cwd, env={"COLUMNS": "200", "PATH": ""})


def test_console_script_is_installed() -> None:
    exe = shutil.which("guardian", path=str(Path(sys.executable).parent))
    assert exe is not None
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.startswith("guardian ")


def test_rules_check_accepts_the_shipped_rules() -> None:
    result = guardian("rules", "check", str(REPO_ROOT / "rules" / "default.yaml"))
    assert result.returncode == 0
    assert "rules OK" in result.stdout


def test_rules_check_lists_every_problem_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\n"
        "rules:\n"
        "  - name: spike\n"
        "    metric: loss\n"
        "    detector: {kind: robust_zscore, z_treshold: 5}\n"
        "    actions: [skip]\n"
    )
    good = tmp_path / "good.yaml"
    good.write_text("version: 1\nrules:\n  - name: nan\n    metric: loss\n    detector: {kind: non_finite}\n"
                    "    actions: [skip_update]\n")
    result = guardian("rules", "check", str(good), str(bad))
    assert result.returncode == 1
    assert f"{good}: 1 rules OK" in result.stdout
    assert (f"{bad}:5: rule 'spike': detector 'robust_zscore' has no parameter 'z_treshold'; "
            "did you mean 'z_threshold'?") in result.stdout
    assert f"{bad}:6: rule 'spike': unknown action 'skip'" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_missing_rule_file_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    result = guardian("replay", "--rules", str(tmp_path / "nope.yaml"), str(tmp_path))
    assert result.returncode == 2
    assert "nope.yaml: cannot read the file" in result.stderr
    assert "Traceback" not in result.stderr


def test_replay_of_a_missing_log_is_a_clear_error(tmp_path: Path) -> None:
    result = guardian("replay", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "missing.json" in result.stderr and "Traceback" not in result.stderr


@needs_fixtures
def test_replay_prints_when_each_rule_would_have_fired() -> None:
    result = guardian("replay", str(REAL_LOGS / "Nicolassalvan__mti881-projet2__ResultsEtape3__trainer_state.json"),
                      str(REAL_LOGS / "Dheena731__tinyLlama-finetune__trainer_state.json"))
    assert result.returncode == 0, result.stderr
    assert "step   16800  overfitting" in result.stdout
    assert "stop(restore=best_eval)" in result.stdout
    assert "no rule would have fired" in result.stdout


def test_rules_show_lists_the_shipped_rules() -> None:
    result = guardian("rules", "show")
    assert result.returncode == 0
    for name in ("non_finite_loss", "loss_spike", "grad_explosion", "overfitting", "plateau", "vanishing_gradient"):
        assert name in result.stdout


def test_json_output_for_scripts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: x\n    metric: loss\n    detector: {kind: nope}\n    actions: [alert]\n")
    check = guardian("rules", "check", "--json", str(bad))
    assert check.returncode == 1
    (result,) = json.loads(check.stdout)["files"]
    assert result["ok"] is False and result["problems"][0].startswith(f"{bad}:5: rule 'x': unknown detector kind 'nope'")
    shown = json.loads(guardian("rules", "show", "--json").stdout)["rules"]
    spike = next(rule for rule in shown if rule["name"] == "loss_spike")
    assert spike["detector"]["kind"] == "robust_zscore" and spike["actions"] == [{"kind": "skip_update", "params": {}}]
    config = tmp_path / "training_args.json"
    config.write_text(json.dumps({"learning_rate": 0.05, "max_grad_norm": 0.0, "fp16": True}))
    advice = json.loads(guardian("doctor", "--json", str(config)).stdout)["advice"]
    assert {a["setting"] for a in advice} >= {"learning_rate", "max_grad_norm"}


@needs_fixtures
def test_replay_json_has_every_decision_in_strict_json() -> None:
    nan_log = REAL_LOGS / "MemaSp__FT-Llama2-HRChatbot__outputs__trainer_state.json"
    result = guardian("replay", "--json", str(nan_log))
    assert result.returncode == 0, result.stderr
    (replayed,) = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))["results"]
    assert replayed["rules_fired"] == {"non_finite_loss": 1} and replayed["observations"] == 70
    assert (replayed["decisions"][0]["step"], replayed["decisions"][0]["value"]) == (33, "inf")
