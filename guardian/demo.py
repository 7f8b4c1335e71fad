"""`guardian demo`: the same tiny LoRA run three times: clean, faulted, and faulted with Guardian."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESCUE_TOLERANCE = 0.05  # the guarded run must end within 5 % of the clean run's eval loss


@dataclass
class RunResult:
    name: str
    eval_loss: float
    seconds: float
    faults: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)


def demo_faults(steps: int) -> list[Any]:
    """A poisoned shard, a learning-rate blow-up and a NaN, spread over the run."""
    from guardian.callbacks.faults import Fault

    return [
        Fault("poison", start_step=int(steps * 0.15), steps=3),
        Fault("lr_blowup", start_step=int(steps * 0.375), steps=8, factor=30.0),
        Fault("nan", start_step=int(steps * 0.625)),
    ]


def train_once(name: str, out_dir: Path, steps: int, seed: int, faults: list[Any], guarded: bool) -> RunResult:
    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.faults import FaultInjector
    from guardian.tinyrun import TinyRun

    callbacks: list[Any] = []
    injector = FaultInjector(list(faults)) if faults else None
    if injector:
        callbacks.append(injector)
    guardian = GuardianCallback() if guarded else None
    if guardian:
        callbacks.append(guardian)
    started = time.perf_counter()
    trainer = TinyRun(str(out_dir / name), max_steps=steps, seed=seed, eval_steps=steps // 4).trainer(callbacks)
    trainer.train()
    eval_loss = float(trainer.evaluate()["eval_loss"])
    result = RunResult(name, eval_loss, time.perf_counter() - started, [str(f) for f in faults])
    if guardian:
        result.actions = [_summarise(i) for i in guardian.interventions]
        result.decisions = [d.message for d in guardian.decisions]
    return result


def _summarise(outcome: dict[str, Any]) -> str:
    from guardian.actions import describe_outcome as describe

    return f"step {outcome['step']}: {describe(outcome)} ({', '.join(outcome['rules'])})"


def run_demo(out_dir: Path, *, steps: int = 400, seed: int = 0, console: Console | None = None) -> bool:
    """Train the three runs, print what happened; True when Guardian rescued the faulted run."""
    console = console or Console()
    faults = demo_faults(steps)
    console.print(f"[bold]Guardian demo[/]: a tiny Llama + LoRA run, {steps} steps on the CPU, three times.")
    console.print("Faults injected: " + "; ".join(str(f) for f in faults) + "\n")
    results = []
    for name, run_faults, guarded in (("clean", [], False), ("faulted", faults, False), ("guarded", faults, True)):
        with console.status(f"training the {name} run..."):
            result = train_once(name, out_dir, steps, seed, run_faults, guarded)
        console.print(f"  {name:8s} eval loss {result.eval_loss:.4f}   ({result.seconds:.0f} s)")
        results.append(result)
    clean, faulted, guarded_run = results
    _print_table(console, results, clean.eval_loss)
    console.print("\n[bold]What Guardian did in the guarded run[/] (every decision is in "
                  f"{out_dir / 'guarded' / 'guardian' / 'events.jsonl'}):")
    for line in guarded_run.actions:
        console.print(f"  - {line}", markup=False, highlight=False)
    if guarded_run.decisions:
        console.print("\nThe first decision, in full:")
        console.print(f"  {guarded_run.decisions[0]}", markup=False, highlight=False)
    return _verdict(console, clean.eval_loss, faulted.eval_loss, guarded_run.eval_loss)


def _print_table(console: Console, results: list[RunResult], clean_loss: float) -> None:
    table = Table(title="\nFinal evaluation loss", title_justify="left")
    for column in ("run", "eval loss", "vs clean", "Guardian actions"):
        table.add_column(column)
    for r in results:
        delta = "—" if r.name == "clean" else _relative(r.eval_loss, clean_loss)
        actions = str(len(r.actions)) if r.name == "guarded" else "—"
        table.add_row(r.name, f"{r.eval_loss:.4f}", delta, actions)
    console.print(table)


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
