"""What `guardian top` draws: pure functions from snapshots to rich renderables (no I/O, no clock).

Tests render them into a fixed-width console writing to a string and compare the text exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich import box
from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from guardian.tui.source import DecisionLine, GpuMemory, RunSnapshot, Snapshot

BLOCKS = "▁▂▃▄▅▆▇█"
NON_FINITE = "×"
WIDE_COLUMNS = 100  # the detail view puts rule states and the decision log side by side from here
DETAIL_POINTS = 200
STATUS_STYLES = {"running": "green", "firing": "bold yellow", "stalled": "bold red", "ended": "dim"}
RULE_STYLES = {"ok": "green", "warming_up": "dim", "firing": "bold yellow", "cooling_down": "cyan"}
SEVERITY_STYLES = {"info": "dim", "warning": "yellow", "critical": "bold red"}
COLUMN_GAP = 2
CORE_COLUMNS = ("", "run", "status", "step", "loss")  # always shown
OPTIONAL_COLUMNS = ("eval loss", "grad norm", "lr", "tok/s", "GPU memory", "firing")  # left to right
DROP_ORDER = ("tok/s", "eval loss", "lr", "GPU memory", "grad norm", "firing")  # the first goes first
RUN_ID_MIN, RUN_ID_MAX, FIRING_MIN, FIRING_MAX = 10, 24, 8, 24

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
    points = resample(values, width)
    finite = [v for v in points if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    levels = height * len(BLOCKS)
    heights = [None if not math.isfinite(v) else 1 + (0 if hi == lo else round((v - lo) / (hi - lo) * (levels - 1)))
               for v in points]
    return [_chart_row(heights, height - 1 - row) for row in range(height)]


def _chart_row(heights: Sequence[int | None], row_from_bottom: int) -> str:
    cells = []
    for level in heights:
        if level is None:
            cells.append(NON_FINITE)
            continue
        fill = min(len(BLOCKS), level - row_from_bottom * len(BLOCKS))
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


def runs_table(runs: Sequence[RunSnapshot], selected: int, *, width: int, max_rows: int = 1000) -> Table:
    """Every run in one row. Columns that no run has a value for are left out, then, while the table is
    wider than `width`, tok/s, eval loss, lr, GPU memory, grad norm and firing in that order; the run id
    and the firing rules are cut short (…) before that. Id, status, step and loss always stay."""
    window = visible_window(len(runs), selected, max_rows)
    rows = {index: run_cells(runs[index], index == selected) for index in window}
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, COLUMN_GAP - 1, 0, 0),
                  header_style="bold")
    columns = fit_columns(list(rows.values()), width)
    for name, column_width in columns:
        table.add_column(name, width=column_width, no_wrap=True, overflow="ellipsis")
    for index, cells in rows.items():
        table.add_row(*(cells[name] for name, _ in columns), style="bold" if index == selected else "")
    return table


def fit_columns(rows: list[dict[str, Text]], width: int) -> list[tuple[str, int]]:
    """The columns to show at `width` and their widths (see `runs_table`)."""
    natural = {name: max([cell_width(Text(name))] + [cell_width(row[name]) for row in rows])
               for name in (*CORE_COLUMNS, *OPTIONAL_COLUMNS)}
    least = {**natural, "run": min(natural["run"], RUN_ID_MIN), "firing": min(natural["firing"], FIRING_MIN)}
    shown = [name for name in OPTIONAL_COLUMNS if name == "firing" or any(row[name].plain != "—" for row in rows)]
    for name in (None, *DROP_ORDER):
        if name in shown:
            shown.remove(name)
        names = [*CORE_COLUMNS, *shown]
        spare = width - sum(least[n] for n in names) - COLUMN_GAP * (len(names) - 1)
        if spare >= 0:
            break
    widths = {n: least[n] for n in names}
    for name, cap in (("firing", FIRING_MAX), ("run", RUN_ID_MAX)):
        if name in widths:
            grow = max(0, min(spare, min(natural[name], cap) - widths[name]))
            widths[name], spare = widths[name] + grow, spare - grow
    return [(n, widths[n]) for n in names]


def cell_width(text: Text) -> int:
    return max(cell_len(line) for line in text.plain.split("\n"))


def run_cells(run: RunSnapshot, selected: bool) -> dict[str, Text]:
    """Every column's cell for one run."""
    firing = ", ".join(run.firing)
    return {
        "": Text("▶" if selected else " "),
        "run": Text(run.id),
        "status": status_text(run.status),
        "step": Text(progress_bar(run.step, run.max_steps)),
        "loss": Text(_with_sparkline(run.loss, run.history.get("loss", ()), 8)),
        "eval loss": Text(number(run.eval_loss)),
        "grad norm": Text(_with_sparkline(run.grad_norm, run.history.get("grad_norm", ()), 6)),
        "lr": Text(learning_rate(run)),
        "tok/s": Text(rate(run.tokens_per_second)),
        "GPU memory": Text("\n").join(gpu_bar(g) for g in run.gpus) if run.gpus else Text("—"),
        "firing": Text(firing or "—", style="yellow" if firing else "dim"),
    }


def _with_sparkline(value: float | None, history: Sequence[float], width: int) -> str:
    return f"{number(value):<6} {sparkline(history, width)}".rstrip()


# ---- decisions -------------------------------------------------------------------------------------


def decision_text(decision: DecisionLine, *, wrap: bool = False) -> Text:
    """ "step     15 non_finite_loss      skip_update  loss is nan at step 15: ..." (cut to one line unless `wrap`)."""
    return Text.assemble(f"step {decision.step:>6} ", (f"{decision.rule:<20}", SEVERITY_STYLES.get(decision.severity, "")),
                         f" {decision.actions:<12} ", decision.reason, no_wrap=not wrap,
                         overflow="fold" if wrap else "ellipsis")


def decision_lines(decisions: Sequence[DecisionLine], limit: int) -> list[Text]:
    """The newest `limit` decisions, oldest first, one line each."""
    return [decision_text(d) for d in decisions[max(0, len(decisions) - max(1, limit)):]]


def decisions_panel(run: RunSnapshot, *, limit: int = 5) -> Panel:
    """The selected run's latest decisions, one line each."""
    lines: list[Text] = decision_lines(run.decisions, limit) or [Text("no decisions yet: every rule is quiet",
                                                                       style="dim")]
    title = f"latest decisions of {run.id} ({len(run.decisions)})"
    return Panel(Group(*lines), title=title, title_align="left", box=box.ROUNDED, padding=(0, 1))


# ---- screens ---------------------------------------------------------------------------------------


def header(snapshot: Snapshot) -> Text:
    """Title, where the data comes from, and the last poll's error (the runs shown are then the last known)."""
    count = len(snapshot.runs)
    text = Text.assemble(("guardian top", "bold"), f" · {snapshot.where} · {count} run{'s' * (count != 1)}")
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
    decision_rows = max(1, height - table_rows - 4)
    return Group(runs_table(snapshot.runs, selected, width=width, max_rows=table_rows),
                 decisions_panel(run, limit=decision_rows))


def detail_view(run: RunSnapshot, *, width: int, height: int = 40, scrolled: int = 0) -> RenderableType:
    """One run: its curves over the last ~200 points, its rule states and its decision log."""
    title = Text.assemble(("run ", "bold"), (run.id, "bold"), " · ", status_text(run.status), " · step ",
                          progress_bar(run.step, run.max_steps, 10))
    if run.seconds_since_report is not None:
        title.append(f" · last report {run.seconds_since_report:.0f} s ago")
    title.append("\n")
    title.append_text(latest_values(run))
    curves = curves_panel(run, width=width)
    wide = width >= WIDE_COLUMNS
    log_rows = max(3, height - 13 - (0 if wide else len(run.rules) + 2))
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


def curves_panel(run: RunSnapshot, *, width: int) -> Panel:
    """Loss and gradient norm as small charts, eval loss and learning rate as sparklines."""
    inner = max(10, width - 4 - 22)
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, width=9)
    grid.add_column(no_wrap=True, width=10, justify="right")
    grid.add_column(no_wrap=True)
    _add_curve(grid, "loss", run.history.get("loss", ()), inner, 3)
    _add_curve(grid, "grad norm", run.history.get("grad_norm", ()), inner, 2)
    _add_curve(grid, "eval loss", run.history.get("eval_loss", ()), inner, 1)
    _add_curve(grid, "lr", run.history.get("learning_rate", ()), inner, 1)
    steps = min(DETAIL_POINTS, len(run.history.get("loss", ())))
    return Panel(grid, title=f"curves over the last {steps} steps", title_align="left", box=box.ROUNDED,
                 padding=(0, 1))


def _add_curve(grid: Table, name: str, values: Sequence[float], width: int, height: int) -> None:
    window = list(values)[-DETAIL_POINTS:]
    if not window:
        grid.add_row(name, "—", Text("no values yet", style="dim"))
        return
    finite = [v for v in window if math.isfinite(v)]
    top, bottom = (number(max(finite)), number(min(finite))) if finite else ("nan", "nan")
    rows = chart(window, width, height)
    scales = [number(window[-1])] if height == 1 else [top, *[""] * (height - 2), bottom]  # latest, or max..min
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
