"""A learning-rate cut must survive the scheduler: factor x the original schedule at every later step."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from guardian.callbacks.lr import scale_lr

TOTAL, WARMUP, CUT_AT = 60, 10, 25


def _optimizer(group_lrs: list[float]) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in group_lrs]
    return torch.optim.AdamW(groups)


def _schedule(kind: str, group_lrs: list[float], cuts: dict[int, float], min_lr: float = 0.0) -> list[list[float]]:
    """The rates of every group at every step, with cuts applied at the given steps."""
    optimizer = _optimizer(group_lrs)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=WARMUP, num_training_steps=TOTAL)
    rates = []
    for step in range(TOTAL):
        if step in cuts:
            scale_lr(optimizer, scheduler, cuts[step], min_lr)
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


LORA_PLUS = [2e-4, 2e-4 * 16]  # LoRA+: B matrices at 16x the rate of A matrices


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup"])
@pytest.mark.parametrize("group_lrs", [[1e-3], LORA_PLUS], ids=["one group", "LoRA+ groups"])
def test_cut_is_factor_times_the_original_schedule_at_every_later_step(kind: str, group_lrs: list[float]) -> None:
    original = _schedule(kind, group_lrs, {})
    cut = _schedule(kind, group_lrs, {CUT_AT: 0.5})
    assert cut[:CUT_AT] == original[:CUT_AT]
    for step in range(CUT_AT, TOTAL):
        assert cut[step] == pytest.approx([0.5 * lr for lr in original[step]], rel=1e-12, abs=0), step


def test_cuts_compound() -> None:
    original = _schedule("cosine", LORA_PLUS, {})
    twice = _schedule("cosine", LORA_PLUS, {20: 0.5, 30: 0.5})
    for step in range(30, TOTAL):
        assert twice[step] == pytest.approx([0.25 * lr for lr in original[step]], rel=1e-12, abs=0)


def test_min_lr_limits_the_cut() -> None:
    optimizer = _optimizer([1e-3])
    scheduler = get_scheduler("constant", optimizer)
    assert scale_lr(optimizer, scheduler, 0.1, min_lr=4e-4) == pytest.approx(0.4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-4)
    assert scale_lr(optimizer, scheduler, 0.5, min_lr=4e-4) == 1.0  # already at the floor: no cut
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-4)


def test_cut_survives_a_save_and_resume_of_the_scheduler() -> None:
    optimizer = _optimizer(LORA_PLUS)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=WARMUP, num_training_steps=TOTAL)
    for _ in range(CUT_AT):
        optimizer.step()
        scheduler.step()
    scale_lr(optimizer, scheduler, 0.5)
    saved_opt, saved_sched = optimizer.state_dict(), scheduler.state_dict()

    resumed_opt = _optimizer(LORA_PLUS)
    resumed_opt.load_state_dict(saved_opt)
    resumed = get_scheduler("linear", resumed_opt, num_warmup_steps=WARMUP, num_training_steps=TOTAL)
    resumed.load_state_dict(saved_sched)
    original = _schedule("linear", LORA_PLUS, {})
    for step in range(CUT_AT + 1, TOTAL):
        resumed_opt.step()
        resumed.step()
        rates = [g["lr"] for g in resumed_opt.param_groups]
        assert rates == pytest.approx([0.5 * lr for lr in original[step]], rel=1e-12, abs=0)


def test_bad_factor_is_refused() -> None:
    with pytest.raises(ValueError, match="factor must be in"):
        scale_lr(_optimizer([1e-3]), None, 1.5)
