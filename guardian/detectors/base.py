"""What every detector is: values in, an optional finding out, state that survives a restart."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

JSONValue = Any  # str | int | float | bool | None | list | dict of those


@dataclass(frozen=True)
class Finding:
    """A detector's claim that something is wrong at a step, with the evidence for it."""

    metric: str
    value: float
    threshold: float | None
    onset_step: int
    message: str
    evidence: dict[str, JSONValue] = field(default_factory=dict)


@runtime_checkable
class Detector(Protocol):
    """A streaming detector.

    `update` gets one observation: the step and the values of the metrics present at that step
    (a subset of the metrics the rule watches; NaN and inf are passed through as floats). It returns a
    `Finding` when the observation is anomalous, else None. Memory is constant or bounded by a window.
    `state_dict` returns plain JSON types only; `load_state_dict` on a fresh instance built with the same
    parameters restores behaviour exactly.
    """

    kind: ClassVar[str]

    def update(self, step: int, values: Mapping[str, float]) -> Finding | None: ...

    @property
    def warming_up(self) -> bool: ...

    def state_dict(self) -> dict[str, JSONValue]: ...

    def load_state_dict(self, state: Mapping[str, JSONValue]) -> None: ...
