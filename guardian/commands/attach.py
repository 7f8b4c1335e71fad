"""`guardian attach OUTPUT_DIR`: follow a run that was started without Guardian, from its files on disk.

Watches the output directory (watchdog, recursive; a timed re-scan as a safety net) and reads what the
run writes:

* LLaMA-Factory's `trainer_log.jsonl`, from the last offset on; a half-written last line waits until its
  newline arrives. A file that shrinks or is replaced (another inode) is read again from the start, as a
  resume. Records are assembled as `guardian.logs.training` assembles them: several writers, the first record per
  step wins, and a step that no writer can continue is a resume.
* Otherwise (plain Hugging Face runs) each `checkpoint-*/trainer_state.json` as it appears: the entries
  of its `log_history` beyond what was fed already. A history that differs from what was fed is a resume.

The source is chosen when the first log appears: `trainer_log.jsonl` if it exists then (it is written at
every logging step), else the checkpoints. Checkpoints are always watched, as resume points.

LLaMA-Factory's log has no grad_norm: each line takes its step's from the newest trainer_state.json in the
output directory or a checkpoint (written at each save) when one already holds that step. Live, a line comes
before the checkpoint that holds its grad norm: when that checkpoint appears, the rules judge the history again
with the grad norms, and report the decisions only they bring (with their own steps, up to `save_steps` late; a
checkpoint marked good meanwhile whose steps they fall on is unmarked). The summary says how many grad norms
came late, and names the rules that could not fire for lack of a metric.

Every observation goes through the rules (`--rules FILE`, default the shipped ones). Warm-ups that count
observations (robust_zscore's `warmup_steps`, threshold's `relative_to_first_steps`) mean steps in-process,
where every step is observed, but log lines here: from the second train line on (the log's interval known)
they are scaled to last about as many steps (`for_log_interval`). Each decision is
printed on one line and written, with the metrics, to `<output_dir>/guardian/events.jsonl` (kinds
`metrics`, `decision`, `action`, `checkpoint`, `start`, `end`, each with `"source": "attach"`); with
`--url` the same events stream to the daemon, so the run shows in `guardian runs` and on its /metrics.

On a resume the rules go back to their state just before the resume step (as an in-process Guardian
restores its state from the checkpoint it resumes from), so the decisions from then on are the ones
`guardian replay` gives on the whole log (with the rules `for_log_interval` gives). Decisions already
made about the abandoned steps stay in the event file, before the `start` event (with `"resumed": true`)
that marks the resume. A daemon's engine is not rewound: it sees the observations in the order they came.

What can be done from outside the training process, and what cannot:

* skip_update, rollback, reduce_lr and stop(restore_best) need the Trainer's objects in its own process;
  attach reports them, it cannot carry them out. Use `GuardianCallback` for those.
* Stopping: with `--pid PID` (the training process, or its launcher: torchrun and accelerate pass the
  signal on to their workers) a decision that calls for a stop sends `--stop-signal` (SIGTERM by default;
  SIGINT makes Python raise KeyboardInterrupt inside the Trainer) once. The decisions that call for a stop
  are those of the rules named with `--stop-on RULE`, or by default every critical decision and every
  decision asking for stop or rollback. Without `--pid` nothing is ever signalled. The process ends
  without saving: the work since its last checkpoint is lost.
* Good checkpoints: a checkpoint is marked good when every step since the checkpoint before it (and at
  least the `--quiet-steps` steps, 10, up to its step) has a train line in the log and no rule fired in
  them: `checkpoint-N/guardian_good.json` is written, and `<output_dir>/guardian/last_good_checkpoint`
  holds its path (both atomically). A log with a line every k > 1 steps cannot show the steps between
  (their loss is averaged into the next line, NaNs left out): no checkpoint is marked good, and attach
  says why. On a decision that calls for a stop, attach
  prints the newest good checkpoint from before the anomaly's onset, to restart with
  `--resume_from_checkpoint PATH`. It cannot keep `save_total_limit` rotation from deleting that
  checkpoint (the in-process callback hard-links good checkpoints to keep them).
* Attach sees only what is written: a decision comes after the log line (every `logging_steps`) or the
  checkpoint (every `save_steps`) that shows the anomaly, and several steps of training may pass before
  the signal lands. Trainer's logged loss is an average over `logging_steps`, and with
  `logging_nan_inf_filter=True` (the default) NaN losses are left out of it.
* Attaching again to the same directory records (and sends to the daemon) the whole history again.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from guardian.commands.checkpointjudge import GOOD_MARK, STATE, CheckpointJudge
from guardian.commands.eventsink import EventSink
from guardian.engine.actions import ActionKind
from guardian.engine.engine import Decision, Engine
from guardian.engine.rules import RuleSet
from guardian.errors import ConfigError
from guardian.events import ActionOutcome, EndEvent, MetricsEvent, Severity, StartEvent
from guardian.logs.tail import JsonlTail
from guardian.logs.training import (
    TRAIN,
    Assembler,
    Observation,
    Record,
    assemble,
    jsonl_ends_run,
    jsonl_records,
    observation_order,
    read_trainer_state,
    trainer_state_ends_run,
)
from guardian.transport.client import DaemonLink
from guardian.transport.runid import default_run_id

JSONL = "trainer_log.jsonl"
# The warm-ups that count observations, by detector (the other warm-ups compare a step number).
_WARMUPS_COUNT_OBSERVATIONS = {"robust_zscore": "warmup_steps", "threshold": "relative_to_first_steps"}
MIN_WARMUP_LINES = 5  # however sparse the log, a median and its spread need a few values


def parse_signal(text: str) -> signal.Signals:
    """A signal from its name (TERM, SIGTERM, int) or number."""
    name = text.strip().upper()
    try:
        return signal.Signals(int(name)) if name.isdigit() else signal.Signals["SIG" + name.removeprefix("SIG")]
    except (KeyError, ValueError):
        raise ConfigError(f"--stop-signal {text!r} is not a signal; use TERM, INT, KILL or a number") from None


# --- reading ---------------------------------------------------------------------------------------------


def for_log_interval(ruleset: RuleSet, interval_steps: int) -> tuple[RuleSet, list[str]]:
    """The rules as they apply to a log with a line every `interval_steps` steps, and what changed.

    A warm-up that counts observations means steps in-process (the callback observes every step) but log
    lines here: at `logging_steps: 5` loss_spike's 20 would last 100 steps, longer than many short runs.
    Such warm-ups become `warmup_steps / interval_steps` lines (at least MIN_WARMUP_LINES, at most what they were),
    so they last about as many steps as the rule says. Windows, consecutive counts and step-based warm-ups
    are left as they are (on the real logs in the fixtures this changes no decision)."""
    if interval_steps <= 1:
        return ruleset, []
    rules, notes = [], []
    for rule in ruleset.rules:
        param = _WARMUPS_COUNT_OBSERVATIONS.get(rule.detector)
        if param is not None:
            warmup = int(getattr(rule.build_detector(), param))
            lines = min(warmup, max(MIN_WARMUP_LINES, math.ceil(warmup / interval_steps)))
            if lines != warmup:
                rule = dataclasses.replace(rule, params={**rule.params, param: lines})
                notes.append(f"{rule.name} {warmup} -> {lines} lines ({lines * interval_steps} steps)")
        rules.append(rule)
    return dataclasses.replace(ruleset, rules=tuple(rules)), notes


def log_interval(observations: Iterable[Observation]) -> int | None:
    """Steps between the first two train observations (the log's logging_steps), None before there are two."""
    steps = [o.step for o in observations if o.phase == TRAIN][:2]
    return steps[1] - steps[0] if len(steps) == 2 and steps[1] > steps[0] else None


def _same(a: Observation, b: Observation) -> bool:
    """Equal observations, NaN equal to NaN."""
    if (a.step, a.phase) != (b.step, b.phase) or a.metrics.keys() != b.metrics.keys():
        return False
    pairs = ((a.metrics[key], b.metrics[key]) for key in a.metrics)
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in pairs)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


@dataclass(frozen=True)
class StopPolicy:
    """Which decisions call for stopping the run, and which process gets which signal."""

    pid: int | None = None
    stop_signal: signal.Signals = signal.SIGTERM
    rules: frozenset[str] = frozenset()  # empty: critical decisions and those asking for stop or rollback

    def wants_stop(self, decision: Decision) -> bool:
        if self.rules:
            return decision.rule in self.rules
        strong = any(a.kind in (ActionKind.STOP, ActionKind.ROLLBACK) for a in decision.actions)
        return strong or decision.severity is Severity.CRITICAL


# --- the follower ------------------------------------------------------------------------------------------


class Follower:
    """Follows one output directory: reads what is new, feeds the rules, records, marks and stops.

    `poll()` does one pass; the caller decides when (on file events, on a timer, or once)."""

    def __init__(self, output_dir: str | os.PathLike[str], ruleset: RuleSet, sink: EventSink, *,
                 policy: StopPolicy = StopPolicy(), quiet_steps: int = 10, out: TextIO | None = None,
                 kill: Callable[[int, int], None] = os.kill) -> None:
        self.output_dir = Path(os.path.abspath(output_dir))
        self.ruleset, self.sink, self.policy, self.quiet_steps = ruleset, sink, policy, quiet_steps
        self.out, self.kill = out or sys.stdout, kill
        self.rules_in_use = ruleset  # the rules with warm-ups scaled to the log's interval, once it is known
        self.engine = Engine(ruleset)
        self.interval_steps: int | None = None  # steps between log lines
        self.source: str | None = None
        self.resumes = self.late = self.skipped_lines = 0
        self.signalled = False
        self.log_ended = self.process_gone = False
        self._fed: list[Observation] = []
        self._decided: list[tuple[int, Decision]] = []  # (index in _fed of the observation, decision)
        self._tail = JsonlTail(self.output_dir / JSONL)
        self._assembler = Assembler()
        self._state_seen: dict[Path, tuple[int, int, int]] = {}
        self.checkpoints = CheckpointJudge(self.output_dir, quiet_steps=quiet_steps, rules_source=ruleset.source,
                                           emit=lambda event: self.sink.emit(event, flush=True), say=self._say)
        self._grad_norms: dict[int, float] = {}  # step -> grad_norm from a trainer_state.json, for a jsonl log
        self._grad_file: tuple[Path, tuple[int, int, int]] | None = None
        self._grad_used: dict[int, float] = {}  # the grad norms given to the rules, by step
        self._grad_late = 0  # of those, the ones that came after their line had been judged without them

    # ---- views ------------------------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.log_ended or self.process_gone

    @property
    def last_step(self) -> int | None:
        return self._fed[-1].step if self._fed else None

    @property
    def decisions(self) -> list[Decision]:
        """The decisions about the run as it stands (those about abandoned steps of a resume left out)."""
        return [d for _, d in self._decided]

    @property
    def observations(self) -> list[Observation]:
        return list(self._fed)

    @property
    def last_good(self) -> Path | None:
        return self.checkpoints.last_good

    # ---- one pass ---------------------------------------------------------------------------------------

    def poll(self) -> None:
        self.checkpoints.discover()
        if self.source is None:
            self._choose_source()
        if self.source == JSONL:
            self._read_jsonl()
        elif self.source == STATE:
            self._read_states()
        self.checkpoints.discover()  # again: a resume forgets the checkpoints from its step on
        if self.last_step is not None:
            self._judge(self.last_step)
        if self.policy.pid is not None and not self.process_gone and not process_alive(self.policy.pid):
            self.process_gone = True
            self._say(f"the training process {self.policy.pid} has exited")
        self.sink.flush()

    def finish(self) -> None:
        """Judge what is left to judge, record the end if the run ended, and print a summary."""
        pending = self.checkpoints.newest_pending_step
        if pending is not None and self.last_step is not None:
            self._judge(pending if self.ended else self.last_step)
        if self.ended and self.source is not None:
            self.sink.emit(EndEvent(step=self.last_step, decisions=len(self._decided), resumes=self.resumes),
                           flush=True)
        if not self._fed:
            self._say("attach: nothing read yet")
            return
        notes = [f"{len(self._fed)} observations to step {self.last_step}", f"{len(self._decided)} decisions"]
        notes += [f"{self.resumes} resume(s)"] if self.resumes else []
        notes += [f"{self.late} late records skipped"] if self.late else []
        notes += [f"{self.skipped_lines} unreadable lines skipped"] if self.skipped_lines else []
        good = f"; last good checkpoint: {self.last_good}" if self.last_good else ""
        self._say(f"attach: {', '.join(notes)}{good}")
        if self._grad_used and self._grad_file is not None:
            late = (f" ({self._grad_late} after their line, when the checkpoint holding them was saved: the rules "
                    "judged those steps again then)") if self._grad_late else ""
            self._say(f"attach: grad_norm for {len(self._grad_used)} of {sum(o.phase == TRAIN for o in self._fed)} "
                      f"logged steps read from {self._grad_file[0].relative_to(self.output_dir)}{late}")
        for line in self.rules_that_cannot_fire():
            self._say(line)

    def rules_that_cannot_fire(self) -> list[str]:
        """One line per missing metric: the rules that watch only metrics the log never gave."""
        seen = {key for obs in self._fed for key in self._metrics(obs)}
        lacking: dict[str, list[str]] = {}
        for rule in self.rules_in_use.rules:
            if seen.isdisjoint(rule.watches):
                lacking.setdefault(", ".join(rule.watches), []).append(rule.name)
        return [f"attach: cannot fire for lack of {metrics} in the log: {', '.join(names)}"
                for metrics, names in lacking.items()]

    # ---- sources ----------------------------------------------------------------------------------------

    def _choose_source(self) -> None:
        if (self.output_dir / JSONL).is_file():
            self.source = JSONL
        elif self._state_files():
            self.source = STATE
        else:
            return
        what = JSONL if self.source == JSONL else "checkpoint-*/trainer_state.json"
        self._say(f"attach: following {self.output_dir / what} with {len(self.ruleset.rules)} rules "
                  f"from {self.ruleset.source}")
        self.sink.emit(StartEvent(output_dir=str(self.output_dir), log=what, rule_file=self.ruleset.source,
                                  rules=[r.name for r in self.ruleset.rules]), flush=True)

    def _read_jsonl(self) -> None:
        self._load_grad_norms()
        read = self._tail.read()
        if read.restarted:
            self._say(f"{JSONL} was truncated or replaced: reading it again from the start")
            self._assembler = assemble(r for line in read.lines for r in (jsonl_records(line) or []))
            self._sync(self._assembler.observations(), shorter_is_resume=True, why=f"{JSONL} was rewritten")
            self.log_ended = any(jsonl_ends_run(line) for line in read.lines)
            return
        for line in read.lines:
            if not line.strip():
                continue
            parsed = jsonl_records(line)
            if parsed is None:
                self.skipped_lines += 1
                continue
            for record in parsed:
                self._add_record(record)
            self.log_ended = self.log_ended or jsonl_ends_run(line)

    def _add_record(self, record: Record) -> None:
        """One jsonl record through the shared assembler: a duplicate is dropped, a restart is a resume."""
        obs = record.observation
        placed = self._assembler.add(record)
        if placed.restarted:
            keep = sum(1 for o in self._fed if o.step < obs.step)
            previous = self.last_step
            self._resume(keep, obs.step, f"{JSONL} went back from step {previous} to {obs.step}")
        if not placed.kept:
            return  # a duplicate: the first record of a step wins
        if self._fed and observation_order(obs) <= observation_order(self._fed[-1]):
            self.late += 1  # kept by the reader, but after later steps were fed: the rules saw their moment pass
            return
        self._feed(obs)

    def _load_grad_norms(self) -> None:
        """The grad norms in the newest trainer_state.json (the output directory's, or a checkpoint's), which
        LLaMA-Factory writes beside its trainer_log.jsonl at every save; they join the lines of their steps."""
        newest: tuple[int, Path, tuple[int, int, int]] | None = None
        for path in self._state_files():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if newest is None or st.st_mtime_ns > newest[0]:
                newest = (st.st_mtime_ns, path, (st.st_ino, st.st_size, st.st_mtime_ns))
        if newest is None or (self._grad_file is not None and self._grad_file == newest[1:]):
            return
        state = read_trainer_state(newest[1])
        if state is None:
            return  # half-written: read again on the next pass
        history = state[0]
        self._grad_file = (newest[1], newest[2])
        self._grad_norms = {o.step: o.metrics["grad_norm"] for o in history
                            if o.phase == TRAIN and "grad_norm" in o.metrics}
        self._judge_late_grad_norms()

    def _judge_late_grad_norms(self) -> None:
        """Lines fed before a trainer_state.json held their grad_norm (following a live log, each line comes
        before the checkpoint that holds it): the rules judge the whole history again with them, as they
        would have with the grad norms in the lines, and the decisions that only the grad norms bring are
        reported now, with their own steps (up to `save_steps` late)."""
        late = {o.step: self._grad_norms[o.step] for o in self._fed
                if o.phase == TRAIN and "grad_norm" not in o.metrics and o.step not in self._grad_used
                and o.step in self._grad_norms}
        if not late:
            return
        self._grad_used.update(late)
        self._grad_late += len(late)
        before = {(i, d.rule, d.step) for i, d in self._decided}
        self.engine = Engine(self.rules_in_use)
        self._decided = [(i, d) for i, obs in enumerate(self._fed)
                         for d in self.engine.observe(obs.step, self._metrics(obs))]
        new = [d for i, d in self._decided if (i, d.rule, d.step) not in before]
        for decision in new:
            self._report(decision, late=True)
        if not new:
            return
        self.checkpoints.unmark(new)  # marked good before these steps' grad norms were known
        self._act(max(d.step for d in new), new)

    def _state_files(self) -> list[Path]:
        files = [p for p in self.output_dir.glob(f"checkpoint-*/{STATE}") if p.parent.name[11:].isdigit()]
        root = self.output_dir / STATE
        return files + [root] if root.is_file() else files

    def _read_states(self) -> None:
        """Each trainer_state.json that is new or changed, oldest first."""
        changed = []
        for path in self._state_files():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._state_seen.get(path) != signature:
                changed.append((st.st_mtime_ns, path, signature))
        for _, path, signature in sorted(changed):
            state = read_trainer_state(path)
            if state is None:
                continue  # half-written: read again on the next pass
            history, doc = state
            self._state_seen[path] = signature
            self._sync(history, shorter_is_resume=False,
                       why=f"{path.relative_to(self.output_dir)} holds another history (a resumed run)")
            self.log_ended = self.log_ended or trainer_state_ends_run(doc)

    def _sync(self, history: list[Observation], *, shorter_is_resume: bool, why: str) -> None:
        """Bring what was fed in line with a whole history: feed what is new, or resume where it differs."""
        fed = self._fed
        i = 0
        while i < min(len(fed), len(history)) and _same(fed[i], history[i]):
            i += 1
        if i < len(fed):
            if i == len(history) and not shorter_is_resume:
                return  # an older checkpoint's history: nothing new in it
            if i == len(history) or observation_order(history[i]) <= observation_order(fed[-1]):
                step = min(fed[i].step, history[i].step) if i < len(history) else fed[i].step
                self._resume(i, step, why)
            # else: the history goes on after what was fed (its beginning is gone): not a resume
        for obs in history[i:]:
            self._feed(obs)

    # ---- feeding and deciding ---------------------------------------------------------------------------

    def _feed(self, obs: Observation) -> None:
        self._judge(obs.step - 1)  # checkpoints before this step are judged on what was known at their step
        if self.interval_steps is None and obs.phase == TRAIN:
            self._learn_interval(obs)
        if self.source == JSONL and obs.phase == TRAIN and "grad_norm" not in obs.metrics:
            self._grad_used.pop(obs.step, None)  # an abandoned run's, at the same step
            grad = self._grad_norms.get(obs.step)
            if grad is not None:
                self._grad_used[obs.step] = grad
        metrics = self._metrics(obs)
        decisions = self.engine.observe(obs.step, metrics)
        self._fed.append(obs)
        self.sink.emit(MetricsEvent(step=obs.step, phase=obs.phase, values=metrics))
        for decision in decisions:
            self._decided.append((len(self._fed) - 1, decision))
            self._report(decision)
        if decisions:
            self._act(obs.step, decisions)

    def _metrics(self, obs: Observation) -> dict[str, float]:
        """What the rules get for an observation: a jsonl line's metrics with the grad norm that a
        trainer_state.json gave for its step (LLaMA-Factory's log has none)."""
        grad = self._grad_used.get(obs.step) if obs.phase == TRAIN else None
        return obs.metrics if grad is None or "grad_norm" in obs.metrics else {**obs.metrics, "grad_norm": grad}

    def _learn_interval(self, obs: Observation) -> None:
        """At the second train line: the log's interval; warm-ups that count lines are scaled to it, and the
        rules see the first line again (no warm-up ends within it, so no decision about it changes)."""
        interval = log_interval([*self._fed, obs])
        if interval is None:
            return
        self.interval_steps = interval
        scaled, notes = for_log_interval(self.ruleset, interval_steps=interval)
        if not notes:
            return
        self.rules_in_use = scaled
        self.engine = Engine(scaled)
        for earlier in self._fed:
            self.engine.observe(earlier.step, self._metrics(earlier))
        self._say(f"attach: the log has a line every {interval} steps; warm-ups that count lines are scaled to "
                  f"last as many steps: {'; '.join(notes)}")

    def _resume(self, keep: int, step: int, why: str) -> None:
        """The run went back to `step`: the first `keep` observations stand, the rules return to their state."""
        replaced = len(self._fed) - keep
        dropped = sum(1 for i, _ in self._decided if i >= keep)
        self._fed = self._fed[:keep]
        self._decided = [(i, d) for i, d in self._decided if i < keep]
        self.engine = Engine(self.rules_in_use)
        for obs in self._fed:
            self.engine.observe(obs.step, self._metrics(obs))
        self.resumes += 1
        self.log_ended = False
        self.checkpoints.forget_from(step)
        since = f"their state at step {self.last_step}" if self._fed else "scratch"
        extra = f"; {dropped} decisions made about the abandoned steps no longer count" if dropped else ""
        self._say(f"resume at step {step}: {why}; {replaced} observations from step {step} on are replaced and "
                  f"the rules continue from {since}{extra}")
        self.sink.emit(StartEvent(step=step, resumed=True, reason=why, replaced_observations=replaced,
                                  dropped_decisions=dropped), flush=True)

    def _report(self, decision: Decision, *, late: bool = False) -> None:
        actions = ", ".join(map(str, decision.actions)) or "none"
        when = " (judged late: its grad_norm came with a checkpoint)" if late else ""
        self._say(f"step {decision.step:>7}  {decision.rule:<22} {decision.severity.value:<8} {actions:<28} "
                  f"{decision.finding.message}{when}")
        self.sink.emit(decision.to_event(late=late), flush=True)

    def _act(self, step: int, decisions: list[Decision]) -> None:
        """What can be done from outside: point at a good checkpoint and, with a pid, stop the run."""
        stopping = [d for d in decisions if self.policy.wants_stop(d)]
        if not stopping:
            return
        onset = min(d.finding.onset_step for d in stopping)
        good = self.checkpoints.resume_point(before=onset)
        outcome = ActionOutcome(stopped=False, resume_from=None if good is None else str(good))
        if good is not None:
            self._say(f"  resume from the last good checkpoint before step {onset}: --resume_from_checkpoint {good}")
        else:
            self._say(f"  no good checkpoint from before step {onset} is known")
        if self.policy.pid is None:
            self._say("  not stopping the run: no --pid given")
        elif self.signalled:
            outcome = msgspec.structs.replace(outcome, already_signalled=True)
        else:
            outcome = self._signal(outcome)
        self.sink.emit(outcome.event(step, [d.rule for d in stopping]), flush=True)

    def _signal(self, outcome: ActionOutcome) -> ActionOutcome:
        """Send the stop signal once; `outcome` with what came of it."""
        pid, sig = self.policy.pid, self.policy.stop_signal
        assert pid is not None  # checked by the caller
        try:
            self.kill(pid, sig)
        except OSError as exc:
            self._say(f"  could not send {sig.name} to process {pid}: {exc}")
            return msgspec.structs.replace(outcome, signal_error=f"{sig.name} to {pid}: {exc}")
        self.signalled = True
        self._say(f"  sent {sig.name} to process {pid} to stop the run")
        return msgspec.structs.replace(outcome, stopped=True, signal=sig.name, pid=pid)

    def resume_point(self, before: int) -> Path | None:
        """The newest checkpoint marked good, still on disk, from before step `before`."""
        return self.checkpoints.resume_point(before)

    def _judge(self, through: int) -> None:
        """Judge the checkpoints up to step `through` on what was fed and decided."""
        self.checkpoints.judge(through, self._fed, self.decisions, interval_steps=self.interval_steps,
                               last_step=self.last_step)

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)


# --- the loop ----------------------------------------------------------------------------------------------


class _Wake(FileSystemEventHandler):
    """Wakes the loop when the run's logs or checkpoints change (not on Guardian's own writes)."""

    def __init__(self, root: Path, wake: threading.Event) -> None:
        self.root, self.wake = root, wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = [event.src_path, getattr(event, "dest_path", "")]
        if any(self._relevant(os.fsdecode(p)) for p in paths if p):
            self.wake.set()

    def _relevant(self, path: str) -> bool:
        parts = Path(os.path.relpath(path, self.root)).parts
        if not parts or parts[0] in ("guardian", "..") or parts[-1] == GOOD_MARK:
            return False
        return parts[-1] in (JSONL, STATE) or (len(parts) == 1 and parts[0].startswith("checkpoint-"))


def _start_observer(root: Path, wake: threading.Event, out: TextIO) -> Any:
    from watchdog.observers import Observer

    observer = Observer()
    try:
        observer.schedule(_Wake(root, wake), str(root), recursive=True)
        observer.start()
    except OSError as exc:
        print(f"attach: cannot watch {root} for changes ({exc}); re-scanning on a timer instead", file=out, flush=True)
        return None
    return observer


def follow(follower: Follower, *, linger_seconds: float, poll_seconds: float, stop: threading.Event,
           wake: threading.Event) -> None:
    """Poll on every change (and every `poll_seconds`) until stopped, or until the run has ended and
    `linger_seconds` have passed."""
    observer: Any = None
    end_at: float | None = None
    waiting_said = False
    try:
        while not stop.is_set():
            if observer is None and follower.output_dir.is_dir():
                observer = _start_observer(follower.output_dir, wake, follower.out) or False
            elif not follower.output_dir.is_dir() and not waiting_said:
                waiting_said = True
                follower._say(f"attach: waiting for {follower.output_dir} to appear")
            follower.poll()
            now = time.monotonic()
            if follower.ended and end_at is None:
                end_at = now + linger_seconds
                follower._say(f"attach: the run has ended; following for {linger_seconds:g} s more")
            elif not follower.ended:
                end_at = None
            if end_at is not None and now >= end_at:
                return
            wake.wait(poll_seconds if end_at is None else min(poll_seconds, max(0.0, end_at - now)))
            wake.clear()
    except KeyboardInterrupt:
        return
    finally:
        if observer:
            observer.stop()
            observer.join(timeout=2)


def attach(output_dir: Path, ruleset: RuleSet, *, once: bool = False, linger_seconds: float = 30.0,
           pid: int | None = None, stop_signal: str = "TERM", stop_on: Iterable[str] = (),
           url: str | None = None, token: str | None = None, run_id: str | None = None, rule_set: str = "default",
           poll_seconds: float = 2.0, quiet_steps: int = 10, out: TextIO | None = None) -> int:
    """The `guardian attach` command: follow `output_dir` until the run ends (or once); return the exit code."""
    out = out or sys.stdout
    policy = StopPolicy(pid, parse_signal(stop_signal), _check_rules(frozenset(stop_on), ruleset))
    if once and not output_dir.is_dir():
        raise ConfigError(f"{output_dir}: no such directory; give the run's output_dir (where {JSONL} or "
                          "checkpoint-*/ are written)")
    link = None
    if url:
        run_id = run_id or default_run_id(output_dir)
        meta = {"output_dir": os.path.abspath(output_dir), "host": socket.gethostname(), "attached": True,
                "pid": pid}
        link = DaemonLink(url, run_id, rules=rule_set, meta=meta, token=token,
                          spool=output_dir / "guardian" / "events.jsonl", run_key_dir=output_dir / "guardian")
        print(f"attach: reporting run {run_id} to {url}", file=out, flush=True)
    sink = EventSink(output_dir / "guardian" / "events.jsonl", link)
    follower = Follower(output_dir, ruleset, sink, policy=policy, quiet_steps=quiet_steps, out=out)
    try:
        if once:
            follower.poll()
            if follower.source is None:
                raise ConfigError(f"{output_dir}: holds no {JSONL} or checkpoint-*/{STATE} to read")
        else:
            stop, wake = threading.Event(), threading.Event()
            with _stop_on_sigterm(stop, wake):
                follow(follower, linger_seconds=linger_seconds, poll_seconds=poll_seconds, stop=stop, wake=wake)
        follower.finish()
    finally:
        sink.close()
    return 0


def _check_rules(names: frozenset[str], ruleset: RuleSet) -> frozenset[str]:
    known = {rule.name for rule in ruleset.rules}
    unknown = sorted(names - known)
    if unknown:
        raise ConfigError(f"--stop-on {', '.join(unknown)}: no such rule in {ruleset.source}; "
                          f"its rules: {', '.join(sorted(known))}")
    return names


class _stop_on_sigterm:  # used as a context manager, reads like one
    """SIGTERM ends the loop cleanly (events flushed, summary printed), like Ctrl-C."""

    def __init__(self, stop: threading.Event, wake: threading.Event) -> None:
        self.stop, self.wake = stop, wake
        self.previous: Any = None

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, *_: object) -> None:
        self.stop.set()
        self.wake.set()
