"""A tiny real Trainer + LoRA run for `torchrun --nproc_per_node 2` on CPU (gloo), with a fault on one rank.

Usage: torchrun --nproc_per_node 2 ddp_train.py OUTPUT_DIR SCENARIO [URL]
Each rank writes OUTPUT_DIR/rank-<r>.json: per step, a checksum of its trainable weights and its learning
rates, plus Guardian's decisions and interventions, so the test can compare ranks step by step.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from transformers import TrainerCallback

from guardian import events
from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.rulefile.reader import load_rules, parse_rules
from guardian.testing.tinyrun import TinyRun

ROLLBACK_RULES = """
version: 1
rules:
  - name: nan
    metrics: [loss, grad_norm]
    detector: {kind: non_finite}
    severity: critical
    actions: [rollback, {reduce_lr: {factor: 0.5}}]
"""
STOP_RULES = ROLLBACK_RULES.replace("[rollback, {reduce_lr: {factor: 0.5}}]", "[stop]")

# scenario -> (faulty rank, faults, rules, max_steps)
SCENARIOS: dict[str, tuple[int, list[Fault], str | None, int]] = {
    "skip": (1, [Fault("nan", 10), Fault("poison", 20, steps=2)], None, 30),
    "rollback": (0, [Fault("nan", 30)], ROLLBACK_RULES, 40),
    "stop": (1, [Fault("nan", 15)], STOP_RULES, 40),
    "daemon_down": (1, [Fault("nan", 10)], None, 20),
    "ctl": (1, [Fault("nan", 3)], None, 300),
}


class StopThroughDaemon(TrainerCallback):  # type: ignore[misc]
    """Rank 0 asks the daemon to stop the run at step 5, as `guardian ctl stop` would."""

    def __init__(self, url: str, run_id: str) -> None:
        self.url, self.run_id = url, run_id

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 5 and int(os.environ["RANK"]) == 0:
            from guardian.transport.client import request

            request(self.url, "POST", f"/v1/runs/{self.run_id}/control", {"action": "stop"},
                    token=os.environ["GUARDIAN_TOKEN"])


class Record(TrainerCallback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.steps: dict[int, dict[str, Any]] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        params = [p.detach().double() for p in model.parameters() if p.requires_grad]
        self.steps[state.global_step] = {
            "checksum": float(sum(p.sum() for p in params)),
            "finite": bool(all(torch.isfinite(p).all() for p in params)),
            "lrs": [g["lr"] for g in optimizer.param_groups],
        }


def main() -> None:
    out, scenario = sys.argv[1], sys.argv[2]
    url = sys.argv[3] if len(sys.argv) > 3 else None
    rank = int(os.environ["RANK"])
    faulty_rank, faults, rules_text, max_steps = SCENARIOS[scenario]
    rules = parse_rules(rules_text, "ddp-rules.yaml") if rules_text else load_rules()
    deadline = 2.0 if scenario == "ctl" else 0.05
    guardian = GuardianCallback(rules, snapshot_every_steps=10, url=url, run_id="ddp-run", deadline_seconds=deadline)
    record = Record()
    callbacks = [FaultInjector(faults if rank == faulty_rank else []), guardian, record]
    if scenario == "ctl" and url:
        callbacks.append(StopThroughDaemon(url, "ddp-run"))
    trainer = TinyRun(out, max_steps=max_steps, eval_steps=0, batch_size=4, warmup_steps=5).trainer(callbacks)
    trainer.train()
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump({
            "world_size": guardian.sync.world_size,
            "global_step": trainer.state.global_step,
            "steps": record.steps,
            "decisions": [[d.step, d.rule] for d in guardian.decisions],
            "interventions": [events.to_builtins(i) for i in guardian.interventions],
        }, f)
    # Every rank has written its record before any rank exits: at interpreter shutdown a gloo worker thread
    # can still be releasing one of Trainer's finished all_gathers; it then needs the GIL, is stopped by the
    # shutdown and aborts the process ("terminate called without an active exception", exit -6, in about one
    # run in ten here, seen with gdb), and torchrun then kills the other rank, maybe before it wrote its record.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
