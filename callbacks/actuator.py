"""Carries out a plan inside the training process: skip, roll back, cut the learning rate, stop."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from guardian.actions import Plan
from guardian.callbacks import checkpoints, snapshots
from guardian.callbacks.lr import current_lr, scale_lr

log = logging.getLogger("guardian")


class Actuator:
    """The training-side state that actions need: snapshots, good checkpoints, the LR scale."""

    def __init__(self, *, snapshots_kept: int, rollback_margin_steps: int, use_snapshots: bool) -> None:
        self.snapshots = snapshots.SnapshotRing(snapshots_kept)
        self.rollback_margin_steps = rollback_margin_steps
        self.use_snapshots = use_snapshots
        self.good: checkpoints.GoodCheckpoints | None = None
        self.lr_scale = 1.0
        self.counts = {"skipped_updates": 0, "rollbacks": 0, "lr_cuts": 0, "stops": 0}
        self.best_eval: tuple[float, snapshots.Snapshot] | None = None
        # FSDP and DeepSpeed shard the state across ranks: no in-process rollback; stop and ask the
        # supervisor (`guardian run`) to restart from the last good checkpoint instead.
        self.in_process_rollback = True
        self.restart_request: Path | None = None

    def carry_out(self, plan: Plan, step: int, onset: int, control: Any, model: Any, optimizer: Any,
                  scheduler: Any, *, pre_update: bool) -> dict[str, Any]:
        """Do what the plan says; return what was done (empty when nothing was)."""
        outcome: dict[str, Any] = {}
        if plan.rollback and not self.in_process_rollback:
            outcome.update(self.request_restart(onset))
            plan = replace(plan, stop=True)
        elif plan.rollback:
            outcome.update(self.rollback(onset, model, optimizer, scheduler))
        if plan.skip_update and pre_update and optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            self.counts["skipped_updates"] += 1
            outcome["skipped_update"] = True
        if plan.lr_factor < 1.0 and optimizer is not None:
            applied = scale_lr(optimizer, scheduler, plan.lr_factor, plan.min_lr)
            if applied < 1.0:
                self.lr_scale *= applied
                self.counts["lr_cuts"] += 1
            outcome.update(lr_factor=applied, lr=current_lr(optimizer), lr_scale=self.lr_scale)
        if plan.stop:
            if plan.restore_best:
                outcome["restored_best"] = self.restore_best(model)
            control.should_training_stop = True
            self.counts["stops"] += 1
            outcome["stopped"] = True
        return outcome

    def rollback(self, onset: int, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        """Restore the newest good snapshot (or protected checkpoint) from before `onset - margin`."""
        before = onset - self.rollback_margin_steps
        started = time.perf_counter()
        snap = self.snapshots.newest_before(before) if self.use_snapshots else None
        if snap is not None:
            snapshots.restore(snap, model, optimizer, scheduler)
            self.snapshots.drop_from(before)
            source, target, saved_scale = "memory", snap.step, snap.lr_scale
        else:
            folder = self.good.newest_before(before) if self.good else None
            if folder is None:
                return {"rollback": "impossible", "reason": f"no good snapshot or checkpoint before step {before}"}
            checkpoints.load_into(folder, model, optimizer, scheduler)
            info = json.loads((folder / checkpoints.MARKER).read_text())
            source, target, saved_scale = str(folder), int(info["step"]), float(info.get("lr_scale", 1.0))
        # A restore brings back the LR scale of its time; cuts made since then stay in force.
        if self.lr_scale / saved_scale < 1.0:
            scale_lr(optimizer, scheduler, self.lr_scale / saved_scale)
        self.counts["rollbacks"] += 1
        seconds = time.perf_counter() - started
        return {"rollback": source, "rollback_to_step": target, "rollback_seconds": round(seconds, 4)}

    def request_restart(self, onset: int) -> dict[str, Any]:
        """Write where a supervised restart should resume from; the run then stops."""
        folder = self.good.newest_before(onset - self.rollback_margin_steps) if self.good else None
        if self.restart_request is not None:
            tmp = self.restart_request.with_suffix(".tmp")
            tmp.write_text(json.dumps({"resume_from": str(folder) if folder else None, "onset_step": onset}))
            os.replace(tmp, self.restart_request)
        return {"rollback": "restart", "resume_from": str(folder) if folder else None}

    def snapshot(self, step: int, model: Any, optimizer: Any, scheduler: Any) -> bool:
        params = list(snapshots.trainable_parameters(model).values())
        if not snapshots.all_finite(params):
            log.warning("Guardian: weights at step %d are not finite; no snapshot taken", step)
            return False
        self.snapshots.add(snapshots.capture(step, model, optimizer, scheduler, self.lr_scale))
        return True

    def remember_best(self, step: int, value: float | None, model: Any, optimizer: Any, scheduler: Any) -> None:
        if value is None or not math.isfinite(value) or not self.use_snapshots or model is None:
            return
        if self.best_eval is None or value < self.best_eval[0]:
            self.best_eval = (value, snapshots.capture(step, model, optimizer, scheduler, self.lr_scale))

    def restore_best(self, model: Any) -> str:
        if self.best_eval is None:
            return "no best weights kept (enable evaluation and snapshots)"
        with torch.no_grad():
            for name, param in snapshots.trainable_parameters(model).items():
                param.copy_(self.best_eval[1].params[name])
        return f"best evaluation at step {self.best_eval[1].step}"
