"""Per-step loss and gradient norm, read once per optimizer step with a single host sync.

Trainer computes both every step but hands neither to callbacks: the loss of each micro-batch is the
return value of `training_step`, and the pre-clip gradient norm the return value of `_get_grad_norm`.
The probe wraps those two methods on the trainer instance to keep the device tensors, and `read()` turns
them into floats with one `tolist()`. Trainer's logged loss is an average over `logging_steps` with
NaN steps filtered out (`logging_nan_inf_filter`), so it is no substitute.

Without a trainer (a custom loop), `read()` falls back to the gradient norm of the trainable parameters as
they are at `on_pre_optimizer_step` (after any clipping) and reports no loss.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


def find_trainer(max_depth: int = 12) -> Any | None:
    """The `transformers.Trainer` whose callback hook is running, found on the call stack."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


class StepProbe:
    """Collects one optimizer step's loss and gradient norm as tensors; `read()` returns floats."""

    def __init__(self, trainer: Any | None) -> None:
        self._losses: list[torch.Tensor] = []
        self._grad_norm: Any = None
        self.wrapped = trainer is not None and hasattr(trainer, "_get_grad_norm")
        if self.wrapped:
            self._wrap(trainer)

    def _wrap(self, trainer: Any) -> None:
        training_step, get_grad_norm = trainer.training_step, trainer._get_grad_norm
        if getattr(training_step, "_guardian_probe", False):
            return

        @functools.wraps(training_step)
        def step_and_keep_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = training_step(*args, **kwargs)
            self._losses.append(loss)
            return loss

        @functools.wraps(get_grad_norm)
        def grad_norm_and_keep(*args: Any, **kwargs: Any) -> Any:
            norm = get_grad_norm(*args, **kwargs)
            self._grad_norm = norm
            return norm

        step_and_keep_loss._guardian_probe = True  # type: ignore[attr-defined]
        trainer.training_step = step_and_keep_loss
        trainer._get_grad_norm = grad_norm_and_keep

    def read(self, model: torch.nn.Module | None) -> dict[str, float]:
        """This step's values (loss, grad_norm) as floats; clears them for the next step."""
        values: list[torch.Tensor] = []
        names: list[str] = []
        if self._losses:
            values.append(torch.stack([loss.float().reshape(()) for loss in self._losses]).sum())
            names.append("loss")
        norm = self._grad_norm if self.wrapped else _grad_norm(model)
        if isinstance(norm, torch.Tensor):
            values.append(norm.detach().float().reshape(()).to(values[0].device if values else norm.device))
            names.append("grad_norm")
        out = dict(zip(names, torch.stack(values).tolist())) if values else {}
        if norm is not None and not isinstance(norm, torch.Tensor):
            out["grad_norm"] = float(norm)
        self._losses.clear()
        self._grad_norm = None
        return out


def _grad_norm(model: torch.nn.Module | None) -> torch.Tensor | None:
    if model is None:
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
