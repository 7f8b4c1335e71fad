"""Carries out a plan inside the training process: skip, put the rate back, roll back, cut the rate, stop.

Rollback targets and the weights a stop leaves are chosen here, from the good states this process holds: the
ring of in-memory snapshots, the protected checkpoints on disk and the best evaluation's snapshot. A rollback
restores the weights and the optimizer state, not the scheduler: the data is not rewound and the step count
goes on, so the schedule stays where the step count is (the rate of step N is the schedule's rate for step N,
with every cut made so far).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from guardian.callbacks import checkpoints, snapshots
from guardian.callbacks.lr import current_lr, scale_lr, scheduled_lrs
from guardian.engine.actions import Plan, Restore
from guardian.events import ActionOutcome, LrChange
from guardian.logs.atomic import write_atomic

log = logging.getLogger("guardian")
PROBE_TOLERANCE = 1.5  # a good state's reference loss may be this many times the best one's
EVALS_KEPT = 100
OVERFIT_MARGIN = 0.03  # an evaluation this much above the best one says the run was past its best
COUNTS = ("skipped_updates", "rollbacks", "lr_cuts", "lr_restores", "stops")  # what the actuator counts


@dataclass(frozen=True)
class GoodState:
    """A state a rollback or a stop can go back to."""

    step: int
    source: str                       # "memory" or the checkpoint folder
    probe_loss: float | None          # the reference batch's loss with these weights, when measured
    snapshot: snapshots.Snapshot | None = None
    folder: Path | None = None


class Actuator:
    """The training-side state that actions need: snapshots, good checkpoints, the best weights, the LR scale."""

    def __init__(self, *, snapshots_kept: int, rollback_margin_steps: int, use_snapshots: bool) -> None:
        self.snapshots = snapshots.SnapshotRing(snapshots_kept)
        self.rollback_margin_steps = rollback_margin_steps
        self.use_snapshots = use_snapshots
        self.good: checkpoints.GoodCheckpoints | None = None
        self.lr_scale = 1.0
        self.counts = dict.fromkeys(COUNTS, 0)
        self.best_eval: tuple[float, snapshots.Snapshot] | None = None
        self.evals: deque[tuple[int, float]] = deque(maxlen=EVALS_KEPT)
        self.scaler: Any = None  # the mixed-precision GradScaler, when the run has one
        # FSDP and DeepSpeed shard the state across ranks: no in-process rollback; stop and ask the
        # supervisor (`guardian run`) to restart from the last good checkpoint instead.
        self.in_process_rollback = True
        self.restart_request: Path | None = None

    def carry_out(self, plan: Plan, step: int, onset: int, control: Any, model: Any, optimizer: Any,
                  scheduler: Any, *, pre_update: bool) -> ActionOutcome:
        """Do what the plan says; return what was done (false when nothing was)."""
        done = ActionOutcome()
        if plan.restore_lr and optimizer is not None:
            done.lr_restored = self.restore_lr(optimizer, scheduler)
            if done.lr_restored is None:
                plan = replace(plan, skip_update=True)  # no schedule to go back to: do not update at this rate
        if plan.rollback and not self.in_process_rollback:
            self.request_restart(onset, done)
            plan = replace(plan, stop=True, restore=Restore.CURRENT)
        elif plan.rollback:
            self.rollback(onset, model, optimizer, scheduler, done)
        if plan.skip_update and pre_update and optimizer is not None:
            self.skip(optimizer)
            done.skipped_update = True
        if plan.lr_factor < 1.0 and optimizer is not None:
            applied = scale_lr(optimizer, scheduler, plan.lr_factor, plan.min_lr)
            if applied < 1.0:
                self.lr_scale *= applied
                self.counts["lr_cuts"] += 1
            done.lr_factor, done.lr, done.lr_scale = applied, current_lr(optimizer), self.lr_scale
        if plan.stop:
            if plan.restore is not Restore.CURRENT and model is not None:
                done.restored = self.restore_for_stop(plan.restore, onset, model, optimizer, scheduler)
            control.should_training_stop = True
            self.counts["stops"] += 1
            done.stopped = True
        return done

    # ---- single actions ----------------------------------------------------------------------------

    def skip(self, optimizer: Any) -> None:
        """Drop this step's gradients so `optimizer.step()` changes nothing (the moments never see them).

        Under fp16 mixed precision the GradScaler must still record whether this step overflowed, or its
        `step()` asserts "No inf checks were recorded"; it is asked to unscale first (which it would do itself)
        so its scale goes on growing or backing off exactly as it would without Guardian."""
        scaler = self.scaler
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            inner = getattr(optimizer, "optimizer", optimizer)
            per_optimizer = getattr(scaler, "_per_optimizer_states", {})
            stage = per_optimizer.get(id(inner), {}).get("stage")
            if stage is None or getattr(stage, "name", "") == "READY":
                scaler.unscale_(inner)
        optimizer.zero_grad(set_to_none=True)
        self.counts["skipped_updates"] += 1

    def restore_lr(self, optimizer: Any, scheduler: Any) -> LrChange | None:
        """Put every parameter group's rate back to what the scheduler set; None without a schedule."""
        rates = scheduled_lrs(scheduler, optimizer)
        if rates is None:
            return None
        before = current_lr(optimizer)
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        self.counts["lr_restores"] += 1
        return LrChange(from_=before, to=current_lr(optimizer))

    def rollback(self, onset: int, model: Any, optimizer: Any, scheduler: Any, done: ActionOutcome) -> None:
        """Restore the newest good state (memory or disk) from before `onset - margin`; the schedule stays put.
        Says in `done` where the weights came from, or why they could not."""
        started = time.perf_counter()
        target = self.target(onset)
        if target is None:
            done.rollback, done.reason = "impossible", f"no good snapshot or checkpoint before step {onset}"
            return
        self._restore(target, model, optimizer, scheduler)
        self.snapshots.drop_from(target.step + 1)
        self.counts["rollbacks"] += 1
        done.rollback, done.rollback_to_step = target.source, target.step
        done.rollback_seconds = round(time.perf_counter() - started, 4)

    def restore_for_stop(self, restore: Restore, onset: int, model: Any, optimizer: Any, scheduler: Any) -> str:
        """Leave the best known-good weights in place before a stop; say which."""
        choice = self._stop_state(restore, onset)
        if choice is None:
            return "nothing: no good state is kept (enable snapshots or checkpoints); the current weights stay"
        state, why = choice
        self._restore(state, model, optimizer, scheduler)
        return f"the weights of step {state.step} ({why})"

    def request_restart(self, onset: int, done: ActionOutcome) -> None:
        """Write where a supervised restart should resume from (and say it in `done`); the run then stops."""
        folder = self.good.newest_before(onset - self.rollback_margin_steps) if self.good else None
        if self.restart_request is not None:
            write_atomic(self.restart_request, json.dumps({"resume_from": str(folder) if folder else None,
                                                           "onset_step": onset}), mode=None)
        done.rollback, done.resume_from = "restart", str(folder) if folder else None

    # ---- good states -------------------------------------------------------------------------------

    def snapshot(self, step: int, model: Any, optimizer: Any, scheduler: Any, probe_loss: float | None = None) -> bool:
        params = list(snapshots.trainable_parameters(model).values())
        if not snapshots.all_finite(params):
            log.warning("Guardian: weights at step %d are not finite; no snapshot taken", step)
            return False
        snap = snapshots.capture(step, model, optimizer, scheduler, self.lr_scale)
        snap.probe_loss = probe_loss
        self.snapshots.add(snap)
        return True

    def remember_best(self, step: int, value: float | None, model: Any, optimizer: Any, scheduler: Any) -> None:
        if value is None or not math.isfinite(value):
            return
        if not self.evals or self.evals[-1][0] != step:
            self.evals.append((step, value))
        if not self.use_snapshots or model is None:
            return
        if self.best_eval is None or value < self.best_eval[0]:
            self.best_eval = (value, snapshots.capture(step, model, optimizer, scheduler, self.lr_scale))

    def candidates(self, before: int) -> list[GoodState]:
        """Every good state from before step `before`, newest first (memory before disk at the same step)."""
        found = [GoodState(s.step, "memory", s.probe_loss, snapshot=s)
                 for s in (self.snapshots.all() if self.use_snapshots else []) if s.step < before]
        if self.good is not None:
            for step in self.good.steps():
                if step < before and all(c.step != step for c in found):
                    folder = self.good.root / f"checkpoint-{step}"
                    found.append(GoodState(step, str(folder), _marker_probe(folder), folder=folder))
        return sorted(found, key=lambda c: -c.step)

    def target(self, onset: int) -> GoodState | None:
        """The rollback target: the newest good state from before the onset whose reference loss is not far
        above the best of them (a state saved after damage had begun is passed over). A state within
        `rollback_margin_steps` of the onset is taken only when its reference loss vouches for it; without one,
        the target must predate the onset by more than the margin (the trouble may have begun unseen)."""
        found = self.candidates(onset)
        probes = [c.probe_loss for c in found if c.probe_loss is not None and math.isfinite(c.probe_loss)]
        best = min(probes, default=None)
        for candidate in found:
            probe = candidate.probe_loss
            vouched = best is not None and probe is not None and math.isfinite(probe) and probe <= PROBE_TOLERANCE * best
            if vouched or (probe is None and candidate.step < onset - self.rollback_margin_steps):
                return candidate
        return None

    def _stop_state(self, restore: Restore, onset: int) -> tuple[GoodState, str] | None:
        best = self.best_eval
        best_state = (GoodState(best[1].step, "memory", best[1].probe_loss, snapshot=best[1]),
                      f"best evaluation, eval loss {best[0]:.4g}") if best else None
        if restore is Restore.BEST_EVAL:
            return best_state or self._last_good(onset)
        last_good = self._last_good(onset)
        if last_good is None or best_state is None:
            return last_good or best_state
        if best_state[0].step >= last_good[0].step:
            return best_state  # newer and known good
        # The newer good state is preferred unless the evaluations between the best and it were worse.
        later = [value for step, value in self.evals if best_state[0].step < step <= last_good[0].step]
        if later and min(later) > best[0] * (1 + OVERFIT_MARGIN):  # type: ignore[index]
            return best_state
        return last_good

    def _last_good(self, onset: int) -> tuple[GoodState, str] | None:
        target = self.target(onset)
        return (target, "the newest good state before the trouble began") if target else None

    def _restore(self, state: GoodState, model: Any, optimizer: Any, scheduler: Any) -> None:
        """Weights and optimizer state from `state`; the rates stay where the schedule is now."""
        rates = [group["lr"] for group in optimizer.param_groups] if optimizer is not None else []
        if state.snapshot is not None:
            snapshots.restore(state.snapshot, model, optimizer, None)
        elif state.folder is not None:
            checkpoints.load_into(state.folder, model, optimizer, None)
        if optimizer is None:
            return
        now = scheduled_lrs(scheduler, optimizer) or rates  # the optimizer state brought back its old rates
        for group, rate in zip(optimizer.param_groups, now):
            group["lr"] = rate


def _marker_probe(folder: Path) -> float | None:
    try:
        value = json.loads((folder / checkpoints.MARKER).read_text()).get("probe_loss")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None

