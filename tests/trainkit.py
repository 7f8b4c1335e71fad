"""Helpers for tests that train a real tiny Trainer + LoRA run."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from guardian.callbacks.snapshots import trainable_parameters
from guardian.engine.rules import RuleSet
from guardian.events import AnyEvent, MetricsEvent, StartEvent
from guardian.logs.eventlog import read_events
from guardian.rulefile.reader import parse_rules


@dataclass
class Recorder(TrainerCallback):
    """Records each step's learning rates, and copies of the trainable state at chosen steps."""

    copy_at: set[int] = field(default_factory=set)
    copy_on_save: bool = False
    rates: dict[int, list[float]] = field(default_factory=dict)
    copies: dict[int, dict[str, Any]] = field(default_factory=dict)
    params_at_end: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    lr_scheduler: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        self.rates[step] = [g["lr"] for g in optimizer.param_groups]
        self.params_at_end[step] = {k: p.detach().clone() for k, p in trainable_parameters(model).items()}
        if step in self.copy_at and not self.copy_on_save:
            self.copies[step] = _copy_state(model, optimizer)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                **kwargs: Any) -> None:
        if self.copy_on_save and state.global_step in self.copy_at:
            self.copies[state.global_step] = _copy_state(model, optimizer)


def _copy_state(model: Any, optimizer: Any) -> dict[str, Any]:
    return {
        "params": {k: p.detach().clone() for k, p in trainable_parameters(model).items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }


def assert_same_state(model: Any, optimizer: Any, saved: dict[str, Any]) -> None:
    """Trainable parameters and optimizer state equal the saved ones bit for bit."""
    params = trainable_parameters(model)
    assert params.keys() == saved["params"].keys()
    for name, param in params.items():
        assert torch.equal(param.detach(), saved["params"][name]), name
    now, then = optimizer.state_dict()["state"], saved["optimizer"]["state"]
    assert now.keys() == then.keys()
    for index in now:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(now[index][key], then[index][key]), (index, key)


def rules(text: str) -> RuleSet:
    return parse_rules(text, "test-rules.yaml")


def events(output_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of a run's event file as JSON values (the daemon's tests compare them with what it stored)."""
    path = Path(output_dir) / "guardian" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_events(output_dir: str | Path) -> list[AnyEvent]:
    """The events of a run's event file, typed (every line must be one)."""
    found = list(read_events(Path(output_dir) / "guardian" / "events.jsonl"))
    assert None not in found, "a line of the event file is not an event"
    return [e for e in found if e is not None]


def start_event(output_dir: str | Path) -> StartEvent:
    """The run's one start event."""
    [start] = [e for e in run_events(output_dir) if isinstance(e, StartEvent)]
    return start


def train_metrics(output_dir: str | Path) -> list[MetricsEvent]:
    """The run's metrics events of training steps (not evaluations)."""
    return [e for e in run_events(output_dir) if isinstance(e, MetricsEvent) and e.phase == "train"]


def all_finite(model: Any) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


class CorruptWeight(TrainerCallback):
    """Writes a value into one LoRA weight at the end of a step (a bit flip, a bad all-reduce)."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == self.step:
            param = next(p for n, p in trainable_parameters(model).items() if "lora_A" in n)
            with torch.no_grad():
                param[0, :4] = self.value


class AtStep(TrainerCallback):  # type: ignore[misc]
    """Runs functions at the end of chosen steps."""

    def __init__(self, actions: dict[int, Any]) -> None:
        self.actions = actions

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self.actions:
            self.actions[state.global_step]()
