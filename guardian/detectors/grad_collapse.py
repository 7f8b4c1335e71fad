"""A gradient norm that collapses right after the warm-up while the loss stalls: the peak rate is far too high."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from guardian.detectors.base import Finding, JSONValue
from guardian.detectors.non_finite import check_finite, check_metric, check_positive_int, finite_value
from guardian.detectors.stats import median


@dataclass
class GradCollapseDetector:
    """Detects, in the steps after the warm-up, a gradient norm that fell far below its warm-up level while the
    loss stopped improving.

    Updates far too large for the model (a peak learning rate 10-30x too high) push it into a flat, degenerate
    region: it predicts the commonest tokens, its gradients become tiny, and its loss stays flat well above
    where a healthy run goes. A healthy run's gradient norm can fall too, but then its loss falls with it.

    The reference is the median gradient norm while the rate warmed up (the rate rising from one observation
    to the next). Once the rate stops rising, for the next `watch_steps` observations: it fires once when the
    median of the last `window_steps` gradient norms is below the reference / `drop_factor` and the median of
    the last `window_steps` losses improved by less than `max_improvement` (relative) on the median of the
    first `window_steps` losses after the warm-up, at least `window_steps` observations after the warm-up
    (so the two windows do not overlap). It then stops watching. A run without a warm-up is never judged.

    The finding's onset is where the collapse began: the first window whose median gradient norm was below
    half the warm-up level so far (a rollback goes back to before it). Its evidence carries `lr_factor`
    (`lr_factor` below), the cut to make with that rollback.

    Parameters:
        metric: the loss, e.g. "loss".
        grad_metric: the gradient norm, e.g. "grad_norm".
        lr_metric: the learning rate, e.g. "learning_rate".
        window_steps: observations in each median; at least 3.
        watch_steps: observations after the warm-up during which it judges; at least window_steps.
        drop_factor: how many times below its warm-up level the gradient norm must be; above 1.
        max_improvement: the loss must have improved by less than this (0.03 = 3 %); 0 or more.
        lr_factor: the suggested cut; between 0 and 1.
    """

    kind: ClassVar[str] = "grad_collapse"

    metric: str = "loss"
    grad_metric: str = "grad_norm"
    lr_metric: str = "learning_rate"
    window_steps: int = 10
    watch_steps: int = 100
    drop_factor: float = 5.0
    max_improvement: float = 0.03
    lr_factor: float = 0.1
    _warmup_grads: list[float] = field(init=False, repr=False, default_factory=list)
    _first_losses: list[float] = field(init=False, repr=False, default_factory=list)
    _losses: deque[float] = field(init=False, repr=False, default_factory=deque)
    _grads: deque[float] = field(init=False, repr=False, default_factory=deque)
    _last_lr: float | None = field(init=False, default=None, repr=False)
    _after: int = field(init=False, default=-1, repr=False)  # observations since the warm-up ended; -1: not yet
    _warmup_end_step: int | None = field(init=False, default=None, repr=False)
    _onset: int | None = field(init=False, default=None, repr=False)
    _track: deque[tuple[int, float]] = field(init=False, repr=False, default_factory=deque)
    _done: bool = field(init=False, default=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("metric", "grad_metric", "lr_metric"):
            check_metric(name, getattr(self, name))
        check_positive_int("window_steps", self.window_steps, 3)
        check_positive_int("watch_steps", self.watch_steps, self.window_steps)
        check_finite("drop_factor", self.drop_factor, 1.0, strict=True)
        check_finite("max_improvement", self.max_improvement, 0.0)
        check_finite("lr_factor", self.lr_factor, 0.0, strict=True)
        if self.lr_factor >= 1.0:
            raise ValueError(f"lr_factor must be between 0 and 1 (exclusive), got {self.lr_factor!r}")
        self._losses = deque(maxlen=self.window_steps)
        self._grads = deque(maxlen=self.window_steps)
        self._track = deque(maxlen=self.window_steps)

    @property
    def warming_up(self) -> bool:
        return not self._done and self._after < self.window_steps

    def update(self, step: int, values: Mapping[str, float]) -> Finding | None:
        if self._done:
            return None
        loss, grad = finite_value(values, self.metric), finite_value(values, self.grad_metric)
        lr = finite_value(values, self.lr_metric)
        if loss is None or grad is None or lr is None:
            return None
        rising = self._last_lr is not None and lr > self._last_lr * (1 + 1e-9)
        first = self._last_lr is None
        self._last_lr = lr
        self._note_onset(step, grad)
        if self._after < 0:
            if rising or first:
                if len(self._warmup_grads) < 10_000:
                    self._warmup_grads.append(grad)
                return None
            if len(self._warmup_grads) < 2:  # no warm-up to compare with: never judged
                self._done = True
                return None
            self._after, self._warmup_end_step = 0, step
        self._after += 1
        self._losses.append(loss)
        self._grads.append(grad)
        if self._after <= self.window_steps:
            self._first_losses.append(loss)
        if self._after > self.watch_steps:
            self._done = True
            return None
        if self._after < 2 * self.window_steps:
            return None
        return self._judge(step)

    def _note_onset(self, step: int, grad: float) -> None:
        """Remember where the gradient norm first fell to half its warm-up level (the start of that window)."""
        self._track.append((step, grad))
        if self._onset is not None or len(self._track) < self.window_steps:
            return
        if (len(self._warmup_grads) >= self.window_steps
                and median(g for _, g in self._track) * 2 < median(self._warmup_grads)):
            self._onset = self._track[0][0]

    def _judge(self, step: int) -> Finding | None:
        reference = median(self._warmup_grads)
        grads, losses, start = median(self._grads), median(self._losses), median(self._first_losses)
        if reference <= 0 or grads * self.drop_factor > reference:
            return None
        if losses < start * (1 - self.max_improvement):
            return None  # the loss is still falling: a healthy run whose gradients shrink
        self._done = True
        return Finding(
            metric=self.metric, value=losses, threshold=start * (1 - self.max_improvement),
            onset_step=self._onset if self._onset is not None else (self._warmup_end_step or step),
            message=(f"{self.grad_metric} fell to {grads:.3g} by step {step}, {reference / grads:.3g}x below its "
                     f"level during the warm-up ({reference:.3g}), while {self.metric} stayed at {losses:.4g} "
                     f"({(start - losses) / start:+.1%} since the warm-up ended): the updates are too large for "
                     "the model; the peak rate is far too high"),
            evidence={"grad_reference": reference, "grad_recent": grads, "loss_start": start, "loss_recent": losses,
                      "warmup_end_step": self._warmup_end_step, "lr_factor": self.lr_factor},
        )

    def state_dict(self) -> dict[str, JSONValue]:
        return {"warmup_grads": list(self._warmup_grads), "first_losses": list(self._first_losses),
                "losses": list(self._losses), "grads": list(self._grads), "last_lr": self._last_lr,
                "after": self._after, "warmup_end": self._warmup_end_step, "onset": self._onset, "done": self._done,
                "track": [list(t) for t in self._track]}

    def load_state_dict(self, state: Mapping[str, JSONValue]) -> None:
        self._warmup_grads = [float(x) for x in state["warmup_grads"]]  # type: ignore[union-attr]
        self._first_losses = [float(x) for x in state["first_losses"]]  # type: ignore[union-attr]
        self._losses = deque((float(x) for x in state["losses"]), maxlen=self.window_steps)  # type: ignore[union-attr]
        self._grads = deque((float(x) for x in state["grads"]), maxlen=self.window_steps)  # type: ignore[union-attr]
        self._last_lr = None if state["last_lr"] is None else float(state["last_lr"])  # type: ignore[arg-type]
        self._after = int(state["after"])  # type: ignore[arg-type]
        self._warmup_end_step = None if state["warmup_end"] is None else int(state["warmup_end"])  # type: ignore[arg-type]
        self._onset = None if state.get("onset") is None else int(state["onset"])  # type: ignore[arg-type]
        self._track = deque(((int(a), float(b)) for a, b in state.get("track", [])),  # type: ignore[union-attr,misc]
                            maxlen=self.window_steps)
        self._done = bool(state["done"])
