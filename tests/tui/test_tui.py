"""`guardian top`: widgets rendered exactly, keys and actions, both sources, and the real program in tmux."""

from __future__ import annotations

import io
import json
import os
import pty
import shlex
import shutil
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from daemonkit import DaemonProcess
from repopaths import REPO_ROOT
from rich.console import Console, RenderableType

from guardian.events import ActionEvent, AnyEvent, DecisionEvent, EndEvent, MetricsEvent, Severity, StartEvent
from guardian.transport.client import DaemonError, request
from guardian.tui import widgets
from guardian.tui.app import TopApp
from guardian.tui.keys import KeyReader, parse_keys
from guardian.tui.source import (
    DaemonSource,
    DecisionLine,
    DirSource,
    EventTail,
    GpuMemory,
    ReadOnlySourceError,
    RunSnapshot,
    Snapshot,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

REPO = REPO_ROOT
GIB = 2**30
NAN = float("nan")
URL = "http://127.0.0.1:8765"


def render(renderable: RenderableType, width: int, height: int = 50) -> str:
    """What a terminal `width` columns wide shows (trailing blanks of each line dropped: they are padding)."""
    console = Console(width=width, height=height, record=True, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


LLAMA = RunSnapshot(
    "llama-lora-3f2a9c1d", "firing", step=1520, max_steps=3000, loss=2.45, eval_loss=2.687, grad_norm=1.42,
    learning_rate=2e-4, lr_scale=0.5, tokens_per_second=12345.0,
    gpus=(GpuMemory("0", 61 * GIB, 80 * GIB), GpuMemory("1", 75 * GIB, 80 * GIB)),
    rules={"non_finite_loss": "ok", "loss_spike": "firing", "overfitting": "warming_up", "lr_blowup": "cooling_down"},
    history={"loss": (3.8, 3.6, 3.3, 3.1, 2.9, NAN, 2.7, 2.6, 2.5, 2.45),
             "grad_norm": (1.4, 1.5, 1.3, 1.2, NAN, 1.1, 1.0, 1.42),
             "eval_loss": (2.9, 2.7, 2.687), "learning_rate": (0.0, 2e-4, 4e-4, 2e-4)},
    decisions=(
        DecisionLine(15, "non_finite_loss", "critical", "skip_update",
                     "loss is nan at step 15: non-finite loss=nan, grad_norm=nan"),
        DecisionLine(1519, "loss_spike", "warning", "skip_update",
                     "loss 5.61 at step 1519 is 69 robust z above its rolling median 1.438 (limit 8)"),
    ),
    seconds_since_report=2.0,
)
QWEN = RunSnapshot("qwen-full", "ended", step=400, max_steps=400, loss=0.5748,
                   history={"loss": (1.0, 0.8, 0.7, 0.6, 0.5748)})
SNAPSHOT = Snapshot((LLAMA, QWEN), URL)


# ---- widgets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "width", "expected"), [
    ([0, 1, 2, 3, 4, 5, 6, 7], 8, "▁▂▃▄▅▆▇█"),
    ([0, 1, 2, 3, 4, 5, 6, 7], 4, "▁▃▆█"),  # the newest 4, scaled to their own range
    ([1.0, NAN, 3.0, float("inf")], 10, "▁×█×"),
    ([2.5, 2.5, 2.5], 5, "▁▁▁"),
    ([], 5, ""),
    ([1, 2], 0, ""),
])
def test_sparkline_of_known_values(values: list[float], width: int, expected: str) -> None:
    assert widgets.sparkline(values, width) == expected


def test_chart_resamples_keeping_spikes_and_nans() -> None:
    assert widgets.resample([1, 9, 2, 3, NAN, 4], 3)[:2] == [9, 3]
    assert widgets.chart([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], 16, 2) == [
        "        ▁▂▃▄▅▆▇█",
        "▁▂▃▄▅▆▇█████████",
    ]


def test_bars() -> None:
    assert widgets.progress_bar(1520, 3000) == "1520/3000 ███░░░"
    assert widgets.progress_bar(40, None) == "40"
    assert widgets.progress_bar(None, 10) == "—"
    assert widgets.gpu_bar(GpuMemory("0", 76 * GIB, 80 * GIB)).plain == "0 █████ 76/80G"
    assert widgets.gpu_bar(GpuMemory("1:3", 3.2 * GIB, 24 * GIB)).plain == "1:3 █░░░░ 3.2/24G"


def test_runs_table_and_decisions_at_100_columns() -> None:
    # the run id keeps its whole width; tok/s, GPU memory and the sparklines give way first, eval loss and lr stay.
    assert render(widgets.runs_screen(SNAPSHOT, 0, width=100, height=12, waiting=""), 100) == """\
   run                  status    step       loss    eval loss  lr           grad norm  firing
──────────────────────────────────────────────────────────────────────────────────────────────────
▶  llama-lora-3f2a9c1d  firing    1520/3000  2.45    2.687      0.0002 ×0.5  1.42       loss_spike
   qwen-full            finished  400/400    0.5748  —          —            —          —
╭─ latest decisions of llama-lora-3f2a9c1d (2) ────────────────────────────────────────────────────╮
│ step     15 non_finite_loss skip_update  loss is nan at step 15: non-finite loss=nan, grad_norm… │
│ step   1519 loss_spike      skip_update  loss 5.61 at step 1519 is 69 robust z above its rollin… │
╰──────────────────────────────────────────────────────────────────────────────────────────────────╯"""


def test_runs_table_with_room_for_every_column() -> None:
    assert render(widgets.runs_table(SNAPSHOT.runs, 1, width=160), 160) == """\
   run                  status    step       loss               eval loss  lr           grad norm      firing      GPU memory      tok/s  decisions  last report
────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────
   llama-lora-3f2a9c1d  firing    1520/3000  2.45   █▇▅▄▃×▂▂▁▁  2.687      0.0002 ×0.5  1.42   ▆▄×▃▁█  loss_spike  0 ████░ 61/80G  12.3k  2          2 s ago
                                                                                                                   1 █████ 75/80G
▶  qwen-full            finished  400/400    0.5748 █▅▃▁▁       —          —            —              —           —               —      0          —"""  # noqa: E501 - the table as rendered at width 160


def test_narrow_layout_keeps_id_status_step_and_loss() -> None:
    assert render(widgets.runs_screen(SNAPSHOT, 1, width=60, height=12, waiting=""), 60) == """\
   run           status    step       loss    eval loss
───────────────────────────────────────────────────────
   llama…2a9c1d  firing    1520/3000  2.45    2.687
▶  qwen-full     finished  400/400    0.5748  —
╭─ latest decisions of qwen-full (0) · finished ───────────╮
│ no decisions yet: every rule is quiet                    │
╰──────────────────────────────────────────────────────────╯"""


def test_no_runs_screen() -> None:
    waiting = f"no runs have reported to {URL} yet — start one with GUARDIAN_URL={URL} python train.py"
    assert render(widgets.runs_screen(Snapshot((), URL), 0, width=60, height=12, waiting=waiting), 60) == """\
╭──────────────────────────────────────────────────────────╮
│                                                          │
│   no runs have reported to http://127.0.0.1:8765 yet —   │
│    start one with GUARDIAN_URL=http://127.0.0.1:8765     │
│                     python train.py                      │
│                                                          │
╰──────────────────────────────────────────────────────────╯"""


def test_detail_view() -> None:
    assert render(widgets.detail_view(LLAMA, width=100, height=30), 100) == """\
run llama-lora-3f2a9c1d · firing · step 1520/3000 █████░░░░░ · last report 2 s ago
loss 2.45 · eval loss 2.687 · grad norm 1.42 · lr 0.0002 ×0.5 · tok/s 12.3k · GPU 0 ████░ 61/80G ·
GPU 1 █████ 75/80G
╭─ curves over the last 10 values ─────────────────────────────────────────────────────────────────╮
│ loss             3.8 █▅   ×                                                                      │
│                      ██▇▄▁×                                                                      │
│                 2.45 █████×▅▄▂▁                                                                  │
│ grad norm        1.5 ▅█▂ ×  ▆                                                                    │
│                    1 ███▇×▄▁█                                                                    │
│ eval loss        2.9 █                                                                           │
│                2.687 █▂▁                                                                         │
│ lr            0.0004  ▁█▁                                                                        │
│                    0 ▁███                                                                        │
╰──────────────────────────────────────────────────────────────────────────────────────────────────╯
rule              state        ╭─ decision log (2, newest first) ──────────────────────────────────╮
────────────────────────────── │ step   1519 loss_spike           skip_update  loss 5.61 at step   │
non_finite_loss   ok           │ 1519 is 69 robust z above its rolling median 1.438 (limit 8)      │
loss_spike        firing       │ step     15 non_finite_loss      skip_update  loss is nan at step │
overfitting       warming_up   │ 15: non-finite loss=nan, grad_norm=nan                            │
lr_blowup         cooling_down ╰───────────────────────────────────────────────────────────────────╯"""


def test_detail_view_narrow_stacks_the_log_above_the_rules_and_scrolls() -> None:
    text = render(widgets.detail_view(LLAMA, width=60, height=30, scrolled=1), 60)
    assert text.splitlines()[15:20] == [
        "╭─ decision log (2, from the 2nd newest) ──────────────────╮",
        "│ step     15 non_finite_loss      skip_update  loss is    │",
        "│ nan at step 15: non-finite loss=nan, grad_norm=nan       │",
        "╰──────────────────────────────────────────────────────────╯",
        "rule              state",
    ]
    assert max(len(line) for line in text.splitlines()) <= 60


def test_no_runs_while_the_daemon_is_down() -> None:
    snapshot = Snapshot((), URL, error="cannot reach the guardian daemon")
    assert render(widgets.runs_screen(snapshot, 0, width=60, height=12, waiting="no runs"), 60) == """\
╭──────────────────────────────────────────────────────────╮
│                                                          │
│     waiting for the daemon at http://127.0.0.1:8765      │
│                                                          │
╰──────────────────────────────────────────────────────────╯"""


def test_header_shows_the_daemons_error() -> None:
    error = "cannot reach the guardian daemon at http://127.0.0.1:8765: [Errno 111] Connection refused"
    assert render(widgets.header(Snapshot((QWEN,), URL, error=error)), 100) == """\
guardian top · http://127.0.0.1:8765 · 1 run
⚠ cannot reach the guardian daemon at http://127.0.0.1:8765: [Errno 111] Connection refused
(retrying)"""


def test_many_runs_scroll_to_keep_the_selected_one_visible() -> None:
    runs = tuple(RunSnapshot(f"run-{i:02d}", "running", step=i) for i in range(30))
    text = render(widgets.runs_table(runs, 25, width=60, max_rows=5), 60)
    assert [line.split()[0] for line in text.splitlines()[2:]] == ["run-21", "run-22", "run-23", "run-24", "▶"]


FAMILY = Snapshot((
    RunSnapshot("lora-r8-clean-3f2a9c1d", "running", step=1520, max_steps=3000, loss=2.45, eval_loss=2.687,
                learning_rate=2e-4, grad_norm=1.4, history={"loss": tuple(3.0 - i / 40 for i in range(40))}),
    RunSnapshot("lora-r8-faulty-3f2a9c1d", "firing", step=1519, max_steps=3000, loss=NAN, eval_loss=2.9,
                learning_rate=2e-4, lr_scale=0.5, rules={"non_finite_loss": "firing"}),
    RunSnapshot("lora-r8-by-hand-3f2a9c1d", "ended", step=700, max_steps=3000, loss=2.61, eval_loss=2.75,
                learning_rate=1e-4, stopped_by="operator"),
), URL)


def test_at_80_columns_ids_stay_whole_and_loss_eval_loss_and_lr_stay() -> None:
    lines = render(widgets.runs_table(FAMILY.runs, 0, width=80), 80).splitlines()
    assert lines[0].split() == ["run", "status", "step", "loss", "eval", "loss", "lr"]
    assert [line[3:].split()[0] for line in lines[2:]] == [r.id for r in FAMILY.runs]
    assert lines[3].split()[1:] == ["firing", "1519/3000", "nan", "2.9", "0.0002", "×0.5"]
    assert max(len(line) for line in lines) <= 80


def test_ids_are_cut_only_when_nothing_else_can_give_way_and_keep_what_tells_them_apart() -> None:
    lines = render(widgets.runs_table(FAMILY.runs, 0, width=50), 50).splitlines()
    assert [line[3:].split()[0] for line in lines[2:]] == ["lora-…clean…", "lora…faulty…", "lor…by-hand…"]
    assert widgets.short_id("lora-r8-faulty-3f2a9c1d", 12) == "lora-…2a9c1d"  # alone: the middle goes
    assert widgets.short_id("short", 12) == "short"


def test_wide_terminals_get_long_sparklines_with_their_scale_and_more_columns() -> None:
    lines = render(widgets.runs_table(FAMILY.runs, 0, width=200), 200).splitlines()
    assert lines[0].split()[-3:] == ["norm", "firing", "decisions"]
    cells = lines[2].split()
    assert len(cells[6]) >= 32 and cells[7:11] == ["min", "2.02", "max", "3"]  # the last 40 losses: 3 down to 2.02
    assert "stopped by operator" in lines[4]


def test_an_ended_run_says_how_it_ended() -> None:
    from guardian.tui.source import LiveRun

    def ended(*run_events: AnyEvent) -> RunSnapshot:
        record = LiveRun("r")
        for seq, event in enumerate([StartEvent(max_steps=50), *run_events], start=1):
            record.apply(msgspec.structs.replace(event, seq=seq, time=1000.0 + seq, step=5))
        return record.snapshot({})

    assert ended(EndEvent()).ending == "finished"
    assert ended(ActionEvent(rules=["overfitting"], stopped=True, skipped_update=True),
                 EndEvent()).ending == "stopped by rule overfitting"
    by_hand = ended(ActionEvent(rules=["manual:stop"], source="command", stopped=True, skipped_update=True,
                                command_ids=[4]), EndEvent())
    assert by_hand.ending == "stopped by operator"
    assert [(d.step, d.rule, d.actions, d.reason) for d in by_hand.decisions] == [
        (5, "operator", "stop", "skipped this update; stopping training (by hand, command 4)")]
    assert RunSnapshot("r", "stalled").ending == "no reports: crashed or lost?"
    assert RunSnapshot("r", "running").ending is None
    assert ended(EndEvent(), StartEvent()).ending is None  # resumed: running again
    screen_text = render(widgets.runs_screen(Snapshot((by_hand,), URL), 0, width=100, height=12, waiting=""), 100)
    assert "stopped by operator" in screen_text.splitlines()[2]
    assert "╭─ latest decisions of r (1) · stopped by operator" in screen_text


def test_the_eval_curve_is_drawn_at_its_steps() -> None:
    run = RunSnapshot("r", "running", step=40, history={"loss": tuple(2.0 for _ in range(40)), "eval_loss": (3.0, 2.0)},
                      history_steps={"loss": tuple(range(1, 41)), "eval_loss": (20, 40)})
    lines = render(widgets.curves_panel(run, width=62), 62).splitlines()
    assert lines[0].startswith("╭─ curves over steps 1–40")
    [bottom] = [line[23:59] for line in lines if line.startswith("│                    2 ") and "█" in line]
    # 36 columns for steps 1..40: the eval of step 20 is at column 17, held until the eval of step 40 at the end
    assert bottom == " " * 17 + "█" * 18 + "▁"
    assert lines[-2].split() == ["│", "step", "1", "40", "│"]
    # rolled back from step 2 to 0: the steps logged again are drawn with their new values
    assert widgets.by_step([1, 2, 1, 2], [9.0, 9.0, 1.0, 2.0], 1, 2, 2) == [1.0, 2.0]


# ---- keys, prompt and actions ----------------------------------------------------------------------


@dataclass
class FakeSource:
    snapshots: list[Snapshot]
    read_only: str | None = None
    refuse: Exception | None = None
    where: str = URL
    waiting: str = "no runs yet"
    sent: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def snapshot(self) -> Snapshot:
        return self.snapshots[0] if len(self.snapshots) == 1 else self.snapshots.pop(0)

    def control(self, run_id: str, action: str, params: Any) -> int:
        if self.refuse is not None:
            raise self.refuse
        self.sent.append((run_id, action, dict(params)))
        return 7


def app_for(source: FakeSource, width: int = 100, height: int = 14) -> TopApp:
    app = TopApp(source, Console(width=width, height=height, file=io.StringIO(), color_system=None),
                 clock=lambda: 100.0)
    app.snapshot = source.snapshot()
    return app


def press(app: TopApp, *keys: str) -> bool:
    return all([app.handle(key) for key in keys])


def screen(app: TopApp) -> list[str]:
    return render(app.render(), app.console.width, app.console.height).splitlines()


def test_the_whole_screen_with_a_confirmation_prompt() -> None:
    app = app_for(FakeSource([SNAPSHOT]))
    press(app, "s")
    assert render(app.render(), 100, 14) == """\
guardian top · http://127.0.0.1:8765 · 2 runs · sorted by started (o)
   run                  status    step       loss    eval loss  lr           grad norm  firing
──────────────────────────────────────────────────────────────────────────────────────────────────
▶  llama-lora-3f2a9c1d  firing    1520/3000  2.45    2.687      0.0002 ×0.5  1.42       loss_spike
   qwen-full            finished  400/400    0.5748  —          —            —          —
╭─ latest decisions of llama-lora-3f2a9c1d (2) ────────────────────────────────────────────────────╮
│ step     15 non_finite_loss skip_update  loss is nan at step 15: non-finite loss=nan, grad_norm… │
│ step   1519 loss_spike      skip_update  loss 5.61 at step 1519 is 69 robust z above its rollin… │
╰──────────────────────────────────────────────────────────────────────────────────────────────────╯




stop llama-lora-3f2a9c1d? y/n"""


def test_stop_rollback_and_reduce_lr_are_sent_only_after_yes() -> None:
    source = FakeSource([SNAPSHOT])
    app = app_for(source)
    press(app, "s", "n")
    assert source.sent == [] and screen(app)[-1] == "cancelled: stop of llama-lora-3f2a9c1d"
    press(app, "r", "y")
    assert source.sent == [("llama-lora-3f2a9c1d", "rollback", {})]
    assert screen(app)[-1].startswith("queued rollback for llama-lora-3f2a9c1d (command 7); it is carried out at")
    press(app, "l", "y")
    assert source.sent[-1] == ("llama-lora-3f2a9c1d", "reduce_lr", {"factor": 0.5})


def test_a_refused_action_shows_the_daemons_reason() -> None:
    source = FakeSource([SNAPSHOT], refuse=DaemonError("a valid token is required"))
    app = app_for(source)
    press(app, "s", "y")
    assert screen(app)[-1] == "error: stop llama-lora-3f2a9c1d: a valid token is required"
    last = app.selected().decisions[-1]  # type: ignore[union-attr]
    assert (last.step, last.rule, last.actions, last.reason) == (
        1520, "operator", "stop", "refused: a valid token is required (by hand)")


def test_read_only_source_says_actions_need_the_daemon() -> None:
    source = FakeSource([SNAPSHOT], read_only="read-only (--dir): actions need the daemon")
    app = app_for(source, width=160)
    assert screen(app)[-1] == "↑/↓ select · enter details · o order · read-only (--dir): actions need the daemon · q quit"
    press(app, "s")
    assert app.pending is None and source.sent == []
    assert screen(app)[-1].startswith("read-only (--dir): actions need the daemon: start the run with GUARDIAN_URL")


def test_moving_opening_details_and_going_back() -> None:
    app = app_for(FakeSource([SNAPSHOT]), height=40)
    press(app, "down", "down", "down")
    assert app.selected_id == "qwen-full"
    press(app, "up", "enter")
    assert screen(app)[1].startswith("run llama-lora-3f2a9c1d · firing · step 1520/3000")
    press(app, "down", "down", "down")  # in the detail view: older decisions
    assert app.scrolled == 1 and "decision log (2, from the 2nd newest)" in "\n".join(screen(app))
    press(app, "esc")
    assert any(line.startswith("╭─ latest decisions of llama-lora-3f2a9c1d (2)") for line in screen(app))
    press(app, "enter", "backspace")
    assert not app.detail
    assert press(app, "q") is False


def test_a_run_that_disappears() -> None:
    app = app_for(FakeSource([SNAPSHOT]), height=20)
    press(app, "j", "enter")
    app.snapshot = Snapshot((LLAMA,), URL)
    assert "run qwen-full is no longer reported by http://127.0.0.1:8765; esc to go back" in "\n".join(screen(app))
    press(app, "esc")
    assert app.selected() == LLAMA  # the run now at its place


def test_keys_are_decoded_from_raw_terminal_input() -> None:
    data = b"\x1b[A\x1bOBjk\r\n\x1b\x7fq\x1b[5~\x1b[1;5A s"
    assert parse_keys(data) == ["up", "down", "j", "k", "enter", "enter", "esc", "backspace", "q", "pageup", " ", "s"]


def test_key_reader_restores_the_terminal_even_on_an_exception() -> None:
    parent, child = pty.openpty()
    try:
        before = termios.tcgetattr(child)
        with pytest.raises(RuntimeError), open(child, closefd=False) as stream, KeyReader(stream) as keys:
            assert not termios.tcgetattr(child)[3] & termios.ICANON  # cbreak: keys arrive one by one
            os.write(parent, b"\x1b[Bq")
            assert keys.read(1.0) == ["down", "q"]
            raise RuntimeError("boom")
        assert termios.tcgetattr(child) == before
    finally:
        os.close(parent)
        os.close(child)


def test_rows_keep_their_order_from_poll_to_poll_and_o_changes_it() -> None:
    older, newer = (RunSnapshot("lora-r8-zeta", "running", step=5, started=100.0),
                    RunSnapshot("lora-r8-alpha", "firing", step=3, started=200.0))
    # the daemon lists the most recently heard-from run first, which changes with every report
    app = app_for(FakeSource([Snapshot((newer, older), URL), Snapshot((older, newer), URL)]))
    first = [line.split()[0] for line in screen(app)[3:5]]
    app.snapshot = app.source.snapshot()
    assert [line.split()[0] for line in screen(app)[3:5]] == first == ["▶", "lora-r8-alpha"]  # oldest first
    assert app.selected_id == "lora-r8-zeta"
    press(app, "o")
    assert app.order == "id" and [r.id for r in app.snapshot.runs] == ["lora-r8-alpha", "lora-r8-zeta"]
    assert app.selected_id == "lora-r8-zeta" and screen(app)[0].endswith("sorted by id (o)")
    press(app, "o")
    assert [r.id for r in app.snapshot.runs] == ["lora-r8-alpha", "lora-r8-zeta"]  # status: firing first


def test_s_r_and_l_on_an_ended_run_are_refused() -> None:
    source = FakeSource([FAMILY])
    app = app_for(source)
    app.selected_id = "lora-r8-by-hand-3f2a9c1d"
    for key in ("s", "r", "l"):
        press(app, key)
        assert app.pending is None and source.sent == []
        assert screen(app)[-1].startswith("refused: lora-r8-by-hand-3f2a9c1d has ended (stopped by operator);")
    # and the log says so, as the operator's, poll after poll
    app.snapshot = source.snapshot()
    log = [(d.step, d.rule, d.actions, d.reason) for d in app.selected().decisions]  # type: ignore[union-attr]
    assert log == [(700, "operator", action, "refused: the run has ended (stopped by operator) (by hand)")
                   for action in ("stop", "rollback", "reduce_lr")]
    assert any(line.startswith("│ step    700 operator reduce_lr    refused: the run has ended (stopped by operator)")
               for line in screen(app))


def test_top_help_lists_the_keys() -> None:
    result = subprocess.run([sys.executable, "-m", "guardian.cli", "top", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    keys = [line.split()[0] for line in result.stdout.split("keys:\n", 1)[1].splitlines() if line.startswith("  ")]
    assert keys == ["up/down,", "enter", "esc", "o", "s", "r", "l", "q"]


def test_the_daemon_refuses_actions_on_an_ended_run_and_top_logs_queued_ones(tmp_path: Path) -> None:
    from daemonkit import in_process_daemon

    key = "test-run-key-0123456789abcdefghijklmnop"
    with in_process_daemon(tmp_path) as (_, url, token):
        def report(run: str, *events: dict[str, Any]) -> None:
            request(url, "POST", "/v1/report", {"run": {"id": run, "rules": "default"}, "events": list(events)},
                    token=token, run_key=key)

        report("done", {"seq": 1, "kind": "metrics", "step": 1, "phase": "train", "values": {"loss": 2.0}},
               {"seq": 2, "kind": "end", "step": 1})
        report("live", {"seq": 1, "kind": "metrics", "step": 1, "phase": "train", "values": {"loss": 2.0}})
        source = DaemonSource(url, token)
        with pytest.raises(DaemonError, match="run 'done' has ended: rollback is only for a run still training"):
            source.control("done", "rollback", {})
        assert source.control("live", "reduce_lr", {"factor": 0.5}) == 1
        live = {run.id: run for run in source.snapshot().runs}["live"]
        assert [(d.step, d.rule, d.actions, d.reason) for d in live.decisions] == [
            (None, "operator", "reduce_lr(factor=0.5)", "queued: carried out at the run's next step (by hand, command 1)")]
        assert "step      — operator reduce_lr(factor=0.5) queued: carried out" in render(
            widgets.decisions_panel(live), 100)


# ---- the --dir source ------------------------------------------------------------------------------


def event_line(seq: int, kind: str, **fields: Any) -> str:
    return json.dumps({"seq": seq, "kind": kind, "time": 1000.0 + seq, **fields}) + "\n"


def test_event_tail_copes_with_a_late_file_partial_lines_growth_and_replacement(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == ([], False)  # not there yet
    whole = event_line(1, "start", step=0)
    path.write_text(whole + '{"seq": 2, "kind": "metr')
    assert [e.seq for e in tail.read()[0]] == [1]
    with path.open("a") as f:
        f.write('ics", "step": 1, "phase": "train", "values": {"loss": 2.0}}\nnot json\n' + event_line(3, "end", step=1))
    assert [e.seq for e in tail.read()[0]] == [2, 3]
    assert tail.read() == ([], False)
    path.write_text(whole)  # a new run in the same folder: a shorter file
    events, restarted = tail.read()
    assert restarted and [e.seq for e in events] == [1]


def test_dir_source_marks_a_run_that_stopped_writing_as_stalled(tmp_path: Path) -> None:
    (tmp_path / "guardian").mkdir()
    (tmp_path / "guardian" / "events.jsonl").write_text(
        event_line(1, "start", step=0, max_steps=100)
        + event_line(2, "metrics", step=1, phase="train", values={"loss": 2.0, "grad_norm": 1.0}))
    now = [1010.0]
    source = DirSource(tmp_path, clock=lambda: now[0])
    assert source.snapshot().runs[0].status == "running"
    now[0] += 400  # the shipped `stalled` rule: no report for 300 s
    [run] = source.snapshot().runs
    assert (run.status, run.rules["stalled"], run.step, run.max_steps) == ("stalled", "firing", 1, 100)
    with pytest.raises(ReadOnlySourceError, match="--dir only reads"):
        source.control(run.id, "stop", {})


def test_dir_source_before_the_run_starts(tmp_path: Path) -> None:
    source = DirSource(tmp_path)
    assert source.snapshot() == Snapshot((), str(tmp_path / "guardian" / "events.jsonl"))
    assert source.waiting.startswith(f"no events in {tmp_path}/guardian/events.jsonl yet")


def test_dir_source_over_a_real_training_run(tmp_path: Path) -> None:
    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.faults import Fault, FaultInjector
    from guardian.testing.tinyrun import TinyRun

    TinyRun(str(tmp_path), max_steps=40, eval_steps=20).trainer(
        [FaultInjector([Fault("nan", 15)]), GuardianCallback()]).train()
    [run] = DirSource(tmp_path).snapshot().runs
    assert (run.id, run.status, run.step, run.max_steps) == (tmp_path.name, "ended", 40, 40)
    assert [(d.step, d.rule, d.actions) for d in run.decisions] == [(15, "non_finite_loss", "skip_update")]
    assert run.decisions[0].reason.startswith("loss is nan at step 15")
    assert len(run.history["loss"]) == 40 and str(run.history["loss"][14]) == "nan"
    assert len(run.history["eval_loss"]) == 2 and run.eval_loss == run.history["eval_loss"][-1]
    assert run.rules["non_finite_loss"] == "ok" and set(run.rules) >= {"loss_spike", "stalled"}
    assert run.loss is not None and run.grad_norm is not None and run.tokens_per_second is not None
    assert run.lr_scale == 1.0


# ---- the daemon source -----------------------------------------------------------------------------


class FakeDaemon:
    """Answers the daemon's GET endpoints from dicts; counts the event fetches."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.events: dict[str, dict[str, Any]] = {}
        self.fetched: list[str] = []
        self.down = False
        self.now = 0.0  # a clock that fetching events moves on by `events_seconds`
        self.events_seconds = 0.0

    def __call__(self, url: str, method: str, path: str, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        if self.down:
            raise DaemonError(f"cannot reach the guardian daemon at {url}: [Errno 111] Connection refused")
        if path == "/v1/runs":
            return {"runs": self.runs}
        self.fetched.append(path)
        self.now += self.events_seconds
        return self.events[path.split("/")[3]]


def test_daemon_source_fetches_a_runs_events_only_when_it_changed_and_survives_an_outage() -> None:
    fake = FakeDaemon()
    fake.runs = [{"id": "r1", "status": "firing", "last_step": 2, "last_seen": 5.0, "decisions": 1,
                  "seconds_since_report": 1.0, "rule_status": {"non_finite_loss": "firing"}, "meta": {"max_steps": 9}}]
    decision = {"step": 2, "rule": "non_finite_loss", "severity": "critical", "actions": [{"kind": "skip_update"}],
                "metric": "loss", "value": "nan", "threshold": None, "onset_step": 2, "message": "loss is nan",
                "incident": 1}
    fake.events["r1"] = {"decisions": [decision], "events": [
        {"seq": 1, "kind": "metrics", "step": 1, "phase": "train", "values": {"loss": 3.0}, "lr_scale": 1.0},
        {"seq": 2, "kind": "metrics", "step": 2, "phase": "train", "values": {"loss": "nan"}},
        {"seq": 3, "kind": "system", "rank": 0,
         "gpus": [{"gpu": 0, "memory_used_bytes": GIB, "memory_total_bytes": 8 * GIB}]},
    ]}
    source = DaemonSource(URL, fetch=fake)
    [run] = source.snapshot().runs
    assert (run.status, run.step, run.max_steps, run.firing, run.gpus) == (
        "firing", 2, 9, ["non_finite_loss"], (GpuMemory("0", GIB, 8 * GIB),))
    assert str(run.loss) == "nan" and run.history["loss"][0] == 3.0
    assert run.decisions == (DecisionLine(2, "non_finite_loss", "critical", "skip_update", "loss is nan"),)
    source.snapshot()
    assert fake.fetched == ["/v1/runs/r1/events?since_seq=0&limit=1000"]  # unchanged: not fetched again
    fake.down = True
    stale = source.snapshot()
    assert stale.runs == (run,) and stale.error is not None and "Connection refused" in stale.error
    fake.down, fake.runs = False, []
    assert source.snapshot().runs == ()  # deleted by retention: gone


def test_daemon_source_fetches_a_big_run_less_often() -> None:
    fake = FakeDaemon()
    fake.events["r1"], fake.events_seconds = {"events": [], "decisions": []}, 2.0
    source = DaemonSource(URL, fetch=fake, clock=lambda: fake.now)
    for step in range(1, 5):  # the run changes every second, but fetching its events takes 2 s
        fake.runs = [{"id": "r1", "status": "running", "last_step": step, "last_seen": float(step), "decisions": 0}]
        source.snapshot()
        fake.now += 1.0
    assert len(fake.fetched) == 1  # the next is due at 2 + 5 x 2 = 12 s
    fake.now = 12.0
    source.snapshot()
    assert len(fake.fetched) == 2


def test_daemon_source_when_no_daemon_listens() -> None:
    from daemonkit import free_port

    url = f"http://127.0.0.1:{free_port()}"
    snapshot = DaemonSource(url, timeout_seconds=1.0).snapshot()
    assert snapshot.runs == () and snapshot.error is not None
    assert snapshot.error.startswith(f"cannot reach the guardian daemon at {url}")


def test_history_stays_bounded_however_long_the_run() -> None:
    from guardian.tui.source import HISTORY_POINTS, LiveRun

    record = LiveRun("long", decisions_kept=10)
    for step in range(1, 5001):
        record.apply(MetricsEvent(seq=step, step=step, phase="train", values={"loss": 1.0 / step, "grad_norm": 1.0}))
    for step in range(50):
        record.apply(DecisionEvent(seq=6000 + step, step=step, rule="loss_spike", severity=Severity.WARNING, actions=[],
                                   metric="loss", value=9.0, threshold=1.0, onset_step=1, message="spike",
                                   incident=None))
    run = record.snapshot({})
    assert len(run.history["loss"]) == HISTORY_POINTS and run.history["loss"][-1] == 1.0 / 5000
    assert [d.step for d in run.decisions] == list(range(40, 50)) and run.step == 5000


# ---- the real program in a real terminal -----------------------------------------------------------


TRAIN = """\
import sys
import torch
torch.set_num_threads(1)
from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.testing.tinyrun import TinyRun
out, url = sys.argv[1], sys.argv[2]
TinyRun(out, max_steps=5000, eval_steps=50).trainer(
    [FaultInjector([Fault("nan", 15)]), GuardianCallback(url=url, run_id="tui-run")]).train()
"""


def need_tmux() -> str:
    tmux = shutil.which("tmux")
    if tmux is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing; CI must install it (Debian: apt-get install tmux)", pytrace=False)
        pytest.skip("tmux is not installed")
    return tmux


class Tmux:
    """One detached tmux session on a server of its own; the program's exit status and `stty -a` after it
    ends are written to files (the pane stays, dead, so they can be read)."""

    def __init__(self, tmux: str, tmp_path: Path, name: str) -> None:
        self.tmux, self.name, self.socket = tmux, name, f"guardian-test-{os.getpid()}-{name}"
        self.status_file, self.stty_file = tmp_path / f"{name}.status", tmp_path / f"{name}.stty"
        self.pid_file = tmp_path / f"{name}.pid"

    def __call__(self, *args: str) -> str:
        return subprocess.run([self.tmux, "-L", self.socket, "-f", "/dev/null", *args], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def start(self, command: str, width: int = 120, height: int = 40) -> None:
        inner = f"echo $$ > {self.pid_file}; cd {shlex.quote(str(REPO))}; exec {command}"
        shell = (f"sh -c {shlex.quote(inner)}; echo $? > {self.status_file}; stty -a > {self.stty_file}")
        self("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), shell,
             ";", "set-option", "-w", "-t", self.name, "remain-on-exit", "on")

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", self.name, *keys)

    def wait(self, check: Callable[[str], bool], what: str, timeout_seconds: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_seconds
        while True:
            text = self.screen()
            if check(text):
                return text
            if time.monotonic() > deadline:
                size = self("display-message", "-p", "-t", self.name, "#{window_width}x#{window_height}").strip()
                raise AssertionError(f"timed out waiting for {what}; the screen ({size}):\n{text}")
            time.sleep(0.2)

    def wait_for(self, *texts: str, timeout_seconds: float = 60.0) -> str:
        return self.wait(lambda screen: all(t in screen for t in texts), " and ".join(map(repr, texts)), timeout_seconds)

    def exited(self, timeout_seconds: float = 20.0) -> int:
        """Wait for the program to end; its exit status."""
        deadline = time.monotonic() + timeout_seconds
        while self("display-message", "-p", "-t", self.name, "#{pane_dead}").strip() != "1":
            assert time.monotonic() < deadline, f"the program did not exit; the screen:\n{self.screen()}"
            time.sleep(0.2)
        return int(self.status_file.read_text())

    def terminal_restored(self) -> bool:
        """`stty -a` after the program: canonical mode and echo are back on."""
        settings = self.stty_file.read_text().split()
        return "icanon" in settings and "echo" in settings

    def kill(self) -> None:
        subprocess.run([self.tmux, "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux_session(tmp_path: Path) -> Iterator[Callable[[str], Tmux]]:
    tmux, sessions = need_tmux(), []

    def make(name: str) -> Tmux:
        sessions.append(Tmux(tmux, tmp_path, name))
        return sessions[-1]

    yield make
    for session in sessions:
        session.kill()


def wait_until(check: Callable[[], Any], what: str, timeout_seconds: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout_seconds
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return result


def python(*args: str) -> str:
    return " ".join(shlex.quote(a) for a in (sys.executable, *args))


def test_guardian_top_without_a_terminal_says_so() -> None:
    result = subprocess.run([sys.executable, "-m", "guardian.cli", "top", "--url", "http://127.0.0.1:9"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "guardian top needs a terminal" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_guardian_top_in_a_real_terminal_against_a_real_daemon_and_run(
        tmp_path: Path, tmux_session: Callable[[str], Tmux]) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    with (tmp_path / "train.log").open("wb") as log:
        training = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), daemon.url], stdout=log,
                                    stderr=subprocess.STDOUT, cwd=REPO)
    term = tmux_session("top")
    try:
        def decided() -> bool:
            runs = request(daemon.url, "GET", "/v1/runs")["runs"]
            return bool(runs) and runs[0]["decisions"] > 0

        wait_until(decided, "the run's first decision (training log: train.log)")
        term.start(f"env GUARDIAN_HOME={shlex.quote(str(tmp_path / 'state'))} "
                   + python("-m", "guardian.cli", "top", "--url", daemon.url))
        table = term.wait_for("tui-run", "latest decisions of tui-run", "non_finite_loss", "grad norm")
        assert "running" in table or "firing" in table

        term.keys("Down", "Enter")
        term.wait_for("run tui-run ·", "curves over steps", "decision log", "state", "non_finite_loss")
        term.keys("Escape")
        term.wait_for("latest decisions of tui-run")

        term.keys("s")
        term.wait_for("stop tui-run? y/n")
        term.keys("y")
        term.wait_for("queued stop for tui-run (command")
        commands = request(daemon.url, "GET", "/v1/runs/tui-run/events")["commands"]
        assert [(c["action"], c["source"]) for c in commands] == [("stop", "ctl")]
        assert training.wait(timeout=180) == 0  # the run carried out the stop
        term.wait(lambda s: "▶  tui-run  stopped" in s, "the run to show as stopped", 30)
        term.wait_for("· stopped by operator", "skipped this update; stopping training (by hand, command 1)")

        term("resize-window", "-t", "top", "-x", "70")
        narrow = term.wait(lambda s: "tok/s" not in s and "tui-run" in s, "the narrow layout")
        assert max(len(line) for line in narrow.splitlines()) <= 70
        header = narrow.splitlines()[1].split()
        assert header[:4] == ["run", "status", "step", "loss"] and "lr" in header  # (eval loss once there is one)

        term.keys("q")
        assert term.exited() == 0
        assert term.terminal_restored()
    finally:
        if training.poll() is None:
            training.kill()
        daemon.stop()


def test_guardian_top_restores_the_terminal_on_sigterm_and_shows_an_empty_dir(
        tmp_path: Path, tmux_session: Callable[[str], Tmux]) -> None:
    term = tmux_session("dir")
    term.start(python("-m", "guardian.cli", "top", "--dir", str(tmp_path / "out")), width=200, height=20)
    term.wait_for(f"no events in {tmp_path}/out/guardian/events.jsonl yet", "read-only (--dir)")
    os.kill(int(term.pid_file.read_text()), signal.SIGTERM)
    assert term.exited() == 128 + signal.SIGTERM
    assert term.terminal_restored()


# ---- a real session: three runs through a real daemon, one stopped from top, one with `guardian ctl` ----------


class AtStep:
    """A Trainer callback that calls functions at the end of chosen steps (an operator pressing keys)."""

    def __init__(self, actions: dict[int, Callable[[], None]]) -> None:
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):  # type: ignore[misc]
            def on_step_end(inner, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step in actions:
                    actions[state.global_step]()

        self.callback = _Callback()


CLEAN, FAULTY, BY_HAND, BY_CTL = ("lora-r8-clean-3f2a9c1d", "lora-r8-faulty-3f2a9c1d", "lora-r8-by-hand-3f2a9c1d",
                                  "lora-r8-by-ctl-3f2a9c1d")


def real_session(tmp_path: Path, url: str, token: str) -> TopApp:
    """A real daemon's view of four tiny real runs: healthy; rescued by skips; stopped with `s` in top;
    given a rollback then a stop with `guardian ctl`. Returns the `top` app (80×24) that stopped the third."""
    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.faults import Fault, FaultInjector
    from guardian.cli import main
    from guardian.testing.tinyrun import TinyRun

    app = TopApp(DaemonSource(url, token), Console(width=80, height=24, file=io.StringIO(), color_system=None))

    def press_in_top(*keys: str) -> None:
        app.snapshot = app.source.snapshot()
        app.selected_id = BY_HAND
        press(app, *keys)

    def ctl(*args: str) -> None:
        assert main(["ctl", *args, BY_CTL, "--url", url, "--token", token]) == 0

    def train(run_id: str, *callbacks: Any) -> None:
        TinyRun(str(tmp_path / run_id), max_steps=30, eval_steps=10).trainer(
            [*callbacks, GuardianCallback(url=url, token=token, run_id=run_id, deadline_seconds=2.0)]).train()

    train(CLEAN)
    train(FAULTY, FaultInjector([Fault("nan", 12), Fault("nan", 25)]))
    train(BY_HAND, AtStep({18: lambda: press_in_top("s", "y")}).callback)
    train(BY_CTL, AtStep({10: lambda: ctl("rollback"), 22: lambda: ctl("stop")}).callback)
    app.snapshot = app.source.snapshot()
    return app


@pytest.mark.slow
def test_a_real_session_operator_actions_and_endings_through_a_real_daemon(tmp_path: Path) -> None:
    from daemonkit import in_process_daemon

    from guardian.cli import main

    with in_process_daemon(tmp_path / "state") as (_, url, token):
        top = real_session(tmp_path, url, token)
        assert top.message is not None and top.message.plain.startswith(f"queued stop for {BY_HAND} (command 1)")
        runs = {run.id: run for run in top.snapshot.runs}
        assert [r.id for r in top.snapshot.runs] == [CLEAN, FAULTY, BY_HAND, BY_CTL]  # in the order they started
        assert {r.id: r.ending for r in runs.values()} == {CLEAN: "finished", FAULTY: "finished",
                                                            BY_HAND: "stopped by operator", BY_CTL: "stopped by operator"}
        assert [(d.rule, d.step) for d in runs[FAULTY].decisions] == [("non_finite_loss", 12), ("non_finite_loss", 25)]
        log = [(d.rule, d.actions, d.reason) for d in runs[BY_CTL].decisions]
        assert [entry[:2] for entry in log] == [("operator", "rollback"), ("operator", "stop")]
        assert log[0][2].startswith("rolled back to step 0 from memory") and log[0][2].endswith("(by hand, command 2)")
        assert log[1][2] == "skipped this update; stopping training (by hand, command 3)"

        top.selected_id = BY_HAND
        text = "\n".join(screen(top))
        assert f"╭─ latest decisions of {BY_HAND} (1) · stopped by operator" in text
        assert any("operator stop         skipped this update; stopping training" in line for line in screen(top))
        for run_id in (CLEAN, FAULTY, BY_HAND, BY_CTL):  # 80 columns: every id whole, eval loss and lr shown
            assert any(line[3:].startswith(run_id + " ") for line in screen(top))
        assert screen(top)[1].split()[-4:] == ["loss", "eval", "loss", "lr"]

        # --dir over the run's own event file tells the same story
        [on_disk] = DirSource(tmp_path / BY_CTL).snapshot().runs
        assert on_disk.ending == "stopped by operator"
        assert [(d.rule, d.actions, d.reason) for d in on_disk.decisions] == log

        press(top, "s")  # an ended run: refused here, and by the daemon for `guardian ctl`
        assert top.pending is None and screen(top)[-1].startswith(f"refused: {BY_HAND} has ended")
        assert main(["ctl", "stop", BY_HAND, "--url", url, "--token", token]) == 2
        with pytest.raises(DaemonError, match=f"run '{BY_HAND}' has ended: stop is only for a run still training"):
            top.source.control(BY_HAND, "stop", {})
