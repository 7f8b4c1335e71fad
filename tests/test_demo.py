"""The README's first command: Guardian rescues the faulted run, and the faults really ruin it unguarded."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from rich.console import Console

from guardian.demo import demo_faults, run_demo, train_once


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_demo_rescues_the_faulted_run(tmp_path: Path) -> None:
    out = io.StringIO()
    rescued = run_demo(tmp_path, steps=400, console=Console(file=out, width=120))
    text = out.getvalue()
    assert rescued, text
    assert "Rescued:" in text
    assert "diverged (NaN)" in text
    assert (tmp_path / "guarded" / "guardian" / "events.jsonl").is_file()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_each_demo_fault_is_caught_at_its_step(tmp_path: Path) -> None:
    faults = demo_faults(200)
    result = train_once("guarded", tmp_path, 200, 0, faults, guarded=True)
    acted = [line.split(":")[0] for line in result.actions]
    poison, blowup, nan = faults
    expected = [f"step {s}" for f in (poison, blowup, nan) for s in range(f.start_step, f.start_step + f.steps)]
    assert acted == expected
    assert math.isfinite(result.eval_loss)
