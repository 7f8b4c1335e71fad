"""In-memory snapshots of what training changes: trainable weights, optimizer and scheduler state.

For LoRA/QLoRA runs the trainable part is small, so a ring of snapshots in host memory makes a rollback
take milliseconds, with no checkpoint on disk.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from guardian.callbacks.lr import unwrap_scheduler


@dataclass
class Snapshot:
    """The trainable state of a run after the update of `step`."""

    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    lr_scale: float
    probe_loss: float | None = None  # the reference batch's loss with these weights, when measured

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params.values())


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trainable_nbytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in trainable_parameters(model).values())


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one host sync)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _to_host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    return copy.deepcopy(value)


def capture(step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any, lr_scale: float) -> Snapshot:
    """Copy the trainable state to host memory."""
    params = {name: p.detach().to("cpu", copy=True) for name, p in trainable_parameters(model).items()}
    sched = unwrap_scheduler(scheduler).state_dict() if scheduler is not None else None
    return Snapshot(step, params, _to_host(optimizer.state_dict()), copy.deepcopy(sched), lr_scale)


def restore(snapshot: Snapshot, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Put the snapshot's weights, optimizer and scheduler state back, in place (None: leave that part)."""
    params = trainable_parameters(model)
    missing = set(snapshot.params) ^ set(params)
    if missing:
        raise RuntimeError(f"snapshot does not match the model's trainable parameters: {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(snapshot.params[name])
    if optimizer is not None:
        optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
    if scheduler is not None and snapshot.scheduler is not None:
        unwrap_scheduler(scheduler).load_state_dict(copy.deepcopy(snapshot.scheduler))


class SnapshotRing:
    """The newest `capacity` snapshots, and the run's first one (kept for good: the state to go back to when
    the trouble began before every newer snapshot, such as a peak learning rate that was wrong from the start)."""

    def __init__(self, capacity: int) -> None:
        self._ring: deque[Snapshot] = deque(maxlen=capacity)
        self._first: Snapshot | None = None

    def add(self, snapshot: Snapshot) -> None:
        if self._first is None:
            self._first = snapshot
            return
        self._ring.append(snapshot)

    def newest_before(self, step: int) -> Snapshot | None:
        return next((s for s in reversed(self.all()) if s.step < step), None)

    def drop_from(self, step: int) -> None:
        """Forget snapshots taken at `step` or later (suspect after an anomaly that began before them)."""
        kept = [s for s in self._ring if s.step < step]
        self._ring.clear()
        self._ring.extend(kept)
        if self._first is not None and self._first.step >= step:
            self._first = None

    def steps(self) -> list[int]:
        return [s.step for s in self.all()]

    def all(self) -> list[Snapshot]:
        """The snapshots, oldest first."""
        return ([self._first] if self._first is not None else []) + list(self._ring)

    def __len__(self) -> int:
        return len(self.all())
