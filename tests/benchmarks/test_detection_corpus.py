"""The detection benchmark's corpus and scoring (benchmarks/detection_corpus.py, benchmarks/detection.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from repopaths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import detection as det
import detection_corpus as dc

SHORT = {"min_steps": 1000, "max_steps": 1200}


def _stream(kind: str, index: int = 7, seed: int = 0) -> dc.Stream:
    return dc.make_stream(seed, index, kind, **SHORT)


def _arrays(s: dc.Stream) -> list[np.ndarray]:
    return [s.steps, s.loss, s.grad_norm, s.learning_rate, s.eval_steps, s.eval_loss, s.level, s.grad_level]


# --- the generator -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["healthy", "loss_spike_2x_3", "nan_both", "overfitting", "divergence_fast"])
def test_generator_is_deterministic(kind: str) -> None:
    a, b = _stream(kind), _stream(kind)
    for x, y in zip(_arrays(a), _arrays(b)):
        assert np.array_equal(x, y, equal_nan=True)
    assert a.anomalies == b.anomalies and a.params == b.params
    other = _stream(kind, seed=1)
    assert not np.array_equal(a.loss[:100], other.loss[:100])


def test_plan_counts() -> None:
    plan = dc.corpus_plan(runs_per_type=2, healthy_runs=50, persistent_runs=3)
    assert plan.count("healthy") == 50
    assert all(plan.count(t) == 2 for t in dc.LOSS_SPIKE_TYPES + dc.GRAD_SPIKE_TYPES + dc.NAN_KINDS)
    assert all(plan.count(t) == 3 for t in dc.PERSISTENT_TYPES)


@pytest.mark.parametrize("index", range(6))
def test_healthy_streams_are_finite_and_unlabelled(index: int) -> None:
    s = _stream("healthy", index)
    assert s.anomalies == []
    for values in (s.loss, s.grad_norm, s.learning_rate, s.eval_loss):
        assert np.all(np.isfinite(values))
    assert np.all(s.loss > 0) and np.all(s.grad_norm > 0) and np.all(s.learning_rate >= 0)
    assert 1000 <= s.n_steps <= 1200
    assert list(s.eval_steps) == list(range(s.eval_every, s.n_steps + 1, s.eval_every))
    # a healthy excursion of the grad norm stays within the documented bound
    assert np.max(s.grad_norm / s.grad_level) <= math.exp(dc.MAX_HEALTHY_GRAD_LOG_EXCURSION) + 1e-9


@pytest.mark.parametrize("kind", dc.LOSS_SPIKE_TYPES)
def test_loss_spike_is_the_stated_multiple_of_the_local_level(kind: str) -> None:
    s = _stream(kind)
    multiple = float(kind.split("_")[2].rstrip("x"))
    width = int(kind.rsplit("_", 1)[1])
    assert len(s.anomalies) == dc.EVENTS_PER_TRANSIENT_STREAM
    for a in s.anomalies:
        assert a.type == kind and a.end - a.start + 1 == width
        idx = [s.index_of(step) for step in range(a.start, a.end + 1)]
        assert np.allclose(s.loss[idx], multiple * s.level[idx])
        # the steps around the spike are ordinary noise, not part of it
        assert s.loss[s.index_of(a.start) - 1] < multiple * s.level[s.index_of(a.start) - 1]
    starts = [a.start for a in s.anomalies]
    assert all(b - a >= dc.MIN_EVENT_SPACING for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("kind", dc.GRAD_SPIKE_TYPES)
def test_grad_spike_is_the_stated_multiple_of_the_local_level(kind: str) -> None:
    s = _stream(kind)
    multiple = float(kind.split("_")[2].rstrip("x"))
    for a in s.anomalies:
        assert a.start == a.end
        i = s.index_of(a.start)
        assert s.grad_norm[i] == pytest.approx(multiple * s.grad_level[i])
    assert np.all(np.isfinite(s.loss))


@pytest.mark.parametrize("kind", dc.NAN_KINDS)
def test_non_finite_values_are_exactly_at_the_labelled_steps(kind: str) -> None:
    s = _stream(kind)
    bad_loss = {int(st) for st, v in zip(s.steps, s.loss) if not math.isfinite(v)}
    bad_grad = {int(st) for st, v in zip(s.steps, s.grad_norm) if not math.isfinite(v)}
    labelled = {step for a in s.anomalies for step in range(a.start, a.end + 1)}
    assert labelled and all(1 <= a.end - a.start + 1 <= 3 for a in s.anomalies)
    assert bad_loss == (labelled if kind in ("nan_loss", "nan_both") else set())
    assert bad_grad == (labelled if kind in ("nan_grad", "nan_both") else set())
    assert np.all(np.isfinite(s.eval_loss))


def test_persistent_anomalies() -> None:
    zero = _stream("plateau_zero")
    (a,) = zero.anomalies
    assert a.end == zero.n_steps
    assert np.all(zero.loss[zero.index_of(a.start):] == 0.0) and zero.loss[zero.index_of(a.start) - 1] > 0
    flat = _stream("plateau_flat")
    (a,) = flat.anomalies
    level = flat.level[flat.index_of(a.start):]
    assert np.all(level == level[0]) and flat.level[flat.index_of(a.start) - 50] > level[0]
    fast = _stream("divergence_fast")
    (a,) = fast.anomalies
    before = fast.level[fast.index_of(a.start) - 1]
    assert fast.level[fast.index_of(a.start) + 10] >= 9.9 * before and a.end == fast.n_steps
    slow = _stream("divergence_slow")
    (a,) = slow.anomalies
    doubling = slow.params["doubling_steps"]
    i = slow.index_of(a.start)
    j = i + int(doubling)
    assert 1.6 < slow.level[j] / slow.level[i - 1] < 2.1  # doubles every D steps (the base curve still falls)


def test_overfitting_eval_rises_while_train_falls() -> None:
    s = _stream("overfitting")
    (a,) = s.anomalies
    after = s.eval_steps >= a.start
    assert after.sum() >= 8
    at_onset = s.eval_loss[~after][-1]
    assert s.eval_loss[-1] > at_onset * (1 + 0.5 * s.params["eval_rise"])
    assert s.level[-1] < s.level[s.index_of(a.start)]


# --- scoring ---------------------------------------------------------------------------------------------------


def test_episodes_group_consecutive_firings() -> None:
    assert det.episodes([1, 2, 3, 10, 11, 30], 1) == [(1, 3), (10, 11), (30, 30)]
    assert det.episodes([100, 200, 300, 700], 150) == [(100, 300), (700, 700)]
    assert det.episodes([], 1) == []


def test_healthy_steps_leave_out_windows_and_tolerance() -> None:
    assert det.healthy_steps(1000, [], 50) == 1000
    assert det.healthy_steps(1000, [("x", 100, 100)], 50) == 1000 - 51
    # overlapping windows count once; a window running past the end is clipped
    assert det.healthy_steps(1000, [("x", 100, 120), ("y", 110, 130), ("z", 990, 1000)], 50) == 1000 - 81 - 11


def test_match_stream_on_a_hand_made_example() -> None:
    anomalies = [("loss_spike_2x_1", 100, 100), ("grad_spike_5x", 500, 500), ("loss_spike_2x_1", 800, 800)]
    firings = [50, 102, 103, 520, 900]
    m = det.match_stream(firings, anomalies, {"loss_spike_2x_1"}, tolerance=50, max_gap=1)
    assert m["detected"] == {0: 2}  # 102 is 2 steps after the first spike; the one at 800 is missed
    assert m["false"] == [(50, 50), (900, 900)]  # 900 is past 800 + 50
    assert m["on_target"] == [(102, 103)]
    assert m["off_target"] == [(520, 520)]  # in the grad spike's window: neither true nor false


def test_score_precision_recall_delay_and_false_alarm_rate() -> None:
    results = [
        {"meta": {"name": "a", "kind": "loss_spike_2x_1", "n_steps": 1000, "first_step": 1, "eval_every": 100,
                  "anomalies": [("loss_spike_2x_1", 100, 100), ("loss_spike_2x_1", 500, 500),
                                ("loss_spike_2x_1", 800, 800)]},
         "firings": {"r": [50, 104, 500, 501]}},
        {"meta": {"name": "b", "kind": "healthy", "n_steps": 2000, "first_step": 1, "eval_every": 100,
                  "anomalies": []},
         "firings": {"r": [10, 11, 12, 1500]}},
    ]
    s = det.score(results, {"r": ({"loss_spike_2x_1"}, "train")}, None, tolerance=50)
    assert s["labelled"] == 3 and s["detected"] == 2
    assert s["false_alarms"] == 3  # step 50 in a, steps 10-12 (one episode) and 1500 in b
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["precision"] == pytest.approx(2 / 5)
    assert s["f1"] == pytest.approx(2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3))
    assert s["delay_median"] == 2 and s["delay_p90"] == pytest.approx(3.6)
    assert s["healthy_steps"] == (1000 - 3 * 51) + 2000
    assert s["fa_per_10k"] == pytest.approx(3 / s["healthy_steps"] * 1e4)
    # restricted to another type: stream a is left out, b's false alarms remain
    other = det.score(results, {"r": ({"loss_spike_2x_1", "grad_spike_5x"}, "train")}, {"grad_spike_5x"}, 50)
    assert other["labelled"] == 0 and other["false_alarms"] == 2 and other["healthy_steps"] == 2000


def test_score_unions_a_systems_rules() -> None:
    results = [{"meta": {"name": "a", "kind": "nan_loss", "n_steps": 1000, "first_step": 1, "eval_every": 100,
                         "anomalies": [("nan_loss", 100, 100), ("nan_loss", 500, 500)]},
                "firings": {"x": [100, 300], "y": [505, 300, 301]}}]
    s = det.score(results, {"x": ({"nan_loss"}, "train"), "y": ({"nan_loss"}, "train")}, {"nan_loss"}, 50)
    assert s["detected"] == 2 and s["delay_median"] == 2.5
    assert s["false_alarms"] == 1  # 300 from x and 300-301 from y overlap: one false alarm


def test_prf_edge_cases() -> None:
    assert det.prf(0, 0, 0) == {"precision": None, "recall": None, "f1": None}
    assert det.prf(0, 5, 0)["f1"] == 0.0
    assert det.prf(5, 5, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_run_task_guardian_finds_the_labelled_nans(tmp_path: Path) -> None:
    det._worker_init(None, ("guardian", "naive"), str(tmp_path))
    res = det.run_task(("synthetic", 0, 7, "nan_both", 1000, 1000))
    starts = [a[1] for a in res["meta"]["anomalies"]]
    assert [s for s in res["firings"]["non_finite_loss"] if s in starts] == starts
    assert set(res["firings"]) >= {"loss_spike", "grad_norm>10", "loss>mean(last3)"}
