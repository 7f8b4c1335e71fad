"""The `guardian` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from guardian import __version__
from guardian.errors import GuardianError, RuleFileError
from guardian.ruleset import RuleSet, default_rules_path, load_rules


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GuardianError as exc:
        Console(stderr=True).print("[red]error:[/] " + escape(str(exc)), highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardian", description="Watch training runs and rescue them.")
    parser.add_argument("--version", action="version", version=f"guardian {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a tiny LoRA run clean, faulted, and faulted with Guardian")
    demo.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=Path("guardian-demo"), help="where the runs write (default ./guardian-demo)")
    demo.set_defaults(func=_demo)

    rules = sub.add_parser("rules", help="check or list rule files").add_subparsers(metavar="ACTION")
    check = rules.add_parser("check", help="validate rule files; exit 1 if any has a problem")
    check.add_argument("files", nargs="+", type=Path)
    check.set_defaults(func=_rules_check)
    show = rules.add_parser("show", help="list the rules of a file (default: the shipped rules)")
    show.add_argument("file", nargs="?", type=Path)
    show.set_defaults(func=_rules_show)
    detectors = rules.add_parser("detectors", help="document every detector kind and its parameters")
    detectors.set_defaults(func=_rules_detectors)

    replay = sub.add_parser("replay", help="what would the rules have done on a past run's log?")
    replay.add_argument("paths", nargs="+", type=Path, help="trainer_state.json, trainer_log.jsonl or a run directory")
    replay.add_argument("--rules", type=Path, help="rule file (default: the shipped rules)")
    replay.set_defaults(func=_replay)
    return parser


def _demo(args: argparse.Namespace) -> int:
    import transformers

    from guardian.demo import run_demo

    transformers.logging.set_verbosity_error()
    logging.getLogger("guardian").setLevel(logging.CRITICAL)  # the demo prints its own account
    return 0 if run_demo(args.out, steps=args.steps, seed=args.seed) else 1


def _rules_check(args: argparse.Namespace) -> int:
    console, failed = Console(), 0
    for path in args.files:
        try:
            ruleset = load_rules(path)
        except RuleFileError as exc:
            failed += 1
            for problem in exc.problems:
                console.print("[red]✗[/] " + escape(str(problem)), highlight=False)
            continue
        console.print(f"[green]✓[/] {path}: {len(ruleset.rules)} rules OK", highlight=False)
    return 1 if failed else 0


def _rules_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    ruleset = load_rules(args.file)
    table = Table(title=f"{args.file or default_rules_path()}", title_justify="left")
    for column in ("rule", "watches", "detector", "severity", "actions", "escalation"):
        table.add_column(column)
    for rule in ruleset.rules:
        escalation = "; ".join(
            f"{e.after_firings} in {e.within_steps} steps: {', '.join(map(str, e.actions))}" for e in rule.escalation
        )
        table.add_row(rule.name, ", ".join(rule.watches), rule.detector, rule.severity.value,
                      ", ".join(map(str, rule.actions)), escalation or "—")
    Console().print(table)
    return 0


def _rules_detectors(args: argparse.Namespace) -> int:
    import inspect

    from guardian.detectors import DETECTORS

    console = Console()
    for kind, cls in sorted(DETECTORS.items()):
        console.print(f"[bold]{kind}[/]")
        console.print(inspect.cleandoc(cls.__doc__ or ""), markup=False, highlight=False, soft_wrap=True)
        console.print()
    return 0


def _replay(args: argparse.Namespace) -> int:
    from guardian.replay import replay

    ruleset: RuleSet = load_rules(args.rules)
    console = Console()
    for path in args.paths:
        result = replay(path, ruleset)
        report = result.report
        notes = [f"{report.format}", f"{result.observations} observations"]
        if report.duplicates_dropped:
            notes.append(f"{report.duplicates_dropped} duplicate lines dropped")
        if report.restarts:
            notes.append(f"{report.restarts} resume(s)")
        if report.skipped_lines:
            notes.append(f"{report.skipped_lines} unreadable lines skipped")
        console.print(f"[bold]{path}[/] ({', '.join(notes)})", highlight=False)
        if not result.decisions:
            console.print("  no rule would have fired")
        for decision in result.decisions:
            actions = ", ".join(map(str, decision.actions))
            console.print(f"  step {decision.step:>7}  {decision.rule:<22} {actions:<28} {decision.finding.message}",
                          highlight=False, markup=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
