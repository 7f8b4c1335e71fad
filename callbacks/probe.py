"""Per-step loss and gradient norm, read once per optimizer step with a single host sync.

Trainer computes both every step but hands neither to callbacks: the loss of each micro-batch is the
return value of `training_step`, and the pre-clip gradient norm the return value of `_get_grad_norm`
(transformers 5) or of `accelerator.clip_grad_norm_` (transformers 4, which has no `_get_grad_norm`; the
norm it returns is the one before clipping). The probe wraps those methods on the trainer (and, on 4.x, on
its accelerator) instance to keep the device tensors, and `read()` turns them into floats with one
`tolist()`. When 4.x does not clip (`max_grad_norm` 0 or None) there is no clip call to wrap: `read()` asks
the accelerator for the norm with no limit, as 5.x's `_get_grad_norm` does (gradients unscaled first under
fp16). Trainer's logged loss is an average over `logging_steps` with NaN steps filtered out
(`logging_nan_inf_filter`), so it is no substitute.

`reading_of(trainer)` says whether this can be done at all (`Reading.pre_update`) and, when not, why: no
Trainer found (a custom loop), a transformers without the hooks, DeepSpeed (whose update happens inside the
backward pass, before any callback hook). Then the probe wraps nothing, and the callback judges the values
Trainer logs, at log time.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Reading:
    """How this run's steps can be read: per optimizer step before its update, or only at log time.

    `grad_norm` names where the per-step gradient norm comes from: "_get_grad_norm" (transformers 5),
    "accelerator.clip_grad_norm_" (transformers 4 with clipping), "unclipped" (transformers 4 without
    clipping: measured at the pre-optimizer hook), or "logged" (Trainer's logs, at log time)."""

    pre_update: bool
    grad_norm: str
    why: str = ""  # when not pre_update: what stops the per-step reading

    def to_dict(self) -> dict[str, Any]:
        """For the run's `start` event."""
        return {"pre_update": self.pre_update, "grad_norm_from": self.grad_norm,
                **({"pre_update_why": self.why} if self.why else {})}

    def warning(self) -> str:
        """The one paragraph said at train begin when Guardian cannot act before the update."""
        return (f"Guardian cannot read each optimizer step before its update in this run: {self.why}. "
                "What still works: the rules judge the loss and gradient norm Trainer logs, when it logs them "
                "(averaged over logging_steps, NaN steps filtered out), and their alerts, learning-rate restores "
                "and cuts, rollbacks and stops are carried out then, after that step's update. What does not: "
                "no update is ever skipped (skip_update is not carried out), and a bad batch or a NaN reaches "
                "the weights before any rule sees it.")


def reading_of(trainer: Any | None) -> Reading:
    """Whether the probe can read per step before the update with this trainer, and from where."""
    from transformers import TrainerCallback

    if trainer is None:
        return Reading(False, "logged", "no transformers.Trainer was found on the call stack of the callback's "
                                        "hooks (a custom training loop, or a trainer that calls the callback "
                                        "from elsewhere)")
    if not callable(getattr(TrainerCallback, "on_pre_optimizer_step", None)) \
            or not callable(getattr(getattr(trainer, "callback_handler", None), "on_pre_optimizer_step", None)):
        return Reading(False, "logged", "this transformers has no on_pre_optimizer_step hook (it came in 4.41; "
                                        "install transformers>=4.46)")
    if getattr(trainer, "is_deepspeed_enabled", False):
        return Reading(False, "logged", "DeepSpeed makes the update inside the backward pass "
                                        "(accelerator.backward calls engine.step), before any callback hook runs")
    if not callable(getattr(trainer, "training_step", None)):
        return Reading(False, "logged", f"{type(trainer).__name__} has no training_step to read the loss from")
    if callable(getattr(trainer, "_get_grad_norm", None)):
        return Reading(True, "_get_grad_norm")
    if not _clips(trainer):
        return Reading(True, "unclipped")
    if callable(getattr(getattr(trainer, "accelerator", None), "clip_grad_norm_", None)):
        return Reading(True, "accelerator.clip_grad_norm_")
    return Reading(False, "logged", f"{type(trainer).__name__} clips gradients without accelerator.clip_grad_norm_, "
                                    "so the pre-clip norm cannot be read")


def _clips(trainer: Any) -> bool:
    clip = getattr(getattr(trainer, "args", None), "max_grad_norm", None)
    return isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0


class StepProbe:
    """Collects one optimizer step's loss, gradient norm and token count; `read()` returns floats.

    It wraps the trainer only where `reading_of(trainer).pre_update`; otherwise `wrapped` is False and the
    callback reads nothing per step. Throughput (tokens and samples per second) is measured between
    consecutive `read()` calls, so it covers everything a step costs, data loading included.
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
        self._trainer = trainer
        self.reading = reading_of(trainer)
        self.wrapped = self.reading.pre_update
        if self.wrapped:
            self._wrap(trainer)

    def _wrap(self, trainer: Any) -> None:
        self._wrap_training_step(trainer)
        if self.reading.grad_norm == "_get_grad_norm":
            trainer._get_grad_norm = self._keeping_norm(trainer._get_grad_norm)
        elif self.reading.grad_norm == "accelerator.clip_grad_norm_":
            trainer.accelerator.clip_grad_norm_ = self._keeping_norm(trainer.accelerator.clip_grad_norm_)

    def _wrap_training_step(self, trainer: Any) -> None:
        training_step = trainer.training_step
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

        step_and_keep_loss._guardian_probe = owner  # type: ignore[attr-defined]
        trainer.training_step = step_and_keep_loss

    def _keeping_norm(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """`method` (which returns the pre-clip norm), keeping what it returns for this probe. A method wrapped
        by an earlier train() of the same trainer is not wrapped again: it feeds this probe from now on."""
        owner = getattr(method, "_guardian_probe", None)
        if isinstance(owner, list):
            owner[0] = self
            return method
        owner = [self]

        @functools.wraps(method)
        def norm_and_keep(*args: Any, **kwargs: Any) -> Any:
            norm = method(*args, **kwargs)
            owner[0]._grad_norm = norm
            return norm

        norm_and_keep._guardian_probe = owner  # type: ignore[attr-defined]
        return norm_and_keep

    def _see(self, inputs: Any) -> None:
        try:
            self.on_inputs(inputs)  # type: ignore[misc]
        except Exception:
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
        norm = self._norm(model)
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

    def _norm(self, model: torch.nn.Module | None) -> Any:
        """This step's gradient norm before clipping: the one a wrapped method kept, or, where nothing clips,
        measured now (still before the update). Called only where the probe wraps the trainer."""
        if self.reading.grad_norm != "unclipped":
            return self._grad_norm
        accelerator = getattr(self._trainer, "accelerator", None)
        wrapped_model = getattr(self._trainer, "model_wrapped", None)
        wrapped_model = model if wrapped_model is None else wrapped_model
        if wrapped_model is None or not callable(getattr(accelerator, "clip_grad_norm_", None)):
            return _grad_norm(model)
        return accelerator.clip_grad_norm_(wrapped_model.parameters(), float("inf"))  # type: ignore[union-attr]

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
