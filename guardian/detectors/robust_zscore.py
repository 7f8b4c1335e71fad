"""Spikes and drops measured in robust z-scores against a rolling median."""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import ClassVar, Literal

from guardian.detectors.base import Finding, JSONValue
from guardian.detectors.non_finite import check_finite, check_metric, check_positive_int, finite_value
from guardian.detectors.stats import MAD_SCALE

DIRECTIONS = ("up", "down", "both")
NOISE_ESTIMATES = ("mad", "diff_mad")


@dataclass
class RobustZScoreDetector:
    """Detects a value far from the rolling median of recent values, in robust z-scores (spikes or drops).

    z = (x - median) / max(1.4826 * MAD, eps) over the last `window_steps` accepted observations, where
    eps = max(1e-12, 1e-3 * |median|) (so a flat window does not turn tiny changes into huge z). With
    log_scale the window holds log(x) and eps = 1e-3, i.e. a 0.1 % relative change. Anomalous observations
    are kept out of the window so a spike does not contaminate its own baseline; if more than
    window_steps // 2 consecutive observations are anomalous, the level has genuinely moved and the window
    restarts from those recent values. Non-finite values (and values <= 0 with log_scale) are ignored.

    Parameters:
        metric: the metric to watch, e.g. "loss" or "grad_norm".
        window_steps: how many recent accepted observations (logged values, not optimizer steps) form the
            baseline; at least 3.
        warmup_steps: no firing until the window holds this many observations; between 1 and window_steps.
        z_threshold: an observation is anomalous when its robust z is beyond this; greater than 0.
        direction: "up" flags values above the median (loss spikes), "down" values below it, "both" either.
        consecutive_steps: fire once this many consecutive observations are anomalous, then on each further
            anomalous one; between 1 and window_steps // 2.
        min_relative_change: also require |x - median| >= min_relative_change * |median| (original units), so
            a very quiet window does not flag changes too small to matter; 0 or more (0 disables).
        min_change: also require |x - median| >= min_change (original units): for a metric whose level sits
            near 0, where no relative change is small; 0 or more (0 disables).
        log_scale: judge log(x) instead of x (for metrics spanning orders of magnitude, like grad_norm).
        baseline_steps: the median is taken over only the newest `baseline_steps` accepted values, so the
            baseline follows a falling loss closely; 0 (the default) uses the whole window.
        noise: how the spread is estimated. "mad": the MAD of the window's values. "diff_mad": the MAD of
            successive differences divided by sqrt(2), which a trend (a loss still falling fast early in a
            run) does not inflate; use it with `baseline_steps` for losses.
        sustained_steps: also fire when this many consecutive observations are beyond
            `sustained_z_threshold` (and `min_relative_change`), though none reaches `z_threshold`: a shift
            lasting a few steps is evidence that one step of the same size is not; 0 (the default) disables.
            Between 2 and window_steps // 2. Such observations are kept out of the window too.
        sustained_z_threshold: the robust z each of those observations must pass (default 4); greater than 0
            and at most z_threshold.
        ignore_at_or_below: values at or below this are neither judged nor taken into the window (a loss of
            exactly 0 is a step with no labelled token, not a loss level: ten of them would pull the baseline to
            0 and make every normal loss after them a "spike"); None (the default) judges every value.
    """

    kind: ClassVar[str] = "robust_zscore"
    follows_weights: ClassVar[bool] = True  # its baseline is rewound with a rollback

    metric: str
    window_steps: int = 100
    warmup_steps: int = 20
    z_threshold: float = 6.0
    direction: Literal["up", "down", "both"] = "up"
    consecutive_steps: int = 1
    min_relative_change: float = 0.0
    min_change: float = 0.0
    log_scale: bool = False
    baseline_steps: int = 0
    noise: Literal["mad", "diff_mad"] = "mad"
    sustained_steps: int = 0
    sustained_z_threshold: float = 4.0
    ignore_at_or_below: float | None = None
    _window: deque[float] = field(init=False, repr=False, default_factory=deque)
    _sorted: list[float] = field(init=False, repr=False, default_factory=list)
    _diffs: deque[float] = field(init=False, repr=False, default_factory=deque)
    _sorted_diffs: list[float] = field(init=False, repr=False, default_factory=list)
    _recent: deque[float] = field(init=False, repr=False, default_factory=deque)
    _run: int = field(init=False, default=0, repr=False)
    _strong: int = field(init=False, default=0, repr=False)
    _run_start: int | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        check_metric("metric", self.metric)
        check_positive_int("window_steps", self.window_steps, 3)
        check_positive_int("warmup_steps", self.warmup_steps, 1)
        if self.warmup_steps > self.window_steps:
            raise ValueError(
                f"warmup_steps must be between 1 and window_steps ({self.window_steps}), got {self.warmup_steps}"
            )
        check_finite("z_threshold", self.z_threshold, 0.0, strict=True)
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of 'up', 'down', 'both', got {self.direction!r}")
        check_positive_int("consecutive_steps", self.consecutive_steps, 1)
        if self.consecutive_steps > self.window_steps // 2:
            raise ValueError(
                f"consecutive_steps must be between 1 and window_steps // 2 ({self.window_steps // 2}), "
                f"got {self.consecutive_steps}"
            )
        check_finite("min_relative_change", self.min_relative_change, 0.0)
        check_finite("min_change", self.min_change, 0.0)
        if not isinstance(self.log_scale, bool):
            raise ValueError(f"log_scale must be true or false, got {self.log_scale!r}")
        check_positive_int("baseline_steps", self.baseline_steps, 0)
        if self.baseline_steps > self.window_steps:
            raise ValueError(
                f"baseline_steps must be between 0 and window_steps ({self.window_steps}), got {self.baseline_steps}"
            )
        if self.noise not in NOISE_ESTIMATES:
            raise ValueError(f"noise must be 'mad' or 'diff_mad', got {self.noise!r}")
        check_positive_int("sustained_steps", self.sustained_steps, 0)
        if self.sustained_steps and not 2 <= self.sustained_steps <= self.window_steps // 2:
            raise ValueError(
                f"sustained_steps must be 0 (off) or between 2 and window_steps // 2 ({self.window_steps // 2}), "
                f"got {self.sustained_steps}"
            )
        check_finite("sustained_z_threshold", self.sustained_z_threshold, 0.0, strict=True)
        if self.ignore_at_or_below is not None:
            check_finite("ignore_at_or_below", self.ignore_at_or_below)
        if self.sustained_steps and self.sustained_z_threshold > self.z_threshold:
            raise ValueError(
                f"sustained_z_threshold must not exceed z_threshold ({self.z_threshold:g}), "
                f"got {self.sustained_z_threshold:g}"
            )
        self._window = deque(maxlen=self.window_steps)
        self._recent = deque(maxlen=self.window_steps // 2 + 1)

    @property
    def warming_up(self) -> bool:
        return len(self._window) < self.warmup_steps

    def update(self, step: int, values: Mapping[str, float]) -> Finding | None:
        raw = finite_value(values, self.metric)
        if raw is not None and self.ignore_at_or_below is not None and raw <= self.ignore_at_or_below:
            return None
        x = self._transform(raw)
        if x is None:
            return None
        if self.warming_up:
            self._accept(x)
            return None
        median = self._level()
        if not self._may_be_out_of_line(x, median):  # most healthy values: no need for the spread at all
            self._in_line(x)
            return None
        mad = self._spread(median)
        z = (x - median) / max(MAD_SCALE * mad, self._eps(median))
        # x is on the watched side of the median and far enough from it: only the size of z is left to judge
        strong = abs(z) > self.z_threshold
        if not strong and not (self.sustained_steps and abs(z) > self.sustained_z_threshold):
            self._in_line(x)
            return None
        if self._run == 0:
            self._run_start = step
        self._run += 1  # consecutive observations out of line (kept out of the window)
        self._strong = self._strong + 1 if strong else 0  # of which, consecutive ones beyond z_threshold
        self._recent.append(x)
        fires = strong and self._strong >= self.consecutive_steps
        sustained = bool(self.sustained_steps) and self._run >= self.sustained_steps
        finding = self._finding(step, x, median, mad, z) if fires or sustained else None
        if self._run > self.window_steps // 2:
            self._rebaseline()
        return finding

    def _transform(self, value: float | None) -> float | None:
        if value is None or not self.log_scale:
            return value
        return math.log(value) if value > 0 else None

    def _original(self, x: float) -> float:
        return math.exp(x) if self.log_scale else x

    def _eps(self, median: float) -> float:
        return 1e-3 if self.log_scale else max(1e-12, 1e-3 * abs(median))

    def _accept(self, x: float) -> None:
        """Add an accepted value; the window, its successive differences and their sorted copies stay in step,
        so every statistic is a lookup or a binary search rather than a pass over the window."""
        window, diffs = self._window, self._diffs
        if len(window) == window.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, window.popleft())]
            if diffs:
                del self._sorted_diffs[bisect.bisect_left(self._sorted_diffs, diffs.popleft())]
        if window and self.noise == "diff_mad":
            d = x - window[-1]
            diffs.append(d)
            bisect.insort(self._sorted_diffs, d)
        window.append(x)
        bisect.insort(self._sorted, x)

    def _clear(self) -> None:
        self._window.clear()
        self._sorted.clear()
        self._diffs.clear()
        self._sorted_diffs.clear()

    def _level(self) -> float:
        """The baseline median."""
        if self.baseline_steps:
            return _median(sorted(islice(reversed(self._window), self.baseline_steps)))
        return _median(self._sorted)

    def _spread(self, median: float) -> float:
        """The (unscaled) MAD that measures the window's noise ("mad": the window's deviations from `median`)."""
        if self.noise == "diff_mad" and len(self._sorted) >= 3:
            diffs = self._sorted_diffs
            return _mad(diffs, _median(diffs)) / math.sqrt(2)
        return _mad(self._sorted, median)

    def _may_be_out_of_line(self, x: float, median: float) -> bool:
        """Everything but the z-score, which is cheap to check first: the watched side of the median (every
        threshold is > 0, so z has the sign of x - median) and the relative change."""
        if (self.direction == "up" and x <= median) or (self.direction == "down" and x >= median) or x == median:
            return False
        base = self._original(median)
        change = abs(self._original(x) - base)
        return change >= self.min_relative_change * abs(base) and change >= self.min_change

    def _in_line(self, x: float) -> None:
        self._accept(x)
        self._run, self._strong, self._run_start = 0, 0, None
        self._recent.clear()

    def _rebaseline(self) -> None:
        """The level has moved for good: restart the window from the recent anomalous values."""
        self._clear()
        for x in self._recent:
            self._accept(x)
        self._recent.clear()
        self._run, self._strong, self._run_start = 0, 0, None

    def _finding(self, step: int, x: float, median: float, mad: float, z: float) -> Finding:
        """A finding for observation x; when it does not reach z_threshold it fires as a sustained shift."""
        sustained = abs(z) <= self.z_threshold
        threshold = self.sustained_z_threshold if sustained else self.z_threshold
        scale = max(MAD_SCALE * mad, self._eps(median))
        limit = median + math.copysign(threshold, z) * scale
        value, base = self._original(x), self._original(median)
        side = "above" if z > 0 else "below"
        onset = self._run_start if self._run_start is not None else step
        if sustained:
            why = f"limit {self.sustained_z_threshold:g} for {self.sustained_steps} in a row: {self._run} since step {onset}"
        else:
            why = f"limit {self.z_threshold:g}" + ("" if self._run == 1 else f", {self._run} consecutive since step {onset}")
        log = " (log scale)" if self.log_scale else ""
        return Finding(
            metric=self.metric,
            value=value,
            threshold=self._original(limit),
            onset_step=onset,
            message=(
                f"{self.metric} {value:.4g} at step {step} is {abs(z):.3g} robust z {side} its rolling median "
                f"{base:.4g}{log} ({why})"
            ),
            evidence={
                "median": base, "mad": mad, "z": z, "z_threshold": threshold, "sustained": sustained,
                "window_size": len(self._window), "consecutive": self._run, "log_scale": self.log_scale,
            },
        )

    def state_dict(self) -> dict[str, JSONValue]:
        return {
            "window": list(self._window),
            "recent": list(self._recent),
            "run": self._run,
            "strong": self._strong,
            "run_start": self._run_start,
        }

    def load_state_dict(self, state: Mapping[str, JSONValue]) -> None:
        self._clear()
        for x in state["window"]:
            self._accept(float(x))
        self._recent = deque((float(x) for x in state["recent"]), maxlen=self.window_steps // 2 + 1)
        self._run = int(state["run"])
        self._strong = int(state.get("strong", self._run))  # stores written before sustained_steps existed
        self._run_start = None if state["run_start"] is None else int(state["run_start"])


def _median(s: Sequence[float]) -> float:
    """The median of a sorted, non-empty sequence."""
    n = len(s)
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def _mad(s: Sequence[float], center: float) -> float:
    """Median absolute deviation of the sorted values `s` around `center` (not scaled), in O(log n)."""
    n = len(s)
    k = n // 2
    if n % 2:
        return _kth_deviation(s, center, k)
    return (_kth_deviation(s, center, k - 1) + _kth_deviation(s, center, k)) / 2


def _kth_deviation(s: Sequence[float], center: float, k: int) -> float:
    """The k-th smallest (from 0) of |x - center| over the sorted values `s`.

    The deviations form two ascending runs, leftwards from `center` (A[t] = center - s[p-1-t]) and rightwards
    (B[t] = s[p+t] - center); the k-th smallest of their union is found by a binary search over how many come
    from A (the classic selection in two sorted arrays).
    """
    p = bisect.bisect_left(s, center)
    a, b = p, len(s) - p
    lo, hi = max(0, k + 1 - b), min(a, k + 1)
    while True:
        i = (lo + hi) // 2  # take i from A and j from B
        j = k + 1 - i
        if i > 0 and j < b and center - s[p - i] > s[p + j] - center:
            hi = i - 1  # A[i-1] > B[j]: too many from A
        elif j > 0 and i < a and s[p + j - 1] - center > center - s[p - 1 - i]:
            lo = i + 1  # B[j-1] > A[i]: too few from A
        else:
            left = center - s[p - i] if i > 0 else -math.inf
            right = s[p + j - 1] - center if j > 0 else -math.inf
            return max(left, right)
