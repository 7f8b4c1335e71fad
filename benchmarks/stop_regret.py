"""What a stop would cost on real runs: the regret of every stop the rules make on real training logs.

    .venv/bin/python benchmarks/stop_regret.py                       # the real-log fixtures, shipped rules
    .venv/bin/python benchmarks/stop_regret.py --rules my.yaml LOG...

Every log is replayed through the rules (`guardian.commands.replay`). A stop at step S leaves the weights a stop
restores: the best evaluation up to S for a stop that restores the best weights, else the last evaluation up to
S (the weights of the newest good state are about as good). The log says how the run went on without the
stop, so the regret of the stop is how much better the run's eval loss became later:

    regret = (restored - best_after) / best_after     (0 when the run never did better after S)

A stop whose regret is above 5 % cost the run the improvement it would have made. Also listed per log: the
decisions that act (anything but an alert), since on a healthy real run every one of them is a false alarm.
Writes benchmarks/results/stop_regret.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, describe_machine, machine_info, table, write_json

from guardian.commands.replay import replay_observations
from guardian.engine.actions import ActionKind, Restore, stop_restore
from guardian.logs.training import EVAL, read_log
from guardian.rulefile.reader import load_rules

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real-logs"
REGRET_LIMIT = 0.05


@dataclass
class LogResult:
    log: str
    evaluations: int
    acting_decisions: int
    acting_rules: list[str]
    stop_step: int | None = None
    stop_rule: str | None = None
    restored_eval: float | None = None
    best_after: float | None = None
    regret: float | None = None


def judge(path: Path, rules_path: str | None) -> LogResult:
    observations = read_log(path)
    decisions = replay_observations(observations, load_rules(rules_path))
    evals = [(o.step, o.metrics["eval_loss"]) for o in observations
             if o.phase == EVAL and math.isfinite(o.metrics.get("eval_loss", math.nan))]
    acting = [d for d in decisions if any(a.kind is not ActionKind.ALERT for a in d.actions)]
    result = LogResult(path.name, len(evals), len(acting), sorted({d.rule for d in acting}))
    stop = next((d for d in decisions if any(a.kind is ActionKind.STOP for a in d.actions)), None)
    if stop is None:
        return result
    result.stop_step, result.stop_rule = stop.step, stop.rule
    before = [(s, v) for s, v in evals if s <= stop.step]
    after = [v for s, v in evals if s > stop.step]
    if not before:
        return result
    wants_best = any(a.kind is ActionKind.STOP and stop_restore(a) is Restore.BEST_EVAL for a in stop.actions)
    restored = min(v for _, v in before) if wants_best else before[-1][1]
    result.restored_eval = restored
    result.best_after = min(after) if after else None
    result.regret = max(0.0, (restored - min(after)) / min(after)) if after else 0.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="*", type=Path, help="training logs (default: the real-log fixtures)")
    parser.add_argument("--rules", default=None, help="rule file (default: the shipped rules)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "stop_regret.json")
    args = parser.parse_args()
    logs = args.logs or sorted(p for p in FIXTURES.glob("*.json*") if p.name != "SOURCES.tsv")
    results = [judge(path, args.rules) for path in logs]
    rows = [[r.log[:60], str(r.evaluations), str(r.acting_decisions), ", ".join(r.acting_rules) or "—",
             "—" if r.stop_step is None else f"{r.stop_step} ({r.stop_rule})",
             "—" if r.restored_eval is None else f"{r.restored_eval:.4g}",
             "—" if r.best_after is None else f"{r.best_after:.4g}",
             "—" if r.regret is None else f"{r.regret:.1%}"] for r in results]
    headers = ["log", "evals", "acting decisions", "acting rules", "stop (rule)", "restored eval", "best after",
               "regret"]
    text = table(headers, rows)
    stops = [r for r in results if r.stop_step is not None]
    worst = max((r.regret or 0.0 for r in stops), default=0.0)
    summary = (f"{len(stops)} stops on {len(results)} logs; worst regret {worst:.1%} "
               f"({'within' if worst <= REGRET_LIMIT else 'ABOVE'} the {REGRET_LIMIT:.0%} limit)")
    print(text)
    print(summary)
    info = machine_info()
    write_json(args.out, {"machine": info, "rules": args.rules or "shipped", "results": [asdict(r) for r in results],
                          "summary": summary})
    md = args.out.with_suffix(".md")
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += [f"| `{r.log}` | " + " | ".join(row[1:]) + " |" for r, row in zip(results, rows)]
    command = " ".join(["benchmarks/stop_regret.py", *sys.argv[1:]])
    md.write_text(f"# Stop regret on real logs\n\n{describe_machine(info)}\n\nCommand: `.venv/bin/python {command}` "
                  f"(rules: {args.rules or 'shipped'})\n\n" + "\n".join(lines) + f"\n\n{summary}\n")


if __name__ == "__main__":
    main()
