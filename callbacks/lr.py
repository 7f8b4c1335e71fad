"""Learning-rate cuts that survive the scheduler.

Writing `param_groups[i]["lr"]` alone is undone by the next `LambdaLR.step()`, which recomputes every rate
as `base_lrs[i] * lr_lambda(step)`. Scaling `base_lrs` as well makes the cut part of the schedule itself:
every later step gets `factor x` the original schedule, each parameter group keeps its own ratio (LoRA+),
and the cut is saved in `scheduler.pt` with the checkpoint, so it survives a resume too.
"""

from __future__ import annotations

from typing import Any


def unwrap_scheduler(scheduler: Any) -> Any:
    """The torch scheduler inside accelerate's wrapper, if wrapped."""
    return getattr(scheduler, "scheduler", scheduler)


def current_lr(optimizer: Any) -> float:
    return float(optimizer.param_groups[0]["lr"])


def scheduled_lrs(scheduler: Any | None, optimizer: Any) -> list[float] | None:
    """The rate of every parameter group as the scheduler last set it (with Guardian's cuts), or None when
    there is no scheduler that says (a custom loop, or a scheduler without `get_last_lr`)."""
    inner: Any = unwrap_scheduler(scheduler) if scheduler is not None else None
    last = getattr(inner, "_last_lr", None)
    if not isinstance(last, (list, tuple)) or len(last) != len(optimizer.param_groups):
        return None
    try:
        return [float(rate) for rate in last]
    except (TypeError, ValueError):
        return None


def scale_lr(optimizer: Any, scheduler: Any | None, factor: float, min_lr: float = 0.0) -> float:
    """Multiply every group's rate and its schedule by `factor`, never taking group 0 below `min_lr`.

    Returns the factor actually applied (1.0 when the rate is already at or below `min_lr`).
    """
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"factor must be in (0, 1], got {factor}")
    lr = current_lr(optimizer)
    if min_lr > 0.0 and lr > 0.0:
        factor = max(factor, min(1.0, min_lr / lr))
    if factor >= 1.0:
        return 1.0
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    inner: Any = unwrap_scheduler(scheduler) if scheduler is not None else None
    if getattr(inner, "base_lrs", None) is not None:
        inner.base_lrs = [base * factor for base in inner.base_lrs]
    if getattr(inner, "_last_lr", None) is not None:
        inner._last_lr = [group["lr"] for group in optimizer.param_groups]
    return factor
