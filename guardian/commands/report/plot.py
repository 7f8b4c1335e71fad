"""The picture of `guardian report`: one panel per thing logged, over the optimizer step.

Honest by construction: every panel's y-range is set once, from everything drawn in it (train and eval curves,
the best-weights marker); a value cut off above a panel is drawn as a line leaving the panel plus a marker at
its step (never a flat line at the cut); the loss axis is logarithmic when the loss spans more than a decade,
so the early descent stays readable; runs of consecutive firings are drawn as one band; a panel with nothing to
show is not drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardian.commands.report.record import RunRecord, Series
from guardian.commands.report.summary import by_rule, finite_points, interventions, operator_actions, restored_best
from guardian.events import LrChange

FIGSIZE_INCHES = (12, 10)
DPI = 110
LOG_SCALE_DECADES = 1.0  # a loss spanning more than this many decades gets a log axis
MARKS_MAX = 40  # firings, skips: at most this many separate marks per severity or row; closer ones merge into bands
LABEL_GAP_FRACTION = 0.07  # value labels closer than this fraction of the step axis are not both written
LABELS_MAX = 6
OPERATOR_STYLE = ("#e377c2", "P", "operator action")
SEVERITY_COLOURS = {"info": "#1f77b4", "warning": "#ff9f1c", "critical": "#d62728"}
ACTION_STYLES = {  # action -> (colour, marker, legend label)
    "skip": ("#555555", "v", "update skipped"),
    "rollback": ("#9467bd", "<", "rollback (arrow: back to the target step)"),
    "lr_cut": ("#2ca02c", "D", "learning-rate cut"),
    "stop": ("#000000", "s", "stop"),
    "lr_restore": ("#17becf", "o", "learning rate put back on its schedule"),
}


@dataclass(frozen=True)
class Span:
    """Consecutive steps (firings, skips) shown as one mark: a line when `first == last`, else a band."""

    first: int
    last: int
    count: int


def render_png(record: RunRecord, path: Path, headline: str) -> None:
    build_figure(record, headline).savefig(path)


def build_figure(record: RunRecord, headline: str) -> Any:
    """The report's figure: loss, gradient norm, learning rate and the decision strip, each only if it has data."""
    from matplotlib.figure import Figure

    rules = list(by_rule(record.decisions))
    panels = _panels(record)
    ratios = [{"loss": 3.0, "grad": 2.0, "lr": 2.0}.get(p, 0.9 + 0.3 * (len(rules) + _operator_rows(record)))
              for p in panels]
    fig = Figure(figsize=FIGSIZE_INCHES, dpi=DPI, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": ratios})[:, 0]
    flags: set[str] = set()
    grid = _step_grid(record)
    for name, ax in zip(panels, axes):
        if name == "loss":
            _loss_panel(ax, record, flags)
        elif name == "grad":
            _grad_panel(ax, record, flags)
        elif name == "lr":
            _lr_panel(ax, record, flags)
        elif name == "strip":
            _timeline_strip(ax, record, rules, grid)
        else:
            _empty(ax, "nothing was logged")
        if name in ("loss", "grad", "lr"):
            _mark_decisions(ax, record, grid, flags)
    steps = [s for series in (*record.train.values(), *record.eval.values()) for s in series.steps] or [0, 1]
    low, high = min(steps), max(max(steps), record.last_step)
    pad = max(1.0, 0.01 * (high - low))
    axes[-1].set_xlim(low - pad, high + pad)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(record.name, fontsize=13, fontweight="bold")
    axes[0].set_title(headline, fontsize=10, loc="left")
    handles = _legend_handles(record, flags)
    if handles:  # a healthy run with nothing marked has no legend (matplotlib refuses zero columns)
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    return fig


def _panels(record: RunRecord) -> list[str]:
    """The panels with something to show, top to bottom."""
    panels = []
    if _has_values(record.train.get("loss")) or _has_values(record.eval.get("eval_loss")):
        panels.append("loss")
    if _has_values(record.train.get("grad_norm")):
        panels.append("grad")
    scale_moved = not record.replayed and (interventions(record).lr_cuts or any(v != 1.0 for v in record.lr_scale.values))
    if _has_values(record.train.get("learning_rate")) or scale_moved:
        panels.append("lr")
    if record.decisions or record.actions:
        panels.append("strip")
    return panels or ["nothing"]


def _has_values(series: Series | None) -> bool:
    return bool(series and series.values)


def _operator_rows(record: RunRecord) -> int:
    return 1 if operator_actions(record) else 0


# ---- the value panels -------------------------------------------------------------------------------


def _loss_panel(ax: Any, record: RunRecord, flags: set[str]) -> None:
    train, evals = record.train.get("loss"), record.eval.get("eval_loss")
    values = [v for s in (train, evals) if s for v in s.values]
    log = _wants_log(values)
    top = _robust_top(values, log=log)
    if log:
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        flags.add("log_loss")
    shown: list[float] = []
    if train:
        shown += _curve(ax, train, top, flags, color="#1f77b4", label="train loss", smooth=True)
    if evals:
        shown += _curve(ax, evals, top, flags, color="#ff7f0e", label="eval loss", marker="o")
    best = restored_best(record)
    if best is not None:
        ax.scatter([best[0]], [best[1]], marker="*", s=160, color="#ff7f0e", edgecolors="black", zorder=8,
                   label="best weights " + ("that would be restored" if record.replayed else "restored"))
        shown.append(best[1])
    _fit_y(ax, shown, top, log=log)
    _nan_row(ax, [train, evals], flags)
    ax.legend(loc="best", fontsize=8)
    ax.set_ylabel("loss (log)" if log else "loss")


def _grad_panel(ax: Any, record: RunRecord, flags: set[str]) -> None:
    series = record.train.get("grad_norm")
    assert series is not None  # only drawn when logged
    positive = Series([s for s, v in zip(series.steps, series.values) if not (math.isfinite(v) and v <= 0)],
                      [v for v in series.values if not (math.isfinite(v) and v <= 0)])
    ax.set_ylabel("grad norm (log)")
    if finite_points(positive):
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        shown = _curve(ax, positive, None, flags, color="#8c564b", label="grad norm", smooth=True)
        _fit_y(ax, shown, None, log=True)
    else:
        ax.set_yticks([])
    zeros = [s for s, v in zip(series.steps, series.values) if math.isfinite(v) and v <= 0]
    if zeros:
        ax.scatter(zeros, [0.03] * len(zeros), transform=_edge(ax), marker="v", color="#8c564b", s=18, clip_on=False)
        flags.add("zero_grad")
    _nan_row(ax, [series], flags)


def _lr_panel(ax: Any, record: RunRecord, flags: set[str]) -> None:
    series = record.train.get("learning_rate")
    ax.set_ylabel("learning rate")
    acts = interventions(record)
    if series and series.values:
        top = _robust_top(series.values, log=False)
        shown = _curve(ax, series, top, flags, color="#17becf", label="learning rate")
        _nan_row(ax, [series], flags)
        if acts.lr_cuts:
            lookup = dict(zip(series.steps, series.values))
            cut = [(s, lookup.get(s + 1, lookup.get(s))) for s in acts.lr_cuts]
            cut = [(s, v) for s, v in cut if v is not None and math.isfinite(v) and (top is None or v <= top)]
            ax.scatter([s for s, _ in cut], [v for _, v in cut], marker="D", color=ACTION_STYLES["lr_cut"][0],
                       s=30, zorder=5)
        restored = [(a.step, a.lr_restored.to) for a in record.actions if isinstance(a.lr_restored, LrChange)]
        if restored:  # the logged rate is the one that jumped; the update used this one
            ax.scatter([s for s, _ in restored], [v for _, v in restored], marker="o", s=22, zorder=6,
                       facecolors="none", edgecolors=ACTION_STYLES["lr_restore"][0], linewidths=1.2)
            shown += [v for _, v in restored]
        _fit_y(ax, shown, top, log=False)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        ax.set_yticks([])
    scale = record.lr_scale
    if not record.replayed and (acts.lr_cuts or any(v != 1.0 for v in scale.values)):
        twin = ax.twinx()
        if scale.steps:
            twin.plot(scale.steps, scale.values, drawstyle="steps-post", color="#2ca02c", ls="--", lw=1.2)
        twin.set_ylim(0, 1.1)
        twin.set_ylabel("LR scale", color="#2ca02c")
        flags.add("lr_scale")


def _curve(ax: Any, series: Series, top: float | None, flags: set[str], *, color: str, label: str,
           smooth: bool = False, marker: str | None = None) -> list[float]:
    """Plot a series as it is (a value above `top` leaves the panel, marked at its step); return the values shown
    inside the panel. NaN/inf break the line (a gap, never a bridge) and are marked in the panel's NaN row."""
    steps = series.steps
    values = [v if math.isfinite(v) else math.nan for v in series.values]
    if smooth and len(values) > 600:  # the raw curve faint, a rolling median (spikes stay in the raw one) on top
        ax.plot(steps, values, color=color, lw=0.6, alpha=0.35)
        ax.plot(steps, _rolling_median(values, max(5, len(values) // 100)), color=color, lw=1.4, label=label)
    else:
        ax.plot(steps, values, color=color, lw=1.1, label=label, marker=marker, ms=4)
    points = finite_points(series)
    over = [(s, v) for s, v in points if top is not None and v > top]
    if over:
        _off_scale_marks(ax, over, color)
        flags.add("off_scale")
    return [v for _, v in points if top is None or v <= top]


def _off_scale_marks(ax: Any, over: list[tuple[int, float]], color: str) -> None:
    """Values above the panel: a marker at the top edge at each step, and the largest values written out where
    their labels do not crowd each other."""
    ax.scatter([s for s, _ in over], [0.97] * len(over), transform=_edge(ax), marker="^", color=color,
               edgecolors="#333333", linewidths=0.5, s=26, clip_on=False, zorder=6)
    for step, value in keep_apart(over, _step_range(ax) * LABEL_GAP_FRACTION, LABELS_MAX):
        ax.annotate(f"{value:.3g}", (step, 0.97), xycoords=_edge(ax), xytext=(4, -4), textcoords="offset points",
                    fontsize=7, color="#333333", va="top", ha="left")


def keep_apart(points: Sequence[tuple[int, float]], min_gap: float, limit: int) -> list[tuple[int, float]]:
    """The points to label: the largest values first, each at least `min_gap` steps from every label kept."""
    kept: list[tuple[int, float]] = []
    for step, value in sorted(points, key=lambda p: -p[1]):
        if len(kept) >= limit:
            break
        if all(abs(step - other) >= min_gap for other, _ in kept):
            kept.append((step, value))
    return sorted(kept)


def _step_range(ax: Any) -> float:
    steps = [float(x) for line in ax.get_lines() for x in line.get_xdata()]
    return max(steps) - min(steps) if len(steps) > 1 else 1.0


def _fit_y(ax: Any, shown: list[float], top: float | None, *, log: bool) -> None:
    """Set the y-range once, from everything drawn inside the panel (train, eval, markers) and the cut."""
    values = [v for v in shown if math.isfinite(v) and (v > 0 or not log)]
    if not values:
        return
    low, high = min(values), max(values)
    if top is not None:
        high = max(high, top)
    if log:
        span = math.log10(high) - math.log10(low) if high > low else 0.5
        pad = 0.06 * span
        ax.set_ylim(low / 10**pad, high * 10**pad)
    else:
        pad = 0.06 * (high - low) if high > low else (abs(high) * 0.1 or 1.0)
        ax.set_ylim(low - pad, high + pad)


def _nan_row(ax: Any, series_list: list[Series | None], flags: set[str]) -> None:
    bad = sorted({s for series in series_list if series for s, v in zip(series.steps, series.values)
                  if not math.isfinite(v)})
    if bad:
        ax.scatter(bad, [0.91] * len(bad), transform=_edge(ax), marker="X", color="#d62728", s=40,
                   clip_on=False, zorder=7)
        flags.add("nan")


def _wants_log(values: list[float]) -> bool:
    """A log loss axis when every value is positive and the (robust) range spans more than a decade."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2 or min(finite) <= 0:
        return False
    top = _robust_top(finite, log=True) or max(finite)
    return math.log10(top / min(finite)) > LOG_SCALE_DECADES


def _robust_top(values: list[float], *, log: bool) -> float | None:
    """Where to cut a panel so that a blow-up does not flatten the rest of the curve (None: no cut)."""
    finite = sorted(v for v in values if math.isfinite(v) and (v > 0 or not log))
    if len(finite) < 10:
        return None
    data = [math.log10(v) for v in finite] if log else finite
    lo, hi = data[int(0.05 * (len(data) - 1))], data[int(0.95 * (len(data) - 1))]
    cut = hi + 2 * ((hi - lo) or abs(hi) or 1.0) if not log else hi + max(1.0, 2 * (hi - lo))
    if data[-1] <= cut:
        return None
    return 10**cut if log else cut


# ---- decisions and actions --------------------------------------------------------------------------


def _step_grid(record: RunRecord) -> list[int]:
    """Every step the run logged or decided at: what "consecutive" means for firings."""
    steps = {s for series in (*record.train.values(), *record.eval.values()) for s in series.steps}
    steps |= {d.step for d in record.decisions} | {a.step for a in record.actions}
    return sorted(steps)


def spans(steps: list[int], grid: list[int], limit: int = MARKS_MAX) -> list[Span]:
    """Group steps into runs of consecutive logged steps; widen the allowed gap until at most `limit` remain."""
    position = {s: i for i, s in enumerate(grid)}
    ordered = sorted(set(steps))
    gap = 1
    while True:
        found: list[Span] = []
        for step in ordered:
            if found and position.get(step, 0) - position.get(found[-1].last, 0) <= gap:
                found[-1] = Span(found[-1].first, step, found[-1].count + 1)
            else:
                found.append(Span(step, step, 1))
        if len(found) <= limit:
            return found
        gap *= 2


def _mark_decisions(ax: Any, record: RunRecord, grid: list[int], flags: set[str]) -> None:
    for severity in ("info", "warning", "critical"):
        steps = [d.step for d in record.decisions if d.severity.value == severity]
        for span in spans(steps, grid):
            colour = SEVERITY_COLOURS[severity]
            if span.first == span.last:
                ax.axvline(span.first, color=colour, lw=0.8, alpha=0.45, zorder=0)
            else:
                ax.axvspan(span.first, span.last, color=colour, alpha=0.15, lw=0, zorder=0)
                flags.add("band")
    acts = interventions(record)
    for action in acts.rollbacks:
        if action.rollback_to_step is not None:
            ax.axvspan(action.rollback_to_step, action.step, color=ACTION_STYLES["rollback"][0], alpha=0.08, lw=0)
    for step in acts.stops:
        ax.axvline(step, color="black", ls="--", lw=1.2)
        if record.replayed:
            ax.axvspan(step, record.last_step, color="#999999", alpha=0.12, lw=0)
    for action in operator_actions(record):
        ax.axvline(action.step, color=OPERATOR_STYLE[0], ls=":", lw=1.4)


def _timeline_strip(ax: Any, record: RunRecord, rules: list[str], grid: list[int]) -> None:
    """One row per rule that fired (runs of firings as bars), a row for Guardian's actions, one for the operator's."""
    operator = operator_actions(record)
    rows = {rule: i + 1 for i, rule in enumerate(rules)}
    for rule, group in by_rule(record.decisions).items():
        worst = max(group, key=lambda d: ("info", "warning", "critical").index(d.severity.value))
        _span_row(ax, spans([d.step for d in group], grid), rows[rule], SEVERITY_COLOURS[worst.severity.value])
    acts = interventions(record)
    hollow = record.replayed
    # Several actions at one step sit on sub-rows of the actions row: skips low, rollbacks high.
    for kind, steps, y in (("skip", acts.skipped, -0.22), ("lr_restore", acts.lr_restores, 0.0),
                           ("lr_cut", acts.lr_cuts, 0.0), ("stop", acts.stops, 0.0),
                           ("rollback", [a.step for a in acts.rollbacks], 0.22)):
        colour, marker, _ = ACTION_STYLES[kind]
        if kind in ("skip", "lr_restore"):
            _span_row(ax, spans(steps, grid), y, colour, marker=marker, hollow=hollow)
        elif steps:
            ax.scatter(steps, [y] * len(steps), marker=marker, s=45, zorder=4,
                       facecolors="none" if hollow else colour, edgecolors=colour, linewidths=1.2)
    targets = [(a.step, a.rollback_to_step) for a in acts.rollbacks if a.rollback_to_step is not None]
    labelled = {step for step, _ in keep_apart([(s, float(s)) for s, _ in targets],
                                               max(1.0, (grid[-1] - grid[0]) * LABEL_GAP_FRACTION) if grid else 1.0,
                                               LABELS_MAX)}
    for step, target in targets:
        ax.annotate("", xy=(target, 0.22), xytext=(step, 0.22),
                    arrowprops={"arrowstyle": "->", "color": ACTION_STYLES["rollback"][0], "lw": 1.5})
        if step in labelled:
            ax.text((target + step) / 2, 0.3, f"back to step {target}", fontsize=7, color=ACTION_STYLES["rollback"][0],
                    va="bottom", ha="center")
    labels = ["would act" if hollow else "Guardian", *rows]
    ticks = [0, *rows.values()]
    if operator:
        y = len(rules) + 1
        colour, marker, _ = OPERATOR_STYLE
        ax.scatter([a.step for a in operator], [y] * len(operator), marker=marker, s=60, color=colour, zorder=4)
        ticks.append(y)
        labels.append("operator")
    ax.set_yticks(ticks, labels)
    ax.set_ylim(-0.6, len(ticks) - 0.4)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)


def _span_row(ax: Any, found: list[Span], y: float, colour: str, *, marker: str = "o", hollow: bool = False) -> None:
    singles = [s.first for s in found if s.first == s.last]
    if singles:
        ax.scatter(singles, [y] * len(singles), marker=marker, s=30, zorder=3, linewidths=1.2,
                   facecolors="none" if hollow else colour, edgecolors=colour)
    for span in found:
        if span.first != span.last:
            ax.hlines(y, span.first, span.last, colors=colour, lw=6, alpha=0.6 if not hollow else 0.3, zorder=3)


def _legend_handles(record: RunRecord, flags: set[str]) -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []
    for severity in ("critical", "warning", "info"):
        if any(d.severity.value == severity for d in record.decisions):
            handles.append(Line2D([], [], color=SEVERITY_COLOURS[severity], marker="o", lw=0.8,
                                  label=f"{severity} decision"))
    if "band" in flags:
        handles.append(Patch(color="#999999", alpha=0.3, label="band: a run of consecutive firings"))
    acts = interventions(record)
    present = {"skip": acts.skipped, "rollback": acts.rollbacks, "lr_cut": acts.lr_cuts, "stop": acts.stops,
               "lr_restore": acts.lr_restores}
    for kind, (colour, marker, label) in ACTION_STYLES.items():
        if present[kind]:
            label = f"would be: {label}" if record.replayed else f"Guardian: {label}"
            handles.append(Line2D([], [], color=colour, marker=marker, ls="none", label=label,
                                  markerfacecolor="none" if record.replayed else colour))
    if operator_actions(record):
        colour, marker, label = OPERATOR_STYLE
        handles.append(Line2D([], [], color=colour, marker=marker, ls=":", label=label))
    if any(a.rollback_to_step is not None for a in acts.rollbacks):
        handles.append(Patch(color=ACTION_STYLES["rollback"][0], alpha=0.2, label="steps undone by a rollback"))
    if record.replayed and acts.stops:
        handles.append(Patch(color="#999999", alpha=0.3, label="after the stop the rules would have made"))
    if "nan" in flags:
        handles.append(Line2D([], [], color="#d62728", marker="X", ls="none", label="NaN / inf value"))
    if "off_scale" in flags:
        handles.append(Line2D([], [], color="#777777", marker="^", ls="none", label="value above the panel (cut)"))
    if "zero_grad" in flags:
        handles.append(Line2D([], [], color="#8c564b", marker="v", ls="none", label="grad norm 0 (below the axis)"))
    if "lr_scale" in flags:
        handles.append(Line2D([], [], color="#2ca02c", ls="--",
                              label="LR scale set by Guardian or the operator (right axis)"))
    return handles


# ---- small helpers ----------------------------------------------------------------------------------


def _rolling_median(values: list[float], window: int) -> list[float]:
    import numpy as np

    half = window // 2
    data = np.asarray(values, dtype=float)
    return [float(np.nanmedian(data[max(0, i - half): i + half + 1])) if np.isfinite(data[i]) else math.nan
            for i in range(len(data))]


def _plain_log_ticks(ax: Any) -> None:
    """Log-axis labels as 0.5, 1, 2 rather than 5e-01; minor ticks at 2 and 5 labelled when the range is short."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _: Any) -> str:
        low, high = ax.get_ylim()
        ratio = high / max(low, 1e-300)
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0.0
        shown = (1.2, 1.4, 1.6, 1.8, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0) if ratio <= 4 else (2.0, 3.0, 5.0) if ratio <= 30 \
            else (2.0, 5.0) if ratio <= 200 else ()
        return f"{value:g}" if mantissa in shown else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _edge(ax: Any) -> Any:
    """x in data, y in axes fractions: for markers pinned to the top or bottom of a panel."""
    from matplotlib.transforms import blended_transform_factory

    return blended_transform_factory(ax.transData, ax.transAxes)


def _empty(ax: Any, text: str) -> None:
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#777777")
