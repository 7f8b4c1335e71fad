"""`guardian demo`: the same tiny LoRA run three times: clean, faulted, and faulted with Guardian.

Every run leaves something `guardian report` reads: the guarded run Guardian's own record
(`guardian/events.jsonl`), the clean and faulted runs a `trainer_state.json` logged at every step, over which
`report` replays the rules to show what Guardian would have done.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msgspec import UNSET
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from guardian.events import ActionEvent, LrChange

RESCUE_TOLERANCE = 0.05  # the guarded run must end within 5 % of the clean run's eval loss


@dataclass
class RunResult:
    name: str
    eval_loss: float
    seconds: float
    faults: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)  # one line per intervention
    outcomes: list[ActionEvent] = field(default_factory=list)  # the interventions as the actuator recorded them
    counts: dict[str, int] = field(default_factory=dict)  # the actuator's counts by kind
    decisions: list[str] = field(default_factory=list)


def demo_faults(steps: int) -> list[Any]:
    """A poisoned shard, a learning-rate blow-up and a NaN, spread over the run."""
    from guardian.callbacks.faults import Fault

    return [
        Fault("poison", start_step=int(steps * 0.15), steps=3),
        Fault("lr_blowup", start_step=int(steps * 0.375), steps=8, factor=30.0),
        Fault("nan", start_step=int(steps * 0.625)),
    ]


def train_once(name: str, out_dir: Path, steps: int, seed: int, faults: list[Any], guarded: bool,
               on_step: Callable[[int], None] | None = None) -> RunResult:
    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.faults import FaultInjector
    from guardian.testing.tinyrun import TinyRun

    callbacks: list[Any] = []
    injector = FaultInjector(list(faults)) if faults else None
    if injector:
        callbacks.append(injector)
    guardian = GuardianCallback() if guarded else None
    if guardian:
        callbacks.append(guardian)
    if on_step is not None:
        callbacks.append(_step_listener(on_step))
    started = time.perf_counter()
    run_dir = out_dir / name
    # Unguarded runs log every step, NaN included, so that `guardian report` can replay the rules over them.
    settings = TinyRun(str(run_dir), max_steps=steps, seed=seed, eval_steps=steps // 4) if guarded else TinyRun(
        str(run_dir), max_steps=steps, seed=seed, eval_steps=steps // 4, logging_steps=1,
        logging_nan_inf_filter=False)
    trainer = settings.trainer(callbacks)
    trainer.train()
    eval_loss = float(trainer.evaluate()["eval_loss"])
    if not guarded:
        trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
    result = RunResult(name, eval_loss, time.perf_counter() - started, [str(f) for f in faults])
    if guardian:
        result.outcomes = list(guardian.interventions)
        result.counts = dict(guardian.counts)
        result.actions = [_summarise(i) for i in guardian.interventions]
        result.decisions = [d.message for d in guardian.decisions]
    return result


def _step_listener(on_step: Callable[[int], None]) -> Any:
    """A Trainer callback that tells the demo's progress line each finished step."""
    from transformers import TrainerCallback

    class StepListener(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            on_step(state.global_step)

    return StepListener()


def _summarise(action: ActionEvent) -> str:
    """"step 15: skipped this update (non_finite_loss)": one intervention."""
    return f"step {action.step}: {action.outcome.describe()} ({', '.join(action.rules)})"


def run_demo(out_dir: Path, *, steps: int = 400, seed: int = 0, console: Console | None = None) -> bool:
    """Train the three runs, print what happened; True when Guardian rescued the faulted run."""
    console = console or Console()
    faults = demo_faults(steps)
    console.print(f"[bold]Guardian demo[/]: a tiny Llama + LoRA run, {steps} steps on the CPU, three times.")
    console.print("Faults injected into the second and third runs:")
    for fault in faults:
        _indented(console, f"- {fault}")
    console.print()
    results = []
    for name, run_faults, guarded in (("clean", [], False), ("faulted", faults, False), ("guarded", faults, True)):
        results.append(_train_with_progress(console, name, out_dir, steps, seed, run_faults, guarded))
    clean, faulted, guarded_run = results
    _print_table(console, results, clean.eval_loss)
    console.print(f"\n[bold]What Guardian did in the guarded run[/] (every decision is in "
                  f"{out_dir / 'guarded' / 'guardian' / 'events.jsonl'}):")
    for line in action_lines(guarded_run.outcomes):
        _indented(console, f"- {line}")
    if guarded_run.decisions:
        console.print("\nThe first decision, in full:")
        _indented(console, guarded_run.decisions[0])
    rescued = _verdict(console, clean.eval_loss, faulted.eval_loss, guarded_run.eval_loss)
    _next_steps(console, out_dir)
    return rescued


def _train_with_progress(console: Console, name: str, out_dir: Path, steps: int, seed: int, faults: list[Any],
                         guarded: bool) -> RunResult:
    """One run, with a live line saying how far it is (a busy machine can take minutes per run)."""
    started = time.perf_counter()
    with console.status(f"training the {name} run...") as status:
        def show(step: int) -> None:
            status.update(f"training the {name} run: step {step}/{steps}, {time.perf_counter() - started:.0f} s")
        result = train_once(name, out_dir, steps, seed, faults, guarded, on_step=show)
    console.print(f"  {name:8s} eval loss {result.eval_loss:.4f}   ({result.seconds:.0f} s)")
    return result


def _indented(console: Console, text: str) -> None:
    """Plain text, wrapped to the terminal with every line indented (no markup: messages hold brackets)."""
    console.print(Padding(Text(text), (0, 0, 0, 2)))


def _kind(action: ActionEvent) -> tuple[str, ...]:
    """Which kinds of intervention an action carried out: skipped_update, lr_restored, rollback, lr_factor,
    stopped."""
    done = (("skipped_update", action.skipped_update), ("lr_restored", isinstance(action.lr_restored, LrChange)),
            ("rollback", bool(action.rollback)), ("lr_factor", bool(action.lr_factor)),
            ("stopped", bool(action.stopped)))
    return tuple(name for name, did in done if did)


def action_lines(actions: list[ActionEvent]) -> list[str]:
    """One line per stretch of consecutive steps with the same kind of action for the same rules."""
    groups: list[list[ActionEvent]] = []
    for action in actions:
        last = groups[-1][-1] if groups else None
        if last is not None and last.step == action.step - 1 \
                and (_kind(last), last.rules) == (_kind(action), action.rules):
            groups[-1].append(action)
        else:
            groups.append([action])
    lines = []
    for group in groups:
        first, final = group[0].step, group[-1].step
        where = f"step {first}" if first == final else f"steps {first}-{final}"
        each = f", each step (at step {first})" if len(group) > 1 and group[0].lr_restored is not UNSET else ""
        what = group[0].outcome.describe()
        if len(group) > 1:
            what = what.replace("skipped this update", "skipped each update")
        lines.append(f"{where}: {what}{each} ({', '.join(group[0].rules)})")
    return lines


def _next_steps(console: Console, out_dir: Path) -> None:
    console.print("\n[bold]Try next[/]:")
    for command, why in ((f"guardian report {out_dir / 'guarded'}", "what Guardian did, as a page and a plot"),
                         (f"guardian report {out_dir / 'faulted'}", "what it would have done on the unguarded run"),
                         (f"guardian top --dir {out_dir / 'guarded'}", "the guarded run in the terminal view")):
        _indented(console, f"{command}   # {why}")


def _print_table(console: Console, results: list[RunResult], clean_loss: float) -> None:
    table = Table(title="\nFinal evaluation loss", title_justify="left")
    for column in ("run", "eval loss", "vs clean", "Guardian actions"):
        table.add_column(column)
    for r in results:
        delta = "—" if r.name == "clean" else _relative(r.eval_loss, clean_loss)
        actions = _kinds(r.counts) if r.name == "guarded" else "—"
        table.add_row(r.name, f"{r.eval_loss:.4f}", delta, actions)
    console.print(table)


_COUNTED = (("skipped_updates", "skip"), ("lr_restores", "LR restore"), ("rollbacks", "rollback"),
            ("lr_cuts", "LR cut"), ("stops", "stop"))


def _kinds(counts: dict[str, int]) -> str:
    """'4 skips, 8 LR restores': the actuator's counts of each kind of intervention."""
    return ", ".join(f"{counts[key]} {name}{'s' if counts[key] != 1 else ''}"
                     for key, name in _COUNTED if counts.get(key)) or "none"


def _relative(value: float, reference: float) -> str:
    if not math.isfinite(value):
        return "[red]diverged (NaN)[/]"
    return f"{(value - reference) / reference:+.1%}"


def _verdict(console: Console, clean: float, faulted: float, guarded: float) -> bool:
    rescued = math.isfinite(guarded) and abs(guarded - clean) / clean <= RESCUE_TOLERANCE
    broken = not math.isfinite(faulted) or (faulted - clean) / clean > RESCUE_TOLERANCE
    if rescued and broken:
        console.print(f"\n[green bold]Rescued:[/] the guarded run ended within {RESCUE_TOLERANCE:.0%} of the clean "
                      "run; without Guardian the same faults ruined it.")
    elif rescued:
        console.print("\n[yellow]The guarded run matched the clean one, but the faults did not ruin the unguarded "
                      "run this time.[/]")
    else:
        console.print(f"\n[red bold]Not rescued:[/] the guarded run ended {_relative(guarded, clean)} from the clean run.")
    return rescued
