"""The suite's fault mechanisms: each its own small class, none shared with Guardian's own fault injector.

Every injector has `attach(trainer)`, called once after the trainer is built and before `train()`, and
`report()`, a JSON-able record of what it actually did (which steps, which weight, what loss came out).
Steps are optimizer steps counted from 1, as `state.global_step + 1` during the step.

- `BadStretch`      batches of steps [start, start+steps) replaced by random tokens (labels = the tokens)
- `MaskedLabels`    every label of steps [start, start+steps) set to -100 (steps=None: the whole run)
- `WeightCorruption` at the end of step `step`, inf / NaN / a huge value written into one LoRA weight
- `NanMicrobatch`   micro-batch `micro_index` of step `step`: the embedding output multiplied by NaN
- `GradSpike`       gradients multiplied by `factor` during the backward passes of `steps` steps
- `LrJumpOnce`      the learning rate multiplied by `factor` for step `step` only
- `LrForced`        from step `start` on, each step's rate is the scheduled rate x `factor`

The two collator faults wrap `trainer.data_collator` for the training dataloader only (the evaluation
dataloader keeps the original), and map each collator call to its optimizer step from the dataloader's
length, the gradient accumulation and the epoch boundaries (Trainer's last step of an epoch takes the
remaining batches). They need `dataloader_num_workers=0`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback


def optimizer_step_of_batch(batch_index: int, *, batches_per_epoch: int, accumulation: int) -> int:
    """The optimizer step (from 1) that consumes training batch `batch_index` (from 0)."""
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    epoch, within = divmod(batch_index, batches_per_epoch)
    return epoch * steps_per_epoch + within // accumulation + 1


class _TrainCollatorFault:
    """Wraps the training dataloader's collator; `corrupt(batch)` changes the batches of chosen steps."""

    def __init__(self, start: int, steps: int | None) -> None:
        self.start, self.steps = start, steps
        self.calls = 0
        self.batches_per_epoch = 0
        self.accumulation = 1
        self.corrupted: list[int] = []  # optimizer step of each corrupted micro-batch

    def active(self, step: int) -> bool:
        return step >= self.start and (self.steps is None or step < self.start + self.steps)

    def attach(self, trainer: Any) -> None:
        original_get = trainer.get_train_dataloader
        self.accumulation = trainer.args.gradient_accumulation_steps

        def get_train_dataloader() -> Any:
            inner = trainer.data_collator
            trainer.data_collator = self._wrap(inner)
            try:
                loader = original_get()
            finally:
                trainer.data_collator = inner
            self.batches_per_epoch = len(loader)
            return loader

        trainer.get_train_dataloader = get_train_dataloader

    def _wrap(self, inner: Callable[[list[Any]], dict[str, Any]]) -> Callable[[list[Any]], dict[str, Any]]:
        def collate(features: list[Any]) -> dict[str, Any]:
            batch = inner(features)
            step = optimizer_step_of_batch(self.calls, batches_per_epoch=max(1, self.batches_per_epoch),
                                           accumulation=self.accumulation)
            self.calls += 1
            if self.active(step):
                self.corrupted.append(step)
                batch = self.corrupt(batch)
            return batch

        return collate

    def corrupt(self, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class BadStretch(_TrainCollatorFault):
    """Garbage batches for `steps` optimizer steps from `start`: random tokens, trained on as their own labels."""

    def __init__(self, start: int, steps: int, *, low_id: int, high_id: int, seed: int) -> None:
        super().__init__(start, steps)
        self.low_id, self.high_id = low_id, high_id
        self.generator = torch.Generator().manual_seed(seed)  # never the global RNG: data order stays the same

    def corrupt(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids = batch["input_ids"]
        garbage = torch.randint(self.low_id, self.high_id, ids.shape, generator=self.generator, dtype=ids.dtype)
        out = dict(batch)
        out["input_ids"] = garbage
        out["attention_mask"] = torch.ones_like(garbage)
        out["labels"] = garbage.clone()
        return out

    def report(self) -> dict[str, Any]:
        return {"start": self.start, "steps": self.steps, "corrupted_steps": sorted(set(self.corrupted)),
                "corrupted_microbatches": len(self.corrupted)}


class MaskedLabels(_TrainCollatorFault, TrainerCallback):
    """Every label -100 for `steps` optimizer steps from `start` (steps=None: from `start` to the end).

    Also records the logged loss of those steps (needs logging_steps=1): whether it came out 0 or NaN."""

    def __init__(self, start: int, steps: int | None) -> None:
        super().__init__(start, steps)
        self.losses: dict[int, float] = {}

    def attach(self, trainer: Any) -> None:
        super().attach(trainer)
        trainer.add_callback(self)

    def corrupt(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        out["labels"] = torch.full_like(batch["labels"], -100)
        return out

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs and self.active(state.global_step):
            self.losses[state.global_step] = float(logs["loss"])

    def report(self) -> dict[str, Any]:
        kinds = {"nan" if math.isnan(v) else "zero" if v == 0 else "inf" if math.isinf(v) else "finite"
                 for v in self.losses.values()}
        return {"start": self.start, "steps": self.steps, "masked_steps": len(self.losses),
                "masked_loss": "/".join(sorted(kinds)) or "none"}


class WeightCorruption(TrainerCallback):
    """At the end of optimizer step `step`, writes `value` into a few entries (or a whole row) of one LoRA weight."""

    def __init__(self, step: int, *, param_index: int, value: float, pattern: str, entries: int, seed: int) -> None:
        self.step, self.param_index, self.value = step, param_index, value
        self.pattern, self.entries, self.seed = pattern, entries, seed
        self.done: dict[str, Any] = {}

    def attach(self, trainer: Any) -> None:
        trainer.add_callback(self)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step != self.step or self.done:
            return
        names = sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        name = names[self.param_index % len(names)]
        weight = dict(model.named_parameters())[name]
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            if self.pattern == "row":
                row = int(torch.randint(weight.shape[0], (1,), generator=generator))
                weight[row, :] = self.value
                where: list[Any] = [row]
            else:
                flat = torch.randperm(weight.numel(), generator=generator)[: self.entries]
                weight.view(-1)[flat] = self.value
                where = flat.tolist()
        self.done = {"param": name, "pattern": self.pattern, "where": where, "value": self.value,
                     "at_step": state.global_step}

    def report(self) -> dict[str, Any]:
        return dict(self.done) or {"at_step": None}


class NanMicrobatch(TrainerCallback):
    """The embedding output of micro-batch `micro_index` of step `step` is multiplied by NaN (training forwards only)."""

    def __init__(self, step: int, micro_index: int) -> None:
        self.step, self.micro_index = step, micro_index
        self.current_step = 0
        self.micro = 0
        self.hits: list[tuple[int, int]] = []
        self.forward_calls = 0

    def attach(self, trainer: Any) -> None:
        trainer.add_callback(self)
        trainer.model.get_input_embeddings().register_forward_hook(self._hook)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.current_step, self.micro = state.global_step + 1, 0

    def _hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        self.forward_calls += 1
        micro, self.micro = self.micro, self.micro + 1
        if self.current_step == self.step and micro == self.micro_index:
            self.hits.append((self.current_step, micro))
            return output * float("nan")
        return None

    def report(self) -> dict[str, Any]:
        return {"step": self.step, "micro_index": self.micro_index, "hits": self.hits}


class GradSpike(TrainerCallback):
    """Gradients of every trainable parameter multiplied by `factor` in the backward passes of steps
    [start, start+steps), through tensor hooks, so clipping (when on) and the pre-clip norm see them."""

    def __init__(self, start: int, steps: int, factor: float) -> None:
        self.start, self.steps, self.factor = start, steps, factor
        self.armed = False
        self.spiked: list[int] = []

    def attach(self, trainer: Any) -> None:
        trainer.add_callback(self)
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.register_hook(self._scale)

    def _scale(self, grad: torch.Tensor) -> torch.Tensor | None:
        return grad * self.factor if self.armed else None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step + 1
        self.armed = self.start <= step < self.start + self.steps
        if self.armed:
            self.spiked.append(step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.armed = False

    def report(self) -> dict[str, Any]:
        return {"start": self.start, "steps": self.steps, "factor": self.factor, "spiked_steps": self.spiked}


class LrJumpOnce(TrainerCallback):
    """The learning rate of every parameter group multiplied by `factor` for optimizer step `step` only."""

    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor = step, factor
        self.saved: list[float] | None = None
        self.applied: list[float] = []

    def attach(self, trainer: Any) -> None:
        trainer.add_callback(self)

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if state.global_step + 1 != self.step:
            return
        self.saved = [g["lr"] for g in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] *= self.factor
        self.applied = [g["lr"] for g in optimizer.param_groups]

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if self.saved is not None:  # back to the scheduled rate before the scheduler moves on
            for group, lr in zip(optimizer.param_groups, self.saved):
                group["lr"] = lr
            self.saved = None

    def report(self) -> dict[str, Any]:
        return {"step": self.step, "factor": self.factor, "applied_lr": self.applied[:1]}


class LrForced(TrainerCallback):
    """From optimizer step `start` to the end, each step's rate is the scheduler's rate x `factor`, set again
    at every step after the previous `scheduler.step()` (a broken LR wrapper)."""

    def __init__(self, start: int, factor: float) -> None:
        self.start, self.factor = start, factor
        self.forced_steps = 0

    def attach(self, trainer: Any) -> None:
        trainer.add_callback(self)

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None,
                      **kwargs: Any) -> None:
        if state.global_step + 1 < self.start:
            return
        for group, scheduled in zip(optimizer.param_groups, lr_scheduler.get_last_lr()):
            group["lr"] = scheduled * self.factor
        self.forced_steps += 1

    def report(self) -> dict[str, Any]:
        return {"start": self.start, "factor": self.factor, "forced_steps": self.forced_steps}
