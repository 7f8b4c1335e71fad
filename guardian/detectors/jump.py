"""Sudden jumps of a metric that should move smoothly, such as the learning rate."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from guardian.detectors.base import Finding, JSONValue
from guardian.detectors.non_finite import check_finite, check_metric, check_positive_int, finite_value


@dataclass
class JumpDetector:
    """Detects a value more than `factor` times the largest of the recent values.

    Learning-rate schedules (linear, cosine, constant, with linear warm-up) never multiply the rate by more
    than 2 from one step to the next after the first step, so a rate several times its recent maximum is a
    schedule or resume bug, an optimizer misconfigured mid-run, or a fault: the update it would make is
    dangerous. Schedules with hard restarts (cosine_with_restarts) jump on purpose: disable the rule for them.

    Parameters:
        metric: the metric to watch, e.g. "learning_rate".
        factor: fire when the value exceeds `factor` x the maximum of the last `window_steps` accepted values;
            greater than 1.
        window_steps: how many recent accepted observations form the reference; at least 1.
        warmup_steps: no firing before this step (the first steps of a warm-up start from 0); 0 or more.

        reference_metric: a metric giving the value the metric should have, e.g. "scheduled_lr" (the rate the
            scheduler set, which Guardian's training side reports). When it is in the observation, the value is
            judged against it instead: it fires when the value is more than `reference_factor` x the reference,
            at every step it stays there (a rate forced off its schedule is never accepted as the new normal).
        reference_factor: see reference_metric; greater than 1.

    Without a reference, a jumped value is not accepted into the window, so every step of a lasting jump
    fires; after `window_steps` consecutive jumped observations the new level is accepted as the reference.
    """

    kind: ClassVar[str] = "jump"

    metric: str
    factor: float = 4.0
    window_steps: int = 10
    warmup_steps: int = 0
    reference_metric: str | None = None
    reference_factor: float = 1.5
    _window: deque[float] = field(init=False, repr=False, default_factory=deque)
    _run: list[float] = field(init=False, repr=False, default_factory=list)
    _run_start: int | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        check_metric("metric", self.metric)
        check_finite("factor", self.factor, 1.0, strict=True)
        check_positive_int("window_steps", self.window_steps, 1)
        check_positive_int("warmup_steps", self.warmup_steps, 0)
        if self.reference_metric is not None:
            check_metric("reference_metric", self.reference_metric)
        check_finite("reference_factor", self.reference_factor, 1.0, strict=True)
        self._window = deque(maxlen=self.window_steps)

    @property
    def warming_up(self) -> bool:
        return not self._window

    def update(self, step: int, values: Mapping[str, float]) -> Finding | None:
        x = finite_value(values, self.metric)
        if x is None:
            return None
        scheduled = finite_value(values, self.reference_metric) if self.reference_metric else None
        if scheduled is not None and scheduled > 0.0:
            return self._against_reference(step, x, scheduled)
        reference = max(self._window, default=0.0)
        if step < self.warmup_steps or reference <= 0.0 or x <= self.factor * reference:
            self._window.append(x)
            self._run, self._run_start = [], None
            return None
        if self._run_start is None:
            self._run_start = step
        self._run.append(x)
        if len(self._run) >= self.window_steps:
            self._window.extend(self._run)
            self._run = []
        return Finding(
            metric=self.metric, value=x, threshold=self.factor * reference, onset_step=self._run_start,
            message=(f"{self.metric} {x:.4g} at step {step} is {x / reference:.3g}x its recent maximum "
                     f"{reference:.4g} (limit {self.factor:g}x)"),
            evidence={"reference": reference, "ratio": x / reference, "factor": self.factor},
        )

    def _against_reference(self, step: int, x: float, scheduled: float) -> Finding | None:
        if x <= self.reference_factor * scheduled:
            self._window.append(x)
            self._run, self._run_start = [], None
            return None
        if self._run_start is None:
            self._run_start = step
        self._run = self._run[-self.window_steps:] + [x]
        return Finding(
            metric=self.metric, value=x, threshold=self.reference_factor * scheduled, onset_step=self._run_start,
            message=(f"{self.metric} {x:.4g} at step {step} is {x / scheduled:.3g}x the {self.reference_metric} "
                     f"{scheduled:.4g} (limit {self.reference_factor:g}x)"),
            evidence={"reference": scheduled, "ratio": x / scheduled, "factor": self.reference_factor,
                      "against": self.reference_metric},
        )

    def state_dict(self) -> dict[str, JSONValue]:
        return {"window": list(self._window), "run": list(self._run), "run_start": self._run_start}

    def load_state_dict(self, state: Mapping[str, JSONValue]) -> None:
        self._window = deque((float(x) for x in state["window"]), maxlen=self.window_steps)
        self._run = [float(x) for x in state["run"]]
        self._run_start = None if state["run_start"] is None else int(state["run_start"])
