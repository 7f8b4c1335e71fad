"""The independent fault suite: do guarded Trainer runs end at least as well as the same runs unguarded?

    .venv/bin/python benchmarks/faults/suite.py --half tune                 # the tuning half, all variants
    .venv/bin/python benchmarks/faults/suite.py --half heldout --variants clean,unguarded
    .venv/bin/python benchmarks/faults/suite.py --half tune --only bad_stretch-01 --seeds 0
    .venv/bin/python benchmarks/faults/suite.py --half tune --families lr_forced,grad_spike --rules my.yaml \
        --guardian-kwargs '{"snapshot_every_steps": 10}'

68 scenarios in 12 families (scenarios.py), each with its own randomly drawn configuration and fault, split
into a tuning half and a held-out half (34 each, every family in both); each scenario runs with every training
seed (default 0 and 1), so a half is 68 units. Per unit: the clean twin (shared by scenarios with the same base
configuration), the fault unguarded (for the healthy and overfit families that is the clean run itself), and
the fault with Guardian and with each peer. Outcomes (outcomes.py) are judged only by the final test loss.
The faults (injectors.py), data and tokenizer (data.py) and model (model.py) are the suite's own; Guardian is
used only through `GuardianCallback(rules=..., **kwargs)` and its `decisions`, `interventions`, `counts`.

Writes benchmarks/results/faults_<half>.json (every run record, every unit's outcome, the machine) and .md.
Runs in a pool of `--workers` spawned processes with one torch thread each, longest units first.

Measured on the development machine (AMD EPYC, 2 cores, --workers 2, shared with other engineers' test runs):
the tuning half with the default variants (68 units, 320 training runs) took 63.9 min wall at a load average of
about 5, for 50.4 min of CPU time in the runs, i.e. about 25 min on an idle 2-core machine. The held-out half
with clean,unguarded only (116 runs) took 14.0 min wall for 15.5 min of CPU; its scenarios are a little cheaper
than the tuning half's, so with all five variants (320 runs) it needs about 43 CPU-minutes: about 22 min on an
idle 2-core machine, about an hour when the machine is as busy as it was. Each report states its wall and CPU
time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import outcomes  # noqa: E402
import report  # noqa: E402
import scenarios as scen  # noqa: E402
from _common import RESULTS_DIR, busy_warning, describe_machine, machine_info, table, write_json  # noqa: E402

DEFAULT_VARIANTS = ["clean", "unguarded", "guardian", "hf_early_stop", "spike_stop"]


# ---- jobs ----------------------------------------------------------------------------------------


def job_key(s: scen.Scenario, seed: int, variant: str) -> tuple[str, str, int]:
    """Runs that are the same training share a key: clean runs by base config; unguarded = clean where
    the family injects nothing."""
    if variant == "clean" or (variant == "unguarded" and s.family in scen.NO_INJECTION):
        return ("clean", s.base_key(), seed)
    return (variant, s.id, seed)


def plan_jobs(selected: list[scen.Scenario], seeds: list[int],
              variants: list[str]) -> dict[tuple[str, str, int], tuple[scen.Scenario, int, str]]:
    jobs: dict[tuple[str, str, int], tuple[scen.Scenario, int, str]] = {}
    for s in selected:
        for seed in seeds:
            for variant in variants:
                key = job_key(s, seed, variant)
                jobs.setdefault(key, (s, seed, "clean" if key[0] == "clean" else variant))
    return jobs


def cost(s: scen.Scenario) -> float:
    """A rough duration estimate: micro-batches, plus the evaluations (each scores the test set too)."""
    return s.max_steps * s.grad_accum * (1 + s.batch_size / 16) + 4 * s.max_steps / s.eval_steps + 40


_WORKER: dict[str, Any] = {}


def _init_worker(rules: str | None, guardian_kwargs: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER.update(rules=rules, guardian_kwargs=guardian_kwargs)


def _run_job(item: tuple[tuple[str, str, int], scen.Scenario, int, str]) -> tuple[tuple[str, str, int], dict[str, Any]]:
    key, s, seed, variant = item
    import runner

    started = time.perf_counter()
    try:
        record = asdict(runner.run_unit(s, seed, variant, rules=_WORKER.get("rules"),
                                        guardian_kwargs=_WORKER.get("guardian_kwargs")))
    except Exception as exc:
        import traceback

        record = {"scenario_id": s.id, "family": s.family, "seed": seed, "variant": variant,
                  "final_test_loss": float("nan"), "error": traceback.format_exc(limit=5),
                  "seconds": round(time.perf_counter() - started, 2), "steps_completed": 0,
                  "max_steps": s.max_steps, "stopped_early": True, "test_at_eval": [], "guardian": None}
        print(f"ERROR in {s.id} seed {seed} {variant}: {exc}", file=sys.stderr, flush=True)
    return key, record


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def run_jobs(jobs: dict[tuple[str, str, int], tuple[scen.Scenario, int, str]], workers: int, rules: str | None,
             guardian_kwargs: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    items = sorted(((k, *v) for k, v in jobs.items()), key=lambda it: -cost(it[1]))
    total_cost = sum(cost(it[1]) for it in items)
    done_cost = 0.0
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(rules, guardian_kwargs), maxtasksperchild=40) as pool:
        for n, (key, record) in enumerate(pool.imap_unordered(_run_job, items), 1):
            results[key] = record
            done_cost += cost(jobs[key][0])
            elapsed = time.perf_counter() - started
            eta = elapsed / done_cost * (total_cost - done_cost)
            print(f"[{n:3d}/{len(items)}] {_clock(elapsed)} elapsed, ETA {_clock(eta)}  {key[0]:<13} "
                  f"{record['scenario_id']:<24} seed {record['seed']}  test {report.fmt(record['final_test_loss'])}"
                  f"  {record['seconds']:.1f}s{'  ERROR' if record.get('error') else ''}", flush=True)
    return results


def reuse_runs(paths: list[str], jobs: dict[tuple[str, str, int], Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Runs that do not depend on Guardian's code (every variant but guardian), from earlier result files."""
    found: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in paths:
        for run in json.loads(Path(path).read_text())["runs"]:
            key = (str(run["key"][0]), str(run["key"][1]), int(run["key"][2]))
            if key in jobs and key[0] != "guardian":
                found[key] = _numbers({k: v for k, v in run.items() if k != "key"})
    return found


def _numbers(value: Any) -> Any:
    """A result file's values with "nan", "inf" and "-inf" read back as floats."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


# ---- units ---------------------------------------------------------------------------------------


def assemble(selected: list[scen.Scenario], seeds: list[int], variants: list[str],
             results: dict[tuple[str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    units = []
    judged = [v for v in variants if v not in ("clean", "unguarded")]
    for s in selected:
        for seed in seeds:
            runs = {v: results[job_key(s, seed, v)] for v in ["clean", "unguarded", *judged]}
            losses = {v: r["final_test_loss"] for v, r in runs.items()}
            outcome = outcomes.classify(
                family=s.family, healthy=s.family in scen.HEALTHY, rescuable=s.rescuable, clean=losses["clean"],
                unguarded=losses["unguarded"], unguarded_test_at_eval=runs["unguarded"]["test_at_eval"],
                variants={v: losses[v] for v in judged}, guardian=runs.get("guardian", {}).get("guardian"))
            units.append({
                "scenario": s.id, "seed": seed, "family": s.family, "trainer": s.trainer, "clip": s.max_grad_norm > 0,
                "accum": s.grad_accum, "fault": s.describe_fault(), "losses": losses, "outcome": outcome,
                "stopped": {v: bool(r.get("stopped_early")) for v, r in runs.items()},
                "guardian": runs.get("guardian", {}).get("guardian"),
                "fault_report": runs["unguarded"].get("fault"),
                "errors": {v: r["error"] for v, r in runs.items() if r.get("error")},
            })
    return units


def write_outputs(doc: dict[str, Any], out: Path) -> Path:
    """The JSON document at `out` (strict JSON) and its Markdown report beside it; returns the report's path."""
    doc["summary"] = dict(zip(("headers", "rows"), report.summary_table(report.summary_rows(doc["units"], doc["variants"]),
                                                                        doc["variants"])))
    write_json(out, report.json_safe(doc))
    md = out.with_suffix(".md")
    md.write_text(report.markdown(doc, describe_machine(doc["machine"])))
    return md


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(table(headers, rows))
        return
    t = Table(title="Fault suite (G = Guardian, ES = HF early stop, SS = spike stop)")
    for i, h in enumerate(headers):
        t.add_column(h, no_wrap=i == 0, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    Console(width=220).print(t)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--half", choices=["tune", "heldout", "all"])
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only rewrite the Markdown report of an existing results file (nothing is run)")
    p.add_argument("--seeds", default="0,1", help="training seeds, comma-separated (default 0,1)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated; clean and unguarded always run (they are the references)")
    p.add_argument("--rules", default=None, help="rule file for the guardian variant (default: the shipped rules)")
    p.add_argument("--guardian-kwargs", default="{}", help="JSON object of GuardianCallback keyword arguments")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", default=None, help="only scenarios whose id contains this")
    p.add_argument("--families", default=None, help="only these families, comma-separated")
    p.add_argument("--master-seed", type=int, default=scen.MASTER_SEED)
    p.add_argument("--reuse", action="append", default=[], metavar="JSON",
                   help="take the runs of variants other than guardian from an earlier result file of the same "
                        "half and seeds instead of training them again (repeatable; for tuning the rules)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/faults_<half>.json); "
                                                "the Markdown report goes beside it")
    args = p.parse_args(argv)
    if not args.half and not args.render:
        p.error("--half is required (or --render JSON)")
    unknown = set(args.variants.split(",")) - set(DEFAULT_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; valid: {', '.join(DEFAULT_VARIANTS)}")
    families = set(args.families.split(",")) if args.families else set()
    if families - set(scen.FAMILIES):
        p.error(f"unknown families {sorted(families - set(scen.FAMILIES))}; valid: {', '.join(scen.FAMILIES)}")
    try:
        args.guardian_kwargs = json.loads(args.guardian_kwargs)
    except json.JSONDecodeError as exc:
        p.error(f"--guardian-kwargs is not JSON: {exc}")
    if not isinstance(args.guardian_kwargs, dict):
        p.error("--guardian-kwargs must be a JSON object, e.g. '{\"snapshot_every_steps\": 10}'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        path = Path(args.render)
        doc = json.loads(path.read_text())
        doc.setdefault("cpu_seconds", round(sum(r.get("cpu_seconds", 0.0) for r in doc["runs"]), 1))
        print(f"wrote {write_outputs(doc, path)}")
        return 0
    info = machine_info()
    info["torch_threads"] = 1  # per worker
    warning = busy_warning(info)
    if warning:
        print(warning)
    selected = scen.select(scen.generate(args.master_seed), args.half)
    if args.families:
        selected = [s for s in selected if s.family in args.families.split(",")]
    if args.only:
        selected = [s for s in selected if args.only in s.id]
    if not selected:
        print("no scenario matches --only/--families", file=sys.stderr)
        return 2
    seeds = [int(x) for x in args.seeds.split(",")]
    requested = args.variants.split(",")
    variants = ["clean", "unguarded"] + [v for v in DEFAULT_VARIANTS[2:] if v in requested]
    jobs = plan_jobs(selected, seeds, variants)
    print(f"{len(selected)} scenarios x {len(seeds)} seeds = {len(selected) * len(seeds)} units; {len(jobs)} "
          f"training runs on {args.workers} workers; variants {', '.join(variants)}", flush=True)
    started = time.perf_counter()
    reused = reuse_runs(args.reuse, jobs)
    if reused:
        print(f"reusing {len(reused)} runs from {', '.join(args.reuse)}", flush=True)
    todo = {k: v for k, v in jobs.items() if k not in reused}
    results = {**reused, **run_jobs(todo, args.workers, args.rules, args.guardian_kwargs)}
    elapsed = time.perf_counter() - started
    units = assemble(selected, seeds, variants, results)

    out = Path(args.out) if args.out else RESULTS_DIR / f"faults_{args.half}.json"
    settings = {"rules": args.rules, "guardian_kwargs": args.guardian_kwargs, "workers": args.workers,
                "reused_from": args.reuse,
                "master_seed": args.master_seed, "only": args.only, "families": args.families,
                "ruin_tolerance": outcomes.RUIN_TOLERANCE, "harm_tolerance": outcomes.HARM_TOLERANCE}
    doc = {"benchmark": "faults", "half": args.half, "machine": info, "settings": settings, "seeds": seeds,
           "variants": variants, "elapsed_seconds": round(elapsed, 1),
           "cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in results.values()), 1),
           "scenarios": [asdict(s) for s in selected], "units": units,
           "runs": [{"key": list(k), **r} for k, r in sorted(results.items(), key=lambda kv: str(kv[0]))]}
    md = write_outputs(doc, out)
    print_table(*report.console_table(report.summary_rows(units, variants), variants))
    print(f"CPU time of the runs: {doc['cpu_seconds'] / 60:.1f} min")
    print(f"{len(jobs)} runs in {_clock(elapsed)}; wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
