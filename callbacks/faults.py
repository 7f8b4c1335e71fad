"""Faults injected into a real training run, for the demo, the tests and the benchmarks.

Each fault fires at chosen optimizer steps and imitates something that kills real runs:
- `poison`: the batch's labels are replaced by one token (a corrupt shard): the loss spikes.
- `lr_blowup`: the learning rate is multiplied for a window of steps (a schedule or resume bug).
- `nan`: the forward pass overflows to NaN (an fp16 overflow, a broken sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback


@dataclass(frozen=True)
class Fault:
    kind: str  # "poison" | "lr_blowup" | "nan"
    start_step: int
    steps: int = 1
    factor: float = 30.0  # for lr_blowup

    def active(self, step: int) -> bool:
        return self.start_step <= step < self.start_step + self.steps

    def __str__(self) -> str:
        span = (f"step {self.start_step}" if self.steps == 1
                else f"steps {self.start_step}-{self.start_step + self.steps - 1}")
        extra = f" x{self.factor:g}" if self.kind == "lr_blowup" else ""
        return f"{self.kind}{extra} at {span}"


@dataclass
class FaultInjector(TrainerCallback):
    """Arms the faults at their steps. Add it before Guardian's callback."""

    faults: list[Fault] = field(default_factory=list)
    injected: list[tuple[int, str]] = field(default_factory=list)
    _step: int = 0
    _hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self._step = state.global_step + 1
        for fault in self.faults:
            if fault.kind == "lr_blowup" and fault.active(self._step):
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * fault.factor
                self.injected.append((self._step, str(fault)))

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not module.training:
            return None
        for fault in self.faults:
            if not fault.active(self._step):
                continue
            if fault.kind == "poison" and "labels" in kwargs:
                kwargs["labels"] = torch.full_like(kwargs["labels"], 7)
                self.injected.append((self._step, str(fault)))
            elif fault.kind == "nan" and "input_ids" in kwargs:
                embed: Any = module.get_input_embeddings()  # type: ignore[operator]
                kwargs["inputs_embeds"] = embed(kwargs.pop("input_ids")) * float("nan")
                self.injected.append((self._step, str(fault)))
        return args, kwargs
