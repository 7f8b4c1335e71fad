"""A metric whose recent level is clearly above a line falls to or below it in one step (a sign flip)."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from guardian.detectors.base import Finding, JSONValue
from guardian.detectors.non_finite import check_finite, check_metric, check_positive_int, finite_value
from guardian.detectors.stats import MAD_SCALE


@dataclass
class ReversalDetector:
    """Detects a value at or below `below` while the recent level is clearly above it (e.g. DPO's reward
    margin turning negative in one step, from a level the run had reached).

    The level is the median of the last `baseline_steps` accepted values, the noise the robust spread of their
    step-to-step changes (1.4826 x MAD of the differences / sqrt 2, which a steady trend does not inflate). A
    value fires when it is at or below `below` while the level is at least `level_z` noise units above
    `below`: a level that hovers around the line (a run that has not learnt to tell the answers apart yet)
    never fires. Firing values are kept out of the window; after more than `baseline_steps` of them in a row
    the level has genuinely moved and the window starts afresh.

    Parameters:
        metric: the metric to watch, e.g. "rewards/margins".
        below: the line (default 0).
        baseline_steps: accepted values forming the level and the noise; at least 3.
        warmup_steps: no firing before this many values were accepted; at least baseline_steps.
        level_z: how many noise units above `below` the level must be; greater than 0.
    """

    kind: ClassVar[str] = "reversal"
    follows_weights: ClassVar[bool] = True  # its baseline is rewound with a rollback

    metric: str
    below: float = 0.0
    baseline_steps: int = 10
    warmup_steps: int = 20
    level_z: float = 2.0
    _window: deque[float] = field(init=False, repr=False, default_factory=deque)
    _accepted: int = field(init=False, default=0, repr=False)
    _run: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        check_metric("metric", self.metric)
        check_finite("below", self.below)
        check_positive_int("baseline_steps", self.baseline_steps, 3)
        check_positive_int("warmup_steps", self.warmup_steps, self.baseline_steps)
        check_finite("level_z", self.level_z, 0.0, strict=True)
        self._window = deque(self._window, maxlen=self.baseline_steps)

    @property
    def warming_up(self) -> bool:
        return self._accepted < self.warmup_steps

    def update(self, step: int, values: Mapping[str, float]) -> Finding | None:
        x = finite_value(values, self.metric)
        if x is None:
            return None
        if self.warming_up or x > self.below:
            self._accept(x)
            return None
        level = statistics.median(self._window)
        noise = self._noise(level)
        if level - self.below < self.level_z * noise:
            self._accept(x)
            return None
        self._run += 1
        if self._run > self.baseline_steps:  # not a reversal any more: the level itself moved
            self._window.clear()
            self._accepted = self._run = 0
        return Finding(
            metric=self.metric, value=x, threshold=self.below, onset_step=step,
            message=(f"{self.metric} {x:.4g} at step {step} is at or below {self.below:g} while its level is "
                     f"{level:.4g}, {(level - self.below) / noise:.1f} noise units above it (limit {self.level_z:g})"),
            evidence={"level": level, "noise": noise, "below": self.below},
        )

    def _accept(self, x: float) -> None:
        self._window.append(x)
        self._accepted += 1
        self._run = 0

    def _noise(self, level: float) -> float:
        values = list(self._window)
        diffs = [b - a for a, b in zip(values, values[1:])]
        center = statistics.median(diffs)
        mad = statistics.median(abs(d - center) for d in diffs)
        return max(MAD_SCALE * mad / math.sqrt(2), 1e-3 * abs(level), 1e-12)

    def state_dict(self) -> dict[str, JSONValue]:
        return {"window": list(self._window), "accepted": self._accepted, "run": self._run}

    def load_state_dict(self, state: Mapping[str, JSONValue]) -> None:
        self._window = deque((float(v) for v in state.get("window", [])), maxlen=self.baseline_steps)  # type: ignore[union-attr]
        self._accepted = int(state.get("accepted", 0))  # type: ignore[arg-type]
        self._run = int(state.get("run", 0))  # type: ignore[arg-type]
