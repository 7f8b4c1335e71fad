"""benchmarks/gpu_check.py, the one-shot GPU check, run for real as a subprocess on the CPU so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repopaths import REPO_ROOT

REPO = REPO_ROOT
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=str(REPO))
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_the_cpu_quick_run_passes_every_check_the_cpu_can_run(tmp_path: Path) -> None:
    proc, data = run_check(tmp_path, "--device", "cpu", "--quick")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = {c["check"]: c for c in data["checks"]}
    assert {k: c["status"] for k, c in checks.items()} == {
        "overhead": "pass", "recovery-fp32": "pass", "recovery-fp16": "pass", "nvml": "skip", "ddp": "pass"}
    assert checks["nvml"]["summary"] == "no NVML/GPU: skipped"
    ratio = checks["overhead"]["figures"]["paired_step_ratio"]
    assert isinstance(ratio, float) and ratio > 0
    assert "GradScaler" in checks["recovery-fp16"]["figures"]["skip"]["grad_scaler"]
    assert checks["recovery-fp16"]["figures"]["rollback"]["counts"]["lr_cuts"] == 1
    assert checks["ddp"]["figures"]["backend"] == "gloo"
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | " in table for name in checks)
    assert all(name in proc.stdout for name in checks)  # the printed table


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_each_failing_check_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    proc, data = run_check(tmp_path, "--device", "cuda", "--quick")
    assert proc.returncode == 1 and data["passed"] is False
    names = [c["check"] for c in data["checks"]]
    assert names == ["overhead", "recovery-bf16", "recovery-fp16", "nvml", "ddp"]
    assert all(c["status"] == "fail" and "sees no CUDA device" in c["summary"] for c in data["checks"])
    assert "FAILED" in proc.stdout


def test_the_device_command_in_the_docstring_fits_the_run_tool_and_matches_the_readme() -> None:
    lines = [line.strip() for line in SCRIPT.read_text().splitlines() if line.strip().startswith("set -o pipefail")]
    assert len(lines) == 1
    command = lines[0]
    assert len(command) < 2000
    assert "benchmarks/gpu_check.py --device cuda" in command and "$OUT/" in command
    assert f"`{command}`" in (REPO / "benchmarks" / "README.md").read_text()
