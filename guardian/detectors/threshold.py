"""A metric outside fixed bounds for some consecutive observations."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from guardian.detectors.base import Finding, JSONValue
from guardian.detectors.non_finite import check_finite, check_metric, check_positive_int, finite_value
from guardian.detectors.stats import median


@dataclass
class ThresholdDetector:
    """Detects a metric above or below a fixed limit for a number of consecutive observations.

    Non-finite values are ignored (they neither count towards nor break a run of breaches).

    Parameters:
        metric: the metric to watch, e.g. "grad_norm".
        above: fire when the value is strictly greater than this; None for no upper limit.
        below: fire when the value is strictly less than this; None for no lower limit. At least one of
            above and below must be given, and below must be less than above when both are.
        consecutive_steps: how many consecutive observations (logged values, not optimizer steps) must breach
            a limit before it fires; at least 1. It keeps firing on each further breach.
        warmup_steps: observations logged at a step lower than this are ignored; 0 or more.
        relative_to_first_steps: when above 0, `above` is raised to `above` x the median of the run's first this
            many (finite, positive) observations after warm-up when that median is above 1, so the limit fits
            the run's own scale (a model whose healthy gradient norm is 1e6 is not "exploding") and never falls
            below `above`; nothing fires before they are seen. `below` is not scaled.
    """

    kind: ClassVar[str] = "threshold"

    metric: str
    above: float | None = None
    below: float | None = None
    consecutive_steps: int = 1
    warmup_steps: int = 0
    relative_to_first_steps: int = 0
    _first: list[float] = field(init=False, repr=False, default_factory=list)
    _run: int = field(init=False, default=0, repr=False)
    _run_start: int | None = field(init=False, default=None, repr=False)
    _last_step: int | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        check_metric("metric", self.metric)
        if self.above is None and self.below is None:
            raise ValueError("above or below must be given (a number), got neither")
        for name in ("above", "below"):
            if getattr(self, name) is not None:
                check_finite(name, getattr(self, name))
        if self.above is not None and self.below is not None and not self.below < self.above:
            raise ValueError(f"below must be less than above, got below={self.below!r} and above={self.above!r}")
        check_positive_int("consecutive_steps", self.consecutive_steps, 1)
        check_positive_int("warmup_steps", self.warmup_steps, 0)
        check_positive_int("relative_to_first_steps", self.relative_to_first_steps, 0)

    @property
    def warming_up(self) -> bool:
        early = self.warmup_steps > 0 and (self._last_step is None or self._last_step < self.warmup_steps)
        return early or len(self._first) < self.relative_to_first_steps

    @property
    def scale(self) -> float:
        """What `above` is multiplied by: the median of the first observations when above 1, else 1."""
        if not self.relative_to_first_steps or not self._first:
            return 1.0
        return max(1.0, median(self._first))

    def update(self, step: int, values: Mapping[str, float]) -> Finding | None:
        value = finite_value(values, self.metric)
        if value is None:
            return None
        self._last_step = step
        if step < self.warmup_steps:
            return None
        if len(self._first) < self.relative_to_first_steps:
            if value > 0:
                self._first.append(value)
            return None
        breach = self._breach(value)
        if breach is None:
            self._run, self._run_start = 0, None
            return None
        if self._run == 0:
            self._run_start = step
        self._run += 1
        if self._run < self.consecutive_steps:
            return None
        return self._finding(step, value, *breach)

    def _breach(self, value: float) -> tuple[str, float] | None:
        """The side ("above" or "below") and limit the value crosses, if any."""
        if self.above is not None and value > self.above * self.scale:
            return "above", self.above * self.scale
        if self.below is not None and value < self.below:
            return "below", self.below
        return None

    def _finding(self, step: int, value: float, side: str, limit: float) -> Finding:
        onset = self._run_start if self._run_start is not None else step
        run = "" if self._run == 1 else f" for {self._run} consecutive observations since step {onset}"
        if self.relative_to_first_steps and side == "above" and self.scale > 1.0:
            run += f" ({self.above:g}x the median {self.scale:.4g} of its first {self.relative_to_first_steps} values)"
        return Finding(
            metric=self.metric,
            value=value,
            threshold=limit,
            onset_step=onset,
            message=f"{self.metric} {value:.4g} at step {step} is {side} the limit {limit:.4g}{run}",
            evidence={"side": side, "limit": limit, "consecutive": self._run,
                      **({"scale": self.scale} if self.relative_to_first_steps else {})},
        )

    def state_dict(self) -> dict[str, JSONValue]:
        return {"run": self._run, "run_start": self._run_start, "last_step": self._last_step, "first": list(self._first)}

    def load_state_dict(self, state: Mapping[str, JSONValue]) -> None:
        self._run = int(state["run"])
        self._run_start = None if state["run_start"] is None else int(state["run_start"])
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
        self._first = [float(x) for x in state.get("first", [])]  # type: ignore[union-attr]
