"""The `guardian` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.markup import escape

from guardian import __version__, events
from guardian.engine.rules import RuleSet
from guardian.errors import ConfigError, GuardianError, RuleFileError
from guardian.rulefile.reader import default_rules_path, load_rules
from guardian.transport.client import DaemonError

EXIT_CODES = """\
exit codes: 0 done; 1 the command worked and found a problem (`rules check`: a rule file is invalid, or with
--strict has a warning, `doctor`: an error, or with --strict any warning, `demo`: the guarded run was not
rescued, `run`: the training command failed before its first step, or the restart budget ran out); 2 a usage \
or input error, an unreachable daemon or a
refused request (the message says what to fix); 130 interrupted.
Commands that print tables take --json: the same facts as one JSON document on stdout (errors stay on stderr)."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (GuardianError, DaemonError) as exc:
        message = _token_advice(args) if isinstance(exc, DaemonError) and exc.status == 401 else str(exc)
        Console(stderr=True).print("[red]error:[/] " + escape(message), highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardian", description="Watch training runs and rescue them.", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"guardian {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a tiny LoRA run clean, faulted, and faulted with Guardian")
    demo.add_argument("--steps", type=_demo_steps, default=400,
                      help=f"optimizer steps per run (default 400, at least {DEMO_MIN_STEPS})")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the model, data and faults (default 0)")
    demo.add_argument("--out", type=Path, default=Path("guardian-demo"),
                      help="where the runs write (default ./guardian-demo)")
    demo.set_defaults(func=_demo)

    rules_parser = sub.add_parser("rules", help="check or list rule files")
    rules_parser.set_defaults(func=lambda _: _print_help(rules_parser))
    rules = rules_parser.add_subparsers(metavar="ACTION")
    check = rules.add_parser("check", help="validate rule files; exit 1 if any has a problem")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE", help="a rule file (YAML) to validate")
    check.add_argument("--strict", action="store_true",
                       help="also exit 1 on warnings (a metric name nothing is known to log)")
    _json_arg(check)
    check.set_defaults(func=_rules_check)
    show = rules.add_parser("show", help="list the rules of a file (default: the shipped rules)")
    show.add_argument("file", nargs="?", type=Path, help="the rule file to list (default: the shipped rules)")
    _json_arg(show)
    show.set_defaults(func=_rules_show)
    detectors = rules.add_parser("detectors", help="document every detector kind and its parameters")
    detectors.set_defaults(func=_rules_detectors)

    serve = sub.add_parser("serve", help="run the guardian daemon that many runs report to")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others need the token)")
    serve.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    serve.add_argument("--state-dir", type=Path, default=_default_state_dir(),
                       help="database, token and rules (default $GUARDIAN_HOME or ~/.guardian)")
    serve.add_argument("--rules-dir", type=Path, help="rule files, one rule set per NAME.yaml (default STATE_DIR/rules)")
    serve.add_argument("--alert-actions", type=Path,
                       help="map webhook alerts to actions (default STATE_DIR/alert-actions.yaml if present)")
    serve.add_argument("--retain-days", type=float, help="delete runs not heard from in this many days")
    serve.add_argument("--fresh-store", action="store_true",
                       help="if the store is damaged, move it aside to guardian.db.damaged-TIME and start empty")
    serve.set_defaults(func=_serve)

    runs = sub.add_parser("runs", help="the runs the daemon knows: running, stalled, firing, ended")
    _client_args(runs)
    _json_arg(runs)
    runs.set_defaults(func=_runs)

    events = sub.add_parser("events", help="the decisions and actions of one run, with their evidence")
    events.add_argument("run", help="the run's id (`guardian runs` lists them)")
    events.add_argument("--all", action="store_true", help="also list every metrics event")
    _client_args(events)
    _json_arg(events)
    events.set_defaults(func=_events)

    ctl = sub.add_parser("ctl", help="act on a run by hand (needs the daemon's token)")
    ctl.add_argument("action", choices=["stop", "rollback", "reduce-lr", "skip-update"],
                     help="what to do at the run's next step: stop, rollback, reduce-lr or skip-update")
    ctl.add_argument("run", help="the run's id (`guardian runs` lists them)")
    ctl.add_argument("--factor", type=float, default=0.5, help="for reduce-lr (default 0.5)")
    _client_args(ctl)
    _json_arg(ctl)
    ctl.set_defaults(func=_ctl)

    top = sub.add_parser("top", help="a live terminal view of the runs; stop, roll back or cut the LR of one",
                         epilog=_TOP_KEYS, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--dir", type=Path, help="watch one embedded run from its output directory instead of the daemon")
    top.add_argument("--refresh", type=float, default=1.0, help="seconds between polls (default 1)")
    _client_args(top)
    top.set_defaults(func=_top)

    run = sub.add_parser("run", help="run a training command with Guardian injected; restart it if it dies",
                         description="Runs COMMAND with Guardian in every transformers Trainer it creates (no code "
                         "change) and restarts it from the last good checkpoint when it dies mid-training (a command "
                         "that fails before its first step is not restarted). Exit codes: 0 finished, 1 gave up "
                         "(failed before its first step, or the restart budget used up), 130 interrupted, "
                         "143 terminated.")
    run.add_argument("--max-restarts", type=int, default=3, help="restart budget (default 3)")
    run.add_argument("--backoff", type=float, default=5.0, help="seconds before the first restart; doubles (default 5)")
    run.add_argument("--lr-factor", type=float, help="multiply the learning rate by this at each restart, e.g. 0.5")
    run.add_argument("--rules", type=Path, help="rule file for the injected callback (default: the shipped rules)")
    run.add_argument("--url", default=os.environ.get("GUARDIAN_URL"), type=_url,
                     help="report to this daemon (default $GUARDIAN_URL)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- python train.py")
    run.set_defaults(func=_run)

    replay = sub.add_parser("replay", help="what would the rules have done on a past run's log?")
    replay.add_argument("paths", nargs="*", type=Path,
                        help="trainer_state.json, trainer_log.jsonl, Guardian's events.jsonl or a run directory")
    replay.add_argument("--rules", type=Path, help="rule file (default: the shipped rules)")
    replay.add_argument("--run", action="append", default=[], help="a run stored by the daemon (repeatable)")
    replay.add_argument("--state-dir", type=Path, default=_default_state_dir(), help="the daemon's state dir")
    _json_arg(replay)
    replay.set_defaults(func=_replay)

    report = sub.add_parser("report", help="a run's curves and Guardian's decisions as report.png and report.md")
    report.add_argument("target", nargs="?", metavar="PATH_OR_RUN",
                        help="a run's output directory, its guardian/events.jsonl, a trainer_state.json or "
                             "trainer_log.jsonl, or the id of a run the daemon stored")
    report.add_argument("--run", help="a run stored by the daemon")
    report.add_argument("--state-dir", type=Path, default=_default_state_dir(), help="the daemon's state dir")
    report.add_argument("--rules", type=Path, help="rules to replay a plain training log with (default: the shipped rules)")
    report.add_argument("--out", type=Path, help="where to write (default ./guardian-report-<name>/)")
    _json_arg(report)
    report.set_defaults(func=_report)

    doctor = sub.add_parser("doctor", help="check a training configuration before the run starts")
    doctor.add_argument("config", type=Path, help="TrainingArguments as JSON, or a LLaMA-Factory YAML file")
    doctor.add_argument("--rules", type=Path, help="the rules the run will use (default: the shipped rules)")
    doctor.add_argument("--world-size", type=int, default=1, help="number of processes (GPUs) training (default 1)")
    doctor.add_argument("--device", choices=["cpu", "cuda"], help="where the run trains")
    doctor.add_argument("--no-snapshots", action="store_true",
                        help="Guardian's in-memory snapshots are off (snapshot_every_steps=0 or a model too big)")
    doctor.add_argument("--dataset-size", type=int, help="training samples, to check the number of epochs")
    doctor.add_argument("--strict", action="store_true", help="exit 1 on any warning too (an error always does)")
    doctor.add_argument("--method", help="training method when the file does not say (dpo, kto, ppo, grpo, sft, ...)")
    doctor.add_argument("--finetuning", choices=["lora", "qlora", "full"], type=str.lower,
                        help="fine-tuning type when the file does not say (wins over the adapter's)")
    doctor.add_argument("--adapter", type=Path, help="the run's PEFT adapter_config.json (default: the one "
                        "beside the configuration, if any)")
    _json_arg(doctor)
    doctor.set_defaults(func=_doctor)
    _add_attach(sub)
    _add_push(sub)
    return parser


DEMO_MIN_STEPS = 200


def _demo_steps(text: str) -> int:
    """--steps of `guardian demo`: the faults come at 15 %, 37 % and 62 % of the run, and the rules need about
    30 steps of warm-up before the first one."""
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of steps, got {text!r}") from None
    if steps < DEMO_MIN_STEPS:
        raise argparse.ArgumentTypeError(
            f"must be at least {DEMO_MIN_STEPS}, got {steps}: the faults come at 15%, 37% and 62% of the run and "
            "the rules need about 30 steps of warm-up before the first (try --steps 400, the default)")
    return steps


def _url(text: str) -> str:
    """--url: http://HOST:PORT; a loopback HOST:PORT without the scheme is taken as http://."""
    from guardian.transport.client import daemon_url

    try:
        return daemon_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _token_advice(args: argparse.Namespace) -> str:
    """What to do when the daemon refused a request for want of its token (401), in the CLI's words."""
    from guardian.transport.token import TOKEN_ENV, find_token

    url = getattr(args, "url", None) or "the daemon"
    found, where = (None, "") if getattr(args, "token", None) else find_token()
    if getattr(args, "token", None):
        tried = f"the token given (--token or ${TOKEN_ENV}) is not its token"
    elif found:
        tried = f"the token in {where} is not its token (is GUARDIAN_HOME another daemon's state folder?)"
    else:
        tried = f"no token was found: {where}"
    return (f"{url} needs the daemon's token for this, and {tried}. Pass --token TOKEN, or set {TOKEN_ENV}, or "
            "set GUARDIAN_HOME to the daemon's state folder so its token file (STATE_DIR/token, written by "
            "`guardian serve`) is read")


def _json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document for scripts instead of text")


def _print_json(data: object) -> None:
    """Strict JSON on stdout: non-finite floats as the strings "nan", "inf", "-inf" (as on the wire)."""

    sys.stdout.write(json.dumps(events.to_builtins(data, other=str), indent=2, allow_nan=False) + "\n")


def _default_state_dir() -> Path:
    from guardian.transport.token import default_state_dir

    return default_state_dir()


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("GUARDIAN_URL", "http://127.0.0.1:8765"), type=_url,
                        help="the daemon, http://HOST:PORT (default $GUARDIAN_URL or http://127.0.0.1:8765)")
    parser.add_argument("--token", default=os.environ.get("GUARDIAN_TOKEN"),
                        help="the daemon's token (default $GUARDIAN_TOKEN, else read from the state dir)")


def _token(args: argparse.Namespace) -> str | None:
    """--token, else $GUARDIAN_TOKEN, else the daemon's token file in $GUARDIAN_HOME (or ~/.guardian)."""
    from guardian.transport.token import find_token

    return str(args.token) if args.token else find_token()[0]


def _serve(args: argparse.Namespace) -> int:
    from guardian.daemon.serve import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(host=args.host, port=args.port, state_dir=args.state_dir, rules_dir=args.rules_dir,
          alert_actions=args.alert_actions, retain_days=args.retain_days, fresh_store=args.fresh_store)
    return 0


def _runs(args: argparse.Namespace) -> int:
    from rich.table import Table

    from guardian.transport.client import request

    runs = request(args.url, "GET", "/v1/runs", token=_token(args))["runs"]
    if args.json:
        _print_json({"runs": runs})
        return 0
    if not runs:
        Console().print(f"no runs have reported to {args.url} yet")
        return 0
    table = Table()
    for column in ("run", "status", "step", "last report", "decisions", "firing rules", "rules"):
        table.add_column(column)
    colours = {"running": "green", "firing": "yellow", "stalled": "red", "ended": "dim"}
    for run in runs:
        firing = [name for name, status in run["rule_status"].items() if status == "firing"]
        table.add_row(run["id"], f"[{colours.get(run['status'], 'white')}]{run['status']}[/]",
                      str(run["last_step"]), f"{run['seconds_since_report']:.0f} s ago", str(run["decisions"]),
                      ", ".join(firing) or "—", run["rules"])
    Console().print(table)
    return 0


def _events(args: argparse.Namespace) -> int:
    from guardian.events import Kind
    from guardian.transport.client import request
    from guardian.transport.eventpages import all_events

    kinds = () if args.all else tuple(k.value for k in (Kind.DECISION, Kind.ACTION, Kind.START, Kind.END,
                                                        Kind.CHECKPOINT))
    data = all_events(lambda path: request(args.url, "GET", path, token=_token(args)), args.run, kinds)
    if not (data["events"] or data["decisions"] or data["commands"]):
        known = [r["id"] for r in request(args.url, "GET", "/v1/runs", token=_token(args))["runs"]]
        if args.run not in known:
            listed = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "") if known else "none yet"
            raise ConfigError(f"no run '{args.run}' at {args.url}; `guardian runs` lists them (runs: {listed})")
    if args.json:
        _print_json({"run": args.run, **data})
        return 0
    console = Console()
    console.print(f"[bold]Decisions of the daemon for {escape(args.run)}[/]")
    for line in _decision_lines(data["decisions"]):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print("[bold]What the run did[/]")
    for line in _event_lines(data["events"]):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    for c in data["commands"]:
        state = "applied" if c["applied"] else "delivered" if c["delivered"] else "queued"
        console.print(f"  command {c['id']}: {c['action']} {c['params']} ({c['source']}) {state}", markup=False)
    return 0


def _decision_lines(decisions: list[dict[str, Any]]) -> list[str]:
    """`guardian events`: the daemon's decisions (`Decision.to_dict()` in its JSON page), a line or two each."""
    from guardian.engine.engine import decision_from_dict

    lines = []
    for data in decisions:
        d = decision_from_dict(data)
        actions = ", ".join(a.kind.value for a in d.actions)
        lines.append(f"  step {d.step:>7}  {d.rule:<22} {actions:<24} {d.finding.message}")
        if d.diagnosis:
            lines.append(f"  {'':>12}  likely cause: {d.diagnosis}; usual fix: {d.fix}")
    return lines


def _event_lines(page: list[dict[str, Any]]) -> list[str]:
    """`guardian events`: what the run did, from the events of the daemon's JSON page (decisions are listed
    apart): an action as what it did, any other event as its fields."""
    from guardian.events import ActionEvent, DecisionEvent

    lines = []
    for data in page:
        event = events.from_builtins(data)
        if isinstance(event, ActionEvent):
            source = f" [{event.source}]" if event.source else ""
            lines.append(f"  step {event.step:>7}  {event.outcome.describe()} ({', '.join(event.rules)}){source}")
        elif not isinstance(event, DecisionEvent):
            fields = {k: v for k, v in events.to_builtins(event).items() if k not in ("seq", "kind", "time")}
            lines.append(f"  seq {event.seq:>7}  {event.kind.value} {json.dumps(fields)}")
    return lines


def _ctl(args: argparse.Namespace) -> int:
    from guardian.transport.client import request

    action = args.action.replace("-", "_")
    params = {"factor": args.factor} if action == "reduce_lr" else {}
    reply = request(args.url, "POST", f"/v1/runs/{quote(args.run, safe='')}/control",
                    {"action": action, "params": params}, token=_token(args))
    if args.json:
        _print_json({"run": args.run, "action": action, "params": params, **reply})
        return 0
    Console().print(f"queued {action} for {escape(args.run)} (command {reply['command_id']}); it is carried out at the "
                    "run's next step", highlight=False)
    return 0


def _top(args: argparse.Namespace) -> int:
    from guardian.tui.app import run_top
    from guardian.tui.source import DaemonSource, DirSource, Source

    source: Source = DirSource(args.dir) if args.dir else DaemonSource(args.url, _token(args))
    return run_top(source, refresh_seconds=max(0.1, args.refresh))


def _run(args: argparse.Namespace) -> int:
    from guardian.commands.supervisor import Supervisor

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.lr_factor is not None and not 0 < args.lr_factor < 1:
        raise ConfigError(f"--lr-factor must be between 0 and 1, got {args.lr_factor}")
    if args.rules is not None:
        load_rules(args.rules)  # check it now: a bad rule file is an error here, not in every rank
    options = {k: v for k, v in {"rules": str(args.rules) if args.rules else None, "url": args.url}.items() if v}
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return Supervisor(command, max_restarts=args.max_restarts, backoff_seconds=args.backoff,
                      lr_factor_on_restart=args.lr_factor, callback_options=options).run()


def _demo(args: argparse.Namespace) -> int:
    import transformers

    from guardian.commands.demo import run_demo

    transformers.logging.set_verbosity_error()
    logging.getLogger("guardian").setLevel(logging.CRITICAL)  # the demo prints its own account
    return 0 if run_demo(args.out, steps=args.steps, seed=args.seed) else 1


def _rules_check(args: argparse.Namespace) -> int:
    console, failed, warned, files = Console(), 0, 0, []
    for path in args.files:
        try:
            ruleset = load_rules(path)
        except RuleFileError as exc:
            failed += 1
            files.append({"file": str(path), "ok": False, "problems": [str(p) for p in exc.problems]})
            if not args.json:
                for problem in exc.problems:
                    console.print("[red]✗[/] " + escape(str(problem)), highlight=False)
            continue
        warnings = [str(w) for w in ruleset.warnings]
        warned += bool(warnings)
        files.append({"file": str(path), "ok": True, "rules": [rule.name for rule in ruleset.rules],
                      "warnings": warnings})
        if not args.json:
            for warning in warnings:
                console.print("[yellow]![/] " + escape(warning), highlight=False)
            note = f", {len(warnings)} warning{'s' * (len(warnings) != 1)}" if warnings else ""
            console.print(f"[green]✓[/] {path}: {len(ruleset.rules)} rules OK{note}", highlight=False)
    if args.json:
        _print_json({"ok": not failed and not (args.strict and warned), "files": files})
    return 1 if failed or (args.strict and warned) else 0


def _rules_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    ruleset = load_rules(args.file)
    if args.json:
        _print_json({"file": str(args.file or default_rules_path()), "rules": [r.to_dict() for r in ruleset.rules]})
        return 0
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
    from guardian.commands.replay import replay, replay_stored

    ruleset: RuleSet = load_rules(args.rules)
    console = Console()
    if not args.paths and not args.run:
        raise ConfigError("give a log file or run directory to replay, or --run RUN_ID for a run the daemon stored")
    results = [replay(path, ruleset) for path in args.paths]
    results += [replay_stored(args.state_dir, run_id, ruleset) for run_id in args.run]
    if args.json:
        _print_json({"rules": str(args.rules or default_rules_path()), "results": [{
            "path": r.path, "format": r.report.format, "observations": r.observations,
            "duplicates_dropped": r.report.duplicates_dropped, "resumes": r.report.restarts,
            "unreadable_lines_skipped": r.report.skipped_lines, "rules_fired": r.rules_fired(),
            "steps": r.train_steps, "last_step": r.last_step,
            "stopped_at_step": r.stop.step if r.stop is not None else None,
            "decisions_after_stop": len(r.after_stop),
            "decisions": [d.to_dict() for d in r.decisions]} for r in results]})
        return 0
    for result in results:
        path = result.path
        report = result.report
        notes = [f"{report.format}", f"{result.observations} observations"]
        if report.duplicates_dropped:
            notes.append(f"{report.duplicates_dropped} duplicate lines dropped")
        if report.restarts:
            notes.append(f"{report.restarts} resume(s)")
        if report.skipped_lines:
            notes.append(f"{report.skipped_lines} unreadable lines skipped")
        console.print(f"[bold]{escape(path)}[/] ({', '.join(notes)})", highlight=False)
        console.print(f"  {result.summary()}", highlight=False, markup=False)
        if not result.decisions:
            console.print("  no rule would have fired")
        for decision in result.until_stop:
            actions = ", ".join(map(str, decision.actions))
            console.print(f"  step {decision.step:>7}  {decision.rule:<22} {actions:<28} {decision.finding.message}",
                          highlight=False, markup=False, soft_wrap=True)
        after, stop = result.after_stop, result.stop
        if stop is not None:
            later = (f"; the {len(after)} later {'decision is' if len(after) == 1 else 'decisions are'} not "
                     "listed (--json has them)") if after else ""
            console.print(f"  a guarded run would have stopped at step {stop.step} ({stop.rule}){later}",
                          highlight=False, markup=False)
    return 0


_TOP_KEYS = """\
keys:
  up/down, k/j  select a run (in a run's details: scroll its decision log)
  enter         a run's details: curves over steps, rule states, decision log
  esc           back to the list of runs
  o             order of the runs: started (default), id, status
  s             stop the selected run
  r             roll it back to its last good state
  l             cut its learning rate x0.5
  q             quit
s, r and l ask y/n, go through the daemon with its token (not with --dir), are
carried out at the run's next step and appear in its decision log as the
operator's; a run that has ended refuses them.
"""


_ATTACH_LIMITS = """\
Follows trainer_log.jsonl (LLaMA-Factory) if it exists, else each checkpoint-*/trainer_state.json as it
appears; prints every decision and writes it with the metrics to OUTPUT_DIR/guardian/events.jsonl (and to the
daemon with --url). Exits when the run has ended (last log line, max_steps reached, or --pid gone) plus
--linger seconds, or on Ctrl-C.

What it can do from outside the training process:
  stop     only with --pid: sends --stop-signal once, on decisions of the --stop-on rules (default: every
           critical decision and every decision asking for stop or rollback); no --pid, no signal
  mark     checkpoints whose steps since the checkpoint before (at least --quiet-steps) are all logged, with
           no decision, are marked good (checkpoint-N/guardian_good.json, OUTPUT_DIR/guardian/
           last_good_checkpoint); a log with a line every k > 1 steps marks none; on an anomaly it prints
           the --resume_from_checkpoint to restart from
What it cannot do: skip_update, rollback, reduce_lr and restore_best need the Trainer's objects (use
GuardianCallback); it sees an anomaly only once a log line or checkpoint shows it, and cannot keep
save_total_limit from deleting the good checkpoint.
"""


def _add_attach(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    attach = sub.add_parser("attach", help="follow a run started without Guardian, from its output directory",
                            description=_ATTACH_LIMITS, formatter_class=argparse.RawDescriptionHelpFormatter)
    attach.add_argument("output_dir", type=Path, help="the run's output_dir")
    attach.add_argument("--rules", type=Path, help="rule file (default: the shipped rules)")
    attach.add_argument("--once", action="store_true", help="read what is there now, record it, and exit")
    attach.add_argument("--linger", type=float, default=30.0, metavar="SECONDS",
                        help="keep following this long after the run has ended (default 30)")
    attach.add_argument("--pid", type=int, help="the training process (or its launcher) to signal on a stop")
    attach.add_argument("--stop-signal", default="TERM", help="TERM (default), INT, KILL or a number")
    attach.add_argument("--stop-on", action="append", default=[], metavar="RULE",
                        help="stop on this rule's decisions only (repeatable)")
    attach.add_argument("--quiet-steps", type=int, default=10,
                        help="a checkpoint is good if no rule fired in at least this many steps up to it (default 10)")
    attach.add_argument("--poll-seconds", type=float, default=2.0,
                        help="re-scan this often even without file events (default 2)")
    attach.add_argument("--url", default=os.environ.get("GUARDIAN_URL") or None, type=_url,
                        help="stream events to this daemon (default $GUARDIAN_URL; none: local only)")
    attach.add_argument("--token", default=os.environ.get("GUARDIAN_TOKEN"), help="the daemon's token")
    attach.add_argument("--run-id", help="the run's id at the daemon (default: folder name + path hash)")
    attach.add_argument("--rule-set", default="default", help="the daemon's rule set for this run")
    attach.set_defaults(func=_attach)


def _attach(args: argparse.Namespace) -> int:
    from guardian.commands.attach import attach

    return attach(args.output_dir, load_rules(args.rules), once=args.once, linger_seconds=args.linger,
                  pid=args.pid, stop_signal=args.stop_signal, stop_on=args.stop_on, url=args.url,
                  token=_token(args) if args.url else None, run_id=args.run_id, rule_set=args.rule_set,
                  poll_seconds=args.poll_seconds,
                  quiet_steps=args.quiet_steps)


def _add_push(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    push = sub.add_parser(
        "push", help="deliver a run's event file to the daemon (after the daemon was down when the run ended)",
        description="Send every event of OUTPUT_DIR/guardian/events.jsonl to the daemon. It stores each event "
        "once, so what it already has is ignored and pushing twice is safe; the new events go through the run's "
        "rules as if they had come live.")
    push.add_argument("output_dir", type=Path, help="the run's output_dir")
    _client_args(push)
    push.add_argument("--run-id", help="the run's id at the daemon (default: from the file, else folder name + hash)")
    push.add_argument("--rule-set", help="the daemon's rule set for this run (default: from the file, else default)")
    push.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds (default 60)")
    _json_arg(push)
    push.set_defaults(func=_push)


def _push(args: argparse.Namespace) -> int:
    from guardian.commands.push import push

    done = push(args.output_dir, args.url, token=_token(args), run_id=args.run_id, rule_set=args.rule_set,
                timeout_seconds=args.timeout)
    if args.json:
        _print_json({"run": done.run_id, "events": done.events, "stored_through_seq": done.last_seq,
                     "skipped_lines": done.skipped_lines})
        return 0
    skipped = f"; {done.skipped_lines} unreadable lines skipped" if done.skipped_lines else ""
    Console().print(f"run {escape(done.run_id)}: the daemon at {escape(args.url)} has all {done.events} events "
                    f"(through seq {done.last_seq}){skipped}", highlight=False)
    return 0


def _report(args: argparse.Namespace) -> int:
    from guardian.commands.report import (
        bad_sample_lines,
        bad_samples_json,
        default_out_dir,
        disk_json,
        load_run,
        verdict,
        write_report,
    )

    record = load_run(args.target, run_id=args.run, state_dir=args.state_dir, ruleset=load_rules(args.rules))
    png, md = write_report(record, args.out or default_out_dir(record.name))
    if args.json:
        _print_json({"run": record.name, "verdict": verdict(record), "png": str(png), "markdown": str(md),
                     "bad_samples": bad_samples_json(record), "on_disk": disk_json(record)})
        return 0
    console = Console()
    console.print(f"[bold]{escape(record.name)}[/]: {escape(verdict(record))}", highlight=False)
    console.print(f"  {png}\n  {md}", markup=False, highlight=False)
    for line in bad_sample_lines(record):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from guardian.commands.doctor import (
        adapter_beside,
        check_config,
        finetuning_type,
        read_adapter,
        read_config,
        render_advice,
    )

    config = read_config(args.config)
    adapter_path = args.adapter or adapter_beside(args.config)
    peft = read_adapter(adapter_path) if adapter_path is not None else None
    advice = check_config(config, rules=load_rules(args.rules), world_size=args.world_size,
                          device=args.device, snapshots_enabled=not args.no_snapshots,
                          dataset_size=args.dataset_size, method=args.method, peft=peft, finetuning=args.finetuning)
    kind = args.finetuning or finetuning_type(config, peft)
    if args.json:
        _print_json({"config": str(args.config), "adapter": str(adapter_path) if adapter_path else None,
                     "finetuning": kind, "advice": [a.to_dict() for a in advice]})
    else:
        console = Console()
        if peft is not None:
            console.print(f"adapter: {escape(str(adapter_path))} ({_adapter_summary(peft)})", highlight=False)
        render_advice(advice, console, title=str(args.config))
    serious = [a for a in advice if a.severity != "info"]
    return 1 if any(a.severity == "error" for a in advice) or (args.strict and serious) else 0


def _adapter_summary(peft: dict[str, object]) -> str:
    """LORA r 64, alpha 16, 4/8-bit base (QLoRA)."""
    parts = [str(peft.get("type"))]
    parts += [f"{name} {peft[key]}" for key, name in (("r", "r"), ("lora_alpha", "alpha"),
                                                      ("lora_dropout", "dropout")) if peft.get(key) is not None]
    if peft.get("quantized"):
        parts.append("4/8-bit base (QLoRA)")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
