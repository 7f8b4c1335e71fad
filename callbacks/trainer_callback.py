"""GuardianCallback: watches every optimizer step of a `transformers.Trainer` and acts on decisions.

    trainer.add_callback(GuardianCallback())      # shipped rules, embedded engine, nothing else to start

Per optimizer step it reads the step's loss and pre-clip gradient norm (one host sync), feeds the engine,
and before `optimizer.step()` carries out what the rules decided: skip the update, roll back to the newest
good snapshot or checkpoint, cut the learning rate, or stop. Evaluations feed the overfitting rules.

With a daemon (`GuardianCallback(url=...)` or `GUARDIAN_URL`), events stream to it in the background and its
decisions about step N are carried out before the update of step N+1, if it answers within
`deadline_seconds`; otherwise the embedded engine, which sees the same stream, decides. A skip of the
update being made right now cannot wait for a round trip, so the embedded engine always makes those.
A failure inside Guardian is logged and training goes on.

The hooks live here and delegate: `verdicts.VerdictArbiter` settles whose verdict a step acts on in daemon mode,
`actuator.Actuator` carries a plan out, `runfiles` holds the supervisor and state files, `run_metrics` serves an
embedded run's Prometheus metrics, `integrations` writes to the Trainer's own reporting.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import TrainerCallback

from guardian import events
from guardian.callbacks import checkpoints, snapshots
from guardian.callbacks.actuator import Actuator
from guardian.callbacks.distributed import RankSync
from guardian.callbacks.integrations import IntegrationBridge
from guardian.callbacks.lr import current_lr, scale_lr, scheduled_lrs
from guardian.callbacks.probe import StepProbe, find_trainer
from guardian.callbacks.reference import ReferenceBatch
from guardian.callbacks.run_metrics import serve_run_metrics
from guardian.callbacks.runfiles import (
    SupervisorFile,
    restart_number,
    resumed_from,
    run_dirs_of,
    save_state,
    saved_engine_state,
    saved_state_for_resume,
)
from guardian.callbacks.samples import NOT_ABOUT_THE_DATA, SampleTracker
from guardian.callbacks.trl_metrics import StoredMetrics
from guardian.callbacks.verdicts import VerdictArbiter
from guardian.commands.doctor import method_of_trainer, preflight
from guardian.engine.actions import IMMEDIATE, ActionKind, merge
from guardian.engine.engine import Decision, Engine
from guardian.engine.rules import RuleSet
from guardian.errors import ConfigError
from guardian.events import ActionEvent, AnyEvent, CheckpointEvent, EndEvent, MetricsEvent, StartEvent, SystemEvent
from guardian.gpu import GpuReader
from guardian.logs.badsample import bad_samples_path
from guardian.logs.eventlog import EventLog
from guardian.rulefile.reader import METHOD_RULES, load_rules, shipped_rules_for
from guardian.runview import RunTracker
from guardian.transport.client import DaemonLink
from guardian.transport.runid import default_run_id
from guardian.transport.token import TOKEN_ENV, default_state_dir, find_token, token_path

log = logging.getLogger("guardian")
F = TypeVar("F", bound=Callable[..., Any])


def _never_raises(hook: F) -> F:
    """Run a hook; if Guardian itself fails, log it and let training go on."""

    @functools.wraps(hook)
    def safe(self: GuardianCallback, *args: Any, **kwargs: Any) -> Any:
        try:
            return hook(self, *args, **kwargs)
        except ConfigError:
            raise  # strict pre-flight: the user asked for a refusal to start
        except Exception:
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
        rollback_margin_steps: a rollback target must predate the anomaly's onset by more than this, unless
            its reference-batch loss vouches for it.
        quiet_steps: a snapshot or checkpoint counts as good only if no rule fired in this many steps.
        protect_checkpoints: how many good checkpoints to keep safe from `save_total_limit` rotation.
        event_log: write metrics and decisions to `<output_dir>/guardian/events.jsonl`.
        url: the guardian daemon to report to (default: the `GUARDIAN_URL` environment variable; none =
            embedded only).
        run_id: the run's id at the daemon (default: from the output folder; stable across resumes).
        rule_set: the name of the daemon's rule set for this run.
        token: the daemon's token, needed for every report (default: `GUARDIAN_TOKEN`, else the daemon's
            token file `$GUARDIAN_HOME/token`, i.e. `~/.guardian/token`, readable when the run's user started
            the daemon).
        deadline_seconds: the longest a step waits for the daemon's verdict on the previous step.
        metrics_port: serve Prometheus metrics for this run on 127.0.0.1:PORT (embedded mode; the daemon
            serves them at its own /metrics otherwise).
        system_every_seconds: how often to report GPU facts (NVML) from this process.
        strict_preflight: refuse to start (ConfigError) when the pre-flight check of the configuration finds a
            warning; by default findings are only logged.
        lr_factor_at_start: scale the learning rate (and its schedule) once training starts; `guardian run`
            sets it when it restarts a crashed run with `--lr-factor`.
        mask_known_bad_samples: when `<output_dir>/guardian/bad_samples.jsonl` (the samples of updates an
            earlier run in this folder skipped) lists samples, mask their labels (-100) wherever they come
            again; costs one host copy of each micro-batch's input_ids while the list is not empty.
        report_to_integrations: also write decisions and actions (`guardian/*` scalars, a line of text) through
            the Trainer's reporting callbacks (`report_to`: TensorBoard, W&B, MLflow); False: events.jsonl only.
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
        url: str | None = None,
        run_id: str | None = None,
        rule_set: str = "default",
        token: str | None = None,
        deadline_seconds: float = 0.5,
        metrics_port: int | None = None,
        system_every_seconds: float = 10.0,
        lr_factor_at_start: float | None = None,
        strict_preflight: bool = False,
        mask_known_bad_samples: bool = True,
        report_to_integrations: bool = True,
    ) -> None:
        self.ruleset = rules if isinstance(rules, RuleSet) else load_rules(None if rules is None else Path(rules))
        self._rules_given = rules is not None  # else the shipped rules for the trainer's method, at train begin
        self._stored: StoredMetrics | None = None  # a TRL trainer's per-batch metrics (rewards/margins, reward...)
        self.snapshot_every_steps = snapshot_every_steps
        self.snapshot_max_bytes = snapshot_max_bytes
        self.quiet_steps = quiet_steps
        self.protect_checkpoints = protect_checkpoints
        self.event_log_enabled = event_log
        self.url = url if url is not None else os.environ.get("GUARDIAN_URL") or None
        self.run_id = run_id
        self.rule_set = rule_set
        self.token = token or None  # else found when the run starts (see `_daemon_token`)
        self.deadline_seconds = deadline_seconds
        self.metrics_port = metrics_port
        self.system_every_seconds = system_every_seconds
        self.lr_factor_at_start = lr_factor_at_start
        self.strict_preflight = strict_preflight
        self.mask_known_bad_samples = mask_known_bad_samples
        self.samples: SampleTracker | None = None  # which samples each step used; bad_samples.jsonl
        self.integrations = IntegrationBridge(enabled=report_to_integrations)  # report_to's writers
        self.advice: list[Any] = []
        self.supervisor = SupervisorFile()  # under `guardian run`: what the supervisor needs to know
        self._output_dir = ""
        self.tracker = RunTracker(run_id or "embedded")
        self.metrics_server: Any = None
        self._gpus: GpuReader | None = None
        self._last_system = 0.0
        self._rank = 0
        self.engine = Engine(self.ruleset)
        self.actuator = Actuator(snapshots_kept=snapshots_kept, rollback_margin_steps=rollback_margin_steps,
                                 use_snapshots=snapshot_every_steps > 0)
        self.decisions: list[Decision] = []
        self.interventions: list[ActionEvent] = []
        self.errors = 0
        self.arbiter = VerdictArbiter(deadline_seconds=deadline_seconds)  # daemon mode: whose verdict to act on
        self.link: DaemonLink | None = None
        self._trainer: Any = None
        self._probe: StepProbe | None = None
        self._events: EventLog | None = None
        self._ended_log: Path | None = None  # where evaluations after train end are appended
        self._last_decision_step = -(10**9)
        self.sync = RankSync()
        self.reference = ReferenceBatch()
        self._probed: dict[str, float] = {}
        self._train_ended = False

    # ---- read-only views kept for callers ---------------------------------------------------------

    @property
    def remote(self) -> bool:
        """Daemon mode (on every rank: rank 0 talks to the daemon and broadcasts its verdicts)."""
        return bool(self.url)

    @property
    def counts(self) -> dict[str, int]:
        return self.actuator.counts

    @property
    def lr_scale(self) -> float:
        return self.actuator.lr_scale

    @property
    def snapshots(self) -> snapshots.SnapshotRing:
        return self.actuator.snapshots

    @property
    def verdicts(self) -> dict[str, int]:
        """Daemon mode: how often the daemon's verdict was acted on, and how often ours (the daemon was late)."""
        return self.arbiter.counts

    # ---- hooks -------------------------------------------------------------------------------------

    @_never_raises
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer = find_trainer()

    @_never_raises
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        main = bool(state.is_world_process_zero)
        show_log_lines(int(getattr(args, "process_index", 0)))
        self._trainer = self._trainer or find_trainer()
        self._choose_rules()
        self._watch_trainer(args, main)
        self._open_outputs(args, state, main)
        self.integrations.attach(self._trainer, main_process=main)
        self._resume(args, state)
        self._track_samples(args, state, kwargs)
        if self.lr_factor_at_start and optimizer is not None:
            applied = scale_lr(optimizer, lr_scheduler, self.lr_factor_at_start)
            self.actuator.lr_scale *= applied
            log.warning("Guardian: restarted with the learning rate x%.3g (now %.3g)", applied, current_lr(optimizer))
        self._tell_supervisor()
        self._rank = int(getattr(args, "process_index", 0))
        self._gpus = _gpu_reader()
        if self.metrics_port is not None and main:
            self.tracker.view.run_id = self.run_id or default_run_id(args.output_dir, getattr(args, "run_name", None))
            self.metrics_server = serve_run_metrics(self.tracker, self.engine, self.metrics_port)
        size = self._size_up_snapshots(model)
        if main:
            self.advice = preflight(args, model, self.ruleset, strict=self.strict_preflight,
                                    snapshots_enabled=self.actuator.use_snapshots,
                                    method=method_of_trainer(self._trainer) if self._trainer is not None else None,
                                    quiet=restart_number() > 0)
        if self.actuator.use_snapshots and self.actuator.snapshot(state.global_step, model, optimizer, lr_scheduler):
            self.engine.remember(state.global_step)
        self._emit_start(state, size)
        log.info("Guardian: watching with %d rules from %s", len(self.ruleset.rules), self.ruleset.source)

    @_never_raises
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        step = state.global_step + 1
        kit = (control, model, optimizer, lr_scheduler)
        if self.remote:
            self._apply_remote(step, *kit)
        self._measure_first_snapshot(state.global_step, model)
        if self._probe is None or not self._probe.wrapped:
            return  # no per-step reading (said at train begin): the rules judge what Trainer logs, in on_log
        values = self._step_values(self._probe, model, optimizer, lr_scheduler)
        self._probed = {}
        try:
            decisions = self.engine.observe(step, values, probe=lambda onset: self._measure_probe(model, onset))
        finally:  # the step's values are written whatever the engine does
            event = self._emit(MetricsEvent(step=step, phase="train", epoch=state.epoch, lr_scale=self.lr_scale,
                                            values={**values, **self._probed}))
        if not self.remote:
            self._act(step, decisions, *kit, pre_update=True)
            return
        # The daemon decides, but the update being made now cannot wait for it: skips happen here.
        early = [d for d in decisions if any(a.kind in IMMEDIATE for a in d.actions)]
        if early:
            self._act(step, early, *kit, pre_update=True, only=tuple(IMMEDIATE))
            self.arbiter.acted_early(early)
        self._await_verdict(event, step, decisions)

    def _step_values(self, probe: StepProbe, model: Any, optimizer: Any, scheduler: Any) -> dict[str, float]:
        """This step's values before its update: the probe's (over all ranks), TRL's stored metrics, the rates."""
        values = probe.read(model, self.sync.reduce_step_values if self.sync.active else None)
        if self._stored is not None:
            for key, value in self._stored.read().items():  # TRL stores them in training_step: this step's, pre-update
                values.setdefault(key, value)
        if optimizer is not None:
            values["learning_rate"] = current_lr(optimizer)
            scheduled = scheduled_lrs(scheduler, optimizer)
            if scheduled:
                values["scheduled_lr"] = scheduled[0]
        return values

    @_never_raises
    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    lr_scheduler: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if self.samples is not None:
            self.samples.end_step()
        if self.actuator.use_snapshots and step % self.snapshot_every_steps == 0 and self._healthy(step):
            if self.actuator.snapshot(step, model, optimizer, lr_scheduler, self._reference_loss(model)):
                self.engine.remember(step)
        if self._gpus is not None and time.monotonic() - self._last_system >= self.system_every_seconds:
            self._last_system = time.monotonic()
            self._emit(SystemEvent(step=step, rank=self._rank, gpus=self._gpus.read()))
        self.integrations.step_end(step, self.engine.policy.current is not None)

    @_never_raises
    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               model: Any = None, optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        if not logs or (self._probe and self._probe.wrapped) or "loss" not in logs:
            return  # with the per-step reading, every step was judged before its update already
        values = {k: float(v) for k, v in logs.items() if k in ("loss", "grad_norm") and isinstance(v, (int, float))}
        self._emit(MetricsEvent(step=state.global_step, phase="train", values=values))
        decisions = self.engine.observe(state.global_step, values)
        self._act(state.global_step, decisions, control, model, optimizer, lr_scheduler, pre_update=False)

    @_never_raises
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    model: Any = None, optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        values = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        if isinstance(state.epoch, (int, float)):
            values.setdefault("epoch", float(state.epoch))  # the overfitting rule waits for a second pass
        step = state.global_step
        kit = (control, model, optimizer, lr_scheduler)
        if self._train_ended:
            self._record_after_end(MetricsEvent(step=step, phase="eval", values=values, after_train=True))
            return
        event = self._emit(MetricsEvent(step=step, phase="eval", values=values), flush=True)
        self.actuator.remember_best(step, values.get("eval_loss"), model, optimizer, lr_scheduler)
        decisions = self.engine.observe(step, values)
        if not self.remote:
            self._act(step, decisions, *kit, pre_update=False)
            return
        self._await_verdict(event, step, decisions)
        self._apply_remote(step, *kit)  # evaluation is slow anyway: settle now

    @_never_raises
    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        # Every rank measures (the reference loss is averaged over ranks); rank 0 writes.
        probe = self._reference_loss(model) if self._healthy(step) else None
        if folder.is_dir() and state.is_world_process_zero:
            save_state(folder, self._state())
            finite = model is None or snapshots.all_finite(list(snapshots.trainable_parameters(model).values()))
            if self._healthy(step) and finite and self.actuator.good is not None:
                info = {"lr_scale": self.lr_scale, **({"probe_loss": probe} if probe is not None else {})}
                where = self.actuator.good.protect(folder, step, info)
                self._emit(CheckpointEvent(step=step, protected=str(where)), flush=True)
                self._tell_supervisor()

    @_never_raises
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._train_ended = True
        counts = self.counts
        self._emit(EndEvent(step=state.global_step, skipped_updates=counts["skipped_updates"],
                            rollbacks=counts["rollbacks"], lr_cuts=counts["lr_cuts"],
                            lr_restores=counts["lr_restores"], stops=counts["stops"],
                            masked_samples=counts.get("masked_samples", 0), decisions=len(self.decisions),
                            incidents=[i.to_dict() for i in self.engine.policy.incidents], lr_scale=self.lr_scale,
                            guardian_errors=self.errors, verdicts=dict(self.verdicts)), flush=True)
        if self.link is not None:
            self.link.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self._events:
            self._events.close()
            self._events = None
        if self.samples is not None:
            self.samples.close()
        log.info("Guardian: run ended at step %d: %d decisions, %d updates skipped, %d rollbacks, "
                 "%d LR cuts (scale %.3g)", state.global_step, len(self.decisions), self.counts["skipped_updates"],
                 self.counts["rollbacks"], self.counts["lr_cuts"], self.lr_scale)

    def _record_after_end(self, event: MetricsEvent) -> None:
        """`trainer.evaluate()` after `train()` returned: the model is the user's now. The evaluation is
        appended to the event log (opened for it and closed again) and is not shown to the rules, so nothing
        is decided or done about it; the daemon gets it with the rest of the file from `guardian push`."""
        if self._ended_log is None:
            return
        events = EventLog(self._ended_log)
        try:
            events.write(event, flush=True)
        finally:
            events.close()
        log.info("Guardian: an evaluation at step %s after training ended is recorded in %s; no rule acts on it",
                 event.step, self._ended_log)

    # ---- train begin, step by step --------------------------------------------------------------------

    def _choose_rules(self) -> None:
        """No rules given: the shipped ones for the trainer's method (DPO family: + preference.yaml; GRPO/PPO:
        rl.yaml)."""
        method = method_of_trainer(self._trainer) if self._trainer is not None else None
        if not self._rules_given and method in METHOD_RULES:
            self.ruleset = shipped_rules_for(method)
            self.engine = Engine(self.ruleset)

    def _watch_trainer(self, args: Any, main: bool) -> None:
        """Hook into the trainer: the per-step reading, the ranks, and what the actuator needs to act."""
        self._stored = StoredMetrics(self._trainer) if self._trainer is not None else None
        self._train_ended = False
        self.reference = ReferenceBatch()
        self._probe = StepProbe(self._trainer, reference=self.reference)
        if not self._probe.reading.pre_update and main:
            log.warning(self._probe.reading.warning())
        self.sync = RankSync()
        self.actuator.in_process_rollback = not _sharded(self._trainer)
        self.actuator.scaler = getattr(getattr(self._trainer, "accelerator", None), "scaler", None)
        clip = getattr(args, "max_grad_norm", None)
        self.engine.clipped = isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0
        self.actuator.good = checkpoints.GoodCheckpoints(args.output_dir, keep=self.protect_checkpoints)
        if main:
            self.actuator.restart_request = Path(args.output_dir) / "guardian" / "restart_request.json"

    def _open_outputs(self, args: Any, state: Any, main: bool) -> None:
        """Rank 0: the event file, and in daemon mode the link to the daemon (which spools from that file)."""
        events_path = Path(args.output_dir) / "guardian" / "events.jsonl"
        if main and (self.event_log_enabled or self.url):
            self._events = EventLog(events_path)
            self._ended_log = events_path
        if main and self.url:
            self.run_id = self.run_id or default_run_id(args.output_dir, getattr(args, "run_name", None))
            meta = {"output_dir": os.path.abspath(args.output_dir), "max_steps": state.max_steps,
                    "host": socket.gethostname(), "pid": os.getpid()}
            self.token = self.token or _daemon_token(self.url)
            self.link = DaemonLink(self.url, self.run_id, rules=self.rule_set, meta=meta, token=self.token,
                                   spool=events_path, run_key_dir=events_path.parent)
            log.info("Guardian: reporting run %s to %s", self.run_id, self.url)
        self.arbiter.link, self.arbiter.deadline_seconds = self.link, self.deadline_seconds
        self._output_dir = os.path.abspath(args.output_dir)

    def _size_up_snapshots(self, model: Any) -> int:
        """The trainable weights' size in bytes; over `snapshot_max_bytes`, rollbacks use checkpoints only."""
        size = snapshots.trainable_nbytes(model)
        if self.actuator.use_snapshots and size > self.snapshot_max_bytes:
            self.actuator.use_snapshots = False
            log.warning("Guardian: trainable weights are %.1f GB, over snapshot_max_bytes; rollbacks will use "
                        "good checkpoints on disk only", size / 1e9)
        return size

    def _emit_start(self, state: Any, trainable_bytes: int) -> None:
        """The start event: the rules, how each step is read, and (daemon mode) the run's id and rule set."""
        reading = self._probe.reading if self._probe is not None else None
        self._emit(StartEvent(step=state.global_step, rules=[r.name for r in self.ruleset.rules],
                              source=self.ruleset.source, trainable_bytes=trainable_bytes,
                              max_steps=state.max_steps, clipped=self.engine.clipped,
                              pre_update=reading.pre_update if reading else None,
                              grad_norm_from=reading.grad_norm if reading else None,
                              pre_update_why=(reading.why or None) if reading else None,
                              # so `guardian push` can deliver the file later
                              run_id=self.run_id if self.link else None, rule_set=self.rule_set if self.link else None),
                   flush=True)

    # ---- the daemon's verdicts ---------------------------------------------------------------------

    def _await_verdict(self, event: AnyEvent | None, step: int, local: list[Decision]) -> None:
        """Rank 0: the daemon's verdict on this step is settled before the next update."""
        if event is not None:
            self.arbiter.await_verdict(event.seq, step, local)

    def _apply_remote(self, step: int, control: Any, model: Any, optimizer: Any, scheduler: Any) -> None:
        """Act on the daemon's verdicts for earlier steps (or our own past the deadline) and its commands.

        Rank 0 talks to the daemon; under DDP it broadcasts the resulting plan, so every rank applies it."""
        verdict = self.arbiter.settle(step)
        plan, onset = verdict.plan, verdict.onset_step
        if self.sync.active:
            device = next(model.parameters()).device if model is not None else torch.device("cpu")
            plan, onset = self.sync.broadcast_plan(plan, onset, device)
        if plan is None:
            return
        self._last_decision_step = step
        for decision in verdict.decisions:
            self._record(decision, verdict.source)
        if plan.empty:
            return
        outcome = self.actuator.carry_out(plan, step, onset, control, model, optimizer, scheduler, pre_update=True)
        commands = verdict.commands
        rules = [d.rule for d in verdict.decisions] + [f"manual:{c.action.value}" for c in commands]
        source = "command" if commands and not verdict.decisions else verdict.source
        self._log_outcome(outcome.event(step, rules, source, [c.id for c in commands] if commands else None))

    # ---- acting ------------------------------------------------------------------------------------

    def _act(self, step: int, decisions: list[Decision], control: Any, model: Any, optimizer: Any, scheduler: Any,
             *, pre_update: bool, only: tuple[ActionKind, ...] = (), skip_kinds: tuple[ActionKind, ...] = (),
             source: str = "local") -> None:
        if not decisions:
            return
        self._last_decision_step = step
        for decision in decisions:
            self._record(decision, source)
        actions = [a for d in decisions for a in d.actions
                   if (not only or a.kind in only) and a.kind not in skip_kinds]
        plan = merge(actions)
        if plan.empty:
            return
        onset = min(d.finding.onset_step for d in decisions)
        outcome = self.actuator.carry_out(plan, step, onset, control, model, optimizer, scheduler,
                                          pre_update=pre_update)
        if outcome.skipped_update:
            self._flag_samples(step, decisions)
        if outcome:
            self._log_outcome(outcome.event(step, [d.rule for d in decisions], source))

    def _record(self, decision: Decision, source: str) -> None:
        self.decisions.append(decision)
        if self.sync.rank == 0:
            (log.error if decision.severity.value == "critical" else log.warning)("Guardian: %s", decision.message)
        self._emit(decision.to_event(source), flush=True)
        self.integrations.decision(decision)

    def _log_outcome(self, record: ActionEvent) -> None:
        if record.rollback == "restart":
            self._tell_supervisor()
        if record.rollback is not None and record.rollback_to_step is not None:
            self._rewind(record.rollback, record.rollback_to_step)
        self.interventions.append(record)
        if self.sync.rank == 0:
            log.warning("Guardian: step %d: %s", record.step, record.outcome.describe())
        self._emit(record, flush=True)
        self.integrations.action(record, self.counts, self.lr_scale)

    # ---- the samples of skipped updates ------------------------------------------------------------

    @_never_raises
    def _track_samples(self, args: Any, state: Any, kwargs: dict[str, Any]) -> None:
        """Record which samples each step uses; mask those that an earlier run in this folder named as bad."""
        trainer = self._trainer
        tokenizer = (kwargs.get("processing_class") or getattr(trainer, "processing_class", None)
                     or getattr(trainer, "tokenizer", None)
                     or getattr(getattr(trainer, "data_collator", None), "tokenizer", None))
        resumed = resumed_from()
        self.samples = SampleTracker(
            args.output_dir, rank=self.sync.rank, world_size=self.sync.world_size, tokenizer=tokenizer,
            mask_known_bad=self.mask_known_bad_samples, counts=self.actuator.counts,
            also_read=[bad_samples_path(d) for d in run_dirs_of(resumed)] if resumed else ())
        self.samples.attach(kwargs.get("train_dataloader"))
        if self._probe is not None and self._probe.wrapped:
            self._probe.on_inputs = self.samples.see
        if self.samples.known_bad and state.is_world_process_zero:
            log.warning("Guardian: %d samples known bad from an earlier run will be masked (%s)",
                        len(self.samples.known_bad), self.samples.path)

    @_never_raises
    def _flag_samples(self, step: int, decisions: list[Decision]) -> None:
        """This step's update is skipped: write its samples down, unless no rule about the data asked for it
        (every rank joins; rank 0 writes)."""
        about_data = [d for d in decisions if d.finding.metric not in NOT_ABOUT_THE_DATA
                      and any(a.kind is ActionKind.SKIP_UPDATE for a in d.actions)]  # a rollback blames the weights
        if self.samples is None or not about_data:
            return
        incident = next((d.incident for d in about_data if d.incident is not None), None)
        named = self.samples.flag(step, [d.rule for d in about_data], incident)
        if named and self.sync.rank == 0:
            log.warning("Guardian: step %d: its %d samples are listed in %s", step, len(named), self.samples.path)

    # ---- bookkeeping -------------------------------------------------------------------------------

    def _healthy(self, step: int) -> bool:
        """No rule fired lately: a snapshot or checkpoint now is good (a rollback target is also checked
        against the reference batch before it is used)."""
        return step - self._last_decision_step > self.quiet_steps

    def _rewind(self, source: str, step: int) -> None:
        """The rules' baselines follow the weights back to `step` (from memory, or the checkpoint's state)."""
        saved = saved_engine_state(source) if source != "memory" else None
        if not self.engine.rewind(step, saved):
            log.info("Guardian: rules that follow the loss level start afresh after the rollback to step %d", step)

    def _reference_loss(self, model: Any) -> float | None:
        """The reference batch's loss with the current weights (all ranks together), or None."""
        if model is None or not self.reference.ready or not self.actuator.in_process_rollback:
            return None
        reduce = self.sync.reduce_mean if self.sync.active else None
        return self.reference.loss(model, reduce)

    def _measure_first_snapshot(self, step: int, model: Any) -> None:
        """The snapshot taken at train begin, before any batch was seen, gets its reference loss at the first
        step, before the first update: the weights are still the snapshot's."""
        snaps = self.actuator.snapshots.all()
        if snaps and snaps[-1].probe_loss is None and snaps[-1].step == step and self.reference.ready:
            snaps[-1].probe_loss = self._reference_loss(model)

    def _measure_probe(self, model: Any, onset: int) -> dict[str, float]:
        """For the engine, when a rule fires: the reference batch's loss now and with the rollback target."""
        target = self.actuator.target(onset)
        if target is None or target.probe_loss is None:
            return {}
        now = self._reference_loss(model)
        if now is None:
            return {}
        self._probed = {"probe_loss": now, "probe_loss_ref": target.probe_loss}
        return self._probed

    def _emit(self, event: AnyEvent, *, flush: bool = False) -> AnyEvent | None:
        if self.metrics_server is not None:
            self.tracker.apply(events.numbered(event, event.seq, time.time()))
        if self._events is None:
            return None
        event = self._events.write(event, flush=flush)
        if self.link is not None:
            self.link.send(event)
        return event

    def _state(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict(), "lr_scale": self.lr_scale, "counts": self.counts}

    def _tell_supervisor(self) -> None:
        """Under `guardian run` (rank 0): where the run writes, its good checkpoints, and any restart request."""
        if self.sync.rank == 0:
            self.supervisor.tell(self._output_dir, self.actuator.good, self.actuator.restart_request)

    def _resume(self, args: Any, state: Any) -> None:
        if state.global_step == 0:
            return
        found = saved_state_for_resume(args.output_dir, state.global_step)
        if found is None:
            return
        saved, data = found
        try:
            self.engine.load_state_dict(data["engine"])
        except (KeyError, ValueError) as exc:
            log.warning("Guardian: %s: could not restore rule state (%s); rules start fresh", saved, exc)
        self.actuator.lr_scale = float(data.get("lr_scale", 1.0))
        self.actuator.counts.update(data.get("counts", {}))
        log.info("Guardian: resumed rule state from %s", saved)


def show_log_lines(rank: int = 0) -> None:
    """Make Guardian's log lines ("watching with N rules", "run ended ...") visible in the training process.

    When the process has logging of its own (a handler on the root logger or on `guardian`), they go there.
    When it has none (a script that configured no logging, the child of `guardian run`), Python would drop
    every line below WARNING: one handler on stderr shows them, INFO and up on rank 0 and WARNING and up on the
    other ranks, and the lines do not also go to a root handler added later (no line twice)."""
    logger = logging.getLogger("guardian")
    if logger.hasHandlers():
        return
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(logging.Formatter("%(message)s"))  # the lines name Guardian themselves
    logger.addHandler(handler)
    logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _daemon_token(url: str) -> str | None:
    """`GUARDIAN_TOKEN`, else the daemon's token file; None (said loudly: the daemon refuses every report
    without it) when neither is there. Training goes on either way, with local verdicts."""
    token, where = find_token()
    if token is None:
        log.warning("Guardian: no token for the daemon at %s: %s. The daemon refuses reports without it, so this "
                    "run's steps are judged locally only. Set %s, or GUARDIAN_HOME to the daemon's state folder "
                    "(its token file is %s)", url, where, TOKEN_ENV, token_path(default_state_dir()))
    return token


def _sharded(trainer: Any) -> bool:
    """FSDP or DeepSpeed: the state is sharded across ranks, so rollback goes through a supervised restart."""
    return bool(trainer is not None and (getattr(trainer, "is_fsdp_enabled", False)
                                         or getattr(trainer, "is_deepspeed_enabled", False)))


def _gpu_reader() -> GpuReader | None:
    """NVML for this process's GPU, or None on a machine without one."""
    if not torch.cuda.is_available():
        return None
    props: Any = torch.cuda.get_device_properties(torch.cuda.current_device())
    try:  # NVML numbers GPUs differently from CUDA under CUDA_VISIBLE_DEVICES: match by PCI bus id
        reader = GpuReader([f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"])
    except AttributeError:
        reader = GpuReader()
    return reader if reader.available else None
