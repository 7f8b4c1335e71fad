"""Eval loss rising past its best while the train loss keeps falling."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from guardian.detectors.base import Finding, JSONValue
from guardian.detectors.non_finite import check_finite, check_metric, check_positive_int, finite_value
from guardian.detectors.stats import MAD_SCALE, median

TRAIN_EMA_ALPHA = 0.1
NOISE_EVALS = 20  # evaluations the noise of the eval metric is estimated from


@dataclass
class OverfittingDetector:
    """Detects overfitting: the eval metric stays above its best while the train metric keeps improving.

    Lower is better for both metrics. The best (lowest) finite eval value and its step are tracked; an
    evaluation is "past its best" when eval > best + min_delta * |best|. Evaluations between the best and
    that tolerance neither count nor reset the count; a new best resets it. The train metric is smoothed by
    an EMA (alpha 0.1) over its finite values; it is "improving" when the EMA now is below the EMA at the
    step of the best eval. Non-finite values are ignored. onset_step of a finding is the step of the best eval.

    Parameters:
        eval_metric: the evaluation metric, e.g. "eval_loss".
        train_metric: the training metric, e.g. "loss".
        patience_evals: fire when this many evaluations since the best have been past it (and on each further
            one while that holds); at least 1. The seeds' early-stopping example uses 3.
        min_delta: relative tolerance: an eval counts as past its best only when above best * (1 + min_delta)
            (for a positive best); 0 or more. 0.01 ignores rises under 1 %.
        require_train_improving: only fire while the train EMA is below its value at the best eval, i.e. the
            model still fits the training data better (the signature of overfitting, not divergence). With
            true, no finding is made before any train value has been seen.
        gap_growth_evals: if above 0, also fire when the gap (eval - train EMA) grew at each of the last this
            many evaluations while the current eval is past its best; 0 disables this earlier warning.
        warmup_evals: no firing until this many evaluations have been seen; 0 or more.
        noise_z: when above 0, judge levels, not single evaluations, so a noisy evaluation (a small eval
            set) cannot stop a run that is still improving. The level is the median of `patience_evals`
            consecutive evaluations, and the reference is the lowest level so far (not the lowest single
            evaluation: the minimum of many noisy draws is a lucky one, and a run compared with it looks worse
            than it is). Fire when the latest level, from evaluations made after those of the lowest one, is
            past the lowest by `min_delta` and by more than `noise_z` noise units. The noise unit is the
            robust spread of the evaluation's step-to-step changes (1.4826 x MAD of the differences / sqrt 2,
            over the last 20 evaluations); the latest evaluation must not be lower than the one before it (a
            run on its way back down is not stopped). 0 (the default) judges each evaluation on its own.
        min_epoch: no firing before the `epoch` metric reaches this (when the run reports it). Within the
            first pass over the data every training batch is unseen, so a falling training loss is itself a
            falling held-out loss: an eval loss that rises meanwhile says the eval set is small or unlike the
            training data, which stopping does not fix. 0 (the default) fires from the start.

    An evaluation at the same step as the previous one (`trainer.evaluate()` called again after training) is
    not a new evaluation and is ignored.
    """

    kind: ClassVar[str] = "overfitting"

    eval_metric: str = "eval_loss"
    train_metric: str = "loss"
    patience_evals: int = 3
    min_delta: float = 0.0
    require_train_improving: bool = True
    gap_growth_evals: int = 0
    warmup_evals: int = 1
    noise_z: float = 0.0
    min_epoch: float = 0.0
    _recent: deque[float] = field(init=False, repr=False, default_factory=deque)
    _evals_since_best: int = field(init=False, default=0, repr=False)
    _last_eval_step: int | None = field(init=False, default=None, repr=False)
    _best: float | None = field(init=False, default=None, repr=False)
    _best_step: int | None = field(init=False, default=None, repr=False)
    _evals_seen: int = field(init=False, default=0, repr=False)
    _evals_past_best: int = field(init=False, default=0, repr=False)
    _train_ema: float | None = field(init=False, default=None, repr=False)
    _train_ema_at_best: float | None = field(init=False, default=None, repr=False)
    _gaps: deque[float] = field(init=False, repr=False, default_factory=deque)
    _level_best: float | None = field(init=False, default=None, repr=False)
    _level_best_eval: int = field(init=False, default=0, repr=False)  # the count of evaluations it ended at
    _epoch: float | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        check_metric("eval_metric", self.eval_metric)
        check_metric("train_metric", self.train_metric)
        if self.eval_metric == self.train_metric:
            raise ValueError(f"eval_metric and train_metric must differ, both are {self.eval_metric!r}")
        check_positive_int("patience_evals", self.patience_evals, 1)
        check_finite("min_delta", self.min_delta, 0.0)
        if not isinstance(self.require_train_improving, bool):
            raise ValueError(f"require_train_improving must be true or false, got {self.require_train_improving!r}")
        check_positive_int("gap_growth_evals", self.gap_growth_evals, 0)
        check_positive_int("warmup_evals", self.warmup_evals, 0)
        check_finite("noise_z", self.noise_z, 0.0)
        check_finite("min_epoch", self.min_epoch, 0.0)
        self._gaps = deque(maxlen=self.gap_growth_evals + 1)
        self._recent = deque(maxlen=NOISE_EVALS)

    @property
    def warming_up(self) -> bool:
        return self._evals_seen < self.warmup_evals

    def update(self, step: int, values: Mapping[str, float]) -> Finding | None:
        train = finite_value(values, self.train_metric)
        if train is not None:
            ema = self._train_ema
            self._train_ema = train if ema is None else ema + TRAIN_EMA_ALPHA * (train - ema)
        epoch = finite_value(values, "epoch")
        if epoch is not None:
            self._epoch = epoch
        value = finite_value(values, self.eval_metric)
        if value is None or step == self._last_eval_step:
            return None
        self._last_eval_step = step
        self._evals_seen += 1
        self._recent.append(value)
        if self._train_ema is not None:
            self._gaps.append(value - self._train_ema)
        level = self._level()
        new_level = level is not None and (self._level_best is None or level < self._level_best)
        if new_level:
            self._level_best, self._level_best_eval = level, self._evals_seen
        if self._best is None or value < self._best:
            self._best, self._best_step, self._evals_past_best = value, step, 0
            self._evals_since_best = 0
            self._train_ema_at_best = self._train_ema
            return None
        self._evals_since_best += 1
        if self.noise_z > 0:
            return None if new_level else self._judge_trend(step, value)
        if value <= self._best + self.min_delta * abs(self._best):
            return None
        self._evals_past_best += 1
        return self._judge(step, value)

    def _judge(self, step: int, value: float) -> Finding | None:
        """Called for an eval past its best: a finding if a rule holds."""
        if self.warming_up or (self.require_train_improving and not self._train_improving()):
            return None
        if self._evals_past_best >= self.patience_evals:
            return self._finding(step, value, "patience")
        if self.gap_growth_evals > 0 and self._gap_growing():
            return self._finding(step, value, "gap_growth")
        return None

    def _level(self) -> float | None:
        """The median of the last `patience_evals` evaluations (None until there are that many)."""
        if len(self._recent) < self.patience_evals:
            return None
        return median(list(self._recent)[-self.patience_evals:])

    def _judge_trend(self, step: int, value: float) -> Finding | None:
        """noise_z mode: the latest level against the lowest one, in units of the eval's noise."""
        recent, lowest = self._level(), self._level_best
        if recent is None or lowest is None or self._evals_seen - self._level_best_eval < self.patience_evals:
            return None  # the latest level must not share an evaluation with the lowest one
        noise = self.noise()
        if recent <= lowest + self.min_delta * abs(lowest) or recent <= lowest + self.noise_z * noise:
            return None
        if self._recent[-1] < self._recent[-2]:
            return None  # the latest evaluation fell: the run may be coming back, wait for the next one
        if self._epoch is not None and self._epoch < self.min_epoch:
            return None  # still the first pass: the training loss is a held-out loss, and it is falling
        self._evals_past_best = self._evals_since_best
        if self.warming_up or (self.require_train_improving and not self._train_improving()):
            return None
        finding = self._finding(step, value, "patience")
        evidence = {**finding.evidence, "recent_median": recent, "lowest_median": lowest, "noise": noise,
                    "noise_z": self.noise_z, "epoch": self._epoch}
        k = self.patience_evals
        message = finding.message + (f"; the median of the last {k} is {recent:.4g}, "
                                     f"{(recent - lowest) / noise:.1f} noise units ({noise:.3g}) above the lowest "
                                     f"median of {k} ({lowest:.4g})" if noise > 0 else "")
        return Finding(finding.metric, finding.value, finding.threshold, finding.onset_step, message, evidence)

    def noise(self) -> float:
        """The robust spread of the eval metric's step-to-step changes (0 with fewer than 3 evaluations)."""
        values = list(self._recent)
        diffs = [b - a for a, b in zip(values, values[1:])]
        if len(diffs) < 2:
            return 0.0
        center = median(diffs)
        return MAD_SCALE * median([abs(d - center) for d in diffs]) / 2 ** 0.5

    def _train_improving(self) -> bool:
        now, then = self._train_ema, self._train_ema_at_best
        return now is not None and then is not None and now < then

    def _gap_growing(self) -> bool:
        gaps = list(self._gaps)
        if len(gaps) <= self.gap_growth_evals:
            return False
        return all(later > earlier for earlier, later in zip(gaps, gaps[1:]))

    def _finding(self, step: int, value: float, rule: str) -> Finding:
        best, best_step = float(self._best or 0.0), int(self._best_step or 0)
        limit = best + self.min_delta * abs(best)
        train = self._train_text()
        why = (
            f"for {self._evals_past_best} evaluations (patience {self.patience_evals})"
            if rule == "patience"
            else f"and its gap to {self.train_metric} grew over the last {self.gap_growth_evals} evaluations"
        )
        return Finding(
            metric=self.eval_metric,
            value=value,
            threshold=limit,
            onset_step=best_step,
            message=f"{self.eval_metric} {value:.4g} at step {step} is above its best {best:.4g} "
            f"(step {best_step}) {why}{train}",
            evidence={
                "rule": rule, "best": best, "best_step": best_step, "evals_since_best": self._evals_past_best,
                "train_ema_at_best": self._train_ema_at_best, "train_ema_now": self._train_ema,
                "gaps": list(self._gaps),
            },
        )

    def _train_text(self) -> str:
        if self._train_ema is None or self._train_ema_at_best is None:
            return ""
        verb = "fell" if self._train_ema < self._train_ema_at_best else "went"
        return f" while {self.train_metric} (EMA) {verb} from {self._train_ema_at_best:.4g} to {self._train_ema:.4g}"

    def state_dict(self) -> dict[str, JSONValue]:
        return {
            "best": self._best, "best_step": self._best_step, "evals_seen": self._evals_seen,
            "evals_past_best": self._evals_past_best, "train_ema": self._train_ema,
            "train_ema_at_best": self._train_ema_at_best, "gaps": list(self._gaps),
            "recent": list(self._recent), "evals_since_best": self._evals_since_best,
            "last_eval_step": self._last_eval_step, "level_best": self._level_best,
            "level_best_eval": self._level_best_eval, "epoch": self._epoch,
        }

    def load_state_dict(self, state: Mapping[str, JSONValue]) -> None:
        self._best = _opt_float(state["best"])
        self._best_step = None if state["best_step"] is None else int(state["best_step"])
        self._evals_seen = int(state["evals_seen"])
        self._evals_past_best = int(state["evals_past_best"])
        self._train_ema = _opt_float(state["train_ema"])
        self._train_ema_at_best = _opt_float(state["train_ema_at_best"])
        self._gaps = deque((float(g) for g in state["gaps"]), maxlen=self.gap_growth_evals + 1)
        self._recent = deque((float(x) for x in state.get("recent", [])), maxlen=NOISE_EVALS)  # type: ignore[union-attr]
        self._evals_since_best = int(state.get("evals_since_best", self._evals_past_best))  # type: ignore[arg-type]
        last = state.get("last_eval_step")
        self._last_eval_step = None if last is None else int(last)  # type: ignore[arg-type]
        self._level_best = _opt_float(state.get("level_best"))
        self._level_best_eval = int(state.get("level_best_eval") or 0)  # type: ignore[arg-type]
        self._epoch = _opt_float(state.get("epoch"))


def _opt_float(value: JSONValue) -> float | None:
    return None if value is None else float(value)
