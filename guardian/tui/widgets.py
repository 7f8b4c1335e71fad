"""What `guardian top` draws: pure functions from snapshots to rich renderables (no I/O, no clock).

Tests render them into a fixed-width console writing to a string and compare the text exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from guardian.tui.source import OPERATOR, DecisionLine, GpuMemory, RunSnapshot, Snapshot

BLOCKS = "▁▂▃▄▅▆▇█"
NON_FINITE = "×"
WIDE_COLUMNS = 100  # the detail view puts rule states and the decision log side by side from here
CURVES_LINES, TALL_CURVES_LINES = 10, 21  # the runs screen's curves panel of the selected run, and on a tall terminal
DETAIL_POINTS = 200
STATUS_STYLES = {"running": "green", "firing": "bold yellow", "stalled": "bold red", "ended": "dim"}
RULE_STYLES = {"ok": "green", "warming_up": "dim", "firing": "bold yellow", "cooling_down": "cyan"}
SEVERITY_STYLES = {"info": "dim", "warning": "yellow", "critical": "bold red"}
COLUMN_GAP = 2
CORE_COLUMNS = ("", "run", "status", "step", "loss")  # always shown
COLUMNS = (*CORE_COLUMNS, "eval loss", "lr", "grad norm", "firing", "GPU memory", "tok/s", "decisions",
           "last report")  # left to right
DROP_ORDER = ("last report", "decisions", "tok/s", "GPU memory", "grad norm", "firing")  # the first goes first
LAST_DROPPED = ("lr", "eval loss")  # only once the ids are cut to RUN_ID_MIN
RUN_ID_MIN, ID_MAX, FIRING_MIN = 12, 48, 24
# What spare room buys, in this order (each taken if it fits): a loss sparkline, the progress bar, how an ended
# run ended, a grad-norm sparkline, more of the firing rules, then longer sparklines with their min and max.
GROWTH: tuple[dict[str, Any], ...] = (
    {"loss_spark": 8}, {"step_bar": True}, {"long_status": True}, {"grad_spark": 6}, {"firing_width": 48},
    {"loss_spark": 12, "loss_scale": True}, {"loss_spark": 24}, {"grad_spark": 12, "grad_scale": True},
    {"loss_spark": 32}, {"loss_spark": 40}, {"grad_spark": 20},
)

# ---- numbers ---------------------------------------------------------------------------------------


def number(value: float | None, digits: int = 4) -> str:
    """A metric value in few characters: 4 significant digits; "—" when unknown."""
    if value is None:
        return "—"
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.{digits}g}"


def rate(value: float | None) -> str:
    """A throughput: 950, 12.3k, 4.1M."""
    if value is None or not math.isfinite(value):
        return "—"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}"


def gibibytes(value: float) -> str:
    gib = value / 2**30
    return f"{gib:.1f}" if gib < 10 else f"{gib:.0f}"


def learning_rate(run: RunSnapshot) -> str:
    """The learning rate, and Guardian's cut of it when there is one: "0.0002 ×0.5"."""
    text = number(run.learning_rate, 3)
    if run.lr_scale is not None and run.lr_scale != 1.0:
        text += f" ×{run.lr_scale:.3g}"
    return text


# ---- curves ----------------------------------------------------------------------------------------


def resample(values: Sequence[float], width: int) -> list[float]:
    """At most `width` points: each the largest of its bucket (spikes stay visible), NaN if any was."""
    if width <= 0:
        return []
    if len(values) <= width:
        return list(values)
    out = []
    for i in range(width):
        bucket = values[i * len(values) // width:(i + 1) * len(values) // width]
        bad = [v for v in bucket if not math.isfinite(v)]
        out.append(bad[0] if bad else max(bucket))
    return out


def chart(values: Sequence[float], width: int, height: int = 1) -> list[str]:
    """Block-character rows (top first) of the values resampled to `width`; NaN/inf are "×" in every row."""
    return _chart_rows(list(resample(values, width)), height)


def by_step(steps: Sequence[int], values: Sequence[float], first: int, last: int, width: int) -> list[float | None]:
    """`width` points on a step axis from `first` to `last`: each column the largest value logged in its steps
    (NaN if any was; a step logged again after a rollback counts with its newest value), the one before carried
    on over columns without a value (an eval every 50 steps is a step line), None before the first value."""
    span = max(1, last - first + 1)
    columns: list[list[float]] = [[] for _ in range(max(0, width))]
    latest = dict(zip(steps, values))  # after a rollback the steps come again: the run's current path is drawn
    for step, value in latest.items():
        if first <= step <= last and width > 0:
            columns[min(width - 1, (step - first) * width // span)].append(value)
    out: list[float | None] = []
    held: float | None = None
    for bucket in columns:
        if bucket:
            bad = [v for v in bucket if not math.isfinite(v)]
            point = bad[0] if bad else max(bucket)
            held = point if math.isfinite(point) else None
            out.append(point)
        else:
            out.append(held)
    return out


def _chart_rows(points: Sequence[float | None], height: int) -> list[str]:
    finite = [v for v in points if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    levels = height * len(BLOCKS)
    heights: list[int | None] = [
        0 if v is None else None if not math.isfinite(v) else
        1 + (0 if hi == lo else round((v - lo) / (hi - lo) * (levels - 1))) for v in points]
    return [_chart_row(heights, height - 1 - row) for row in range(height)]


def _chart_row(heights: Sequence[int | None], row_from_bottom: int) -> str:
    cells = []
    for level in heights:
        if level is None:
            cells.append(NON_FINITE)
            continue
        fill = min(len(BLOCKS), level - row_from_bottom * len(BLOCKS))  # level 0: no value in this column
        cells.append(BLOCKS[fill - 1] if fill > 0 else " ")
    return "".join(cells)


def sparkline(values: Sequence[float], width: int) -> str:
    """The newest `width` values as one row of block characters, scaled to their own min..max."""
    return chart(list(values)[-width:] if width > 0 else [], width, 1)[0]


def progress_bar(step: int | None, max_steps: int | None, width: int = 6) -> str:
    """ "1520/3000 ███░░░" ("1520" alone when the run's length is unknown)."""
    if step is None:
        return "—"
    if not max_steps:
        return str(step)
    filled = round(width * min(1.0, step / max_steps))
    return f"{step}/{max_steps} " + "█" * filled + "░" * (width - filled)


def gpu_bar(gpu: GpuMemory, width: int = 5) -> Text:
    """ "0 ███░░ 61/80G", green below 70 % used, yellow below 90 %, red above."""
    used = gpu.used_bytes / gpu.total_bytes if gpu.total_bytes else 0.0
    filled = round(width * min(1.0, used))
    style = "green" if used < 0.7 else "yellow" if used < 0.9 else "red"
    return Text.assemble(f"{gpu.device} ", ("█" * filled, style), ("░" * (width - filled), "dim"),
                         f" {gibibytes(gpu.used_bytes)}/{gibibytes(gpu.total_bytes)}G")


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


# ---- the runs table --------------------------------------------------------------------------------


def visible_window(count: int, selected: int, rows: int) -> range:
    """The indices of `rows` consecutive runs that include the selected one."""
    rows = max(1, rows)
    start = min(max(0, selected - rows + 1), max(0, count - rows))
    return range(start, min(count, start + rows))


def middle_ellipsis(text: str, width: int) -> str:
    """`text` in `width` cells, cut in the middle ("lora-fau…-3f2a9c1d"): ids of one family share their start,
    and what tells them apart is often at the end."""
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    tail = (width - 1) - (width - 1) // 2
    head = width - 1 - tail
    return text[:head] + "…" + text[len(text) - tail:]


def common_affixes(ids: Sequence[str]) -> tuple[int, int]:
    """The lengths of the start and the end that all `ids` share ((0, 0) for fewer than two)."""
    if len(ids) < 2:
        return 0, 0
    prefix = len(os.path.commonprefix(list(ids)))
    suffix = len(os.path.commonprefix([i[prefix:][::-1] for i in ids]))
    return prefix, suffix


def short_id(run_id: str, width: int, affixes: tuple[int, int] = (0, 0)) -> str:
    """`run_id` in `width` cells, keeping what tells it from the other runs': the start and the end every id
    shares (`affixes`) give way first ("lora…faulty…"), then the middle of what is left."""
    if cell_len(run_id) <= width:
        return run_id
    prefix, suffix = affixes
    core = run_id[prefix:len(run_id) - suffix]
    budget = width - len(core)
    if not core or budget < 0 or (prefix == 0 and suffix == 0):
        return middle_ellipsis(core or run_id, width) if budget < 0 and core else middle_ellipsis(run_id, width)
    reserve = 1 if suffix > budget else 0  # the mark of a cut end
    if prefix <= budget - reserve:
        head, budget = run_id[:prefix], budget - prefix
    else:
        keep = max(0, budget - reserve - 1)
        head, budget = run_id[:keep] + "…", reserve
    tail = run_id[len(run_id) - suffix:]
    if suffix > budget:
        tail = tail[:max(0, budget - 1)] + "…" if budget >= 1 else ""
    return head + core + tail


def status_label(run: RunSnapshot, *, long: bool = False) -> str:
    """ "running", "firing", "stalled", and for an ended run how it ended: "finished" or "stopped" (`long`:
    "stopped by operator", "stopped by rule overfitting")."""
    if not run.ended:
        return run.status
    how = run.ending or "finished"
    return how if long or not how.startswith("stopped") else "stopped"


def scaled_sparkline(values: Sequence[float], width: int, *, scale: bool) -> str:
    """The sparkline of the newest `width` values, then their min and max when `scale`:
    "▇▅▃▂▁▁ min 1.93 max 3.8"."""
    window = list(values)[-width:] if width > 0 else []
    line = sparkline(window, width)
    finite = [v for v in window if math.isfinite(v)]
    if not scale or not finite:
        return line
    return f"{line:<{width}} min {number(min(finite), 3)} max {number(max(finite), 3)}"


@dataclass
class TableLayout:
    """What the runs table shows at a given width: its columns and how much room each detail gets."""

    columns: list[str]
    id_width: int
    long_status: bool = False
    step_bar: bool = False
    loss_spark: int = 0
    loss_scale: bool = False
    grad_spark: int = 0
    grad_scale: bool = False
    firing_width: int = FIRING_MIN
    affixes: tuple[int, int] = (0, 0)  # what every id shares at its start and end (see `short_id`)


def run_cells(run: RunSnapshot, selected: bool, layout: TableLayout | None = None) -> dict[str, Text]:
    """Every column's cell for one run, as `layout` sizes them (the widest when None)."""
    lay = layout or TableLayout(list(COLUMNS), ID_MAX, True, True, 8, False, 6)
    firing = ", ".join(run.firing)
    ending = run.ended and (run.stopped_by is not None)
    return {
        "": Text("▶" if selected else " "),
        "run": Text(short_id(run.id, lay.id_width, lay.affixes)),
        "status": Text(status_label(run, long=lay.long_status),
                       style="bold magenta" if ending else STATUS_STYLES.get(run.status, "")),
        "step": Text(progress_bar(run.step, run.max_steps, 6 if lay.step_bar else 0).rstrip()),
        "loss": Text(_with_sparkline(run.loss, run.history.get("loss", ()), lay.loss_spark, lay.loss_scale)),
        "eval loss": Text(number(run.eval_loss)),
        "lr": Text(learning_rate(run)),
        "grad norm": Text(_with_sparkline(run.grad_norm, run.history.get("grad_norm", ()), lay.grad_spark,
                                          lay.grad_scale)),
        "firing": Text(firing or "—", style="yellow" if firing else "dim"),
        "GPU memory": Text("\n").join(gpu_bar(g) for g in run.gpus) if run.gpus else Text("—"),
        "tok/s": Text(rate(run.tokens_per_second)),
        "decisions": Text(str(run.rule_decisions)),
        "last report": Text("—" if run.seconds_since_report is None else f"{run.seconds_since_report:.0f} s ago"),
    }


def _with_sparkline(value: float | None, history: Sequence[float], width: int, scale: bool) -> str:
    if width <= 0:
        return number(value)
    return f"{number(value):<6} {scaled_sparkline(history, width, scale=scale)}".rstrip()


def fit_layout(runs: Sequence[RunSnapshot], width: int) -> TableLayout:
    """The columns and details that fit `width` (see `runs_table`)."""
    id_natural = max([3, *(cell_len(r.id) for r in runs)])
    has_value = {name: any(run_cells(r, False)[name].plain != "—" for r in runs) for name in COLUMNS}
    shown = [c for c in COLUMNS if c in CORE_COLUMNS or c == "decisions" or has_value[c]]
    layout = TableLayout(shown, min(id_natural, ID_MAX), affixes=common_affixes([r.id for r in runs]))

    def used(lay: TableLayout) -> int:
        cells = [run_cells(r, False, lay) for r in runs]
        return sum(max([cell_len(c)] + [cell_width(row[c]) for row in cells]) if c not in ("run", "firing") else
                   (max(lay.id_width, 3) if c == "run" else
                    min(lay.firing_width, max(cell_width(row[c]) for row in cells)) if cells else 0)
                   for c in lay.columns) + COLUMN_GAP * (len(lay.columns) - 1)

    for name in (None, *DROP_ORDER):  # drop the least important columns while the table is too wide ...
        if name in layout.columns:
            layout.columns.remove(name)
        if used(layout) <= width:
            break
    while used(layout) > width and layout.id_width > RUN_ID_MIN:  # ... then cut the ids in the middle ...
        layout.id_width -= 1
    for name in LAST_DROPPED:  # ... then the last ones
        if used(layout) > width and name in layout.columns:
            layout.columns.remove(name)
    for name in DROP_ORDER[::-1]:  # a column dropped before a wider one that fits after all comes back
        if name not in layout.columns and name in shown:
            trial = TableLayout(**{**vars(layout), "columns": [c for c in shown if c in layout.columns or c == name]})
            if used(trial) <= width:
                layout = trial
    for grow in GROWTH:  # then use what is left, most useful first
        trial = TableLayout(**{**vars(layout), "columns": list(layout.columns), **grow})
        if used(trial) <= width:
            layout = trial
    return layout


def runs_table(runs: Sequence[RunSnapshot], selected: int, *, width: int, max_rows: int = 1000) -> Table:
    """Every run in one row. The run id keeps its full width while anything else can give room: columns that
    no run has a value for are left out, then, while the table is wider than `width`, last report, decisions,
    tok/s, GPU memory, grad norm and firing in that order, then the ids are cut in the middle (…), and only
    then lr and eval loss. Id, status, step and loss always stay. Room left over goes to the step's progress
    bar, a loss sparkline, how an ended run ended, and on wide terminals longer sparklines with their scale."""
    window = visible_window(len(runs), selected, max_rows)
    layout = fit_layout([runs[i] for i in window], width)
    rows = {index: run_cells(runs[index], index == selected, layout) for index in window}
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, COLUMN_GAP - 1, 0, 0),
                  header_style="bold")
    for name in layout.columns:
        column_width = layout.id_width if name == "run" else None
        if name == "firing":
            column_width = min(layout.firing_width,
                               max([cell_len(name)] + [cell_width(c[name]) for c in rows.values()]))
        table.add_column(name, width=column_width, no_wrap=True, overflow="ellipsis")
    for index, cells in rows.items():
        table.add_row(*(cells[name] for name in layout.columns), style="bold" if index == selected else "")
    return table


def cell_width(text: Text) -> int:
    return max(cell_len(line) for line in text.plain.split("\n"))


# ---- decisions -------------------------------------------------------------------------------------


def decision_text(decision: DecisionLine, *, wrap: bool = False, rule_width: int = 20) -> Text:
    """ "step     15 non_finite_loss      skip_update  loss is nan at step 15: ..." (cut to one line unless `wrap`);
    an operator's action: "step     41 operator             stop         by hand (command 1): carried out ..."."""
    step = "—" if decision.step is None else str(decision.step)
    style = "bold cyan" if decision.rule == OPERATOR else SEVERITY_STYLES.get(decision.severity, "")
    return Text.assemble(f"step {step:>6} ", (f"{decision.rule:<{rule_width}}", style), f" {decision.actions:<12} ",
                         decision.reason, no_wrap=not wrap, overflow="fold" if wrap else "ellipsis")


def decision_lines(decisions: Sequence[DecisionLine], limit: int) -> list[Text]:
    """The newest `limit` decisions, oldest first, one line each."""
    shown = decisions[max(0, len(decisions) - max(1, limit)):]
    rule_width = max([8, *(len(d.rule) for d in shown)])
    return [decision_text(d, rule_width=rule_width) for d in shown]


def decisions_panel(run: RunSnapshot, *, limit: int = 5) -> Panel:
    """The selected run's latest decisions and operator actions, one line each; the title says how it ended."""
    lines: list[Text] = decision_lines(run.decisions, limit) or [Text("no decisions yet: every rule is quiet",
                                                                       style="dim")]
    ending = f" · {run.ending}" if run.ending else ""
    title = f"latest decisions of {run.id} ({len(run.decisions)}){ending}"
    return Panel(Group(*lines), title=title, title_align="left", box=box.ROUNDED, padding=(0, 1))


# ---- screens ---------------------------------------------------------------------------------------


def header(snapshot: Snapshot, order: str | None = None) -> Text:
    """Title, where the data comes from, and the last poll's error (the runs shown are then the last known)."""
    count = len(snapshot.runs)
    text = Text.assemble(("guardian top", "bold"), f" · {snapshot.where} · {count} run{'s' * (count != 1)}")
    if order:
        text.append(f" · sorted by {order} (o)")
    if snapshot.error:
        text.append("\n")
        text.append(f"⚠ {snapshot.error} (retrying)", style="bold red")
    return text


def no_runs(message: str) -> Panel:
    """The screen before any run has reported."""
    return Panel(Text(message, justify="center"), box=box.ROUNDED, padding=(1, 2))


def runs_screen(snapshot: Snapshot, selected: int, *, width: int, height: int, waiting: str) -> RenderableType:
    """The runs table and, below it, the selected run's latest decisions (fitting `height` lines)."""
    if not snapshot.runs:
        return no_runs(waiting if snapshot.error is None else f"waiting for the daemon at {snapshot.where}")
    selected = min(max(0, selected), len(snapshot.runs) - 1)
    run = snapshot.runs[selected]
    table_rows = max(1, min(len(snapshot.runs), height - 7))  # at least three decision lines below
    table = runs_table(snapshot.runs, selected, width=width, max_rows=table_rows)
    lines = 2 + sum(max(1, len(r.gpus)) for r in snapshot.runs[:table_rows])
    if width >= 60 and height - lines - CURVES_LINES >= 5:  # room for the selected run's curves
        tall = height - lines - TALL_CURVES_LINES >= 12
        decision_rows = max(1, height - lines - (TALL_CURVES_LINES if tall else CURVES_LINES) - 2)
        return Group(table, curves_panel(run, width=width, rows=(8, 4, 3, 3) if tall else (3, 2, 1, 1)),
                     decisions_panel(run, limit=decision_rows))
    decision_rows = max(1, height - table_rows - 4)
    return Group(table, decisions_panel(run, limit=decision_rows))


def detail_view(run: RunSnapshot, *, width: int, height: int = 40, scrolled: int = 0) -> RenderableType:
    """One run: its curves over the last ~200 points, its rule states and its decision log."""
    status = Text(run.ending or "", style="bold magenta" if run.stopped_by else "dim") if run.ended else \
        status_text(run.status)
    title = Text.assemble(("run ", "bold"), (run.id, "bold"), " · ", status, " · step ",
                          progress_bar(run.step, run.max_steps, 10))
    if run.status == "stalled":
        title.append(f" · {run.ending}", style="bold red")
    if run.seconds_since_report is not None:
        title.append(f" · last report {run.seconds_since_report:.0f} s ago")
    title.append("\n")
    title.append_text(latest_values(run))
    curves = curves_panel(run, width=width)
    wide = width >= WIDE_COLUMNS
    log_rows = max(3, height - 16 - (0 if wide else len(run.rules) + 2))
    rules, log = rules_table(run), decision_log(run, limit=log_rows, scrolled=scrolled)
    if wide:
        bottom = Table.grid(padding=(0, 1))
        bottom.add_column(no_wrap=True)
        bottom.add_column(ratio=1)
        bottom.add_row(rules, log)
        return Group(title, curves, bottom)
    return Group(title, curves, log, rules)


def latest_values(run: RunSnapshot) -> Text:
    """ "loss 2.45 · eval loss 2.687 · grad norm 1.42 · lr 0.0002 ×0.5 · tok/s 12.3k · GPU 0 ████░ 61/80G"."""
    text = Text(f"loss {number(run.loss)} · eval loss {number(run.eval_loss)} · grad norm {number(run.grad_norm)} · "
                f"lr {learning_rate(run)} · tok/s {rate(run.tokens_per_second)}")
    for gpu in run.gpus:
        text.append(" · GPU ")
        text.append_text(gpu_bar(gpu))
    return text


CURVE_ROWS = (("loss", "loss", 3), ("grad norm", "grad_norm", 2), ("eval loss", "eval_loss", 2),
              ("lr", "learning_rate", 2))  # name, history key, rows


def step_axis(run: RunSnapshot) -> tuple[int, int] | None:
    """The steps the curves are drawn over: those of the last DETAIL_POINTS losses (or of any curve logged)."""
    for key in ("loss", *(k for _, k, _ in CURVE_ROWS)):
        steps = run.history_steps.get(key, ())[-DETAIL_POINTS:]
        if steps:
            return steps[0], steps[-1]
    return None


def curves_panel(run: RunSnapshot, *, width: int, rows: Sequence[int] = (3, 2, 2, 2)) -> Panel:
    """Loss, gradient norm, eval loss and learning rate as charts over one step axis (an eval every 50 steps
    sits at its steps, not side by side), each with its max and min; the steps below."""
    inner = max(10, width - 4 - 22)
    axis = step_axis(run)
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, width=9)
    grid.add_column(no_wrap=True, width=10, justify="right")
    grid.add_column(no_wrap=True)
    for (name, key, _), height in zip(CURVE_ROWS, rows):
        _add_curve(grid, name, run.history.get(key, ()), run.history_steps.get(key, ()), axis, inner, height)
    if axis is not None:
        first, last = (str(step) for step in axis)
        grid.add_row("", "step", first + " " * max(1, inner - len(first) - len(last)) + last)
        title = f"curves over steps {axis[0]}–{axis[1]}"
    else:
        title = f"curves over the last {min(DETAIL_POINTS, len(run.history.get('loss', ())))} values"
    return Panel(grid, title=title, title_align="left", box=box.ROUNDED, padding=(0, 1))


def _add_curve(grid: Table, name: str, values: Sequence[float], steps: Sequence[int], axis: tuple[int, int] | None,
               width: int, height: int) -> None:
    if axis is not None and len(steps) == len(values):
        pairs = [(step, v) for step, v in zip(steps, values) if axis[0] <= step <= axis[1]]
        window = [v for _, v in pairs]
        rows = _chart_rows(by_step([p for p, _ in pairs], window, axis[0], axis[1], width), height)
    else:  # no steps known: one column per value
        window = list(values)[-DETAIL_POINTS:]
        rows = chart(window, width, height)
    if not window:
        grid.add_row(name, "—", Text("no values yet", style="dim"))
        return
    finite = [v for v in window if math.isfinite(v)]
    top, bottom = (number(max(finite)), number(min(finite))) if finite else ("nan", "nan")
    scales = [f"{number(window[-1])}"] if height == 1 else [top, *[""] * (height - 2), bottom]  # max..min
    for i, (row, scale) in enumerate(zip(rows, scales)):
        grid.add_row(name if i == 0 else "", scale, row)


def rules_table(run: RunSnapshot) -> Table:
    """Every rule and its state (ok, warming_up, firing, cooling_down)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("rule", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for rule, state in run.rules.items():
        table.add_row(rule, Text(state, style=RULE_STYLES.get(state, "")))
    if not run.rules:
        table.add_row("—", Text("not known yet", style="dim"))
    return table


def decision_log(run: RunSnapshot, *, limit: int, scrolled: int = 0) -> Panel:
    """The run's decisions, newest first, each in full; `scrolled` skips that many of the newest."""
    newest_first = list(reversed(run.decisions))[max(0, scrolled):]
    lines = [decision_text(d, wrap=True) for d in newest_first[:max(1, limit)]] or [Text("no decisions", style="dim")]
    title = f"decision log ({len(run.decisions)}, newest first)"
    if scrolled and run.decisions:
        title = f"decision log ({len(run.decisions)}, from the {_ordinal(scrolled + 1)} newest)"
    return Panel(Group(*lines), title=title, title_align="left", box=box.ROUNDED, padding=(0, 1))


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def footer(text: str | Text) -> Text:
    return text if isinstance(text, Text) else Text(text, style="reverse", no_wrap=True, overflow="ellipsis")
