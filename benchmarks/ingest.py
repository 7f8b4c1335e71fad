"""The daemon's ingest on one core, in-process: report bodies in, verdicts and stored rows out, no HTTP.

    python benchmarks/ingest.py                                   # this tree
    python benchmarks/ingest.py --baseline-src ../old-checkout    # the same bodies through another tree too

Each tree runs in a subprocess of its own (both are the package `guardian`), on the same bodies: `--runs` runs
sending reports of `--batch` metrics events each, with the shipped rules and a fresh SQLite store. What is
timed is what the daemon does with a POST body once the HTTP server has read it: parse and check the report,
feed the rules, commit the events, decisions and rule state, and build the reply. The HTTP benchmark
(`scale.py`) measures the same path with a load generator sharing the machine's cores; this one gives the
daemon a core to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def bodies(runs: int, batch: int, reports: int) -> list[bytes]:
    """`reports` report bodies per run, each of `batch` metrics events, interleaved across runs."""
    out = []
    for r in range(reports):
        for run in range(runs):
            events = []
            for i in range(batch):
                seq = r * batch + i + 1
                loss = 2.0 - 0.0001 * seq + 0.01 * ((seq * 7919 + run) % 13) / 13
                events.append({"seq": seq, "kind": "metrics", "time": 1764000000.0 + seq, "step": seq,
                               "phase": "train", "values": {"loss": loss, "grad_norm": 1.0 + 0.05 * (seq % 5),
                                                            "learning_rate": 2e-4}})
            out.append(json.dumps({"v": 1, "run": {"id": f"run-{run}", "rules": "default", "meta": {}},
                                   "events": events}).encode())
    return out


# Runs inside the subprocess, with the tree under test first on sys.path.
CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
bodies = [line.encode() for line in Path(sys.argv[1]).read_text().splitlines()]
state = Path(tempfile.mkdtemp())
try:
    from guardian.transport.intake import parse_report
    from guardian.daemon.core import Guardian
    from guardian.daemon.store import Store
    from guardian.rulefile.reload import RuleLibrary

    def ingest(core, body):
        core.report(parse_report(body), run_key="k" * 40)
except ImportError:  # before the typed events (da1fb10 and older)
    from guardian import wire
    from guardian.daemon import Guardian
    from guardian.store import Store
    from guardian.reload import RuleLibrary

    def ingest(core, body):
        core.report(wire.parse_report(wire.loads(body)), None, run_key="k" * 40)

core = Guardian(Store(state / "guardian.db"), RuleLibrary(state / "rules"))
events = sum(body.count(b'"seq"') for body in bodies)
started = time.process_time()
for body in bodies:
    ingest(core, body)
core.flush()
seconds = time.process_time() - started
print(json.dumps({"events": events, "cpu_seconds": seconds, "events_per_cpu_second": events / seconds}))
"""


def measure(tree: Path, data: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run([sys.executable, "-c", CHILD, str(data)], env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise SystemExit(f"{tree}: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="runs reporting (default 4)")
    parser.add_argument("--batch", type=int, default=500, help="metrics events per report (default 500)")
    parser.add_argument("--reports", type=int, default=25, help="reports per run (default 25)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each tree; the best counts")
    parser.add_argument("--baseline-src", type=Path, help="another source tree to run on the same bodies")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    trees = {"this tree": ROOT, **({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bodies.jsonl"
        data.write_bytes(b"\n".join(bodies(args.runs, args.batch, args.reports)))
        best: dict[str, float] = {}
        for _ in range(args.repeat):
            for name, tree in trees.items():
                rate = measure(tree, data)["events_per_cpu_second"]
                best[name] = max(best.get(name, 0.0), rate)
    for name, rate in best.items():
        print(f"{name:>10}: {rate:>9,.0f} events per CPU second")
    if "baseline" in best:
        print(f"     ratio: {best['this tree'] / best['baseline']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"runs": args.runs, "batch": args.batch, "reports": args.reports,
                                        "events_per_cpu_second": best}, indent=1) + "\n")


if __name__ == "__main__":
    main()
