"""Step-time overhead of GuardianCallback on a real (tiny, CPU) Trainer run, logging every step.

    python benchmarks/overhead.py                       # 5 rounds x 150 steps, variants none/guardian/guardian-nolog
    python benchmarks/overhead.py --guardian-kwargs '{"snapshot_every_steps": 0}'
    python benchmarks/overhead.py --variants none,guardian --rounds 9 --steps 300

Each round builds a fresh TinyRun trainer per variant (same seed, same data, so the same arithmetic) and
trains it; the variants' order rotates from round to round so that drift of the machine (thermal, other
load) does not favour one of them. Two marker callbacks time every optimizer step:
`on_step_begin` of a marker placed before every other user callback, and `on_step_end` of a marker placed
after all callbacks (Guardian and Trainer's printer included), so the interval holds forward, backward,
clipping, Guardian's `on_pre_optimizer_step`, the optimizer and scheduler steps and Guardian's
`on_step_end` (where snapshots are taken). Both markers are present in every variant.
A second interval, "cycle", runs from one `on_step_begin` to the next: it adds batch loading and
Trainer's logging (`on_log`, printing; logging_steps=1).
The first `--warmup` steps of each run are dropped; each run gives one median; the table reports, per
variant, the median over rounds of those medians and their min-max, and the ratio to `none` both as the
ratio of the medians and as the median and range of the per-round (paired) ratios.
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
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS_DIR, CpuMonitor, busy_warning, describe_machine, load_average,  # noqa: E402
                     machine_info, summary, table, write_json)

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

VARIANTS = {
    "none": "no Guardian callback",
    "guardian": "GuardianCallback(**guardian_kwargs)",
    "guardian-nolog": "GuardianCallback(**guardian_kwargs, event_log=False)",
    "guardian-nosnap": "GuardianCallback(**guardian_kwargs, snapshot_every_steps=0)",
    "guardian-bare": "GuardianCallback(**guardian_kwargs, event_log=False, snapshot_every_steps=0)",
}
HOOKS = ("on_init_end", "on_train_begin", "on_pre_optimizer_step", "on_step_end", "on_log", "on_evaluate",
         "on_save", "on_train_end")


class StepClock:
    """Timestamps of `on_step_begin` (from `begin`) and `on_step_end` (from `end`)."""

    def __init__(self) -> None:
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.begin = _Mark(self.begins, "on_step_begin")
        self.end = _Mark(self.ends, "on_step_end")


class _Mark(TrainerCallback):
    def __init__(self, times: list[float], event: str) -> None:
        self._times = times
        self._event = event

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        if self._event == "on_step_begin":
            self._times.append(time.perf_counter())

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        if self._event == "on_step_end":
            self._times.append(time.perf_counter())


def guardian_for(variant: str, kwargs: dict[str, Any]) -> Any:
    from guardian.callbacks import GuardianCallback

    extra: dict[str, Any] = {
        "guardian": {},
        "guardian-nolog": {"event_log": False},
        "guardian-nosnap": {"snapshot_every_steps": 0},
        "guardian-bare": {"event_log": False, "snapshot_every_steps": 0},
    }[variant]
    return GuardianCallback(**{**kwargs, **extra})


def run_once(variant: str, args: argparse.Namespace, guardian_kwargs: dict[str, Any], *,
             hook_timer: dict[str, list[float]] | None = None, profiler: cProfile.Profile | None = None) -> dict[str, Any]:
    """Build a fresh trainer for `variant`, train it, return its step times and what Guardian did."""
    from guardian.tinyrun import TinyRun

    with tempfile.TemporaryDirectory(prefix=f"guardian-overhead-{variant}-") as out:
        clock = StepClock()
        guardian = None if variant == "none" else guardian_for(variant, guardian_kwargs)
        if guardian is not None and hook_timer is not None:
            _time_hooks(guardian, hook_timer)
        callbacks: list[Any] = [clock.begin] + ([guardian] if guardian is not None else [])
        run = TinyRun(output_dir=out, max_steps=args.steps, seed=args.seed, eval_steps=0, save_steps=0,
                      logging_steps=1, batch_size=args.batch_size)
        trainer = run.trainer(callbacks=callbacks)
        trainer.add_callback(clock.end)  # last of all, after Guardian and Trainer's printer
        order = [type(c).__name__ for c in trainer.callback_handler.callbacks]
        sink = open(os.devnull, "w")  # Trainer prints a dict per logged step; same cost in every variant
        monitor = CpuMonitor()
        monitor.start()
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sink):
                if profiler is not None:
                    profiler.enable()
                try:
                    trainer.train()
                finally:
                    if profiler is not None:
                        profiler.disable()
        finally:
            sink.close()
        wall = time.perf_counter() - started
        cpu = monitor.stop()
        if len(clock.begins) != args.steps or len(clock.ends) != args.steps:
            raise RuntimeError(f"{variant}: timed {len(clock.begins)}/{len(clock.ends)} steps, expected {args.steps}")
        steps = [e - b for b, e in zip(clock.begins, clock.ends)]
        cycles = [b2 - b1 for b1, b2 in zip(clock.begins, clock.begins[1:])]
        result: dict[str, Any] = {"variant": variant, "wall_s": wall, "cpu": cpu, "callback_order": order,
                                  "step_s": steps[args.warmup:], "cycle_s": cycles[args.warmup:]}
        if guardian is not None:
            events = Path(out) / "guardian" / "events.jsonl"
            lines = events.read_text().splitlines() if events.exists() else []
            kinds = [json.loads(line)["kind"] for line in lines]
            result["guardian"] = {
                "errors": guardian.errors, "decisions": len(guardian.decisions),
                "rules_fired": sorted({d.rule for d in guardian.decisions}), "counts": dict(guardian.counts),
                "snapshots_in_ring": guardian.snapshots.steps(), "probe_wrapped": bool(guardian._probe and guardian._probe.wrapped),
                "event_lines": len(lines), "metric_events": kinds.count("metrics"),
                "event_bytes": events.stat().st_size if events.exists() else 0,
            }
            if guardian.errors:
                raise RuntimeError(f"{variant}: Guardian logged {guardian.errors} internal errors")
            if guardian.event_log_enabled and kinds.count("metrics") != args.steps:
                raise RuntimeError(f"{variant}: {kinds.count('metrics')} metric events for {args.steps} steps")
        return result


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each trains every variant once (default 5)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150)")
    parser.add_argument("--warmup", type=int, default=20, help="steps dropped at the start of each run (default 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="TinyRun batch size (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="none,guardian,guardian-nolog",
                        help="comma-separated, from: " + ", ".join(VARIANTS) + " (default none,guardian,guardian-nolog)")
    parser.add_argument("--guardian-kwargs", default="{}", help="JSON object of GuardianCallback options for every "
                        "guardian variant, e.g. '{\"snapshot_every_steps\": 0}'")
    parser.add_argument("--max-other-cores", type=float, default=0.15, help="a round during which other processes "
                        "kept more than this many cores busy on average (from /proc/stat) is run again (default 0.15)")
    parser.add_argument("--max-retries", type=int, default=4, help="re-runs of a contended round (default 4)")
    parser.add_argument("--retry-wait", type=float, default=15.0, help="seconds to wait before a re-run (default 15)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave torch's choice)")
    parser.add_argument("--no-hook-timing", action="store_true", help="skip the extra run that times each of "
                        "Guardian's hooks directly (the most precise figure for a small overhead)")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="after the rounds, cProfile one 'guardian' run: always, never, or "
                             "auto = when a guardian variant's ratio to none exceeds --profile-threshold (default auto)")
    parser.add_argument("--profile-threshold", type=float, default=1.05)
    parser.add_argument("--out", default=str(RESULTS_DIR / "overhead.json"), help="JSON result file "
                        "(default benchmarks/results/overhead.json)")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "none" not in variants:
        parser.error(f"--variants must include 'none' and only {list(VARIANTS)}; got {variants}")
    if args.steps <= args.warmup + 2:
        parser.error("--steps must exceed --warmup by at least 3")
    guardian_kwargs = json.loads(args.guardian_kwargs)
    if not isinstance(guardian_kwargs, dict):
        parser.error("--guardian-kwargs must be a JSON object")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("guardian").setLevel(logging.WARNING)
    info = machine_info()
    print(f"machine: {describe_machine(info)}")
    if busy_warning(info):
        print(busy_warning(info))
    print(f"rounds={args.rounds} steps={args.steps} (first {args.warmup} dropped) variants={variants} "
          f"guardian_kwargs={guardian_kwargs}")
    started = time.perf_counter()

    rounds: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    for r in range(args.rounds):
        shift = r % len(variants)
        order = variants[shift:] + variants[:shift]
        for attempt in range(args.max_retries + 1):
            per: dict[str, Any] = {}
            for variant in order:
                res = run_once(variant, args, guardian_kwargs)
                res["median_step_s"] = statistics.median(res["step_s"])
                res["median_cycle_s"] = statistics.median(res["cycle_s"])
                per[variant] = res
            others = max((run["cpu"]["other_cores"] or 0.0) + (run["cpu"]["steal_cores"] or 0.0) for run in per.values())
            record = {"round": r, "attempt": attempt, "order": order, "runs": per, "load_average": load_average(),
                      "max_other_cores": others, "contended": others > args.max_other_cores}
            print(f"round {r + 1}/{args.rounds} ({', '.join(order)}): " + ", ".join(
                f"{v} {per[v]['median_step_s'] * 1e3:.2f} ms" for v in variants)
                + f"  [{time.perf_counter() - started:.0f} s; other processes used up to {others:.2f} cores]", flush=True)
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

    results: dict[str, Any] = {}
    for metric in ("step", "cycle"):
        base = [rd["runs"]["none"][f"median_{metric}_s"] for rd in rounds]
        base_med = statistics.median(base)
        for variant in variants:
            medians = [rd["runs"][variant][f"median_{metric}_s"] for rd in rounds]
            paired = [m / b for m, b in zip(medians, base)]
            pooled = [t for rd in rounds for t in rd["runs"][variant][f"{metric}_s"]]
            results.setdefault(variant, {})[metric] = {
                "round_medians_s": medians, "over_rounds": summary(medians),
                "ratio_of_medians": statistics.median(medians) / base_med,
                "paired_ratios": paired, "paired_ratio": summary(paired),
                "overhead_ms_per_step": (statistics.median(medians) - base_med) * 1e3,
                "pooled_steps": {k: v for k, v in summary(pooled).items()},
                "p90_pooled_s": sorted(pooled)[int(0.9 * (len(pooled) - 1))],
            }

    def fmt_row(variant: str, metric: str) -> list[str]:
        d = results[variant][metric]
        o, p = d["over_rounds"], d["paired_ratio"]
        return [variant, f"{o['median'] * 1e3:.2f}", f"{o['min'] * 1e3:.2f}-{o['max'] * 1e3:.2f}",
                f"{d['p90_pooled_s'] * 1e3:.2f}", f"{d['overhead_ms_per_step']:+.2f}", f"{d['ratio_of_medians']:.3f}",
                f"{p['median']:.3f}", f"{p['min']:.3f}-{p['max']:.3f}"]

    headers = ["variant", "median ms", "range over rounds", "p90 ms", "+ms/step", "ratio", "paired ratio",
               "paired range"]
    text = []
    for metric, title in (("step", "step time (on_step_begin -> on_step_end, all callbacks inside)"),
                          ("cycle", "cycle time (on_step_begin -> next on_step_begin: + batch loading, logging)")):
        text.append(f"\n{title}; {args.rounds} rounds x {args.steps - args.warmup} timed steps")
        text.append(table(headers, [fmt_row(v, metric) for v in variants]))
    kept_busy = sum(rd["contended"] for rd in rounds)
    text.append(f"rounds discarded because other processes were busy: {len(discarded)}; contended rounds kept: "
                f"{kept_busy}; most cores used by others in a kept round: "
                f"{max(rd['max_other_cores'] for rd in rounds):.2f}")
    g_info = {v: rounds[-1]["runs"][v].get("guardian") for v in variants if v != "none"}
    for v, gi in g_info.items():
        text.append(f"{v}: last round: {gi['decisions']} decisions {gi['rules_fired']}, snapshots in ring "
                    f"{gi['snapshots_in_ring']}, {gi['metric_events']} metric events, events.jsonl "
                    f"{gi['event_bytes']} bytes, probe wrapped: {gi['probe_wrapped']}")
    print("\n".join(text))

    profile: dict[str, Any] | None = None
    hooks: dict[str, Any] | None = None
    worst = max((results[v]["step"]["ratio_of_medians"] for v in variants if v != "none"), default=1.0)
    profile_variant = "guardian" if "guardian" in variants else next((v for v in variants if v != "none"), None)
    if profile_variant and not args.no_hook_timing:
        hooks = hook_times(profile_variant, args, guardian_kwargs)
    if profile_variant and (args.profile == "always" or (args.profile == "auto" and worst > args.profile_threshold)):
        profile = cprofile_run(profile_variant, args, guardian_kwargs, Path(args.out))

    total = time.perf_counter() - started
    info["load_average_at_end"] = load_average()
    print(f"\ntotal runtime {total:.1f} s; load average at end {info['load_average_at_end']}")
    data = {
        "benchmark": "overhead", "machine": info,
        "settings": {**{k: v for k, v in vars(args).items()}, "variants": variants, "guardian_kwargs": guardian_kwargs,
                     "variant_meaning": {v: VARIANTS[v] for v in variants}},
        "results": results,
        "rounds": rounds, "discarded_rounds": discarded,
        "contended_rounds_kept": sum(rd["contended"] for rd in rounds),
        "hook_times": hooks, "profile": profile, "table": "\n".join(text + ([hooks["table"]] if hooks else [])),
        "total_runtime_s": total,
    }
    print(f"wrote {write_json(args.out, data)}")
    return 0


def hook_times(variant: str, args: argparse.Namespace, guardian_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Wall time spent inside each of Guardian's hooks during one run (perf_counter around each call)."""
    hooks: dict[str, list[float]] = {}
    run_once(variant, args, guardian_kwargs, hook_timer=hooks)
    rows, stats = [], {}
    per_step = 0.0
    for name, times in hooks.items():
        timed = times[args.warmup:] if len(times) > args.warmup + 2 else times
        stats[name] = {"calls": len(times), "total_s": sum(times), "median_s": statistics.median(timed),
                       "mean_s": statistics.fmean(timed), "max_s": max(times)}
        if name in ("on_pre_optimizer_step", "on_step_end", "on_log"):
            per_step += statistics.fmean(timed)
        rows.append([name, str(len(times)), f"{statistics.median(timed) * 1e6:.1f}", f"{statistics.fmean(timed) * 1e6:.1f}",
                     f"{max(times) * 1e3:.2f}", f"{sum(times) * 1e3:.1f}"])
    lines = [f"\nGuardian's hooks, one '{variant}' run of {args.steps} steps (perf_counter around each call; "
             f"median/mean after the first {args.warmup} calls)",
             table(["hook", "calls", "median us", "mean us", "max ms", "total ms"], rows),
             f"per optimizer step (on_pre_optimizer_step + on_step_end + on_log, means): {per_step * 1e6:.0f} us"]
    print("\n".join(lines))
    return {"variant": variant, "hooks": stats, "per_step_s": per_step, "table": "\n".join(lines)}


def cprofile_run(variant: str, args: argparse.Namespace, guardian_kwargs: dict[str, Any], out: Path) -> dict[str, Any]:
    """cProfile of one run; the report goes next to the JSON file, as <name>_profile.txt."""
    profiler = cProfile.Profile()
    run_once(variant, args, guardian_kwargs, profiler=profiler)
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
    return {"variant": variant, "cprofile_file": str(prof_path)}


if __name__ == "__main__":
    raise SystemExit(main())
