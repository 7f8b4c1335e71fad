"""One decision on every rank, at the same step.

Under DDP each rank sees its own micro-batches, so its loss differs; gradients and weights are the same
everywhere. Before deciding, the ranks all-reduce the step's values (one small collective on the tensors the
probe already holds, before the single host sync): the loss becomes the mean over ranks — NaN if any rank's
loss is NaN, so any rank's critical finding counts — and token counts are summed. Every rank then feeds the
same values to an identical engine and reaches identical decisions, with no further agreement needed.

Decisions that come from the daemon reach rank 0 only; rank 0 broadcasts the resulting plan, so all ranks
apply the same verdict or the same fallback, and no rank waits longer than rank 0's deadline.
"""

from __future__ import annotations

from typing import Any

import torch

from guardian.engine.actions import Plan, Restore

_RESTORES = list(Restore)
_PLAN_FIELDS = 9  # present, skip, rollback, lr_factor, min_lr, stop, restore, restore_lr, onset


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class RankSync:
    """Collectives for agreement; every method is a no-op in a single process."""

    def __init__(self) -> None:
        dist = _dist()
        self.world_size = dist.get_world_size() if dist else 1
        self.rank = dist.get_rank() if dist else 0
        self._dist = dist

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def reduce_step_values(self, stacked: torch.Tensor, names: list[str]) -> torch.Tensor:
        """All-reduce the probe's values: mean of losses and grad norms, sum of token counts."""
        if not self.active:
            return stacked
        out = stacked.clone()
        self._dist.all_reduce(out)
        for i, name in enumerate(names):
            if name not in ("tokens", "samples"):
                out[i] = out[i] / self.world_size
        return out

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over ranks (NaN if any rank's is NaN)."""
        if not self.active:
            return value
        out = value.clone()
        self._dist.all_reduce(out)
        return out / self.world_size

    def broadcast_plan(self, plan: Plan | None, onset: int, device: torch.device) -> tuple[Plan | None, int]:
        """Rank 0's plan (or None) and anomaly onset, on every rank."""
        if not self.active:
            return plan, onset
        data = torch.zeros(_PLAN_FIELDS, dtype=torch.float64, device=device)
        if self.rank == 0 and plan is not None:
            data[:] = torch.tensor([1, plan.skip_update, plan.rollback, plan.lr_factor, plan.min_lr, plan.stop,
                                    _RESTORES.index(plan.restore), plan.restore_lr, onset], dtype=torch.float64)
        self._dist.broadcast(data, src=0)
        values = data.tolist()
        if not values[0]:
            return None, onset
        plan = Plan(bool(values[1]), bool(values[2]), values[3], values[4], bool(values[5]), _RESTORES[int(values[6])],
                    bool(values[7]))
        return plan, int(values[8])
