"""Rules watching a metric nothing logs never fire: `guardian rules check` warns, with a "did you mean"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from guardian.engine.metricnames import closest, is_known
from guardian.rulefile.reader import load_rules, parse_rules, shipped_rules_path

GUARDIAN = [sys.executable, "-m", "guardian.cli"]
TYPOS = """\
version: 1
rules:
  - name: spike
    metric: los
    detector: {kind: threshold, above: 3}
    actions: [alert]
  - name: nan
    metrics: [loss, gradnorm]
    detector: {kind: non_finite}
    actions: [alert]
  - name: vs_lr
    metric: loss
    detector: {kind: warmup_rise, lr_metric: learning_rat}
    actions: [alert]
  - name: mine
    metric: my_reward_model_score
    detector: {kind: threshold, below: 0.1}
    actions: [alert]
  - name: known
    metric: rewards/margins
    detector: {kind: threshold, below: -1}
    actions: [alert]
  - name: evals
    metric: eval_rewards/accuracies
    detector: {kind: threshold, below: 0.1}
    actions: [alert]
"""


def guardian(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARDIAN, *args], capture_output=True, text=True, env={"COLUMNS": "300", "PATH": ""})


def test_unknown_metric_names_are_warned_about_with_file_line_rule_and_a_guess(tmp_path: Path) -> None:
    path = tmp_path / "typos.yaml"
    path.write_text(TYPOS)
    result = guardian("rules", "check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr  # warnings, not errors: custom metrics exist
    out = " ".join(result.stdout.split())
    assert f"{path}:4: rule 'spike': metric 'los' is not a name" in out and "did you mean 'loss'?" in out
    assert f"{path}:8: rule 'nan': metric 'gradnorm'" in out and "did you mean 'grad_norm'?" in out
    assert f"{path}:13: rule 'vs_lr': metric 'learning_rat'" in out and "did you mean 'learning_rate'?" in out
    assert f"{path}:16: rule 'mine': metric 'my_reward_model_score'" in out and "ignore this warning" in out
    assert "rewards/margins" not in out and "eval_rewards" not in out  # TRL's keys and eval_* are known
    assert "6 rules OK, 4 warnings" in out
    assert "Traceback" not in result.stdout + result.stderr


def test_strict_makes_warnings_fail_and_json_lists_them(tmp_path: Path) -> None:
    path = tmp_path / "typos.yaml"
    path.write_text(TYPOS)
    assert guardian("rules", "check", "--strict", str(path)).returncode == 1
    report = json.loads(guardian("rules", "check", "--json", str(path)).stdout)
    assert report["ok"] is True and len(report["files"][0]["warnings"]) == 4
    strict = json.loads(guardian("rules", "check", "--json", "--strict", str(path)).stdout)
    assert strict["ok"] is False


def test_the_shipped_rule_files_watch_only_known_names() -> None:
    for name in ("default.yaml", "preference.yaml", "rl.yaml"):
        assert load_rules(shipped_rules_path(name)).warnings == (), name
    assert guardian("rules", "check", "--strict", str(shipped_rules_path("preference.yaml"))).returncode == 0


def test_known_names_cover_hf_trl_guardian_and_the_daemon() -> None:
    for name in ("loss", "grad_norm", "learning_rate", "epoch", "eval_loss", "eval_my_metric", "scheduled_lr",
                 "probe_loss", "probe_loss_ref", "seconds_since_report", "rewards/accuracies", "rewards/chosen",
                 "kl", "reward_std", "frac_reward_zero_std", "rewards/sum_reward/mean", "completions/mean_length",
                 "objective/kl"):
        assert is_known(name), name
    assert not is_known("los") and closest("los") == "loss"
    assert closest("rewards/margin") == "rewards/margins"
    assert parse_rules(TYPOS).warnings[0].line == 4
