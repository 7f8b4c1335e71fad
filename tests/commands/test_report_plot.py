"""`guardian report`'s picture: every panel holds what it draws, nothing is drawn flatter or fuller than it is.

Each test writes a real Trainer log (`trainer_state.json`), reads it the way `guardian report` does, and inspects
the matplotlib figure the report saves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from realpaths import REAL_LOGS, needs_fixtures

from guardian.commands.report import RunRecord, load_run, verdict
from guardian.commands.report.plot import build_figure, spans
from guardian.rulefile.reader import load_rules


def log_file(tmp_path: Path, train: list[tuple[int, dict[str, Any]]], evals: list[tuple[int, float]] = ()) -> Path:
    history: list[dict[str, Any]] = [{"step": s, "epoch": s / 20, **values} for s, values in train]
    history += [{"step": s, "epoch": s / 20, "eval_loss": v} for s, v in evals]
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"log_history": sorted(history, key=lambda e: e["step"])}))
    return path


def record_of(path: Path) -> RunRecord:
    return load_run(path, ruleset=load_rules())


def figure(record: RunRecord) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = build_figure(record, verdict(record))
    FigureCanvasAgg(fig).draw()  # lays the figure out as savefig does: text extents and limits are final
    return fig


def axes_named(fig: Any, label: str) -> Any:
    return next(ax for ax in fig.axes if ax.get_ylabel().startswith(label))


def inside(ax: Any, values: list[float]) -> bool:
    low, high = ax.get_ylim()
    return all(low <= v <= high for v in values)


def test_an_eval_curve_below_the_train_loss_stays_in_its_panel(tmp_path: Path) -> None:
    """Once: a train spike cut the panel's top, which froze its range at the train curve's bottom, and the eval
    curve (below the train loss, as with dropout) fell out of the panel."""
    train = [(s, {"loss": 1.0 - 0.003 * s, "grad_norm": 1.0}) for s in range(1, 101)]
    train[40] = (41, {"loss": 80.0, "grad_norm": 1.0})  # one spike: cut off above the panel
    evals = [(s, 0.35 - 0.001 * s) for s in (20, 40, 60, 80, 100)]
    fig = figure(record_of(log_file(tmp_path, train, evals)))
    loss = axes_named(fig, "loss")
    assert inside(loss, [v for _, v in evals])
    assert inside(loss, [values["loss"] for _, values in train if values["loss"] < 2])
    assert loss.get_ylim()[1] < 80.0  # the spike is cut, not flattening the rest


def test_values_above_the_panel_are_drawn_as_they_are_and_marked(tmp_path: Path) -> None:
    """Once: the first values, above the cut, were drawn as a flat line at the cut."""
    train = [(s, {"loss": 5000.0 if s <= 3 else 1.0 + 0.5 * math.sin(s), "grad_norm": 1.0}) for s in range(1, 101)]
    fig = figure(record_of(log_file(tmp_path, train)))
    loss = axes_named(fig, "loss")
    top = loss.get_ylim()[1]
    assert top < 5000.0
    [curve] = [line for line in loss.get_lines() if line.get_label() == "train loss"]
    assert list(curve.get_ydata()[:3]) == [5000.0, 5000.0, 5000.0]  # the line leaves the panel; it is not clipped
    marked = [offsets for c in loss.collections for offsets in c.get_offsets().tolist()]
    assert {1.0, 2.0, 3.0} <= {x for x, _ in marked}  # and each cut value has a marker at its step


def test_a_loss_spanning_decades_gets_a_log_axis_and_a_narrow_one_does_not(tmp_path: Path) -> None:
    falling = [(s, {"loss": 10.0 * 0.95**s, "grad_norm": 1.0}) for s in range(1, 101)]  # 9.5 -> 0.06
    assert axes_named(figure(record_of(log_file(tmp_path, falling))), "loss").get_yscale() == "log"
    narrow = [(s, {"loss": 2.0 - 0.01 * s, "grad_norm": 1.0}) for s in range(1, 101)]  # 2 -> 1
    (tmp_path / "narrow").mkdir()
    assert axes_named(figure(record_of(log_file(tmp_path / "narrow", narrow))), "loss").get_yscale() == "linear"


def test_value_labels_do_not_overlap(tmp_path: Path) -> None:
    """Once: five spikes on neighbouring steps were each written out, on top of each other."""
    train = [(s, {"loss": 1.0 + 0.01 * (s % 3), "grad_norm": 1.0}) for s in range(1, 201)]
    for s in range(60, 65):
        train[s - 1] = (s, {"loss": 100.0 * s, "grad_norm": 1.0})
    fig = figure(record_of(log_file(tmp_path, train)))
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_text()]
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1:]), ax.get_ylabel()
    assert any(t.get_text() == "6.4e+03" for t in axes_named(fig, "loss").texts)  # the largest is written out


def test_a_long_run_of_firings_is_one_band_not_hundreds_of_lines(tmp_path: Path) -> None:
    """300 consecutive NaN steps: each fires, and each once drew its own red line in every panel."""
    train = [(s, {"loss": "NaN" if 100 <= s < 400 else 1.0, "grad_norm": 1.0}) for s in range(1, 501)]
    record = record_of(log_file(tmp_path, train))
    assert len(record.decisions) >= 100
    fig = figure(record)
    for ax in fig.axes:
        assert len(ax.lines) + len(ax.patches) < 12, ax.get_ylabel()
    loss = axes_named(fig, "loss")
    bands = [p for p in loss.patches if p.get_width() > 1]
    assert bands and bands[0].get_x() <= 100 and bands[0].get_x() + bands[0].get_width() >= 150


def test_spans_group_consecutive_logged_steps() -> None:
    grid = list(range(0, 100, 10))  # logged every 10 steps: 10 and 20 are consecutive
    assert [(s.first, s.last, s.count) for s in spans([10, 20, 30, 60], grid)] == [(10, 30, 3), (60, 60, 1)]
    many = spans(list(range(0, 1000, 2)), list(range(1000)), limit=10)  # every other step: merged until few
    assert len(many) <= 10 and sum(s.count for s in many) == 500


def test_nothing_logged_means_no_panel(tmp_path: Path) -> None:
    """A log with only a loss and no rule firing: one panel, not four with three saying "nothing here"."""
    train = [(s, {"loss": 2.0 - 0.01 * s}) for s in range(1, 41)]
    fig = figure(record_of(log_file(tmp_path, train)))
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss"]


@pytest.mark.slow
@needs_fixtures
def test_every_panel_of_every_real_log_holds_its_curves(tmp_path: Path) -> None:
    for log in sorted(p for p in REAL_LOGS.iterdir() if p.suffix in (".json", ".jsonl")):
        record = record_of(log)
        fig = figure(record)
        loss = next((ax for ax in fig.axes if ax.get_ylabel().startswith("loss")), None)
        if loss is None:
            continue
        series = record.eval.get("eval_loss")
        assert inside(loss, [v for v in (series.values if series else []) if math.isfinite(v)]), log.name
