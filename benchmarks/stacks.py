"""What Guardian reads and does on the installed training stack: one tiny Trainer + LoRA run with a 15-batch garbage
stretch, clipped and unclipped, logging every 5 steps (BENCHMARKS.md, "Stacks and versions").

    .venv/bin/python benchmarks/stacks.py            # the main stack (transformers 5.x)
    .venv-oldest/bin/python benchmarks/stacks.py     # the oldest admitted one (`make test-oldest` builds it)

Prints one JSON line per setting: the transformers version, the reading (`pre_update`, where the gradient norm
comes from), the decisions and the updates skipped, how many times the engine was fed each step, and the largest
gradient norm Guardian saw in the stretch against `max_grad_norm` (a pre-clip norm exceeds it).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import transformers

from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.events import MetricsEvent, StartEvent
from guardian.logs.eventlog import read_events
from guardian.testing.tinyrun import TinyRun

STRETCH = range(30, 45)


def measure(max_grad_norm: float) -> dict[str, Any]:
    guardian = GuardianCallback(event_log=True)
    fed: Counter[int] = Counter()
    observe = guardian.engine.observe

    def counting(step: int, metrics: Any, probe: Any = None) -> Any:
        if "loss" in metrics or "grad_norm" in metrics:
            fed[step] += 1
        return observe(step, metrics, probe)

    guardian.engine.observe = counting  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as folder:
        run = TinyRun(folder, max_steps=50, eval_steps=0, logging_steps=5, max_grad_norm=max_grad_norm)
        run.trainer([FaultInjector([Fault("poison", STRETCH.start, steps=len(STRETCH))]), guardian]).train()
        written = list(read_events(Path(folder) / "guardian" / "events.jsonl"))
    start = next(e for e in written if isinstance(e, StartEvent))
    norms = [e.values["grad_norm"] for e in written if isinstance(e, MetricsEvent) and e.step in STRETCH
             and isinstance(e.values.get("grad_norm"), float)]
    return {
        "transformers": transformers.__version__, "max_grad_norm": max_grad_norm,
        "pre_update": start.pre_update, "grad_norm_from": start.grad_norm_from,
        "decisions_in_stretch": sum(d.step in STRETCH for d in guardian.decisions),
        "skipped_updates": guardian.counts["skipped_updates"],
        "steps_fed": len(fed), "steps_fed_twice": sum(n > 1 for n in fed.values()),
        "max_grad_norm_seen_in_stretch": round(max(norms), 3) if norms else None,
    }


def main() -> int:
    logging.getLogger("guardian").setLevel(logging.ERROR)
    for clip in (1.0, 0.0):
        print(json.dumps(measure(clip)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
