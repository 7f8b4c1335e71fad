"""GuardianCallback: watches every optimizer step of a `transformers.Trainer` and acts on decisions.

    trainer.add_callback(GuardianCallback())      # shipped rules, embedded engine, nothing else to start

Per optimizer step it reads the step's loss and pre-clip gradient norm (one host sync), feeds the engine,
and before `optimizer.step()` carries out what the rules decided: skip the update, roll back to the newest
good snapshot or checkpoint, cut the learning rate, or stop. Evaluations feed the overfitting rules.
A failure inside Guardian is logged and training goes on.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import TrainerCallback

from guardian.actions import Plan, merge
from guardian.callbacks import checkpoints, snapshots
from guardian.callbacks.lr import current_lr, scale_lr
from guardian.callbacks.probe import StepProbe, find_trainer
from guardian.engine import Decision, Engine
from guardian.eventlog import EventLog
from guardian.ruleset import RuleSet, load_rules

log = logging.getLogger("guardian")
F = TypeVar("F", bound=Callable[..., Any])
STATE_FILE = "guardian_state.json"


def _never_raises(hook: F) -> F:
    """Run a hook; if Guardian itself fails, log it and let training go on."""

    @functools.wraps(hook)
    def safe(self: GuardianCallback, *args: Any, **kwargs: Any) -> Any:
        try:
            return hook(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - Guardian must never kill the run it protects
            self.errors += 1
            log.exception("Guardian failed in %s; training continues without this step's checks", hook.__name__)
            return None

    return safe  # type: ignore[return-value]


class GuardianCallback(TrainerCallback):
    """Applies Guardian's rules to a Trainer run from inside the training process.

    Args:
        rules: a rule file path or a loaded `RuleSet`; None uses the shipped `default.yaml`.
        snapshot_every_steps: take an in-memory snapshot of the trainable state this often (0 disables).
        snapshots_kept: how many snapshots the ring holds.
        snapshot_max_bytes: no in-memory snapshots when the trainable weights are larger than this
            (full fine-tuning of a big model); rollbacks then use good checkpoints on disk.
        rollback_margin_steps: a rollback target must predate the anomaly's onset by more than this.
        quiet_steps: a snapshot or checkpoint counts as good only if no rule fired in this many steps.
        protect_checkpoints: how many good checkpoints to keep safe from `save_total_limit` rotation.
        event_log: write metrics and decisions to `<output_dir>/guardian/events.jsonl`.
    """

    def __init__(
        self,
        rules: str | os.PathLike[str] | RuleSet | None = None,
        *,
        snapshot_every_steps: int = 25,
        snapshots_kept: int = 3,
        snapshot_max_bytes: int = 2 * 1024**3,
        rollback_margin_steps: int = 5,
        quiet_steps: int = 10,
        protect_checkpoints: int = 2,
        event_log: bool = True,
    ) -> None:
        self.ruleset = rules if isinstance(rules, RuleSet) else load_rules(None if rules is None else Path(rules))
        self.snapshot_every_steps = snapshot_every_steps
        self.snapshot_max_bytes = snapshot_max_bytes
        self.rollback_margin_steps = rollback_margin_steps
        self.quiet_steps = quiet_steps
        self.protect_checkpoints = protect_checkpoints
        self.event_log_enabled = event_log
        self.engine = Engine(self.ruleset)
        self.snapshots = snapshots.SnapshotRing(snapshots_kept)
        self.decisions: list[Decision] = []
        self.interventions: list[dict[str, Any]] = []
        self.counts = {"skipped_updates": 0, "rollbacks": 0, "lr_cuts": 0, "stops": 0}
        self.lr_scale = 1.0
        self.errors = 0
        self._trainer: Any = None
        self._probe: StepProbe | None = None
        self._events: EventLog | None = None
        self._good: checkpoints.GoodCheckpoints | None = None
        self._last_decision_step = -(10**9)
        self._best_eval: tuple[float, snapshots.Snapshot] | None = None
        self._use_snapshots = snapshot_every_steps > 0

    # ---- hooks -------------------------------------------------------------------------------------

    @_never_raises
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer = find_trainer()

    @_never_raises
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        self._trainer = self._trainer or find_trainer()
        self._probe = StepProbe(self._trainer)
        self._good = checkpoints.GoodCheckpoints(args.output_dir, keep=self.protect_checkpoints)
        if state.is_world_process_zero and self.event_log_enabled:
            self._events = EventLog(Path(args.output_dir) / "guardian" / "events.jsonl")
        self._resume(args, state)
        size = snapshots.trainable_nbytes(model)
        if self._use_snapshots and size > self.snapshot_max_bytes:
            self._use_snapshots = False
            log.warning("Guardian: trainable weights are %.1f GB, over snapshot_max_bytes; rollbacks will use "
                        "good checkpoints on disk only", size / 1e9)
        if self._use_snapshots:
            self._snapshot(state.global_step, model, optimizer, lr_scheduler)
        self._emit("start", {"step": state.global_step, "rules": [r.name for r in self.ruleset.rules],
                             "source": self.ruleset.source, "trainable_bytes": size,
                             "max_steps": state.max_steps}, flush=True)
        log.info("Guardian: watching with %d rules from %s", len(self.ruleset.rules), self.ruleset.source)

    @_never_raises
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        step = state.global_step + 1
        metrics = self._probe.read(model) if self._probe else {}
        if optimizer is not None:
            metrics["learning_rate"] = current_lr(optimizer)
        self._emit("metrics", {"step": step, "phase": "train", "epoch": state.epoch, "lr_scale": self.lr_scale, **metrics})
        decisions = self.engine.observe(step, metrics)
        if decisions:
            self._act(step, decisions, control, model, optimizer, lr_scheduler, pre_update=True)

    @_never_raises
    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    lr_scheduler: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if self._use_snapshots and step % self.snapshot_every_steps == 0 and self._healthy(step):
            self._snapshot(step, model, optimizer, lr_scheduler)

    @_never_raises
    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               model: Any = None, optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        if not logs or (self._probe and self._probe.wrapped) or "loss" not in logs:
            return
        metrics = {k: float(v) for k, v in logs.items() if k in ("loss", "grad_norm") and isinstance(v, (int, float))}
        decisions = self.engine.observe(state.global_step, metrics)
        if decisions:
            self._act(state.global_step, decisions, control, model, optimizer, lr_scheduler, pre_update=False)

    @_never_raises
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    model: Any = None, optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        values = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        step = state.global_step
        self._emit("metrics", {"step": step, "phase": "eval", **values}, flush=True)
        self._remember_best(step, values, model, optimizer, lr_scheduler)
        decisions = self.engine.observe(step, values)
        if decisions:
            self._act(step, decisions, control, model, optimizer, lr_scheduler, pre_update=False)

    @_never_raises
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        if folder.is_dir() and state.is_world_process_zero:
            _write_json(folder / STATE_FILE, self._state())
            if self._healthy(step) and self._good is not None:
                where = self._good.protect(folder, step, {"lr_scale": self.lr_scale})
                self._emit("checkpoint", {"step": step, "protected": str(where)}, flush=True)

    @_never_raises
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        summary = {"step": state.global_step, **self.counts, "decisions": len(self.decisions),
                   "lr_scale": self.lr_scale, "guardian_errors": self.errors}
        self._emit("end", summary, flush=True)
        if self._events:
            self._events.close()
        log.info("Guardian: run ended at step %d: %d decisions, %d updates skipped, %d rollbacks, "
                 "%d LR cuts (scale %.3g)", state.global_step, len(self.decisions), self.counts["skipped_updates"],
                 self.counts["rollbacks"], self.counts["lr_cuts"], self.lr_scale)

    # ---- actions -----------------------------------------------------------------------------------

    def _act(self, step: int, decisions: list[Decision], control: Any, model: Any, optimizer: Any,
             scheduler: Any, *, pre_update: bool) -> None:
        self._last_decision_step = step
        for decision in decisions:
            self.decisions.append(decision)
            (log.error if decision.severity.value == "critical" else log.warning)("Guardian: %s", decision.message)
            self._emit("decision", decision.to_dict(), flush=True)
        plan = merge(a for d in decisions for a in d.actions)
        onset = min(d.finding.onset_step for d in decisions)
        outcome = self._carry_out(plan, step, onset, control, model, optimizer, scheduler, pre_update)
        if outcome:
            outcome = {"step": step, "rules": [d.rule for d in decisions], **outcome}
            self.interventions.append(outcome)
            log.warning("Guardian: step %d: %s", step, _describe(outcome))
            self._emit("action", outcome, flush=True)

    def _carry_out(self, plan: Plan, step: int, onset: int, control: Any, model: Any, optimizer: Any,
                   scheduler: Any, pre_update: bool) -> dict[str, Any]:
        outcome: dict[str, Any] = {}
        if plan.rollback:
            outcome.update(self._rollback(onset, model, optimizer, scheduler))
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
                outcome["restored_best"] = self._restore_best(model)
            control.should_training_stop = True
            self.counts["stops"] += 1
            outcome["stopped"] = True
        return outcome

    def _rollback(self, onset: int, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        before = onset - self.rollback_margin_steps
        started = time.perf_counter()
        snap = self.snapshots.newest_before(before) if self._use_snapshots else None
        if snap is not None:
            snapshots.restore(snap, model, optimizer, scheduler)
            self._drop_snapshots_from(before)
            source, target = "memory", snap.step
            self._rescale_after_restore(snap.lr_scale, optimizer, scheduler)
        else:
            folder = self._good.newest_before(before) if self._good else None
            if folder is None:
                return {"rollback": "impossible", "reason": f"no good snapshot or checkpoint before step {before}"}
            checkpoints.load_into(folder, model, optimizer, scheduler)
            info = json.loads((folder / checkpoints.MARKER).read_text())
            self._rescale_after_restore(float(info.get("lr_scale", 1.0)), optimizer, scheduler)
            source, target = str(folder), int(info["step"])
        self.counts["rollbacks"] += 1
        seconds = time.perf_counter() - started
        return {"rollback": source, "rollback_to_step": target, "rollback_seconds": round(seconds, 4)}

    def _rescale_after_restore(self, saved_scale: float, optimizer: Any, scheduler: Any) -> None:
        """A restore brings back the LR scale of its time; cuts made since then must stay in force."""
        ratio = self.lr_scale / saved_scale
        if ratio < 1.0:
            scale_lr(optimizer, scheduler, ratio)

    def _drop_snapshots_from(self, step: int) -> None:
        kept = [s for s in self.snapshots._ring if s.step < step]
        self.snapshots._ring.clear()
        self.snapshots._ring.extend(kept)

    def _restore_best(self, model: Any) -> str:
        if self._best_eval is not None:
            with torch.no_grad():
                for name, param in snapshots.trainable_parameters(model).items():
                    param.copy_(self._best_eval[1].params[name])
            return f"best evaluation at step {self._best_eval[1].step}"
        return "no best weights kept (enable evaluation and snapshots)"

    # ---- bookkeeping -------------------------------------------------------------------------------

    def _healthy(self, step: int) -> bool:
        return step - self._last_decision_step > self.quiet_steps

    def _snapshot(self, step: int, model: Any, optimizer: Any, scheduler: Any) -> None:
        params = list(snapshots.trainable_parameters(model).values())
        if not snapshots.all_finite(params):
            log.warning("Guardian: weights at step %d are not finite; no snapshot taken", step)
            return
        self.snapshots.add(snapshots.capture(step, model, optimizer, scheduler, self.lr_scale))

    def _remember_best(self, step: int, values: dict[str, float], model: Any, optimizer: Any, scheduler: Any) -> None:
        value = values.get("eval_loss")
        if value is None or not math.isfinite(value) or not self._use_snapshots or model is None:
            return
        if self._best_eval is None or value < self._best_eval[0]:
            self._best_eval = (value, snapshots.capture(step, model, optimizer, scheduler, self.lr_scale))

    def _emit(self, kind: str, payload: dict[str, Any], *, flush: bool = False) -> None:
        if self._events is not None:
            self._events.write(kind, payload, flush=flush)

    def _state(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict(), "lr_scale": self.lr_scale, "counts": self.counts}

    def _resume(self, args: Any, state: Any) -> None:
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if state.global_step == 0 or not saved.is_file():
            return
        data = json.loads(saved.read_text())
        try:
            self.engine.load_state_dict(data["engine"])
        except (KeyError, ValueError) as exc:
            log.warning("Guardian: %s: could not restore rule state (%s); rules start fresh", saved, exc)
        self.lr_scale = float(data.get("lr_scale", 1.0))
        self.counts.update(data.get("counts", {}))
        log.info("Guardian: resumed rule state from %s", saved)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _describe(outcome: dict[str, Any]) -> str:
    parts = []
    if "rollback" in outcome:
        if outcome["rollback"] == "impossible":
            parts.append(f"could not roll back ({outcome['reason']})")
        else:
            parts.append(f"rolled back to step {outcome['rollback_to_step']} from {outcome['rollback']} "
                         f"in {outcome['rollback_seconds'] * 1000:.1f} ms")
    if outcome.get("skipped_update"):
        parts.append("skipped this update")
    if "lr_factor" in outcome:
        parts.append(f"learning rate x{outcome['lr_factor']:.3g} -> {outcome['lr']:.3g} (scale {outcome['lr_scale']:.3g})")
    if outcome.get("stopped"):
        parts.append("stopping training" + (f", restored {outcome['restored_best']}" if "restored_best" in outcome else ""))
    return "; ".join(parts) or "recorded"
