"""NaN and infinity in the metrics that must always be finite (loss, grad_norm)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from guardian.detectors.base import Finding, JSONValue


def finite_value(values: Mapping[str, float], metric: str) -> float | None:
    """The metric's value as a float when it is present and finite, else None."""
    value = values.get(metric)
    if type(value) is float:  # the usual case, first
        return value if value - value == 0.0 else None  # NaN and infinities give NaN
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    """Raise ValueError unless `value` is an int >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_finite(name: str, value: float, minimum: float | None = None, strict: bool = False) -> None:
    """Raise ValueError unless `value` is a finite number (above `minimum`, strictly if `strict`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def check_metric(name: str, value: str) -> None:
    """Raise ValueError unless `value` is a non-empty metric name."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty metric name such as 'loss', got {value!r}")


@dataclass
class NonFiniteDetector:
    """Detects NaN or infinite values in metrics that must always be finite.

    Fires on every observation where a watched metric is present and is NaN, +inf or -inf; metrics that are
    absent from an observation are not judged. There is no warm-up.

    Parameters:
        metrics: the metric names to watch, e.g. ("loss", "grad_norm"). Must be a non-empty tuple of names.
    """

    kind: ClassVar[str] = "non_finite"

    metrics: tuple[str, ...] = ("loss", "grad_norm")
    _episode_start: int | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.metrics, str) or not isinstance(self.metrics, (tuple, list)) or not self.metrics:
            raise ValueError(
                f"metrics must be a non-empty list of metric names such as ['loss', 'grad_norm'], "
                f"got {self.metrics!r}"
            )
        for name in self.metrics:
            check_metric("each entry of metrics", name)
        self.metrics = tuple(self.metrics)

    @property
    def warming_up(self) -> bool:
        return False

    def update(self, step: int, values: Mapping[str, float]) -> Finding | None:
        present = [m for m in self.metrics if values.get(m) is not None]
        if not present:
            return None
        bad = [m for m in present if not math.isfinite(float(values[m]))]
        if not bad:
            self._episode_start = None
            return None
        if self._episode_start is None:
            self._episode_start = step
        return self._finding(step, {m: float(values[m]) for m in bad})

    def _finding(self, step: int, bad: dict[str, float]) -> Finding:
        first, value = next(iter(bad.items()))
        listed = ", ".join(f"{m}={v}" for m, v in bad.items())
        since = "" if self._episode_start == step else f" (non-finite since step {self._episode_start})"
        return Finding(
            metric=first,
            value=value,
            threshold=None,
            onset_step=self._episode_start if self._episode_start is not None else step,
            message=f"{first} is {value} at step {step}{since}: non-finite {listed}",
            evidence={"non_finite": {m: str(v) for m, v in bad.items()}, "metrics": list(bad)},
        )

    def state_dict(self) -> dict[str, JSONValue]:
        return {"episode_start": self._episode_start}

    def load_state_dict(self, state: Mapping[str, JSONValue]) -> None:
        start = state["episode_start"]
        self._episode_start = None if start is None else int(start)
