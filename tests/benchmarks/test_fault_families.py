"""One real TRL `SFTTrainer` + LoRA run per fault family of the independent suite (benchmarks/faults/), with the
suite's own injectors: what Guardian does about it, and that the guarded run ends no worse than the same run
left alone (for the ruinous faults: far better)."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import Any

import pytest
from repopaths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "faults"))
import runner
from scenarios import Scenario

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]  # one torch thread (tests/conftest.py)

BASE = Scenario(id="family-test", family="healthy_noisy", trainer="sft", learning_rate=4e-3, max_steps=90,
                batch_size=8, grad_accum=1, max_grad_norm=1.0, warmup_steps=6, eval_steps=30, eval_size=32,
                eval_resample=False, train_size=1200, data_noise=0.05, data_seed=11)


def scenario(family: str, fault: str = "none", **changes: Any) -> Scenario:
    params = changes.pop("params", {})
    return replace(BASE, id=f"{family}-test", family=family, fault=fault, fault_params=tuple(params.items()),
                   **changes)


def acted(record: runner.RunRecord) -> dict[str, int]:
    """What Guardian carried out: kind -> count."""
    assert record.guardian is not None
    counts: dict[str, int] = {}
    for item in record.guardian["interventions"]:
        done = {"skip": bool(item.get("skipped_update")), "rollback": "rollback_to_step" in item,
                "lr_cut": isinstance(item.get("lr_factor"), float) and item["lr_factor"] < 1.0,
                "restore_lr": bool(item.get("lr_restored")), "stop": bool(item.get("stopped"))}
        for kind in (k for k, v in done.items() if v):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def guarded_and_unguarded(s: Scenario) -> tuple[runner.RunRecord, runner.RunRecord]:
    guarded = runner.run_unit(s, 0, "guardian")
    unguarded = runner.run_unit(s, 0, "unguarded")
    assert guarded.error is None and unguarded.error is None, (guarded.error, unguarded.error)
    return guarded, unguarded


def no_worse(guarded: runner.RunRecord, unguarded: runner.RunRecord, tolerance: float = 0.02) -> None:
    g, u = guarded.final_test_loss, unguarded.final_test_loss
    assert math.isfinite(g)
    assert not math.isfinite(u) or g <= u * (1 + tolerance), (g, u)


def test_bad_stretch_costs_skips_only() -> None:
    guarded, unguarded = guarded_and_unguarded(scenario("bad_stretch", "bad_stretch", params={"start": 40, "steps": 20}))
    done = acted(guarded)
    assert done.get("skip", 0) >= 15 and "rollback" not in done and "stop" not in done and "lr_cut" not in done
    assert guarded.steps_completed == BASE.max_steps
    no_worse(guarded, unguarded)


def test_weight_corruption_is_rolled_back_once() -> None:
    s = scenario("weight_corruption", "weight_corruption", params={
        "step": 45, "kind": "inf", "value": math.inf, "param_index": 7, "pattern": "entries", "entries": 2, "seed": 3})
    guarded, unguarded = guarded_and_unguarded(s)
    assert acted(guarded).get("rollback") == 1
    assert not math.isfinite(unguarded.final_test_loss)
    no_worse(guarded, unguarded)


def test_a_nan_micro_batch_under_accumulation_is_skipped() -> None:
    s = scenario("nan_microbatch", "nan_microbatch", grad_accum=2, params={"step": 40, "micro_index": 1})
    guarded, unguarded = guarded_and_unguarded(s)
    assert acted(guarded) == {"skip": 1}
    assert not math.isfinite(unguarded.final_test_loss)
    no_worse(guarded, unguarded)


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_a_gradient_spike_is_skipped_only_without_clipping(clip: float) -> None:
    s = scenario("grad_spike", "grad_spike", max_grad_norm=clip, params={"start": 50, "steps": 2, "factor": 1000.0})
    guarded, unguarded = guarded_and_unguarded(s)
    done = acted(guarded)
    assert done == ({} if clip else {"skip": 2}), done  # clipped: already bounded, an alert only
    no_worse(guarded, unguarded)


@pytest.mark.parametrize(("fault", "params"), [
    ("lr_jump_once", {"step": 45, "factor": 60.0}),
    ("lr_forced", {"start": 45, "factor": 40.0}),
])
def test_a_rate_off_its_schedule_is_put_back(fault: str, params: dict[str, Any]) -> None:
    guarded, unguarded = guarded_and_unguarded(scenario(fault, fault, params=params))
    done = acted(guarded)
    expected = 1 if fault == "lr_jump_once" else BASE.max_steps - params["start"] + 1
    assert done == {"restore_lr": expected}, done
    no_worse(guarded, unguarded)


def test_a_rate_far_too_high_from_the_start_is_cut_once() -> None:
    s = scenario("lr_too_high", "lr_too_high", max_steps=120, params={"multiplier": 25.0})
    guarded, unguarded = guarded_and_unguarded(s)
    done = acted(guarded)
    assert done.get("rollback") == 1 and done.get("lr_cut") == 1 and "stop" not in done, done
    assert guarded.final_test_loss < unguarded.final_test_loss * 0.9


def test_a_stretch_of_masked_labels_is_skipped() -> None:
    s = scenario("masked_labels", "masked_labels", params={"start": 40, "steps": 10})
    guarded, unguarded = guarded_and_unguarded(s)
    done = acted(guarded)
    assert "rollback" not in done and "stop" not in done and "lr_cut" not in done
    no_worse(guarded, unguarded)


def test_overfitting_with_noisy_evaluation_stops_with_the_best_weights() -> None:
    s = scenario("overfit_noisy_eval", max_steps=160, train_size=24, eval_steps=10, eval_size=12)
    guarded = runner.run_unit(s, 0, "guardian")
    unguarded = runner.run_unit(s, 0, "unguarded")
    best = min(loss for _, loss in unguarded.test_at_eval)
    assert guarded.final_test_loss <= unguarded.final_test_loss
    assert guarded.final_test_loss <= best * 1.05 or not acted(guarded)


@pytest.mark.parametrize("family, changes", [
    ("healthy_noisy", {"batch_size": 3, "eval_size": 8, "eval_steps": 10}),
    ("healthy_large_grad", {"max_grad_norm": 0.0, "loss_scale": 3e4}),
    ("healthy_noisy_eval", {"eval_size": 6, "eval_steps": 10, "eval_resample": True}),
])
def test_a_healthy_run_is_left_alone(family: str, changes: dict[str, Any]) -> None:
    record = runner.run_unit(scenario(family, **changes), 0, "guardian")
    assert record.error is None
    assert acted(record) == {}, record.guardian["decisions"] if record.guardian else None
    assert record.steps_completed == BASE.max_steps
