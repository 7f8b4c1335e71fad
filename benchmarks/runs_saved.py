"""Runs saved: how many faulted tiny Trainer + LoRA runs end as well as their clean twin, per variant.

    python benchmarks/runs_saved.py                      # 12 fault configurations x 300 steps (about 10 min, 1 core)
    python benchmarks/runs_saved.py --runs 7 --steps 200 # smaller
    python benchmarks/runs_saved.py --variants unguarded,guardian

Every configuration is a real `transformers.Trainer` run of `guardian.testing.tinyrun.TinyRun` (a Llama-architecture
model built from a config, a LoRA adapter, generated data; CPU) with faults injected by
`guardian.callbacks.faults.FaultInjector`, or a tiny training set that makes it overfit. Each configuration
has its own seed (model init, data, data order) and its own randomly drawn fault timings, kinds and sizes:

- `poison`:     Fault("poison", k, steps=1..3)                  (labels of 1-3 batches replaced by one token)
- `lr_blowup`:  Fault("lr_blowup", k, steps=5..10, factor=10..50)
- `nan`:        Fault("nan", k)                                  (the forward pass produces NaN once)
- `overfit`:    train_size 16..32 (2-4 batches per epoch, so 300 steps = 75-150 epochs), eval every 25 steps
- combinations: poison+lr_blowup+nan (the demo's mix, at random steps), overfit+poison, lr_blowup+nan

Variants, each run from scratch with the configuration's seed:
- `clean`:      the twin: same seed, same data, no faults (and for overfit configurations the same tiny
                training set: it overfits too; that is the "fault").
- `unguarded`:  the faults, no callback. (For a pure-overfit configuration it is the clean twin itself.)
- `stop-only`:  what peers do: transformers' `EarlyStoppingCallback(early_stopping_patience=3)` on eval_loss
                (`metric_for_best_model="eval_loss"`) plus a minimal callback that sets
                `control.should_training_stop` when a logged `loss`/`grad_norm` or `eval_loss` is not finite.
                No `load_best_model_at_end`: the run ends with the weights it has (NaN weights stay NaN).
- `stop+best`:  the same plus `load_best_model_at_end=True` (checkpoints every eval), i.e. the best
                evaluation's checkpoint is loaded when training ends: the strongest common peer setup.
- `guardian`:   `GuardianCallback()` with the shipped rules (skip / roll back / cut the LR / stop and restore
                the best weights on overfitting).

Success: the final evaluation loss (`trainer.evaluate()` after `train()`) is finite and within `--tolerance`
(5 %) of the reference: |final - ref| / ref <= 0.05. The reference is the clean twin's final eval loss, except
for configurations that overfit by design (`overfit*`), where it is the best eval loss the clean twin reached
(at any of its evaluations), because its final eval loss is the overfitted one.

Writes benchmarks/results/runs_saved.json (every run: eval history, stop step, Guardian's decisions and
actions, seconds) and runs_saved.md (machine, command, definitions, tables).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from guardian.events import ActionEvent

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, describe_machine, machine_info, table, write_json

KINDS = ["poison", "lr_blowup", "nan", "overfit", "poison+lr_blowup+nan", "overfit+poison", "lr_blowup+nan"]
ALL_VARIANTS = ["unguarded", "stop-only", "stop+best", "guardian"]


@dataclass
class Config:
    name: str
    kind: str
    seed: int
    train_size: int
    eval_steps: int
    faults: list[dict[str, Any]] = field(default_factory=list)  # Fault fields

    @property
    def overfit(self) -> bool:
        return self.kind.startswith("overfit")

    def fault_objects(self) -> list[Any]:
        from guardian.callbacks.faults import Fault

        return [Fault(**f) for f in self.faults]

    def describe(self) -> str:
        parts = [str(f) for f in self.fault_objects()]
        if self.overfit:
            parts.insert(0, f"train_size {self.train_size}")
        return "; ".join(parts) or "none"


def make_configs(n: int, steps: int, eval_steps: int, overfit_eval_steps: int, seed0: int) -> list[Config]:
    """`n` configurations cycling through KINDS; fault steps and sizes drawn from a per-config RNG."""
    configs = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        seed = seed0 + i
        rng = random.Random(7919 * (seed + 1))
        lo, hi = max(40, int(0.15 * steps)), int(0.8 * steps)
        faults: list[dict[str, Any]] = []
        parts = kind.split("+")
        # spread the faults of a combination over separate windows of the run
        windows = [(lo + (hi - lo) * j // len(parts), lo + (hi - lo) * (j + 1) // len(parts) - 12)
                   for j in range(len(parts))]
        for part, (a, b) in zip(parts, windows):
            if part == "overfit":
                continue
            start = rng.randint(a, max(a, b))
            if part == "poison":
                faults.append({"kind": "poison", "start_step": start, "steps": rng.randint(1, 3)})
            elif part == "lr_blowup":
                faults.append({"kind": "lr_blowup", "start_step": start, "steps": rng.randint(5, 10),
                               "factor": float(rng.choice([10, 15, 20, 30, 40, 50]))})
            elif part == "nan":
                faults.append({"kind": "nan", "start_step": start})
        overfit = kind.startswith("overfit")
        configs.append(Config(name=f"c{i:02d}-{kind}", kind=kind, seed=seed,
                              train_size=rng.randint(16, 32) if overfit else 2000,
                              eval_steps=overfit_eval_steps if overfit else eval_steps, faults=faults))
    return configs


# ---- the peers' stop-only callback -------------------------------------------------------------------


def _nonfinite_stop_callback() -> Any:
    from transformers import TrainerCallback

    class NonFiniteStop(TrainerCallback):
        """Stop when a logged loss/grad_norm or the eval loss is NaN/inf (what peers' callbacks do)."""

        def __init__(self) -> None:
            self.stopped_at: int | None = None
            self.reason = ""

        def _stop(self, state: Any, control: Any, reason: str) -> None:
            control.should_training_stop = True
            if self.stopped_at is None:
                self.stopped_at, self.reason = state.global_step, reason

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    self._stop(state, control, f"{key} non-finite")

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                        **kw: Any) -> None:
            value = (metrics or {}).get("eval_loss")
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._stop(state, control, "eval_loss non-finite")

    return NonFiniteStop()


def _eval_recorder() -> Any:
    from transformers import TrainerCallback

    class EvalRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.evals: list[tuple[int, float]] = []

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                        **kw: Any) -> None:
            self.evals.append((state.global_step, float((metrics or {}).get("eval_loss", float("nan")))))

    return EvalRecorder()


# ---- one training run --------------------------------------------------------------------------------


def train_one(cfg: Config, variant: str, steps: int, workdir: Path) -> dict[str, Any]:
    from transformers import EarlyStoppingCallback

    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.faults import FaultInjector
    from guardian.testing.tinyrun import TinyRun

    out = Path(tempfile.mkdtemp(prefix=f"{cfg.name}-{variant}-", dir=workdir))
    recorder = _eval_recorder()
    callbacks: list[Any] = []
    faults = [] if variant == "clean" else cfg.fault_objects()
    injector = FaultInjector(list(faults)) if faults else None
    if injector:
        callbacks.append(injector)  # before Guardian, as documented
    callbacks.append(recorder)
    guardian = stopper = early = None
    if variant == "guardian":
        guardian = GuardianCallback()
        callbacks.append(guardian)
    elif variant in ("stop-only", "stop+best"):
        early = EarlyStoppingCallback(early_stopping_patience=3)
        stopper = _nonfinite_stop_callback()
        callbacks += [early, stopper]
    run = TinyRun(str(out), max_steps=steps, seed=cfg.seed, eval_steps=cfg.eval_steps, train_size=cfg.train_size,
                  save_steps=cfg.eval_steps if variant == "stop+best" else 0)
    started = time.perf_counter()
    trainer = run.trainer(callbacks)
    if early is not None:
        trainer.args.metric_for_best_model = "eval_loss"
        trainer.args.greater_is_better = False
        trainer.args.load_best_model_at_end = variant == "stop+best"
    trainer.train()
    final = float(trainer.evaluate()["eval_loss"])
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "variant": variant, "final_eval_loss": final, "evals": recorder.evals[:-1],  # the last is the final one
        "end_step": int(trainer.state.global_step), "seconds": round(seconds, 2),
        "injected": sorted({s for s, _ in injector.injected}) if injector else [],
    }
    finite_evals = [v for _, v in recorder.evals[:-1] if math.isfinite(v)]
    result["best_eval_loss"] = min(finite_evals) if finite_evals else float("nan")
    if guardian is not None:
        result["guardian_actions"] = len(guardian.interventions)
        result["guardian_counts"] = dict(guardian.counts)
        result["guardian_decisions"] = [f"step {d.step} {d.rule}" for d in guardian.decisions]
        result["guardian_interventions"] = [_brief(i) for i in guardian.interventions]
        result["guardian_errors"] = guardian.errors
    if stopper is not None:
        early_stop = stopper.stopped_at is None and result["end_step"] < steps
        result["stop_reason"] = stopper.reason or ("eval_loss did not improve for 3 evals" if early_stop else "")
    del trainer
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    return result


def _brief(action: ActionEvent) -> str:
    return f"step {action.step}: {action.outcome.describe()} ({', '.join(action.rules)})"


# ---- scoring and reporting -----------------------------------------------------------------------------


def reference(cfg: Config, clean: dict[str, Any]) -> float:
    return float(clean["best_eval_loss"] if cfg.overfit else clean["final_eval_loss"])


def saved(value: float, ref: float, tol: float) -> bool:
    return math.isfinite(value) and math.isfinite(ref) and abs(value - ref) / ref <= tol


def fmt(value: float, ref: float, tol: float) -> str:
    if not math.isfinite(value):
        return "nan ✗"
    return f"{value:.4f} ({(value - ref) / ref:+.1%}) {'✓' if saved(value, ref, tol) else '✗'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=12, help="number of fault configurations (default 12)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--overfit-eval-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first configuration")
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy 2-core box)")
    parser.add_argument("--workdir", default=None, help="where the runs' output folders go (temporary)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "runs_saved.json"))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("guardian").setLevel(logging.CRITICAL)  # decisions are recorded in the JSON

    info = machine_info()
    print(describe_machine(info), flush=True)
    configs = make_configs(args.runs, args.steps, args.eval_steps, args.overfit_eval_steps, args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="runs_saved-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records = []
    for cfg in configs:
        print(f"\n{cfg.name}: seed {cfg.seed}; {cfg.describe()}", flush=True)
        clean = train_one(cfg, "clean", args.steps, workdir)
        ref = reference(cfg, clean)
        print(f"  clean      {clean['final_eval_loss']:.4f} (best {clean['best_eval_loss']:.4f}; reference "
              f"{ref:.4f})  {clean['seconds']:.1f}s", flush=True)
        rec: dict[str, Any] = {"config": asdict(cfg), "description": cfg.describe(), "reference": ref,
                               "reference_kind": "clean best eval" if cfg.overfit else "clean final eval",
                               "runs": {"clean": clean}}
        for variant in variants:
            if variant == "unguarded" and not cfg.faults:
                result = {**clean, "variant": "unguarded", "same_as_clean": True}  # no injected fault: identical run
            else:
                result = train_one(cfg, variant, args.steps, workdir)
            result["saved"] = saved(result["final_eval_loss"], ref, args.tolerance)
            rec["runs"][variant] = result
            extra = ""
            if variant == "guardian":
                extra = f"  actions {result['guardian_actions']} {result['guardian_counts']}"
            elif result.get("stop_reason"):
                extra = f"  stopped at {result['end_step']}: {result['stop_reason']}"
            print(f"  {variant:10s} {fmt(result['final_eval_loss'], ref, args.tolerance)}  {result['seconds']:.1f}s"
                  f"{extra}", flush=True)
        records.append(rec)
    total = time.perf_counter() - started
    shutil.rmtree(workdir, ignore_errors=True)

    shares = {v: sum(r["runs"][v]["saved"] for r in records) for v in variants}
    share_rows = [[v, f"{shares[v]}/{len(records)}", f"{shares[v] / len(records):.0%}"] for v in variants]
    share_table = table(["variant", "saved", "share"], share_rows)
    headers = ["config", "faults", "reference", *variants]
    if "guardian" in variants:
        headers.append("Guardian actions")
    rows = []
    for r in records:
        row = [r["config"]["name"], r["description"],
               f"{r['reference']:.4f}" + (" (best)" if r["config"]["kind"].startswith("overfit") else "")]
        row += [fmt(r["runs"][v]["final_eval_loss"], r["reference"], args.tolerance) for v in variants]
        if "guardian" in variants:
            row.append(str(r["runs"]["guardian"]["guardian_actions"]))
        rows.append(row)
    run_table = table(headers, rows)
    print("\nRuns saved (final eval loss within "
          f"{args.tolerance:.0%} of the reference; non-finite = not saved):\n" + share_table)
    print("\n" + run_table)
    print(f"\n{len(records)} configurations, {sum(len(r['runs']) for r in records)} runs in {total / 60:.1f} min")

    data = {"benchmark": "runs_saved", "machine": info, "wall_seconds": round(total, 1),
            "settings": {k: getattr(args, k) for k in ("runs", "steps", "eval_steps", "overfit_eval_steps", "seed",
                                                       "tolerance", "threads")} | {"variants": variants},
            "definition": ("saved = final eval loss finite and |final - ref| / ref <= tolerance; ref = clean twin's "
                           "final eval loss, or its best eval loss for overfit* configurations"),
            "shares": {v: {"saved": shares[v], "of": len(records), "share": shares[v] / len(records)} for v in variants},
            "configs": records, "share_table": share_table, "run_table": run_table}
    out = write_json(args.out, data)
    md = Path(out).with_suffix(".md")
    md.write_text(markdown(data))
    print(f"wrote {out} and {md}")


def markdown(data: dict[str, Any]) -> str:
    info = data["machine"]
    records = data["configs"]
    settings = data["settings"]
    variants = settings["variants"]
    args = argparse.Namespace(**settings)
    tol = args.tolerance
    lines = [
        "# Runs saved by Guardian on a fault-injection suite", "",
        f"- Machine: {describe_machine(info)}",
        f"- Platform: {info['uname']['system']} {info['uname']['release']} {info['uname']['machine']}",
        f"- Command: `{info['command']}`",
        f"- Wall time: {data['wall_seconds'] / 60:.1f} min for {len(records)} configurations "
        f"({sum(len(r['runs']) for r in records)} runs, torch threads {args.threads})",
        f"- Settings: {args.steps} steps per run, eval every {args.eval_steps} steps (overfit configurations: every "
        f"{args.overfit_eval_steps}), TinyRun defaults otherwise (lr 2e-3 cosine, warm-up 10, batch 8, "
        "max_grad_norm 1.0, logging every 10 steps).", "",
        "**Saved** = the final eval loss (`trainer.evaluate()` after `train()`) is finite and within "
        f"{tol:.0%} of the reference, |final − ref| / ref ≤ {tol}. The reference is the clean twin's (same seed, "
        "no faults) final eval loss; for the `overfit*` configurations, whose clean twin overfits by design (a "
        "training set of 16–32 examples), it is the best eval loss the clean twin reached at any evaluation.", "",
        "Variants: `unguarded` (faults, no callback; for a pure overfit configuration it is the clean twin itself); "
        "`stop-only` (transformers' `EarlyStoppingCallback(early_stopping_patience=3)` on eval_loss plus a callback "
        "that stops when a logged loss/grad_norm or eval_loss is NaN/inf; the run keeps the weights it has); "
        "`stop+best` (the same with `load_best_model_at_end=True`, checkpoints at every eval); `guardian` "
        "(`GuardianCallback()`, shipped rules).", "",
        "## Share of runs saved", "", "| variant | saved | share |", "| --- | --- | --- |",
    ]
    for v in variants:
        s = data["shares"][v]
        lines.append(f"| {v} | {s['saved']}/{s['of']} | {s['share']:.0%} |")
    lines += ["", "## Per run", "",
              "Final eval loss (change against the reference) ✓ saved / ✗ not saved.", "",
              "| config | faults | reference | " + " | ".join(variants) + " | Guardian actions |",
              "|" + " --- |" * (len(variants) + 4)]
    for r in records:
        cells = [r["config"]["name"], r["description"],
                 f"{r['reference']:.4f}" + (" (clean best)" if r["config"]["kind"].startswith("overfit") else "")]
        cells += [fmt(r["runs"][v]["final_eval_loss"], r["reference"], tol) for v in variants]
        cells.append(str(r["runs"]["guardian"]["guardian_actions"]) if "guardian" in variants else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Reading", ""] + reading(data) + ["", "## What the callbacks did", ""]
    for r in records:
        lines.append(f"- **{r['config']['name']}** ({r['description']}), clean final "
                     f"{r['runs']['clean']['final_eval_loss']:.4f}, clean best {r['runs']['clean']['best_eval_loss']:.4f}")
        for v in variants:
            run = r["runs"][v]
            if v == "guardian":
                acts = "; ".join(run["guardian_interventions"]) or "none"
                lines.append(f"  - guardian: ended at step {run['end_step']}, {run['guardian_actions']} actions: {acts}")
            elif v in ("stop-only", "stop+best"):
                why = run.get("stop_reason") or "ran to the end"
                lines.append(f"  - {v}: ended at step {run['end_step']} ({why})")
    return "\n".join(lines) + "\n"


def reading(data: dict[str, Any]) -> list[str]:
    """Facts computed from the runs, then the limits of this suite."""
    records = data["configs"]
    variants = data["settings"]["variants"]
    out = []
    if "unguarded" in variants:
        lost = [r for r in records if not r["runs"]["unguarded"]["saved"]]
        harmless = [r["config"]["name"] for r in records if r["runs"]["unguarded"]["saved"]]
        out.append(f"- The faults ruined {len(lost)} of {len(records)} unguarded runs; the other {len(harmless)} "
                   f"({', '.join(harmless) or 'none'}) recovered by themselves within the tolerance, so they do not "
                   "tell the variants apart.")
        for v in variants:
            if v != "unguarded":
                n = sum(r["runs"][v]["saved"] for r in lost)
                out.append(f"  - of the {len(lost)} ruined runs, `{v}` saved {n}")
    if "guardian" in variants:
        totals: dict[str, int] = {}
        for r in records:
            for k, v in r["runs"]["guardian"]["guardian_counts"].items():
                totals[k] = totals.get(k, 0) + v
        rules = sorted({d.split(" ", 2)[2] for r in records for d in r["runs"]["guardian"]["guardian_decisions"]})
        errors = sum(r["runs"]["guardian"].get("guardian_errors", 0) for r in records)
        out.append(f"- Guardian's actions over the suite: {totals}; rules that fired: {', '.join(rules) or 'none'}; "
                   f"errors inside Guardian: {errors}.")
    out += [
        "- Limits of this suite: one tiny model (Llama architecture, hidden 64, 2 layers, LoRA r=8 plus a fully "
        "trained lm_head/embed_tokens) on generated data, CPU, short runs; faults are the three kinds "
        "`FaultInjector` provides, each lasting at most 10 steps, starting between 15 % and 80 % of the run; one seed per "
        "configuration. Faults that the shipped rules are not built for are not in it (a learning rate raised "
        "less than 4x, a long stretch of bad data, slow divergence, NaN that keeps coming back after a skip), "
        "nor is a Guardian run on the clean twins (false positives: see tests/logs/test_real_logs.py).",
        "- `stop-only` and `stop+best` are the peers' usual recipe as specified for this benchmark; they only stop, "
        "so they cannot undo damage that happened before the stop; `stop+best` matches Guardian on the overfit "
        "configurations because both end on the best evaluation's weights.",
    ]
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report-only":  # rebuild the .md from a results JSON
        loaded = json.loads(Path(sys.argv[2]).read_text())
        Path(sys.argv[2]).with_suffix(".md").write_text(markdown(loaded))
    else:
        main()
