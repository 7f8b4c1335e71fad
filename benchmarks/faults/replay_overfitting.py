"""The overfitting rule replayed on the fault suite's recorded runs: would it stop them, and what would it cost?

    .venv/bin/python benchmarks/faults/replay_overfitting.py benchmarks/results/faults_tune.json
    .venv/bin/python benchmarks/faults/replay_overfitting.py --params '{"noise_z": 3.0}' RESULTS.json...

A run without Guardian's other actions trains the same with and without the overfitting rule until the rule
stops it, so its recorded train losses and evaluations decide exactly where the rule would stop, and its
recorded test loss at each evaluation says what the stop would leave: the test loss at the best evaluation up
to the stop (the stop restores the best weights). Replayed: every clean run (and the unguarded run of the
families that inject nothing), with each evaluation's epoch worked out from the scenario's batch size,
accumulation and train size. A stop harms a run when that test loss is more than 2 % above the run's final one;
a run overfits (is ruined) when its final test loss is more than 5 % above the best it reached, and a stop saves
it when it leaves a test loss within 5 % of that best. The same tolerances as the suite (outcomes.py).

Cheap enough to weigh a parameter change on many recorded runs before running the suite: more recorded runs
come from `suite.py --half all --variants clean --families healthy_noisy_eval,overfit_noisy_eval --master-seed N
--out RESULTS.json` (24 runs, about 2 min).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import outcomes  # noqa: E402
import scenarios as scen  # noqa: E402

from guardian.detectors import DETECTORS  # noqa: E402
from guardian.rulefile.reader import load_rules  # noqa: E402


@dataclass(frozen=True)
class Replayed:
    source: str
    scenario: str
    family: str
    seed: str
    stop_step: int | None
    left: float      # the test loss the rule would leave (the final one when it does not stop)
    final: float     # the run's final test loss
    best: float      # the best test loss the run reached at an evaluation

    @property
    def harmed(self) -> bool:
        return outcomes.is_harmed(self.left, self.final)

    @property
    def overfit(self) -> bool:
        return self.final > self.best * (1 + outcomes.RUIN_TOLERANCE)

    @property
    def saved(self) -> bool:
        return self.overfit and self.left <= self.best * (1 + outcomes.RUIN_TOLERANCE)


def replay(run: dict[str, Any], scenario: dict[str, Any], params: dict[str, Any]) -> tuple[int | None, float]:
    detector = DETECTORS["overfitting"](**params)
    epochs_per_step = scenario["batch_size"] * scenario["grad_accum"] / scenario["train_size"]
    evals = {int(step): float(loss) for step, loss in run["eval_history"]}
    test = {int(step): float(loss) for step, loss in run["test_at_eval"]}
    best_step, best = None, math.inf
    for step, loss in enumerate(run["train_loss"], start=1):
        detector.update(step, {"loss": float(loss)})
        if step not in evals:
            continue
        finding = detector.update(step, {"eval_loss": evals[step], "epoch": step * epochs_per_step})
        if evals[step] < best:
            best, best_step = evals[step], step
        if finding is not None:
            return step, test.get(best_step or step, float(run["final_test_loss"]))
    return None, float(run["final_test_loss"])


def replay_file(path: Path, params: dict[str, Any]) -> list[Replayed]:
    doc = json.loads(path.read_text())
    scenarios = {s["id"]: s for s in doc["scenarios"]}
    out, seen = [], set()
    for run in doc["runs"]:
        if not (run["variant"] == "clean" or (run["variant"] == "unguarded" and run["family"] in scen.NO_INJECTION)):
            continue
        key = json.dumps(run["key"])
        if key in seen or not run["eval_history"] or not outcomes.finite(run.get("final_test_loss")):
            continue
        seen.add(key)
        step, left = replay(run, scenarios[run["scenario_id"]], params)
        out.append(Replayed(path.name, run["scenario_id"], run["family"], str(run["seed"]), step, left,
                            float(run["final_test_loss"]), min(float(v) for _, v in run["test_at_eval"])))
    return out


def summary(rows: list[Replayed]) -> str:
    healthy = [r for r in rows if r.family != "overfit_noisy_eval"]
    overfit = [r for r in rows if r.overfit]
    return (f"{len(rows)} runs: stopped {sum(r.stop_step is not None for r in healthy)} of the {len(healthy)} outside "
            f"overfit_noisy_eval, harmed {sum(r.harmed for r in rows)}; of the {len(overfit)} runs that overfit, "
            f"saved {sum(r.saved for r in overfit)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="fault-suite result files (JSON)")
    p.add_argument("--params", default="{}", help="JSON object overriding the shipped rule's detector parameters")
    args = p.parse_args(argv)
    params = {**load_rules().by_name("overfitting").params, **json.loads(args.params)}
    rows = [row for path in args.results for row in replay_file(path, params)]
    print(f"overfitting rule {params}")
    for r in rows:
        if r.stop_step is not None or r.overfit:
            verdict = "harmed" if r.harmed else "saved" if r.saved else "missed" if r.overfit else "no harm"
            print(f"  {r.source:28s} {r.scenario:24s} seed {r.seed}  stop {r.stop_step or '-':>4}  leaves "
                  f"{r.left:.4f}  final {r.final:.4f}  best {r.best:.4f}  {verdict}")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
