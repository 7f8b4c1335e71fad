"""The README's first command: Guardian rescues the faulted run, and the faults really ruin it unguarded."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

from rich.console import Console

from guardian.commands.demo import action_lines, demo_faults, run_demo, train_once
from guardian.commands.report import load_run
from guardian.rulefile.reader import load_rules


def test_demo_rescues_the_faulted_run(tmp_path: Path) -> None:
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rescued = run_demo(tmp_path, steps=400, console=Console(file=out, width=80))
    text = out.getvalue()
    assert rescued, text
    assert "Rescued:" in text
    assert "diverged (NaN)" in text
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    # 80 columns: the first decision wraps with its indent, never back to column 0
    decision = text.split("The first decision, in full:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(decision) > 1 and all(line.startswith("  ") for line in decision), decision
    # a stretch of skips is one line, not one per step
    assert "steps 60-62: skipped each update (loss_spike)" in text
    assert "step 61:" not in text
    assert "guardianreport" + str(tmp_path / "guarded") in "".join(text.split())  # long paths wrap

    # every run leaves something `guardian report` reads
    rules = load_rules(None)
    guarded = load_run(tmp_path / "guarded", ruleset=rules)
    assert guarded.actions
    faulted = load_run(tmp_path / "faulted", ruleset=rules)
    assert faulted.replayed and faulted.decisions  # what Guardian would have done unguarded
    assert {d.rule for d in faulted.decisions} >= {"loss_spike", "non_finite_loss"}
    clean = load_run(tmp_path / "clean", ruleset=rules)
    assert clean.replayed and not clean.decisions and clean.last_step == 400


def test_each_demo_fault_is_caught_at_its_step(tmp_path: Path) -> None:
    faults = demo_faults(200)
    result = train_once("guarded", tmp_path, 200, 0, faults, guarded=True)
    acted = [line.split(":")[0] for line in result.actions]
    poison, blowup, nan = faults
    expected = [f"step {s}" for f in (poison, blowup, nan) for s in range(f.start_step, f.start_step + f.steps)]
    assert acted == expected
    assert math.isfinite(result.eval_loss)
    assert action_lines(result.outcomes) == [
        f"steps {poison.start_step}-{poison.start_step + 2}: skipped each update (loss_spike)",
        *[line for line in action_lines(result.outcomes) if "lr_blowup" in line],
        f"step {nan.start_step}: skipped this update (non_finite_loss)"]
    assert len([line for line in action_lines(result.outcomes) if "lr_blowup" in line]) == 1
