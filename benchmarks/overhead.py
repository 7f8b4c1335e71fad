"""Step-time overhead of GuardianCallback on a real (tiny, CPU) Trainer run, logging every step.

    python benchmarks/overhead.py                       # 5 rounds x 150 steps: none, none-again, guardian, guardian-nolog
    python benchmarks/overhead.py --guardian-kwargs '{"snapshot_every_steps": 0}'
    python benchmarks/overhead.py --variants none,guardian --rounds 9 --steps 300
    python benchmarks/overhead.py --interleave 0        # one variant after the other instead of taking turns

Each round builds a fresh TinyRun trainer per variant (same seed, same data, so the same arithmetic;
eval and saving off, logging_steps=1). Two marker callbacks time every optimizer step: `on_step_begin` of
a marker placed before the other user callbacks and `on_step_end` of a marker placed after all callbacks
(Guardian and Trainer's printer included), so the interval holds forward, backward, clipping, Guardian's
`on_pre_optimizer_step`, the optimizer and scheduler steps and Guardian's `on_step_end` (where snapshots
are taken). Both markers are present in every variant. A second interval, "cycle", runs from one
`on_step_begin` to the next: it adds batch loading and Trainer's logging (`on_log`, printing).

How the variants share the machine:
- `--interleave K` (default 10): each variant has its own worker process (spawned once, a fresh trainer
  per round); the round's trainers train at the same time but take turns, K optimizer steps each (a baton
  passed in `on_step_begin`; only one computes at a time). Steps of different variants lie a fraction of
  a second apart, so drifts of a shared or virtual machine hit them alike. The first step after each
  hand-over is not counted. (Processes, not threads: two OpenMP thread teams in one process slow small
  torch ops several-fold on a 2-core machine.)
- `--interleave 0`: the variants train one after the other; their order rotates from round to round.
Either way the first `--warmup` steps of each trainer are dropped and each trainer gives one median per
round. The table reports per variant the median over rounds of those medians and their range, and the
ratio to `none`, both as the ratio of the medians and as the median and range of the per-round (paired)
ratios; with interleaving also the median of the per-turn paired ratios and a bootstrap 95% interval.
`none-again` is a second copy of `none`: its ratio shows how far apart two identical variants land, the
noise floor of the method on this machine.

A round during which other processes kept the CPUs busy (/proc/stat) is discarded and run again. After the
rounds one more run times each Guardian hook directly (the most precise figure for a small overhead), and
cProfile runs when a guardian variant is more than --profile-threshold slower (or with --profile always).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import logging
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import (
    RESULTS_DIR,
    CpuMonitor,
    _from_repo,
    busy_warning,
    describe_machine,
    load_average,
    machine_info,
    summary,
    table,
    write_json,
)
from transformers import TrainerCallback

VARIANTS = {
    "none": "no Guardian callback",
    "none-again": "no Guardian callback (a second copy of 'none': an A/A check of the method)",
    "guardian": "GuardianCallback(**guardian_kwargs)",
    "guardian-nolog": "GuardianCallback(**guardian_kwargs, event_log=False)",
    "guardian-nosnap": "GuardianCallback(**guardian_kwargs, snapshot_every_steps=0)",
    "guardian-bare": "GuardianCallback(**guardian_kwargs, event_log=False, snapshot_every_steps=0)",
    "guardian-daemon": "GuardianCallback(**guardian_kwargs, url=<a real `guardian serve` on loopback>)",
}
HOOKS = ("on_init_end", "on_train_begin", "on_pre_optimizer_step", "on_step_end", "on_log", "on_evaluate",
         "on_save", "on_train_end")
WAIT_LIMIT_S = 900.0


class _Begin(TrainerCallback):
    def __init__(self, times: list[float]) -> None:
        self.times = times

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())


class _End(TrainerCallback):
    def __init__(self, times: list[float]) -> None:
        self.times = times

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())


class Baton:
    """Lets one of several worker processes train at a time; `pass_on` hands over to the next unfinished one.

    Workers are known by their variant's index; `order` holds this round's sequence of those indices.
    """

    def __init__(self, ctx: Any, n: int, participants: int) -> None:
        self.n = n
        self.cond = ctx.Condition()
        self.current = ctx.Value("i", 0, lock=False)  # guarded by cond
        self.order = ctx.Array("i", n, lock=False)
        self.done = ctx.Array("b", n, lock=False)
        self.start = ctx.Barrier(participants)

    def new_round(self, order: list[int]) -> None:
        """`order`: the participating workers in turn order; every other index counts as done."""
        with self.cond:
            rest = [i for i in range(self.n) if i not in order]
            for slot, who in enumerate(order + rest):
                self.order[slot] = who
                self.done[who] = 0 if who in order else 1
            self.current.value = 0

    def _holder(self) -> int:
        return self.order[self.current.value]

    def wait(self, who: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self._holder() == who, timeout=WAIT_LIMIT_S):
                raise RuntimeError(f"worker {who}: waited {WAIT_LIMIT_S:g} s for its turn")

    def _advance(self) -> None:
        for k in range(1, self.n + 1):
            slot = (self.current.value + k) % self.n
            if not self.done[self.order[slot]]:
                self.current.value = slot
                return

    def pass_on(self, who: int) -> None:
        with self.cond:
            if self._holder() == who:
                self._advance()
            self.cond.notify_all()

    def finish(self, who: int) -> None:
        with self.cond:
            self.done[who] = 1
            if self._holder() == who:
                self._advance()
            self.cond.notify_all()


class _Turns(TrainerCallback):
    """Takes the baton at train begin and hands it on every `every` steps; notes each step's turn."""

    def __init__(self, baton: Baton, who: int, every: int) -> None:
        self.baton, self.who, self.every = baton, who, every
        self.turn_of_step: list[int] = []
        self._turn = 0
        self._steps = 0

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.baton.start.wait(timeout=WAIT_LIMIT_S)  # every trainer is set up before any computes
        self.baton.wait(self.who)

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        if self._steps and self._steps % self.every == 0:
            self.baton.pass_on(self.who)
            self.baton.wait(self.who)
            self._turn += 1
        self.turn_of_step.append(self._turn)
        self._steps += 1


@dataclass
class Run:
    """One variant's trainer in one round, with its clocks."""

    variant: str
    out: str
    trainer: Any
    guardian: Any
    begins: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    turns: _Turns | None = None
    error: BaseException | None = None
    wall_s: float = 0.0


def guardian_for(variant: str, kwargs: dict[str, Any]) -> Any:
    from guardian.callbacks import GuardianCallback

    extra: dict[str, Any] = {
        "guardian": {},
        "guardian-nolog": {"event_log": False},
        "guardian-nosnap": {"snapshot_every_steps": 0},
        "guardian-bare": {"event_log": False, "snapshot_every_steps": 0},
        "guardian-daemon": {"url": kwargs.get("daemon_url")},
    }[variant]
    return GuardianCallback(**{**{k: v for k, v in kwargs.items() if k != "daemon_url"}, **extra})


def build_run(variant: str, out: str, args: argparse.Namespace, guardian_kwargs: dict[str, Any], *,
              baton: Baton | None = None, hook_timer: dict[str, list[float]] | None = None) -> Run:
    from guardian.testing.tinyrun import TinyRun

    guardian = None if variant.startswith("none") else guardian_for(variant, guardian_kwargs)
    if guardian is not None and hook_timer is not None:
        _time_hooks(guardian, hook_timer)
    begins: list[float] = []
    ends: list[float] = []
    turns = _Turns(baton, list(VARIANTS).index(variant), args.interleave) if baton is not None else None
    callbacks: list[Any] = ([turns] if turns else []) + [_Begin(begins)] + ([guardian] if guardian is not None else [])
    tiny = TinyRun(output_dir=out, max_steps=args.steps, seed=args.seed, eval_steps=0, save_steps=0,
                   logging_steps=1, batch_size=args.batch_size)
    trainer = tiny.trainer(callbacks=callbacks)
    trainer.add_callback(_End(ends))  # last of all, after Guardian and Trainer's printer
    return Run(variant, out, trainer, guardian, begins, ends, turns)


def _train(run: Run, profiler: cProfile.Profile | None = None) -> None:
    started = time.perf_counter()
    try:
        if profiler is not None:
            profiler.enable()
        try:
            run.trainer.train()
        finally:
            if profiler is not None:
                profiler.disable()
    except BaseException as exc:
        run.error = exc
        if run.turns is not None:
            run.turns.baton.start.abort()  # the others must not wait for this one at the start line
    finally:
        run.wall_s = time.perf_counter() - started
        if run.turns is not None:
            run.turns.baton.finish(run.turns.who)


def collect(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """Step times (warm-up and post-hand-over steps dropped) and what Guardian did."""
    if run.error is not None:
        raise RuntimeError(f"{run.variant}: training failed: {run.error!r}") from run.error
    if len(run.begins) != args.steps or len(run.ends) != args.steps:
        raise RuntimeError(f"{run.variant}: timed {len(run.begins)}/{len(run.ends)} steps, expected {args.steps}")
    turn = run.turns.turn_of_step if run.turns else [0] * args.steps
    keep = [i >= args.warmup and (i == 0 or turn[i] == turn[i - 1]) for i in range(args.steps)]
    steps = [e - b for b, e in zip(run.begins, run.ends)]
    result: dict[str, Any] = {
        "variant": run.variant, "wall_s": run.wall_s,
        "callback_order": [type(c).__name__ for c in run.trainer.callback_handler.callbacks],
        "step_s": [t for t, k in zip(steps, keep) if k],
        "step_turn": [u for u, k in zip(turn, keep) if k],
        "cycle_s": [run.begins[i + 1] - run.begins[i] for i in range(args.steps - 1)
                    if keep[i] and turn[i + 1] == turn[i]],
    }
    result["median_step_s"] = statistics.median(result["step_s"])
    result["median_cycle_s"] = statistics.median(result["cycle_s"])
    guardian = run.guardian
    if guardian is not None:
        events = Path(run.out) / "guardian" / "events.jsonl"
        lines = events.read_text().splitlines() if events.exists() else []
        kinds = [json.loads(line)["kind"] for line in lines]
        decisions = list(getattr(guardian, "decisions", []))
        ring = getattr(guardian, "snapshots", None)
        probe = getattr(guardian, "_probe", None)
        errors = int(getattr(guardian, "errors", 0))
        result["guardian"] = {
            "errors": errors, "decisions": len(decisions),
            "rules_fired": sorted({getattr(d, "rule", "?") for d in decisions}),
            "counts": dict(getattr(guardian, "counts", {})),
            "snapshots_in_ring": ring.steps() if hasattr(ring, "steps") else None,
            "probe_wrapped": bool(probe is not None and getattr(probe, "wrapped", False)),
            "event_lines": len(lines), "metric_events": kinds.count("metrics"),
            "event_bytes": events.stat().st_size if events.exists() else 0,
        }
        if errors:
            raise RuntimeError(f"{run.variant}: Guardian logged {errors} internal errors")
        if getattr(guardian, "event_log_enabled", False) and kinds.count("metrics") != args.steps:
            raise RuntimeError(f"{run.variant}: {kinds.count('metrics')} metric events for {args.steps} steps")
    return result


def _worker(variant: str, conn: Any, baton: Baton, args: argparse.Namespace, guardian_kwargs: dict[str, Any]) -> None:
    """A worker process: for each round the parent announces, train `variant` once, taking turns."""
    import traceback

    sys.stdout = open(os.devnull, "w")  # Trainer prints each logged step; the same in every worker
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("guardian").setLevel(logging.ERROR)  # pre-flight advice etc.; internal errors still show
    conn.send(("ready", os.getpid()))
    while True:
        message = conn.recv()
        if message is None:
            return
        try:
            with tempfile.TemporaryDirectory(prefix=f"guardian-overhead-{variant}-") as out:
                run = build_run(variant, out, args, guardian_kwargs, baton=baton)
                _train(run)
                conn.send(("ok", collect(run, args)))
        except BaseException:
            baton.start.abort()
            baton.finish(list(VARIANTS).index(variant))
            conn.send(("error", traceback.format_exc()))


class Workers:
    """One worker process per variant, kept for all rounds (interleaved mode)."""

    def __init__(self, variants: list[str], args: argparse.Namespace, guardian_kwargs: dict[str, Any]) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.variants = variants
        self.baton = Baton(ctx, len(VARIANTS), len(variants))
        self.conns: dict[str, Any] = {}
        self.procs = []
        for v in variants:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(v, child, self.baton, args, guardian_kwargs), name=f"overhead-{v}",
                               daemon=True)
            proc.start()
            child.close()
            self.conns[v] = parent
            self.procs.append(proc)
        self.pids = [self.conns[v].recv()[1] for v in variants]

    def round(self, order: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        self.baton.new_round([list(VARIANTS).index(v) for v in order])
        monitor = CpuMonitor(self.pids)
        monitor.start()
        for v in order:
            self.conns[v].send(("round", order))
        replies = {v: self.conns[v].recv() for v in order}
        cpu = monitor.stop()
        errors = {v: r[1] for v, r in replies.items() if r[0] != "ok"}
        if errors:
            raise RuntimeError("worker failed:\n" + "\n".join(f"[{v}]\n{e}" for v, e in errors.items()))
        return {v: replies[v][1] for v in order}, cpu

    def close(self) -> None:
        for v in self.variants:
            with contextlib.suppress(OSError, BrokenPipeError):
                self.conns[v].send(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


def run_round(order: list[str], args: argparse.Namespace, guardian_kwargs: dict[str, Any],
              workers: Workers | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train each variant once (taking turns in the workers, or one after the other here)."""
    if workers is not None:
        return workers.round(order)
    per, cpus = {}, []
    monitor = CpuMonitor()
    for v in order:
        monitor.start()
        per[v] = run_single(v, args, guardian_kwargs)
        cpus.append(monitor.stop())
    return per, {k: max((c[k] or 0.0) for c in cpus) for k in cpus[0]}


def run_single(variant: str, args: argparse.Namespace, guardian_kwargs: dict[str, Any], *,
               hook_timer: dict[str, list[float]] | None = None, profiler: cProfile.Profile | None = None) -> dict[str, Any]:
    """One variant alone (for hook timing and profiling)."""
    with tempfile.TemporaryDirectory(prefix=f"guardian-overhead-{variant}-") as out, open(os.devnull, "w") as sink:
        single = argparse.Namespace(**{**vars(args), "interleave": 0})
        run = build_run(variant, out, single, guardian_kwargs, hook_timer=hook_timer)
        with contextlib.redirect_stdout(sink):
            _train(run, profiler)
        return collect(run, single)


def _time_hooks(guardian: Any, timer: dict[str, list[float]]) -> None:
    """Wrap the callback's hooks (on the instance) with perf_counter timers."""
    for name in HOOKS:
        hook = getattr(guardian, name)

        def timed(*a: Any, _hook: Any = hook, _name: str = name, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _hook(*a, **k)
            finally:
                timer.setdefault(_name, []).append(time.perf_counter() - t0)

        setattr(guardian, name, timed)


def turn_ratios(rounds: list[dict[str, Any]], variant: str) -> list[float]:
    """Per turn of the baton: median step time of `variant` over that of `none` in the same turn."""
    ratios = []
    for rd in rounds:
        mine, base = rd["runs"][variant], rd["runs"]["none"]
        by_turn: dict[int, list[float]] = {}
        base_turn: dict[int, list[float]] = {}
        for t, u in zip(mine["step_s"], mine["step_turn"]):
            by_turn.setdefault(u, []).append(t)
        for t, u in zip(base["step_s"], base["step_turn"]):
            base_turn.setdefault(u, []).append(t)
        ratios += [statistics.median(by_turn[u]) / statistics.median(base_turn[u])
                   for u in sorted(by_turn.keys() & base_turn.keys())]
    return ratios


def bootstrap_median(values: list[float], reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(reps))
    return meds[int(0.025 * reps)], meds[int(0.975 * reps) - 1]


def hook_times(variants: list[str], args: argparse.Namespace, guardian_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Wall time inside each of Guardian's hooks (perf_counter around each call), per guardian variant.

    Each variant trains alone `--hook-runs` times, the variants alternating; calls after the first
    `--warmup` of each run are pooled.
    """
    pooled: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    firsts: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    step_medians: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.hook_runs):
        for v in variants:
            hooks: dict[str, list[float]] = {}
            res = run_single(v, args, guardian_kwargs, hook_timer=hooks)
            step_medians[v].append(res["median_step_s"])
            for name, times in hooks.items():
                later = times[args.warmup:] if len(times) > args.warmup + 2 else times
                pooled[v].setdefault(name, []).extend(later)
                firsts[v].setdefault(name, []).extend(times)
    stats: dict[str, Any] = {}
    for v in variants:
        per_hook = {name: {"calls_per_run": len(firsts[v][name]) // args.hook_runs,
                           "median_s": statistics.median(t), "mean_s": statistics.fmean(t),
                           "max_s": max(firsts[v][name]), "total_per_run_s": sum(firsts[v][name]) / args.hook_runs}
                    for name, t in pooled[v].items()}
        per_step = sum(per_hook[n]["mean_s"] for n in ("on_pre_optimizer_step", "on_step_end", "on_log") if n in per_hook)
        step = statistics.median(step_medians[v])
        stats[v] = {"hooks": per_hook, "per_step_s": per_step, "median_step_s": step,
                    "per_step_share": per_step / step}
    names = [n for n in HOOKS if any(n in pooled[v] for v in variants)]
    rows = []
    for name in names:
        row = [name]
        for v in variants:
            h = stats[v]["hooks"].get(name)
            row += [f"{h['median_s'] * 1e6:.1f}", f"{h['mean_s'] * 1e6:.1f}"] if h else ["", ""]
        rows.append(row)
    rows.append(["per step (mean: pre_optimizer_step + step_end + log)"] + [
        x for v in variants for x in ("", f"{stats[v]['per_step_s'] * 1e6:.0f}")])
    rows.append(["  share of the run's median step"] + [
        x for v in variants for x in ("", f"{stats[v]['per_step_share'] * 100:.1f}%")])
    headers = ["hook (us per call)"] + [x for v in variants for x in (f"{v} median", f"{v} mean")]
    lines = [f"\nGuardian's hooks timed directly: each variant trained alone {args.hook_runs}x {args.steps} steps "
             f"(first {args.warmup} calls of each run dropped; on_train_begin and on_init_end are one call per run)",
             table(headers, rows)]
    print("\n".join(lines))
    return {"variants": variants, "runs_each": args.hook_runs, "per_variant": stats, "table": "\n".join(lines)}


def cprofile_run(variant: str, args: argparse.Namespace, guardian_kwargs: dict[str, Any], out: Path) -> dict[str, Any]:
    """cProfile of one run; the report goes next to the JSON file, as <name>_profile.txt."""
    profiler = cProfile.Profile()
    run_single(variant, args, guardian_kwargs, profiler=profiler)
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    buf.write("==== Guardian's code, by cumulative time ====\n")
    stats.sort_stats("cumulative").print_stats(r"guardian|callbacks|eventlog|engine|detectors", 40)
    buf.write("\n\n==== whole run, by own time (tottime) ====\n")
    stats.sort_stats("tottime").print_stats(25)
    prof_path = out.with_name(out.stem + "_profile.txt")
    prof_path.parent.mkdir(parents=True, exist_ok=True)
    prof_path.write_text(buf.getvalue())
    print(f"cProfile of one '{variant}' run written to {prof_path}")
    return {"variant": variant, "cprofile_file": _from_repo(str(prof_path))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each trains every variant once (default 5)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150)")
    parser.add_argument("--warmup", type=int, default=20, help="steps dropped at the start of each run (default 20)")
    parser.add_argument("--interleave", type=int, default=10, help="steps per turn when the round's trainers take "
                        "turns; 0 trains them one after the other (default 10)")
    parser.add_argument("--batch-size", type=int, default=8, help="TinyRun batch size (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="none,none-again,guardian,guardian-daemon",
                        help="comma-separated, from: " + ", ".join(VARIANTS) + " (default none,none-again,guardian,"
                        "guardian-nolog)")
    parser.add_argument("--guardian-kwargs", default="{}", help="JSON object of GuardianCallback options for every "
                        "guardian variant, e.g. '{\"snapshot_every_steps\": 0}'")
    parser.add_argument("--max-other-cores", type=float, default=0.15, help="a round during which other processes "
                        "kept more than this many cores busy on average (from /proc/stat) is run again (default 0.15)")
    parser.add_argument("--max-retries", type=int, default=4, help="re-runs of a contended round (default 4)")
    parser.add_argument("--retry-wait", type=float, default=15.0, help="seconds to wait before a re-run (default 15)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave torch's choice)")
    parser.add_argument("--hook-runs", type=int, default=2, help="after the rounds, train each guardian variant "
                        "alone this many times with a timer around each Guardian hook; 0 skips it (default 2)")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="cProfile one 'guardian' run after the rounds: always, never, or auto = when a guardian "
                             "variant's ratio to none exceeds --profile-threshold (default auto)")
    parser.add_argument("--profile-threshold", type=float, default=1.05)
    parser.add_argument("--out", default=str(RESULTS_DIR / "overhead.json"), help="JSON result file "
                        "(default benchmarks/results/overhead.json)")
    args = parser.parse_args(argv)

    variants = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "none" not in variants or len(variants) < 2:
        parser.error(f"--variants must include 'none', one more, and only {list(VARIANTS)}; got {variants}")
    if args.steps <= args.warmup + 2 * max(args.interleave, 1):
        parser.error("--steps must exceed --warmup by at least two turns")
    if args.interleave < 0:
        parser.error("--interleave must be 0 or more")
    guardian_kwargs = json.loads(args.guardian_kwargs)
    if not isinstance(guardian_kwargs, dict):
        parser.error("--guardian-kwargs must be a JSON object")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("guardian").setLevel(logging.ERROR)  # pre-flight advice etc.; internal errors still show
    info = machine_info()
    print(f"machine: {describe_machine(info)}")
    if busy_warning(info):
        print(busy_warning(info))
    daemon = None
    if "guardian-daemon" in variants:  # a real daemon process, started as the tests start it
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from daemonkit import DaemonProcess

        daemon = DaemonProcess(Path(tempfile.mkdtemp(prefix="guardian-overhead-daemon-"))).start()
        guardian_kwargs = {**guardian_kwargs, "daemon_url": daemon.url}
    how = f"taking turns, {args.interleave} steps each" if args.interleave else "one after the other"
    print(f"rounds={args.rounds} steps={args.steps} (first {args.warmup} dropped) variants={variants} ({how}) "
          f"guardian_kwargs={guardian_kwargs}")
    started = time.perf_counter()

    rounds: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    workers = Workers(variants, args, guardian_kwargs) if args.interleave else None
    try:
        try:
            run_rounds(args, variants, guardian_kwargs, workers, rounds, discarded, started)
        finally:
            if workers is not None:
                workers.close()
        report(args, variants, guardian_kwargs, info, rounds, discarded, started)  # times hooks: daemon still up
    finally:
        if daemon is not None:
            daemon.stop()
    return 0


def run_rounds(args: argparse.Namespace, variants: list[str], guardian_kwargs: dict[str, Any], workers: Workers | None,
               rounds: list[dict[str, Any]], discarded: list[dict[str, Any]], started: float) -> None:
    for r in range(args.rounds):
        shift = r % len(variants)
        order = variants[shift:] + variants[:shift]
        for attempt in range(args.max_retries + 1):
            per, cpu = run_round(order, args, guardian_kwargs, workers)
            others = (cpu["other_cores"] or 0.0) + (cpu["steal_cores"] or 0.0)
            record = {"round": r, "attempt": attempt, "order": order, "runs": per, "cpu": cpu,
                      "load_average": load_average(), "other_cores": others, "contended": others > args.max_other_cores}
            print(f"round {r + 1}/{args.rounds} ({', '.join(order)}): " + ", ".join(
                f"{v} {per[v]['median_step_s'] * 1e3:.2f} ms" for v in variants)
                + f"  [{time.perf_counter() - started:.0f} s; other processes used {others:.2f} cores]", flush=True)
            if not record["contended"]:
                break
            if attempt < args.max_retries:
                discarded.append(record)
                print(f"  other processes were busy (> {args.max_other_cores} cores); discarding this round, "
                      f"retrying in {args.retry_wait:g} s", flush=True)
                time.sleep(args.retry_wait)
            else:
                print("  other processes were busy; out of retries, keeping this round (flagged in the JSON)", flush=True)
        rounds.append(record)


def report(args: argparse.Namespace, variants: list[str], guardian_kwargs: dict[str, Any], info: dict[str, Any],
           rounds: list[dict[str, Any]], discarded: list[dict[str, Any]], started: float) -> None:
    results: dict[str, Any] = {}
    for metric in ("step", "cycle"):
        base = [rd["runs"]["none"][f"median_{metric}_s"] for rd in rounds]
        base_med = statistics.median(base)
        for variant in variants:
            medians = [rd["runs"][variant][f"median_{metric}_s"] for rd in rounds]
            paired = [m / b for m, b in zip(medians, base)]
            pooled = sorted(t for rd in rounds for t in rd["runs"][variant][f"{metric}_s"])
            entry = {
                "round_medians_s": medians, "over_rounds": summary(medians),
                "ratio_of_medians": statistics.median(medians) / base_med,
                "paired_ratios": paired, "paired_ratio": summary(paired),
                "overhead_ms_per_step": (statistics.median(medians) - base_med) * 1e3,
                "pooled_steps": summary(pooled), "p90_pooled_s": pooled[int(0.9 * (len(pooled) - 1))],
            }
            if metric == "step" and args.interleave and variant != "none":
                turns = turn_ratios(rounds, variant)
                entry["turn_ratios"] = turns
                entry["turn_ratio"] = summary(turns)
                entry["turn_ratio_ci95"] = bootstrap_median(turns)
            results.setdefault(variant, {})[metric] = entry

    def fmt_row(variant: str, metric: str) -> list[str]:
        d = results[variant][metric]
        o, p = d["over_rounds"], d["paired_ratio"]
        row = [variant, f"{o['median'] * 1e3:.2f}", f"{o['min'] * 1e3:.2f}-{o['max'] * 1e3:.2f}",
               f"{d['p90_pooled_s'] * 1e3:.2f}", f"{d['overhead_ms_per_step']:+.2f}", f"{d['ratio_of_medians']:.3f}",
               f"{p['median']:.3f}", f"{p['min']:.3f}-{p['max']:.3f}"]
        if metric == "step" and args.interleave:
            row += ([f"{d['turn_ratio']['median']:.3f}",
                     f"{d['turn_ratio_ci95'][0]:.3f}-{d['turn_ratio_ci95'][1]:.3f}"] if "turn_ratio" in d else ["", ""])
        return row

    headers = ["variant", "median ms", "range over rounds", "p90 ms", "+ms/step", "ratio", "paired ratio",
               "paired range"]
    text = []
    for metric, title in (("step", "step time (on_step_begin -> on_step_end, all callbacks inside)"),
                          ("cycle", "cycle time (on_step_begin -> next on_step_begin: + batch loading, logging)")):
        text.append(f"\n{title}; {args.rounds} rounds, {len(rounds[0]['runs']['none'][f'{metric}_s'])} "
                    f"timed steps per run")
        extra = ["turn ratio", "95% CI"] if metric == "step" and args.interleave else []
        text.append(table(headers + extra, [fmt_row(v, metric) for v in variants]))
    if args.interleave:
        n_turns = len(results[variants[1]]["step"].get("turn_ratios", []))
        text.append(f"turn ratio: median over {n_turns} turns of (median step of the variant in its turn / median "
                    f"step of none in the same turn); 95% CI by bootstrap over turns")
    kept_busy = sum(rd["contended"] for rd in rounds)
    text.append(f"rounds discarded because other processes were busy: {len(discarded)}; contended rounds kept: "
                f"{kept_busy}; most cores used by others in a kept round: {max(rd['other_cores'] for rd in rounds):.2f}")
    for v in [v for v in variants if not v.startswith("none")]:
        gi = rounds[-1]["runs"][v]["guardian"]
        text.append(f"{v}: last round: {gi['decisions']} decisions {gi['rules_fired']}, snapshots in ring "
                    f"{gi['snapshots_in_ring']}, {gi['metric_events']} metric events, events.jsonl "
                    f"{gi['event_bytes']} bytes, probe wrapped: {gi['probe_wrapped']}")
    print("\n".join(text))

    profile: dict[str, Any] | None = None
    hooks: dict[str, Any] | None = None
    guardians = [v for v in variants if not v.startswith("none")]
    def headline(v: str) -> float:
        d = results[v]["step"]
        return d["turn_ratio"]["median"] if "turn_ratio" in d else d["paired_ratio"]["median"]

    worst = max((headline(v) for v in guardians), default=1.0)
    profile_variant = "guardian" if "guardian" in variants else (guardians[0] if guardians else None)
    if guardians and args.hook_runs > 0:
        hooks = hook_times(guardians, args, guardian_kwargs)
    if profile_variant and (args.profile == "always" or (args.profile == "auto" and worst > args.profile_threshold)):
        profile = cprofile_run(profile_variant, args, guardian_kwargs, Path(args.out))

    total = time.perf_counter() - started
    info["load_average_at_end"] = load_average()
    print(f"\ntotal runtime {total:.1f} s; load average at end {info['load_average_at_end']}")
    data = {
        "benchmark": "overhead", "machine": info,
        "settings": {**vars(args), "out": _from_repo(args.out), "variants": variants, "guardian_kwargs": guardian_kwargs,
                     "variant_meaning": {v: VARIANTS[v] for v in variants}},
        "results": results, "rounds": rounds, "discarded_rounds": discarded, "contended_rounds_kept": kept_busy,
        "hook_times": hooks, "profile": profile,
        "table": "\n".join(text + ([hooks["table"]] if hooks else [])), "total_runtime_s": total,
    }
    print(f"wrote {write_json(args.out, data)}")


if __name__ == "__main__":
    raise SystemExit(main())
