"""A loss that climbs while the learning rate warms up: the peak rate is too high for this model and data."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from guardian.detectors.base import Finding, JSONValue
from guardian.detectors.non_finite import check_finite, check_metric, check_positive_int, finite_value
from guardian.detectors.stats import MAD_SCALE, median

MIN_LR_FACTOR = 0.01
MAX_DIFFS = 10_000  # loss changes kept to estimate the noise (a warm-up longer than this uses its first part)


@dataclass
class WarmupRiseDetector:
    """Detects, when the warm-up ends, a loss that rose well above its minimum while the rate kept rising.

    A warm-up is a learning-rate range test: the rate grows from near 0 to its peak. When the peak is too high
    the loss falls at first, then climbs once the rate passes what the model can take, and settles high. The
    detector follows the smoothed loss (the median of the last `smooth_steps` values) and its minimum during
    the warm-up; when the rate stops rising it fires once if the smoothed loss is more than `min_rise` above
    that minimum, and by more than `noise_z` times the loss's own noise (so the minimum of a noisy curve is
    not mistaken for a level it left), and the rate is more than `lr_growth` times the rate at the minimum. It
    then stops watching.
    A run without a warm-up (the rate never rises) is never judged.

    The finding's evidence carries `lr_factor`: half the ratio of the rate at the loss's minimum to the peak
    (at least 0.01), the cut that brings the peak back below the rate that still worked.

    Parameters:
        metric: the loss to follow, e.g. "loss".
        lr_metric: the learning rate, e.g. "learning_rate".
        smooth_steps: the median of this many recent losses is the smoothed loss; at least 1.
        min_rise: how far above its minimum the smoothed loss must be, relative (0.3 = 30 %); above 0.
        lr_growth: how many times the rate at the minimum the rate must have reached; above 1.
        noise_z: the rise must also exceed this many noise units: the robust spread of the loss's
            step-to-step changes over the warm-up (1.4826 x MAD of the differences / sqrt 2); 0 or more.
    """

    kind: ClassVar[str] = "warmup_rise"

    metric: str = "loss"
    lr_metric: str = "learning_rate"
    smooth_steps: int = 5
    min_rise: float = 0.3
    lr_growth: float = 1.5
    noise_z: float = 2.0
    _diffs: list[float] = field(init=False, repr=False, default_factory=list)
    _last_loss: float | None = field(init=False, default=None, repr=False)
    _recent: deque[float] = field(init=False, repr=False, default_factory=deque)
    _min: float | None = field(init=False, default=None, repr=False)
    _min_step: int | None = field(init=False, default=None, repr=False)
    _lr_at_min: float | None = field(init=False, default=None, repr=False)
    _last_lr: float | None = field(init=False, default=None, repr=False)
    _rises: int = field(init=False, default=0, repr=False)  # observations so far in which the rate rose
    _done: bool = field(init=False, default=False, repr=False)

    def __post_init__(self) -> None:
        check_metric("metric", self.metric)
        check_metric("lr_metric", self.lr_metric)
        check_positive_int("smooth_steps", self.smooth_steps, 1)
        check_finite("min_rise", self.min_rise, 0.0, strict=True)
        check_finite("lr_growth", self.lr_growth, 1.0, strict=True)
        check_finite("noise_z", self.noise_z, 0.0)
        self._recent = deque(maxlen=self.smooth_steps)

    @property
    def warming_up(self) -> bool:
        return not self._done and self._rises == 0

    def update(self, step: int, values: Mapping[str, float]) -> Finding | None:
        if self._done:
            return None
        loss, lr = finite_value(values, self.metric), finite_value(values, self.lr_metric)
        if lr is None:
            return None
        rising = self._last_lr is not None and lr > self._last_lr * (1 + 1e-9)
        if self._last_lr is not None and not rising:
            self._done = True  # the warm-up is over (or there was none): judge it once
            return self._judge(step, lr) if self._rises else None
        self._last_lr = lr
        self._rises += int(rising)
        if loss is not None:
            if self._last_loss is not None and len(self._diffs) < MAX_DIFFS:
                self._diffs.append(loss - self._last_loss)
            self._last_loss = loss
            self._recent.append(loss)
            smoothed = median(self._recent)
            if len(self._recent) == self._recent.maxlen and (self._min is None or smoothed < self._min):
                self._min, self._min_step, self._lr_at_min = smoothed, step, lr
        return None

    def _judge(self, step: int, peak_lr: float) -> Finding | None:
        if self._min is None or self._lr_at_min is None or self._min_step is None or not self._recent:
            return None
        smoothed = median(self._recent)
        if smoothed <= self._min * (1 + self.min_rise) or self._last_lr is None:
            return None
        noise = self.noise()
        if smoothed - self._min <= self.noise_z * noise:
            return None
        peak = self._last_lr
        if peak < self.lr_growth * self._lr_at_min:
            return None
        factor = max(MIN_LR_FACTOR, min(0.5, 0.5 * self._lr_at_min / peak))
        return Finding(
            metric=self.metric, value=smoothed, threshold=self._min * (1 + self.min_rise), onset_step=self._min_step,
            message=(f"{self.metric} rose to {smoothed:.4g} by the end of the warm-up at step {step}, "
                     f"{smoothed / self._min - 1:.0%} above its minimum {self._min:.4g} at step {self._min_step}, "
                     f"while the learning rate rose from {self._lr_at_min:.3g} to {peak:.3g}: the peak rate is too high"),
            evidence={"minimum": self._min, "minimum_step": self._min_step, "lr_at_minimum": self._lr_at_min,
                      "peak_lr": peak, "lr_factor": factor, "noise": noise},
        )

    def noise(self) -> float:
        """The robust spread of the loss's step-to-step changes during the warm-up (0 with too few)."""
        if len(self._diffs) < 3:
            return 0.0
        center = median(self._diffs)
        return MAD_SCALE * median(abs(d - center) for d in self._diffs) / 2 ** 0.5

    def state_dict(self) -> dict[str, JSONValue]:
        return {"recent": list(self._recent), "diffs": list(self._diffs), "last_loss": self._last_loss, "min": self._min,
                "min_step": self._min_step, "lr_at_min": self._lr_at_min, "last_lr": self._last_lr, "rises": self._rises,
                "done": self._done}

    def load_state_dict(self, state: Mapping[str, JSONValue]) -> None:
        self._recent = deque((float(x) for x in state["recent"]), maxlen=self.smooth_steps)  # type: ignore[union-attr]
        self._diffs = [float(x) for x in state.get("diffs", [])]  # type: ignore[union-attr]
        last = state.get("last_loss")
        self._last_loss = None if last is None else float(last)  # type: ignore[arg-type]
        self._min = None if state["min"] is None else float(state["min"])  # type: ignore[arg-type]
        self._min_step = None if state["min_step"] is None else int(state["min_step"])  # type: ignore[arg-type]
        self._lr_at_min = None if state["lr_at_min"] is None else float(state["lr_at_min"])  # type: ignore[arg-type]
        self._last_lr = None if state["last_lr"] is None else float(state["last_lr"])  # type: ignore[arg-type]
        self._rises = int(state["rises"])  # type: ignore[arg-type]
        self._done = bool(state["done"])
