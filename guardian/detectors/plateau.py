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

    metric: str = "loss"
    window_steps: int = 200
    min_relative_improvement: float = 0.001
    warmup_steps: int = 0
    zero_steps: int = 20
    _values: _Ring = field(init=False, repr=False)
    _steps: _Ring = field(init=False, repr=False)
    _zero_run: int = field(init=False, default=0, repr=False)
    _zero_start: int | None = field(init=False, default=None, repr=False)

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

    def _check_flat(self, step: int, value: float) -> Finding | None:
        if len(self._values) < self.window_steps:
            return None
        quarter = self.window_steps // 4
        first = sum(self._values.span(0, quarter)) / quarter
        last = sum(self._values.span(self.window_steps - quarter, self.window_steps)) / quarter
        needed = self.min_relative_improvement * abs(first)
        if first - last >= needed:
            return None
        start = int(self._steps.first())
        self._values.clear()
        self._steps.clear()
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
