"""Detectors: sequence tables, statistical properties, state round-trips and parameter errors."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardian.detectors import (
    DETECTORS,
    Detector,
    Finding,
    GradCollapseDetector,
    JumpDetector,
    NonFiniteDetector,
    OverfittingDetector,
    PlateauDetector,
    RatioDetector,
    ReversalDetector,
    RobustZScoreDetector,
    ThresholdDetector,
    WarmupRiseDetector,
)
from guardian.detectors.robust_zscore import _mad, _median

Stream = list[tuple[int, dict[str, float]]]
FAST = settings(max_examples=100, deadline=None)
NAN, INF = float("nan"), float("inf")


def series(metric: str, values: Iterable[float], start: int = 0) -> Stream:
    """One observation per step, starting at `start`."""
    return [(start + i, {metric: v}) for i, v in enumerate(values)]


def run(detector: Detector, stream: Stream) -> list[Finding]:
    return [f for step, values in stream if (f := detector.update(step, values)) is not None]


def fired_steps(detector: Detector, stream: Stream) -> list[int]:
    return [step for step, values in stream if detector.update(step, values) is not None]


def wiggle(n: int, level: float = 2.0, amplitude: float = 0.01) -> list[float]:
    """A deterministic noisy flat series."""
    return [level + amplitude * math.sin(1.7 * i) for i in range(n)]


# --- the registry and the conventions the rule-file loader relies on ---------------------------------------

ALLOWED_ANNOTATIONS = {"str", "int", "float", "bool", "float | None", "int | None", "str | None", "tuple[str, ...]"}


def test_registry_maps_each_kind_to_its_class() -> None:
    assert DETECTORS == {
        "non_finite": NonFiniteDetector,
        "threshold": ThresholdDetector,
        "robust_zscore": RobustZScoreDetector,
        "overfitting": OverfittingDetector,
        "plateau": PlateauDetector,
        "jump": JumpDetector,
        "ratio": RatioDetector,
        "reversal": ReversalDetector,
        "warmup_rise": WarmupRiseDetector,
        "grad_collapse": GradCollapseDetector,
    }


@pytest.mark.parametrize("cls", list(DETECTORS.values()), ids=list(DETECTORS))
def test_parameters_are_simple_typed_and_documented(cls: type) -> None:
    doc = cls.__doc__ or ""
    for f in dataclasses.fields(cls):
        if not f.init:
            assert f.name.startswith("_")
            continue
        assert f.type in ALLOWED_ANNOTATIONS or str(f.type).startswith("Literal["), f.name
        assert f"{f.name}:" in doc, f"{cls.__name__} docstring does not document {f.name}"


# --- NonFiniteDetector ---------------------------------------------------------------------------------------


def test_non_finite_fires_on_nan_and_inf_with_episode_onset() -> None:
    stream: Stream = [
        (1, {"loss": 1.0, "grad_norm": 0.5}),
        (2, {"loss": NAN, "grad_norm": INF}),
        (3, {"grad_norm": -INF}),
        (4, {"eval_loss": NAN}),  # not watched
        (5, {"loss": 0.9}),
        (6, {"grad_norm": NAN}),
    ]
    findings = run(NonFiniteDetector(), stream)
    assert [(f.metric, f.onset_step) for f in findings] == [("loss", 2), ("grad_norm", 2), ("grad_norm", 6)]
    assert findings[0].evidence == {"non_finite": {"loss": "nan", "grad_norm": "inf"}, "metrics": ["loss", "grad_norm"]}
    assert findings[0].message == "loss is nan at step 2: non-finite loss=nan, grad_norm=inf"
    assert findings[1].message == "grad_norm is -inf at step 3 (non-finite since step 2): non-finite grad_norm=-inf"


def test_non_finite_ignores_absent_metrics_and_accepts_a_list() -> None:
    detector = NonFiniteDetector(metrics=["eval_loss"])  # type: ignore[arg-type]
    assert detector.metrics == ("eval_loss",)
    assert detector.update(1, {"loss": NAN}) is None
    assert detector.update(1, {"eval_loss": None}) is None  # type: ignore[dict-item]
    assert not detector.warming_up
    assert detector.update(2, {"eval_loss": NAN}) is not None


# --- ThresholdDetector ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "values", "expected"),
    [
        ({"above": 10.0}, [1, 11, 10, 12], [1, 3]),
        ({"below": 0.5}, [1, 0.4, 0.5, 0.1], [1, 3]),
        ({"above": 10.0, "below": 1.0}, [5, 0.5, 20, 5], [1, 2]),
        ({"above": 10.0, "consecutive_steps": 3}, [11, 11, 5, 11, 11, 11, 11], [5, 6]),
        ({"above": 10.0, "consecutive_steps": 2}, [11, NAN, 11, INF, 11], [2, 4]),  # NaN neither counts nor breaks
        ({"above": 10.0, "warmup_steps": 3}, [50, 50, 50, 50], [3]),
        ({"above": 10.0, "warmup_steps": 2, "consecutive_steps": 2}, [50, 50, 50, 50], [3]),
    ],
)
def test_threshold_table(params: dict[str, Any], values: list[float], expected: list[int]) -> None:
    assert fired_steps(ThresholdDetector("grad_norm", **params), series("grad_norm", values)) == expected


def test_threshold_finding_names_limit_run_and_onset() -> None:
    detector = ThresholdDetector("grad_norm", above=10.0, consecutive_steps=2, warmup_steps=100)
    assert detector.warming_up
    findings = run(detector, series("grad_norm", [50, 12, 12.5], start=99))
    assert not detector.warming_up
    (finding,) = findings
    assert finding.onset_step == 100 and finding.threshold == 10.0 and finding.value == 12.5
    assert finding.message == (
        "grad_norm 12.5 at step 101 is above the limit 10 for 2 consecutive observations since step 100"
    )
    assert finding.evidence == {"side": "above", "limit": 10.0, "consecutive": 2}


# --- RobustZScoreDetector: tables ----------------------------------------------------------------------------


def with_spikes(n: int, spikes: Mapping[int, float]) -> list[float]:
    return [spikes.get(i, v) for i, v in enumerate(wiggle(n))]


@pytest.mark.parametrize(
    ("params", "values", "expected"),
    [
        ({}, with_spikes(40, {30: 5.0}), [30]),
        ({}, with_spikes(40, {10: 5.0}), []),  # still warming up (10 < 20 values)
        ({}, with_spikes(40, {30: 0.5}), []),  # a drop, direction "up"
        ({"direction": "down"}, with_spikes(40, {30: 0.5, 33: 5.0}), [30]),
        ({"direction": "both"}, with_spikes(40, {30: 0.5, 33: 5.0}), [30, 33]),
        ({"consecutive_steps": 3}, with_spikes(40, {25: 5.0, 30: 5.0, 31: 5.0, 32: 5.0}), [32]),
        ({}, with_spikes(40, {30: 2.1}), [30]),  # 5 % on a window whose noise is about 0.5 %
        ({"min_relative_change": 0.1}, with_spikes(40, {30: 2.1, 35: 3.0}), [35]),
        ({"min_change": 0.5}, with_spikes(40, {30: 2.1, 35: 3.0}), [35]),  # an absolute floor: 0.1 is not enough
        ({}, with_spikes(40, {30: NAN, 31: INF, 32: 5.0}), [32]),
    ],
)
def test_robust_zscore_table(params: dict[str, Any], values: list[float], expected: list[int]) -> None:
    detector = RobustZScoreDetector("loss", window_steps=50, warmup_steps=20, **params)
    assert fired_steps(detector, series("loss", values)) == expected


def test_robust_zscore_rebaselines_after_a_lasting_level_shift() -> None:
    values = wiggle(30) + [5.0 + 0.01 * math.sin(i) for i in range(30)]
    detector = RobustZScoreDetector("loss", window_steps=20, warmup_steps=10)
    # fires while more than window_steps // 2 = 10 consecutive values are anomalous, then the window restarts
    assert fired_steps(detector, series("loss", values)) == list(range(30, 41))


def test_robust_zscore_spike_stays_out_of_the_baseline() -> None:
    detector = RobustZScoreDetector("loss", window_steps=50, warmup_steps=20)
    values = wiggle(40)
    run(detector, series("loss", values))
    before = detector.state_dict()["window"]
    assert detector.update(40, {"loss": 9.0}) is not None
    assert detector.state_dict()["window"] == before
    assert detector.update(41, {"loss": 9.0}) is not None  # the baseline did not move


def test_robust_zscore_log_scale_ignores_non_positive_values() -> None:
    values = [1.0 * (1.01 ** (i % 5)) for i in range(30)] + [0.0, -3.0, 40.0]
    detector = RobustZScoreDetector("grad_norm", window_steps=50, warmup_steps=20, log_scale=True)
    findings = run(detector, series("grad_norm", values))
    assert [f.onset_step for f in findings] == [32]
    assert findings[0].evidence["log_scale"] is True
    assert len(detector.state_dict()["window"]) == 30


def test_robust_zscore_message_and_evidence() -> None:
    detector = RobustZScoreDetector("loss", window_steps=50, warmup_steps=20, consecutive_steps=2)
    (finding,) = run(detector, series("loss", with_spikes(32, {30: 5.0, 31: 5.0})))
    assert finding.message == (
        "loss 5 at step 31 is 307 robust z above its rolling median 1.999 (limit 6, 2 consecutive since step 30)"
    )
    assert finding.onset_step == 30 and finding.value == 5.0
    assert set(finding.evidence) >= {"median", "mad", "z", "window_size", "consecutive"}
    assert finding.evidence["window_size"] == 30 and finding.evidence["consecutive"] == 2
    assert finding.threshold == pytest.approx(finding.evidence["median"] + 6 * 1.4826 * finding.evidence["mad"])


# --- RobustZScoreDetector: properties ------------------------------------------------------------------------

any_float = st.one_of(st.floats(-1e12, 1e12), st.sampled_from([NAN, INF, -INF]))
levels = st.floats(min_value=0.01, max_value=1000.0)
unit_noise = st.lists(st.floats(min_value=-1.0, max_value=1.0), min_size=1, max_size=150)


@FAST
@given(values=st.lists(any_float, max_size=60), warmup=st.integers(1, 30))
def test_robust_zscore_never_fires_while_warming_up(values: list[float], warmup: int) -> None:
    detector = RobustZScoreDetector("loss", window_steps=30, warmup_steps=warmup, direction="both")
    for step, value in enumerate(values):
        warming = detector.warming_up
        finding = detector.update(step, {"loss": value})
        assert not (warming and finding is not None)


@FAST
@given(level=levels, noise=unit_noise, direction=st.sampled_from(["up", "down", "both"]))
def test_robust_zscore_quiet_on_small_bounded_noise(level: float, noise: list[float], direction: Any) -> None:
    # |x - median| <= 0.004 * level while the scale is >= 1e-3 * median, so |z| <= ~4 < 6 whatever the MAD
    values = [level * (1 + 0.002 * u) for u in noise]
    detector = RobustZScoreDetector("loss", window_steps=40, warmup_steps=5, direction=direction)
    assert fired_steps(detector, series("loss", values)) == []


@FAST
@given(
    values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=120),
    center=st.one_of(st.floats(-1e6, 1e6), st.none()),
)
def test_robust_zscore_incremental_mad_equals_numpy(values: list[float], center: float | None) -> None:
    s = sorted(values)
    c = float(np.median(s)) if center is None else center
    assert _mad(s, c) == float(np.median(np.abs(np.asarray(s) - c)))
    assert _median(s) == float(np.median(s))


@FAST
@given(
    values=st.lists(st.floats(0.1, 10.0), min_size=1, max_size=300),
    noise=st.sampled_from(["mad", "diff_mad"]),
    baseline=st.sampled_from([0, 5]),
)
def test_robust_zscore_statistics_follow_the_window(values: list[float], noise: Any, baseline: int) -> None:
    # the sorted copies kept step by step give the same median and MAD as computing them from the window
    detector = RobustZScoreDetector("loss", window_steps=25, warmup_steps=5, noise=noise, baseline_steps=baseline)
    run(detector, series("loss", values))
    window = np.asarray(detector.state_dict()["window"])
    if len(window) < 3:
        return
    median = float(np.median(window[-baseline:] if baseline else window))
    spread = np.diff(window) if noise == "diff_mad" else window
    center = float(np.median(spread)) if noise == "diff_mad" else median
    mad = float(np.median(np.abs(spread - center))) / (math.sqrt(2) if noise == "diff_mad" else 1)
    level = detector._level()
    assert (level, detector._spread(level)) == pytest.approx((median, mad), rel=1e-12, abs=1e-15)


@FAST
@given(level=levels, noise=st.lists(st.floats(-0.2, 0.2), min_size=20, max_size=120), consecutive=st.integers(1, 4))
def test_robust_zscore_always_catches_a_50_mad_spike(level: float, noise: list[float], consecutive: int) -> None:
    detector = RobustZScoreDetector("loss", window_steps=50, warmup_steps=20, consecutive_steps=consecutive)
    run(detector, series("loss", [level * (1 + u) for u in noise]))
    window = np.asarray(detector.state_dict()["window"])
    median = float(np.median(window))
    mad = float(np.median(np.abs(window - median)))
    spike = median + 50 * max(mad, 1e-3 * abs(median))
    steps = fired_steps(detector, series("loss", [spike] * consecutive, start=len(noise)))
    assert steps and steps[0] < len(noise) + consecutive


@FAST
@given(
    values=st.lists(st.floats(min_value=0.1, max_value=10.0), min_size=1, max_size=120),
    exponent=st.integers(-20, 20),
    params=st.fixed_dictionaries(
        {"direction": st.sampled_from(["up", "down", "both"]), "z_threshold": st.floats(0.5, 8.0),
         "min_relative_change": st.sampled_from([0.0, 0.05])}
    ),
)
def test_robust_zscore_is_invariant_to_positive_scaling(
    values: list[float], exponent: int, params: dict[str, Any]
) -> None:
    # a power of two scales every float exactly, so the comparison cannot be upset by rounding
    scale = 2.0**exponent

    def steps(vals: list[float]) -> list[int]:
        detector = RobustZScoreDetector("loss", window_steps=30, warmup_steps=10, **params)
        return fired_steps(detector, series("loss", vals))

    assert steps(values) == steps([v * scale for v in values])


def test_robust_zscore_log_scale_is_invariant_to_scaling() -> None:
    values = [1.0 + 0.3 * math.sin(i) for i in range(60)]
    values[40] = 30.0
    for scale in (1e-3, 7.0, 1e4):
        detector = RobustZScoreDetector("grad_norm", window_steps=30, warmup_steps=10, log_scale=True)
        assert fired_steps(detector, series("grad_norm", [v * scale for v in values])) == [40]


# --- non-finite values never change what the statistical detectors do ---------------------------------------


def _zscore() -> Detector:
    return RobustZScoreDetector("loss", window_steps=20, warmup_steps=5, direction="both", consecutive_steps=2)


def _plateau() -> Detector:
    return PlateauDetector("loss", window_steps=8, zero_steps=3, min_relative_improvement=0.05)


def _threshold() -> Detector:
    return ThresholdDetector("loss", above=2.5, consecutive_steps=2)


def _overfit() -> Detector:
    return OverfittingDetector(eval_metric="loss", train_metric="grad_norm", patience_evals=2, gap_growth_evals=2)


@FAST
@given(
    make=st.sampled_from([_zscore, _plateau, _threshold, _overfit]),
    values=st.lists(st.one_of(st.floats(0.0, 5.0), st.just(0.0), st.just(2.0)), min_size=1, max_size=80),
    inserts=st.lists(st.tuples(st.integers(0, 80), st.sampled_from([NAN, INF, -INF])), max_size=10),
)
def test_non_finite_values_do_not_change_later_behaviour(
    make: Callable[[], Detector], values: list[float], inserts: list[tuple[int, float]]
) -> None:
    mixed: list[float] = list(values)
    for position, bad in sorted(inserts, reverse=True):
        mixed.insert(min(position, len(mixed)), bad)
    stream = [(step, {"loss": v, "grad_norm": 3.0 - v}) for step, v in enumerate(mixed)]
    clean = [(step, obs) for step, obs in stream if math.isfinite(obs["loss"])]
    assert [repr(f) for f in run(make(), stream)] == [repr(f) for f in run(make(), clean)]


# --- OverfittingDetector -------------------------------------------------------------------------------------


def train_and_eval(evals: list[float], train_start: float, train_end: float, logs_per_eval: int = 10) -> Stream:
    """Train logs every 10 steps falling linearly, an eval after each block of them."""
    stream: Stream = []
    total = len(evals) * logs_per_eval
    for k, eval_value in enumerate(evals):
        for j in range(logs_per_eval):
            i = k * logs_per_eval + j
            stream.append((10 * (i + 1), {"loss": train_start + (train_end - train_start) * i / (total - 1)}))
        stream.append((10 * (k + 1) * logs_per_eval, {"eval_loss": eval_value}))
    return stream


TEXTBOOK_OVERFIT = [0.53, 0.51, 0.55, 0.65, 0.8, 0.95, 1.1, 1.23]
HEALTHY_EVAL = [1.62, 1.40, 1.31, 1.25, 1.22, 1.19, 1.18, 1.17, 1.16, 1.15, 1.14, 1.13, 1.12, 1.12]


def test_overfitting_fires_on_a_textbook_overfit() -> None:
    findings = run(OverfittingDetector(), train_and_eval(TEXTBOOK_OVERFIT, 0.8, 0.04))
    assert [f.evidence["evals_since_best"] for f in findings] == [3, 4, 5, 6]
    first = findings[0]
    assert first.onset_step == 200 and first.value == 0.8 and first.threshold == 0.51
    assert first.evidence["best"] == 0.51 and first.evidence["best_step"] == 200
    assert first.evidence["train_ema_now"] < first.evidence["train_ema_at_best"]
    assert first.message.startswith("eval_loss 0.8 at step 500 is above its best 0.51 (step 200) for 3 evaluations")


@pytest.mark.parametrize(
    ("params", "evals", "train", "expected_evals"),
    [
        ({}, HEALTHY_EVAL, (2.0, 1.0), []),
        ({}, [1.0, 0.9, 0.91, 0.95, 0.89, 0.9, 0.92, 0.88, 0.88], (2.0, 1.0), []),  # blips, then a new best
        ({}, [1.0, 0.9, 0.91, 0.915, 0.905, 0.89], (2.0, 1.0), [5]),  # three evals above the best
        ({"min_delta": 0.02}, [1.0, 0.9, 0.91, 0.915, 0.905, 0.89], (2.0, 1.0), []),  # within 2 % of it
        ({}, TEXTBOOK_OVERFIT, (0.8, 1.5), []),  # train not improving: divergence, not overfitting
        ({"require_train_improving": False}, TEXTBOOK_OVERFIT, (0.8, 1.5), [5, 6, 7, 8]),
        ({"patience_evals": 1}, TEXTBOOK_OVERFIT, (0.8, 0.04), [3, 4, 5, 6, 7, 8]),
        ({"min_delta": 0.5}, TEXTBOOK_OVERFIT, (0.8, 0.04), [7, 8]),  # above 0.765 from the 5th eval on
        ({"gap_growth_evals": 2}, TEXTBOOK_OVERFIT, (0.8, 0.04), [3, 4, 5, 6, 7, 8]),
        ({"warmup_evals": 6}, TEXTBOOK_OVERFIT, (0.8, 0.04), [6, 7, 8]),
    ],
)
def test_overfitting_table(
    params: dict[str, Any], evals: list[float], train: tuple[float, float], expected_evals: list[int]
) -> None:
    steps = fired_steps(OverfittingDetector(**params), train_and_eval(evals, *train))
    assert steps == [100 * k for k in expected_evals]


def test_overfitting_warming_up_and_missing_train() -> None:
    detector = OverfittingDetector(warmup_evals=2)
    assert detector.warming_up
    assert run(detector, series("eval_loss", TEXTBOOK_OVERFIT)) == []  # no train values: cannot judge
    assert not detector.warming_up
    lenient = OverfittingDetector(require_train_improving=False)
    assert fired_steps(lenient, series("eval_loss", TEXTBOOK_OVERFIT)) == [4, 5, 6, 7]


@FAST
@given(
    drops=st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.5)), min_size=1, max_size=40),
    train=st.lists(st.floats(0.0, 5.0), min_size=1, max_size=40),
    patience=st.integers(1, 4),
    gap=st.integers(0, 3),
    require=st.booleans(),
)
def test_overfitting_never_fires_on_non_increasing_eval(
    drops: list[float], train: list[float], patience: int, gap: int, require: bool
) -> None:
    detector = OverfittingDetector(patience_evals=patience, gap_growth_evals=gap, require_train_improving=require)
    eval_value, stream = 3.0, []
    for i, drop in enumerate(drops):
        eval_value -= drop
        stream.append((2 * i, {"loss": train[i % len(train)]}))
        stream.append((2 * i + 1, {"eval_loss": eval_value}))
    assert run(detector, stream) == []


# --- PlateauDetector -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "values", "expected"),
    [
        ({"window_steps": 8}, [2.0] * 20, [7, 15]),  # fires once per window, then the window starts over
        ({"window_steps": 8}, [2.0 * 0.99**i for i in range(30)], []),
        ({"window_steps": 8, "min_relative_improvement": 0.1}, [2.0 * 0.99**i for i in range(30)], [7, 15, 23]),
        ({"window_steps": 8, "warmup_steps": 5}, [2.0] * 13, [12]),  # steps 5..12
        ({"window_steps": 8}, [3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [9]),
        ({"window_steps": 100, "zero_steps": 3}, [1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0], [6, 7]),
        ({"window_steps": 100, "zero_steps": 0}, [0.0] * 50, []),
        ({"window_steps": 8}, [1.0, NAN] * 5 + [1.0] * 3, [12]),  # the 8th finite value
    ],
)
def test_plateau_table(params: dict[str, Any], values: list[float], expected: list[int]) -> None:
    assert fired_steps(PlateauDetector("loss", **params), series("loss", values)) == expected


def test_plateau_findings_say_which_condition() -> None:
    zero = run(PlateauDetector(zero_steps=2), series("loss", [1.0, 0.0, 0.0], start=10))
    assert zero[0].evidence["condition"] == "stuck_at_zero" and zero[0].onset_step == 11
    assert zero[0].message == "loss has been exactly 0 for 2 consecutive observations from step 11 to step 12 (limit 2)"
    flat = run(PlateauDetector(window_steps=4), series("loss", [2.0, 2.1, 2.0, 2.05], start=10))
    assert flat[0].evidence["condition"] == "no_improvement" and flat[0].onset_step == 10
    assert flat[0].message == (
        "loss has not improved over 4 observations from step 10 to step 13: newest-quarter mean 2.05 "
        "vs oldest-quarter mean 2 (needs a drop of 0.10%)"
    )


def test_plateau_quiet_on_a_slow_healthy_decline() -> None:
    # ~0.5 % lower per 100 logs with noise, like a long real LLM fine-tune late in training
    values = [2.35 * 0.99995**i * (1 + 0.01 * math.sin(2.3 * i)) - 0.001 * i / 435 for i in range(435)]
    assert fired_steps(PlateauDetector(), series("loss", values)) == []


@FAST
@given(start=st.floats(1e-3, 1e3), rate=st.floats(0.01, 0.2), n=st.integers(1, 1000))
def test_plateau_never_fires_on_geometric_decay(start: float, rate: float, n: int) -> None:
    values = [start * (1 - rate) ** i for i in range(n)]
    assert fired_steps(PlateauDetector(), series("loss", values)) == []


def _plateau_reference(values: list[float], window: int) -> list[int]:
    """The no-improvement check written plainly: both quarter means added up afresh at every step."""
    held: list[float] = []
    fired = []
    for step, v in enumerate(values):
        held = (held + [v])[-window:]
        if len(held) == window:
            q = window // 4
            first, last = sum(held[:q]) / q, sum(held[-q:]) / q
            if first - last < 0.001 * abs(first):
                fired.append(step)
                held = []
    return fired


@FAST
@given(
    start=st.floats(1e-3, 1e3),
    shape=st.sampled_from(["geometric", "walk", "flat", "steps"]),
    rate=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**16),
    n=st.integers(1, 700),
)
def test_plateau_running_sums_decide_as_fresh_sums_do(start: float, shape: str, rate: float, seed: int, n: int) -> None:
    """The quarter sums are slid rather than re-added each step; no input may change a decision, not even a
    loss falling by tens of orders of magnitude (where sliding sums cancel catastrophically)."""
    rng = np.random.default_rng(seed)
    if shape == "geometric":
        values = [start * (1 - rate) ** i for i in range(n)]
    elif shape == "walk":
        values = list(start * np.exp(np.cumsum(rng.normal(0, rate + 1e-3, n))))
    elif shape == "flat":
        values = list(start * (1 + rate * rng.standard_normal(n)))
    else:  # long flat stretches at levels orders of magnitude apart
        values = [start * 10.0 ** -(6 * (i // 97 % 3)) for i in range(n)]
    detector = PlateauDetector(window_steps=40, zero_steps=0)
    assert fired_steps(detector, series("loss", values)) == _plateau_reference(values, 40)


# --- state round-trips: every detector resumes exactly where it stopped --------------------------------------


def _warmup(*, peak: float, warmup: int, losses: list[float]) -> Stream:
    """A linear warm-up to `peak` over `warmup` steps, then constant, with the given per-step losses."""
    return [(i, {"loss": loss, "learning_rate": peak * min(1.0, (i + 1) / warmup)}) for i, loss in enumerate(losses)]


def _collapse_stream(collapse: bool = True) -> Stream:
    """A 5-step warm-up with grad norm ~1, then the grad norm falls 10x while the loss stays flat (or, healthy,
    the grad norm stays while the loss falls)."""
    stream: Stream = []
    for i in range(30):
        lr = 0.1 * min(1.0, (i + 1) / 5)
        warm = i < 5
        grad = 1.0 + 0.05 * (i % 2) if warm or not collapse else 0.1 + 0.01 * (i % 2)
        loss = 3.0 - 0.1 * min(i, 5) if collapse else 3.0 - 0.05 * i
        stream.append((i + 1, {"loss": loss + 0.01 * (i % 3), "grad_norm": grad, "learning_rate": lr}))
    return stream


def _overfit_stream() -> Stream:
    return train_and_eval(TEXTBOOK_OVERFIT, 0.8, 0.04)


ROUND_TRIPS: dict[str, tuple[Callable[[], Detector], Stream, int]] = {
    "non_finite": (NonFiniteDetector, series("loss", [1.0, NAN, NAN, 1.0, INF, NAN]), 2),
    "threshold": (
        lambda: ThresholdDetector("loss", above=3.0, consecutive_steps=3),
        series("loss", [4, 4, 1, 4, 4, 4, 4]),
        4,
    ),
    "robust_zscore": (
        lambda: RobustZScoreDetector("loss", window_steps=20, warmup_steps=10, consecutive_steps=2),
        series("loss", wiggle(25) + [5.0] * 3 + wiggle(5) + [5.0] * 15),
        26,
    ),
    "robust_zscore_log": (
        lambda: RobustZScoreDetector("loss", window_steps=20, warmup_steps=10, log_scale=True),
        series("loss", wiggle(25) + [5.0] * 3 + wiggle(5) + [5.0] * 15),
        15,
    ),
    "overfitting": (lambda: OverfittingDetector(gap_growth_evals=2), _overfit_stream(), 45),
    "plateau": (lambda: PlateauDetector(window_steps=8, zero_steps=3), series("loss", [2.0] * 11 + [0.0] * 10), 6),
    "jump": (
        lambda: JumpDetector("learning_rate", factor=4.0, window_steps=3),
        series("learning_rate", [1.0, 1.1, 1.2, 9.0, 9.0, 1.0, 9.0, 9.0, 9.0, 9.0]),
        4,
    ),
    "robust_zscore_sustained": (  # cut inside a sustained run: its count must survive the round trip
        lambda: RobustZScoreDetector("loss", window_steps=20, warmup_steps=10, z_threshold=50.0, sustained_steps=3),
        series("loss", wiggle(25) + [2.5] * 4 + wiggle(5) + [2.5] * 3),
        26,
    ),
    "ratio": (
        lambda: RatioDetector("probe_loss", "probe_loss_ref", above=1.5),
        [(i, {"probe_loss": v, "probe_loss_ref": 1.0}) for i, v in enumerate([1.0, 2.0, 1.1, 3.0, NAN])],
        2,
    ),
    "warmup_rise": (
        lambda: WarmupRiseDetector(smooth_steps=3),
        _warmup(peak=1.0, warmup=10, losses=[3.0, 2.5, 2.0, 1.8, 2.2, 2.8, 3.3, 3.6, 3.8, 4.0, 4.0, 4.0]),
        6,
    ),
    "grad_collapse": (
        lambda: GradCollapseDetector(window_steps=3, watch_steps=20),
        _collapse_stream(),
        9,
    ),
    "jump_scheduled": (
        lambda: JumpDetector("learning_rate", reference_metric="scheduled_lr"),
        [(i, {"learning_rate": lr, "scheduled_lr": 1.0}) for i, lr in enumerate([1.0, 1.0, 50.0, 50.0, 1.0, 50.0])],
        3,
    ),
    "robust_zscore_trend": (
        lambda: RobustZScoreDetector("loss", window_steps=30, warmup_steps=10, baseline_steps=5, noise="diff_mad"),
        series("loss", [5.0 - 0.1 * i + 0.01 * (i % 3) for i in range(20)] + [9.0, 3.0, 9.0, 2.9, 9.0]),
        21,
    ),
    "reversal": (
        lambda: ReversalDetector("rewards/margins", baseline_steps=5, warmup_steps=8),
        series("rewards/margins", [0.1 * i + 0.02 * (i % 2) for i in range(1, 12)] + [-1.0, -0.5, 1.3, -0.2]),
        12,
    ),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_state_round_trip(name: str) -> None:
    make, stream, cut = ROUND_TRIPS[name]
    original = make()
    run(original, stream[:cut])
    state = original.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain JSON types only
    restored = make()
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.warming_up == original.warming_up
    expected = [repr(f) for f in run(original, stream[cut:])]
    assert expected, "the continuation should produce findings, or the test proves little"
    assert [repr(f) for f in run(restored, stream[cut:])] == expected


def test_every_kind_has_a_round_trip_case() -> None:
    assert set(DETECTORS) <= set(ROUND_TRIPS)


# --- parameter validation ------------------------------------------------------------------------------------


def bad(cls: type, match: str, **kwargs: Any) -> Any:
    """One row: building `cls(**kwargs)` must raise ValueError matching `match`."""
    return pytest.param(cls, kwargs, match, id=f"{cls.__name__}-{'-'.join(kwargs)}")


def thr(**kwargs: Any) -> dict[str, Any]:
    return {"metric": "loss", "above": 1.0} | kwargs


def rz(**kwargs: Any) -> dict[str, Any]:
    return {"metric": "loss"} | kwargs


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        bad(NonFiniteDetector, r"metrics must be a non-empty list .* got \(\)", metrics=()),
        bad(NonFiniteDetector, r"metrics must be a non-empty list .* got 'loss'", metrics="loss"),
        bad(NonFiniteDetector, r"each entry of metrics must be a non-empty metric name", metrics=("loss", "")),
        bad(ThresholdDetector, r"metric must be a non-empty metric name .* got ''", metric="", above=1.0),
        bad(ThresholdDetector, r"above or below must be given", metric="loss"),
        bad(ThresholdDetector, r"above must be a finite number, got nan", metric="loss", above=NAN),
        bad(ThresholdDetector, r"below must be a finite number, got inf", metric="loss", below=INF),
        bad(ThresholdDetector, r"below must be less than above, got below=2.0 and above=1.0", **thr(below=2.0)),
        bad(ThresholdDetector, r"consecutive_steps must be an integer >= 1, got 0", **thr(consecutive_steps=0)),
        bad(ThresholdDetector, r"warmup_steps must be an integer >= 0, got -1", **thr(warmup_steps=-1)),
        bad(ThresholdDetector, r"warmup_steps must be an integer >= 0, got 1.5", **thr(warmup_steps=1.5)),
        bad(RobustZScoreDetector, r"window_steps must be an integer >= 3, got 2", metric="loss", window_steps=2),
        bad(RobustZScoreDetector, r"warmup_steps must be an integer >= 1, got 0", metric="loss", warmup_steps=0),
        bad(
            RobustZScoreDetector,
            r"warmup_steps must be between 1 and window_steps \(100\), got 101",
            metric="loss",
            warmup_steps=101,
        ),
        bad(RobustZScoreDetector, r"z_threshold must be a finite number > 0, got -1.0", **rz(z_threshold=-1.0)),
        bad(RobustZScoreDetector, r"z_threshold must be a finite number > 0, got 0", metric="loss", z_threshold=0),
        bad(
            RobustZScoreDetector,
            r"direction must be one of 'up', 'down', 'both', got 'sideways'",
            metric="loss",
            direction="sideways",
        ),
        bad(RobustZScoreDetector, r"consecutive_steps must be an integer >= 1, got 0", **rz(consecutive_steps=0)),
        bad(
            RobustZScoreDetector,
            r"consecutive_steps must be between 1 and window_steps // 2 \(50\), got 51",
            metric="loss",
            consecutive_steps=51,
        ),
        bad(
            RobustZScoreDetector,
            r"min_relative_change must be a finite number >= 0, got -0.1",
            metric="loss",
            min_relative_change=-0.1,
        ),
        bad(RobustZScoreDetector, r"log_scale must be true or false, got 'yes'", metric="loss", log_scale="yes"),
        bad(
            RobustZScoreDetector,
            r"sustained_steps must be 0 \(off\) or between 2 and window_steps // 2 \(50\), got 1",
            metric="loss",
            sustained_steps=1,
        ),
        bad(RobustZScoreDetector, r"sustained_steps must be an integer >= 0, got -3", **rz(sustained_steps=-3)),
        bad(
            RobustZScoreDetector,
            r"sustained_z_threshold must not exceed z_threshold \(8\), got 9",
            metric="loss",
            z_threshold=8.0,
            sustained_steps=3,
            sustained_z_threshold=9.0,
        ),
        bad(
            RobustZScoreDetector,
            r"sustained_z_threshold must be a finite number > 0, got 0",
            metric="loss",
            sustained_steps=3,
            sustained_z_threshold=0,
        ),
        bad(OverfittingDetector, r"eval_metric must be a non-empty metric name", eval_metric=""),
        bad(OverfittingDetector, r"train_metric must be a non-empty metric name .* got None", train_metric=None),
        bad(OverfittingDetector, r"train_metric must differ, both are 'eval_loss'", train_metric="eval_loss"),
        bad(OverfittingDetector, r"patience_evals must be an integer >= 1, got 0", patience_evals=0),
        bad(OverfittingDetector, r"min_delta must be a finite number >= 0, got -0.01", min_delta=-0.01),
        bad(OverfittingDetector, r"require_train_improving must be true or false, got 1", require_train_improving=1),
        bad(OverfittingDetector, r"gap_growth_evals must be an integer >= 0, got -1", gap_growth_evals=-1),
        bad(OverfittingDetector, r"warmup_evals must be an integer >= 0, got True", warmup_evals=True),
        bad(PlateauDetector, r"metric must be a non-empty metric name", metric=" "),
        bad(PlateauDetector, r"window_steps must be an integer >= 4, got 3", window_steps=3),
        bad(PlateauDetector, r"improvement must be a finite number >= 0, got -0.5", min_relative_improvement=-0.5),
        bad(PlateauDetector, r"improvement must be a finite number >= 0, got inf", min_relative_improvement=INF),
        bad(PlateauDetector, r"warmup_steps must be an integer >= 0, got -1", warmup_steps=-1),
        bad(PlateauDetector, r"zero_steps must be an integer >= 0, got -2", zero_steps=-2),
    ],
)
def test_parameter_errors(cls: type, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# --- trends and jumps --------------------------------------------------------------------------------------


def test_diff_mad_sees_a_spike_on_a_steeply_falling_loss() -> None:
    """A falling loss inflates the plain MAD and hides a spike; the differences' MAD does not."""
    falling = [5.0 * 0.97**i + 0.05 * ((i * 7) % 5 - 2) / 2 for i in range(40)]
    stream = series("loss", falling + [falling[-1] * 2.5])
    plain = RobustZScoreDetector("loss", window_steps=100, warmup_steps=30, z_threshold=8.0)
    trend = RobustZScoreDetector(
        "loss", window_steps=100, warmup_steps=30, z_threshold=8.0, baseline_steps=10, noise="diff_mad"
    )
    assert fired_steps(plain, stream) == []
    assert fired_steps(trend, stream) == [40]


# --- sustained shifts: a few steps in a row, each below the one-step threshold -------------------------------


def _sustained(**kwargs: Any) -> RobustZScoreDetector:
    params: dict[str, Any] = dict(window_steps=100, warmup_steps=20, z_threshold=8.0, sustained_steps=3,
                                  sustained_z_threshold=4.5, min_relative_change=0.2)
    return RobustZScoreDetector("loss", **{**params, **kwargs})


NOISY = [2.0 + 0.1 * math.sin(1.7 * i) for i in range(60)]  # robust sigma ~0.1: 2.6 is about z 6


@pytest.mark.parametrize(
    ("burst", "expected"),
    [
        ([2.6] * 3, [62]),  # three steps at z ~6: fires on the third, not before
        ([2.6] * 5, [62, 63, 64]),  # and on each further one
        ([2.6] * 2, []),  # two are not enough
        ([2.6, 2.6, 2.1, 2.6, 2.6], []),  # the run must be unbroken
        ([2.42] * 5, []),  # z ~4 is below the sustained threshold
        ([6.0], [60]),  # a one-step spike beyond z_threshold still fires at once
    ],
)
def test_sustained_shift_fires_after_its_steps(burst: list[float], expected: list[int]) -> None:
    stream = series("loss", NOISY + burst + NOISY[:10])
    assert fired_steps(_sustained(), stream) == expected
    assert fired_steps(_sustained(sustained_steps=0), stream) == [s for s, v in stream if v["loss"] == 6.0]


def test_sustained_finding_names_its_own_threshold_and_onset() -> None:
    findings = run(_sustained(), series("loss", NOISY + [2.6] * 3))
    assert len(findings) == 1
    f = findings[0]
    assert f.onset_step == 60 and f.evidence["sustained"] is True and f.evidence["z_threshold"] == 4.5
    assert "limit 4.5 for 3 in a row: 3 since step 60" in f.message
    assert 4.5 < f.evidence["z"] < 8.0


def test_sustained_values_stay_out_of_the_baseline() -> None:
    """A long burst is kept out of the window, so the baseline does not climb into it (until it rebaselines)."""
    detector = _sustained()
    run(detector, series("loss", NOISY + [2.6] * 10))
    assert max(detector.state_dict()["window"]) < 2.2  # type: ignore[type-var]


@given(st.lists(st.floats(0.5, 1.5), min_size=40, max_size=120))
@settings(max_examples=60, deadline=None)
def test_diff_mad_is_quiet_on_a_falling_loss_with_bounded_noise(noise: list[float]) -> None:
    values = [3.0 * 0.99**i + 0.02 * n for i, n in enumerate(noise)]
    detector = RobustZScoreDetector(
        "loss", window_steps=100, warmup_steps=20, z_threshold=8.0, baseline_steps=10, noise="diff_mad",
        min_relative_change=0.1,
    )
    assert fired_steps(detector, series("loss", values)) == []


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 1e-4, 2e-4, 3e-4, 4e-4, 5e-4], []),  # linear warm-up from zero
        ([1e-3 * (1 - i / 50) for i in range(50)], []),  # linear decay
        ([1e-3] * 5 + [3e-2] * 3 + [1e-3] * 3, [5, 6, 7]),  # a blow-up for three steps
    ],
)
def test_jump_flags_a_learning_rate_blowup_but_not_a_schedule(values: list[float], expected: list[int]) -> None:
    assert fired_steps(JumpDetector("learning_rate"), series("learning_rate", values)) == expected


def test_jump_rejects_a_factor_of_one_or_less() -> None:
    with pytest.raises(ValueError, match="factor must be a finite number > 1"):
        JumpDetector("learning_rate", factor=1.0)


# --- RatioDetector ----------------------------------------------------------------------------------------------


def test_ratio_fires_when_the_metric_is_far_above_its_reference_or_not_finite() -> None:
    detector = RatioDetector("probe_loss", "probe_loss_ref", above=1.5)
    stream = [(1, {"probe_loss": 1.4, "probe_loss_ref": 1.0}), (2, {"probe_loss": 1.6, "probe_loss_ref": 1.0}),
              (3, {"probe_loss": NAN, "probe_loss_ref": 1.0}), (4, {"probe_loss": 9.0}),
              (5, {"probe_loss": 9.0, "probe_loss_ref": NAN})]
    findings = run(detector, stream)
    assert [f.onset_step for f in findings] == [2, 3]
    assert "1.6x its reference probe_loss_ref 1 (limit 1.5x)" in findings[0].message
    assert RatioDetector("a", "b", non_finite=False).update(1, {"a": NAN, "b": 1.0}) is None


def test_ratio_min_difference_ignores_tiny_absolute_changes() -> None:
    detector = RatioDetector("probe_loss", "probe_loss_ref", above=1.5, min_difference=0.1)
    assert detector.update(1, {"probe_loss": 0.02, "probe_loss_ref": 0.01}) is None
    assert detector.update(2, {"probe_loss": 0.5, "probe_loss_ref": 0.01}) is not None


# --- WarmupRiseDetector -----------------------------------------------------------------------------------------


def test_warmup_rise_fires_once_when_the_warmup_ends_above_its_minimum() -> None:
    losses = [3.0, 2.6, 2.2, 2.0, 2.1, 2.6, 3.0, 3.4, 3.6, 3.8] + [3.8] * 5
    findings = run(WarmupRiseDetector(smooth_steps=3), _warmup(peak=0.1, warmup=10, losses=losses))
    assert len(findings) == 1
    (finding,) = findings
    assert finding.onset_step == 4  # where the smoothed loss was lowest
    assert finding.evidence["peak_lr"] == pytest.approx(0.1)
    assert finding.evidence["lr_factor"] == pytest.approx(0.5 * finding.evidence["lr_at_minimum"] / 0.1)
    assert "while the learning rate rose from" in finding.message


@pytest.mark.parametrize("losses", [
    [3.0, 2.6, 2.2, 2.0, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3] + [1.2] * 5,   # healthy: falls all through the warm-up
    [3.0, 2.6, 2.2, 2.0, 1.8, 1.9, 2.0, 2.1, 2.0, 2.1] + [2.1] * 5,   # a small rise: within min_rise
])
def test_warmup_rise_is_quiet_on_a_warmup_that_works(losses: list[float]) -> None:
    assert run(WarmupRiseDetector(smooth_steps=3), _warmup(peak=0.1, warmup=10, losses=losses)) == []


def test_warmup_rise_never_judges_a_run_without_warmup() -> None:
    stream = [(i, {"loss": 1.0 + i, "learning_rate": 0.1}) for i in range(20)]
    assert run(WarmupRiseDetector(smooth_steps=3), stream) == []


# --- JumpDetector against the schedule --------------------------------------------------------------------------


def test_a_rate_off_its_schedule_fires_at_every_step_and_is_never_accepted() -> None:
    detector = JumpDetector("learning_rate", window_steps=3, reference_metric="scheduled_lr")
    stream = [(i, {"learning_rate": 1.0 if i < 2 else 100.0, "scheduled_lr": 1.0}) for i in range(20)]
    findings = run(detector, stream)
    assert len(findings) == 18 and all(f.onset_step == 2 for f in findings)
    assert "100x the scheduled_lr 1 (limit 1.5x)" in findings[-1].message


def test_without_a_schedule_the_rate_is_judged_against_its_recent_maximum() -> None:
    detector = JumpDetector("learning_rate", window_steps=3, reference_metric="scheduled_lr")
    stream = [(i, {"learning_rate": 1.0 if i < 2 else 100.0}) for i in range(10)]
    assert len(run(detector, stream)) == 3  # the new level is accepted after window_steps


# --- ThresholdDetector at the run's own scale -------------------------------------------------------------------


def test_a_threshold_relative_to_the_first_steps_fits_the_run_scale() -> None:
    huge = ThresholdDetector("grad_norm", above=1e4, relative_to_first_steps=5)
    assert run(huge, series("grad_norm", [1e6 * (1 + 0.1 * (i % 3)) for i in range(30)])) == []
    small = ThresholdDetector("grad_norm", above=1e4, relative_to_first_steps=5)
    assert fired_steps(small, series("grad_norm", [0.5] * 5 + [2e4])) == [5]  # the floor stays 1e4
    big = ThresholdDetector("grad_norm", above=1e4, relative_to_first_steps=5)
    assert [f.value for f in run(big, series("grad_norm", [1e6] * 5 + [5e9, 2e10]))] == [2e10]


# --- OverfittingDetector with noisy evaluations -----------------------------------------------------------------


def _evals(values: list[float], train_start: float = 2.0) -> Stream:
    stream: Stream = []
    for i, value in enumerate(values):
        stream.append((i * 10, {"loss": train_start - 0.01 * i}))
        stream.append((i * 10, {"eval_loss": value}))
    return stream


def test_noisy_evaluations_that_keep_improving_do_not_fire() -> None:
    noisy = [0.57, 0.53, 0.48, 0.46, 0.45, 0.42, 0.41, 0.41, 0.41, 0.395, 0.403, 0.406, 0.383, 0.375, 0.362,
             0.354, 0.383, 0.368, 0.363, 0.367, 0.367, 0.354, 0.361, 0.345]   # a real ASR run's eval loss
    assert run(OverfittingDetector(patience_evals=3, min_delta=0.03, noise_z=2.0), _evals(noisy)) == []
    assert run(OverfittingDetector(patience_evals=3, min_delta=0.03), _evals(noisy)) != []  # per-evaluation: fires


def test_a_real_rise_fires_in_noise_mode() -> None:
    rising = [0.53, 0.51, 0.56, 0.75, 0.81, 1.01, 1.06]
    detector = OverfittingDetector(patience_evals=3, min_delta=0.03, noise_z=2.0)
    fired = fired_steps(detector, _evals(rising))
    # the lowest median of 3 is 0.53 (steps 0-20); the first median of 3 later evaluations (30-50) is 0.81
    assert fired[0] == 50
    finding = run(OverfittingDetector(patience_evals=3, min_delta=0.03, noise_z=2.0), _evals(rising))[0]
    assert finding.onset_step == 10 and "noise units" in finding.message and "lowest median of 3 (0.53)" in finding.message


def test_a_lucky_low_evaluation_is_not_the_bar() -> None:
    # A flat, noisy eval loss with one lucky draw: against that draw (0.40) the later median (0.50) looks 25 %
    # worse, but no level of 3 evaluations was ever below 0.49.
    flat = [0.50, 0.49, 0.51, 0.40, 0.52, 0.49, 0.50, 0.52, 0.48, 0.51, 0.50, 0.53, 0.50, 0.52]
    assert run(OverfittingDetector(patience_evals=3, min_delta=0.03, noise_z=2.0), _evals(flat)) == []


def _with_epochs(stream: Stream, steps_per_epoch: int) -> Stream:
    return [(step, {**values, "epoch": step / steps_per_epoch}) if "eval_loss" in values else (step, values)
            for step, values in stream]


def test_no_stop_in_the_first_pass_over_the_data() -> None:
    rising = _evals([0.53, 0.51, 0.56, 0.75, 0.81, 1.01, 1.06, 1.1, 1.2])
    first_pass = OverfittingDetector(patience_evals=3, min_delta=0.03, noise_z=2.0, min_epoch=1.0)
    assert run(first_pass, _with_epochs(rising, steps_per_epoch=100)) == []  # epoch 0.8 at the last evaluation
    second = OverfittingDetector(patience_evals=3, min_delta=0.03, noise_z=2.0, min_epoch=1.0)
    assert fired_steps(second, _with_epochs(rising, steps_per_epoch=60))[0] == 60  # epoch 1.0 at step 60
    unknown = OverfittingDetector(patience_evals=3, min_delta=0.03, noise_z=2.0, min_epoch=1.0)
    assert fired_steps(unknown, rising)[0] == 50  # a run that reports no epoch is judged as before


def test_an_evaluation_repeated_at_the_same_step_is_not_a_new_one() -> None:
    detector = OverfittingDetector(patience_evals=1, min_delta=0.0)
    stream = [(0, {"loss": 1.0}), (0, {"eval_loss": 1.0}), (10, {"loss": 0.9}), (10, {"eval_loss": 0.9})]
    assert run(detector, stream) == []
    assert detector.update(10, {"eval_loss": 5.0}) is None  # trainer.evaluate() again at the last step


def test_warmup_rise_is_quiet_when_the_rise_is_within_the_loss_noise() -> None:
    # A tiny, very noisy regression loss (a real run's first logs): its smoothed minimum is just a low draw.
    losses = [0.084, 0.02, 0.012, 0.011, 0.08, 0.043, 0.045, 0.069, 0.016, 0.051, 0.037, 0.068, 0.03, 0.069]
    stream = _warmup(peak=5e-5, warmup=12, losses=losses)
    assert run(WarmupRiseDetector(), stream) == []
    assert run(WarmupRiseDetector(noise_z=0.0), _warmup(peak=5e-5, warmup=12, losses=losses)) != []


def test_zero_losses_do_not_pull_the_baseline_down() -> None:
    """Ten steps with every label masked (loss exactly 0), then normal losses: not a single spike."""
    stream = series("loss", wiggle(30) + [0.0] * 10 + wiggle(20))
    guarded = RobustZScoreDetector("loss", window_steps=100, warmup_steps=20, baseline_steps=10,
                                   noise="diff_mad", z_threshold=8.0, ignore_at_or_below=0.0)
    assert run(guarded, stream) == []
    plain = RobustZScoreDetector("loss", window_steps=100, warmup_steps=20, baseline_steps=10,
                                 noise="diff_mad", z_threshold=8.0)
    assert len(run(plain, stream)) >= 10  # without it every normal loss after the zeros looks like a spike



def test_grad_collapse_fires_once_when_the_gradient_falls_and_the_loss_stalls() -> None:
    findings = run(GradCollapseDetector(window_steps=3, watch_steps=20), _collapse_stream())
    assert len(findings) == 1
    finding = findings[0]
    assert finding.evidence["lr_factor"] == 0.1 and finding.onset_step <= 7
    assert "below its level during the warm-up" in finding.message


def test_grad_collapse_is_quiet_while_the_loss_keeps_falling() -> None:
    assert run(GradCollapseDetector(window_steps=3, watch_steps=20), _collapse_stream(collapse=False)) == []
