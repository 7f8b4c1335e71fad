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
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("guardian")


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
    """Collects one optimizer step's loss, gradient norm and token count; `read()` returns floats.

    Throughput (tokens and samples per second) is measured between consecutive `read()` calls, so it
    covers everything a step costs, data loading included.
    """

    def __init__(self, trainer: Any | None, *, reference: Any = None,
                 on_inputs: Callable[[Any], None] | None = None) -> None:
        self.reference = reference  # a ReferenceBatch offered each micro-batch until it has one
        self.on_inputs = on_inputs  # sees each micro-batch's inputs before its forward pass (SampleTracker.see)
        self._losses: list[torch.Tensor] = []
        self._tokens: list[torch.Tensor] = []
        self._samples = 0
        self._last_read: float | None = None
        self._grad_norm: Any = None
        self.wrapped = trainer is not None and hasattr(trainer, "_get_grad_norm")
        if self.wrapped:
            self._wrap(trainer)

    def _wrap(self, trainer: Any) -> None:
        training_step, get_grad_norm = trainer.training_step, trainer._get_grad_norm
        owner = getattr(training_step, "_guardian_probe", None)
        if isinstance(owner, list):  # wrapped by an earlier train() of this trainer: feed this probe now
            owner[0] = self
            return
        owner = [self]

        @functools.wraps(training_step)
        def step_and_keep_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
            probe = owner[0]
            inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
            probe._count(inputs)
            if probe.on_inputs is not None:
                probe._see(inputs)
            if probe.reference is not None and not probe.reference.ready:
                probe.reference.offer(inputs)
            loss = training_step(*args, **kwargs)
            probe._losses.append(loss)
            return loss

        @functools.wraps(get_grad_norm)
        def grad_norm_and_keep(*args: Any, **kwargs: Any) -> Any:
            norm = get_grad_norm(*args, **kwargs)
            owner[0]._grad_norm = norm
            return norm

        step_and_keep_loss._guardian_probe = owner  # type: ignore[attr-defined]
        trainer.training_step = step_and_keep_loss
        trainer._get_grad_norm = grad_norm_and_keep

    def _see(self, inputs: Any) -> None:
        try:
            self.on_inputs(inputs)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - Guardian must never break the step
            self.on_inputs = None
            log.exception("Guardian: the per-batch hook failed; it is off for the rest of this run")

    def _count(self, inputs: Any) -> None:
        if not isinstance(inputs, dict):
            return
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if isinstance(ids, torch.Tensor) and ids.dim() > 0:
            self._samples += int(ids.shape[0])
        if isinstance(mask, torch.Tensor):
            self._tokens.append(mask.sum())  # stays on the device: read with the loss, in one sync
        elif isinstance(ids, torch.Tensor):
            self._tokens.append(torch.tensor(ids.numel(), device=ids.device))

    def read(self, model: torch.nn.Module | None,
             reduce: Callable[[torch.Tensor, list[str]], torch.Tensor] | None = None) -> dict[str, float]:
        """This step's values (loss, grad_norm, throughput) as floats; clears them for the next step.

        `reduce` may combine the stacked device tensor across ranks before the one host sync."""
        values: list[torch.Tensor] = []
        names: list[str] = []
        if self._tokens:
            values.append(torch.stack([t.float().reshape(()) for t in self._tokens]).sum())
            names.append("tokens")
        if self._losses:
            values.append(torch.stack([loss.float().reshape(()) for loss in self._losses]).sum())
            names.append("loss")
        norm = self._grad_norm if self.wrapped else _grad_norm(model)
        if isinstance(norm, torch.Tensor):
            values.append(norm.detach().float().reshape(()).to(values[0].device if values else norm.device))
            names.append("grad_norm")
        if values:
            device = values[-1].device
            values.append(torch.tensor(float(self._samples), device=device))
            names.append("samples")
            stacked = torch.stack([v.to(device) for v in values])
            if reduce is not None:
                stacked = reduce(stacked, names)
            out = dict(zip(names, stacked.tolist()))
        else:
            out = {}
        if norm is not None and not isinstance(norm, torch.Tensor):
            out["grad_norm"] = float(norm)
        self._throughput(out)
        self._losses.clear()
        self._tokens.clear()
        self._samples = 0
        self._grad_norm = None
        return out

    def _throughput(self, out: dict[str, float]) -> None:
        now = time.perf_counter()
        tokens, samples = out.pop("tokens", None), out.pop("samples", None)
        if self._last_read is not None and now > self._last_read:
            seconds = now - self._last_read
            if tokens is not None:
                out["tokens_per_second"] = tokens / seconds
            if samples:
                out["samples_per_second"] = samples / seconds
        self._last_read = now


def _grad_norm(model: torch.nn.Module | None) -> torch.Tensor | None:
    if model is None:
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
