"""A metric that stopped improving, or that is stuck at exactly zero."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, ClassVar

from guardian.detectors.base import Finding, JSONValue
from guardian.detectors.non_finite import check_finite, check_metric, check_positive_int, finite_value


@dataclass
class PlateauDetector:
    """Detects a metric that has stopped improving (lower is better), or one stuck at exactly 0.

    Two conditions, checked on finite observations logged at step >= warmup_steps:
    (a) no improvement: once the window holds `window_steps` observations, the mean of its oldest quarter
        is compared with the mean of its newest quarter; it fires when the drop is less than
        min_relative_improvement * |oldest-quarter mean|. The window is then emptied, so this fires at most
        once per window; otherwise the window slides on and is checked again at the next observation.
    (b) stuck at zero: `zero_steps` consecutive observations exactly 0.0 (a loss of exactly 0 means the
        loss is masked or the labels are empty); it keeps firing on each further 0.

    Parameters:
        metric: the metric to watch, e.g. "loss".
        window_steps: how many observations (logged values, not optimizer steps) the no-improvement check
            spans; at least 4.
        min_relative_improvement: the smallest drop, as a fraction of the oldest-quarter mean, that counts as
            learning; 0 or more. The default 0.001 means the newest quarter's mean must be at least 0.1 %
            below the oldest quarter's: it only flags a truly flat (or rising) curve, not a slow healthy one.
        warmup_steps: observations logged at a step lower than this are ignored; 0 or more.
        zero_steps: fire after this many consecutive observations exactly 0.0; 0 disables condition (b).
    """

    kind: ClassVar[str] = "plateau"
    follows_weights: ClassVar[bool] = True  # its baseline is rewound with a rollback

    metric: str = "loss"
    window_steps: int = 200
    min_relative_improvement: float = 0.001
    warmup_steps: int = 0
    zero_steps: int = 20
    _values: _Ring = field(init=False, repr=False)
    _steps: _Ring = field(init=False, repr=False)
    _zero_run: int = field(init=False, default=0, repr=False)
    _zero_start: int | None = field(init=False, default=None, repr=False)
    # The sums of the oldest and newest quarters of a full window, kept in step with each append rather than
    # re-added every step (not state: recomputed from the window when it fills). `_slack` is the sum of the
    # magnitudes that went into them, which bounds their rounding error: a decision too close to call within
    # that bound is made on freshly added sums (a loss falling by orders of magnitude cancels catastrophically).
    _sums: tuple[float, float] | None = field(init=False, default=None, repr=False)
    _slack: float = field(init=False, default=0.0, repr=False)
    _slides: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        check_metric("metric", self.metric)
        check_positive_int("window_steps", self.window_steps, 4)
        check_finite("min_relative_improvement", self.min_relative_improvement, 0.0)
        check_positive_int("warmup_steps", self.warmup_steps, 0)
        check_positive_int("zero_steps", self.zero_steps, 0)
        self._values = _Ring(self.window_steps, "d")
        self._steps = _Ring(self.window_steps, "q")

    @property
    def warming_up(self) -> bool:
        return len(self._values) < self.window_steps

    def update(self, step: int, values: Mapping[str, float]) -> Finding | None:
        value = finite_value(values, self.metric)
        if value is None or step < self.warmup_steps:
            return None
        self._slide_sums(value)
        self._values.append(value)
        self._steps.append(step)
        zero = self._check_zero(step, value)
        flat = self._check_flat(step, value)
        return zero or flat

    def _check_zero(self, step: int, value: float) -> Finding | None:
        if value != 0.0:
            self._zero_run, self._zero_start = 0, None
            return None
        if self._zero_run == 0:
            self._zero_start = step
        self._zero_run += 1
        if self.zero_steps == 0 or self._zero_run < self.zero_steps:
            return None
        start = self._zero_start if self._zero_start is not None else step
        return Finding(
            metric=self.metric,
            value=value,
            threshold=0.0,
            onset_step=start,
            message=f"{self.metric} has been exactly 0 for {self._zero_run} consecutive observations "
            f"from step {start} to step {step} (limit {self.zero_steps})",
            evidence={"condition": "stuck_at_zero", "consecutive": self._zero_run, "zero_steps": self.zero_steps},
        )

    def _slide_sums(self, value: float) -> None:
        """Before `value` is appended to a full window: the oldest value leaves the oldest quarter and the one
        after that quarter enters it; `value` enters the newest quarter and its oldest value leaves it."""
        if self._sums is None or len(self._values) < self.window_steps:
            return
        n, q, at = self.window_steps, self.window_steps // 4, self._values.at
        first, last = self._sums
        leaving_first, entering_first, leaving_last = at(0), at(q), at(n - q)
        self._sums = (first - leaving_first + entering_first, last - leaving_last + value)
        self._slack += abs(leaving_first) + abs(entering_first) + abs(leaving_last) + abs(value)
        self._slides += 1

    def _exact_sums(self) -> tuple[float, float]:
        n, q = self.window_steps, self.window_steps // 4
        self._sums = sum(self._values.span(0, q)), sum(self._values.span(n - q, n))
        self._slack, self._slides = abs(self._sums[0]) + abs(self._sums[1]), 0
        return self._sums

    def _check_flat(self, step: int, value: float) -> Finding | None:
        if len(self._values) < self.window_steps:
            return None
        quarter = self.window_steps // 4
        if self._sums is None or self._slides >= self.window_steps:
            self._exact_sums()  # so at most 2 x window_steps additions ever separate the sums from exact ones
        first_sum, last_sum = self._sums  # type: ignore[misc]
        margin = first_sum - last_sum - self.min_relative_improvement * abs(first_sum)
        # their rounding error is below 2 x window_steps x 1.1e-16 x slack: far inside this bound
        if abs(margin) <= 1e-9 * (1 + self.min_relative_improvement) * self._slack:
            first_sum, last_sum = self._exact_sums()
        first, last = first_sum / quarter, last_sum / quarter
        needed = self.min_relative_improvement * abs(first)
        if first - last >= needed:
            return None
        start = int(self._steps.first())
        self._values.clear()
        self._steps.clear()
        self._sums = None
        return Finding(
            metric=self.metric,
            value=last,
            threshold=first - needed,
            onset_step=start,
            message=f"{self.metric} has not improved over {self.window_steps} observations from step {start} "
            f"to step {step}: newest-quarter mean {last:.4g} vs oldest-quarter mean {first:.4g} "
            f"(needs a drop of {self.min_relative_improvement:.2%})",
            evidence={
                "condition": "no_improvement", "first_quarter_mean": first, "last_quarter_mean": last,
                "relative_improvement": (first - last) / abs(first) if first else 0.0,
                "window_size": self.window_steps, "start_step": start,
            },
        )

    def state_dict(self) -> dict[str, JSONValue]:
        return {
            "values": self._values.tolist(), "steps": [int(s) for s in self._steps.tolist()],
            "zero_run": self._zero_run, "zero_start": self._zero_start,
        }

    def load_state_dict(self, state: Mapping[str, JSONValue]) -> None:
        self._values = _Ring(self.window_steps, "d", (float(v) for v in state["values"]))
        self._steps = _Ring(self.window_steps, "q", (int(s) for s in state["steps"]))
        self._sums = None
        self._zero_run = int(state["zero_run"])
        self._zero_start = None if state["zero_start"] is None else int(state["zero_start"])


class _Ring:
    """The newest `size` numbers in a compact ring buffer: 8 bytes a value rather than a deque of float objects
    (a daemon holds one 1,000-value window per run)."""

    def __init__(self, size: int, typecode: str, values: Iterable[float] = ()) -> None:
        self.size, self._start = size, 0
        self._buf: array[Any] = array(typecode)
        for value in values:
            self.append(value)

    def __len__(self) -> int:
        return len(self._buf)

    def append(self, value: float) -> None:
        if len(self._buf) < self.size:
            self._buf.append(value)
        else:  # full: overwrite the oldest
            self._buf[self._start] = value
            self._start = (self._start + 1) % self.size

    def clear(self) -> None:
        del self._buf[:]
        self._start = 0

    def first(self) -> float:
        return self._buf[self._start]

    def at(self, i: int) -> float:
        """Value i, oldest first (0 is the oldest held)."""
        return self._buf[(self._start + i) % len(self._buf)]

    def span(self, lo: int, hi: int) -> Iterable[float]:
        """Values lo..hi-1, oldest first (0 is the oldest held)."""
        n, p, q = len(self._buf), self._start + lo, self._start + hi
        if q <= n:
            return self._buf[p:q]
        if p >= n:
            return self._buf[p - n:q - n]
        return chain(self._buf[p:], self._buf[:q - n])

    def tolist(self) -> list[float]:
        return list(self.span(0, len(self._buf)))
