"""Guardian's decisions and actions in the Trainer's own reporting (`report_to`): TensorBoard, W&B, MLflow.

The integration callbacks the Trainer already runs (`TensorBoardCallback`, `WandbCallback`, `MLflowCallback` and
its subclass `DagsHubCallback`) own a writer or run object; Guardian writes through that object, at the step the
decision or action is about, and opens no client of its own:

- scalars: `guardian/skipped_updates`, `guardian/rollbacks`, `guardian/lr_cuts`, `guardian/lr_restores`,
  `guardian/stops` (running counts) and `guardian/lr_scale` at each action; `guardian/incident` 1 at each firing
  within an incident and 0 at the step it closes;
- one text line per action ("Guardian skipped step 812 (loss_spike): loss 9.6 at step 812 is ...") and per
  alert-only decision: TensorBoard `add_text("guardian/events")`, W&B a `run.alert` per incident Guardian acted in
  (and per stop) and the line in the run summary (`guardian/last_event`), MLflow the `guardian.last_event` tag and
  the lines in the artifact `guardian/events.txt`.

Nothing goes through `trainer.log()`: the Trainer's log history, its loss averaging and Guardian's own `on_log`
stay as they are, and the step is the decision's (the pre-optimizer hook runs before `global_step` moves on).
A writer that fails is logged once and left alone for the rest of the run; training goes on.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from guardian.callbacks.actuator import COUNTS
from guardian.engine.actions import ActionKind
from guardian.engine.engine import Decision
from guardian.events import ActionEvent

log = logging.getLogger("guardian")
F = TypeVar("F", bound=Callable[..., None])

TEXT_TAG = "guardian/events"
MAX_TEXT_LINES = 1000  # the MLflow artifact keeps the first this many lines (it is rewritten with each line)


@dataclass(frozen=True)
class Report:
    """What one decision or action shows in the integrations: scalars at `step`, and maybe a line of text."""

    step: int
    scalars: dict[str, float]
    text: str | None = None
    incident: int | None = None  # the incident an action belongs to (W&B: one alert per incident)
    critical: bool = False
    action: bool = False  # Guardian acted (W&B alerts only on those: an info alert is no reason to page anyone)
    stop: bool = False


def action_line(record: ActionEvent, decisions: list[Decision]) -> str:
    """"Guardian skipped step 812 (loss_spike): loss 9.6 at step 812 is ..." for an action."""
    step = record.step
    acting = [d for d in decisions if not alert_only(d)]  # an alert at the same step has its own line
    named = [d.rule for d in acting] or list(record.rules)
    rules = ", ".join(dict.fromkeys(named)) or "command"
    what = record.outcome.describe()
    head = f"skipped step {step}" if what == "skipped this update" else f"at step {step}: {what}"
    why = "; ".join(dict.fromkeys(d.finding.message for d in acting if d.finding.message))
    return f"Guardian {head} ({rules})" + (f": {why}" if why else "")


def decision_line(decision: Decision) -> str:
    """The line for a decision that only alerts."""
    return f"Guardian alert at step {decision.step} ({decision.rule}): {decision.finding.message}"


def alert_only(decision: Decision) -> bool:
    return all(a.kind is ActionKind.ALERT for a in decision.actions)


class _Writer(ABC):
    """One integration callback's own writer or run object."""

    name = ""

    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def ready(self) -> bool:
        return True

    @abstractmethod
    def write(self, report: Report) -> None:
        """Show `report` through the integration's writer."""


class _TensorBoard(_Writer):
    name = "TensorBoard"

    def ready(self) -> bool:
        return getattr(self.callback, "tb_writer", None) is not None  # None on ranks > 0 and after train end

    def write(self, report: Report) -> None:
        writer = self.callback.tb_writer
        for tag, value in report.scalars.items():
            writer.add_scalar(tag, value, report.step)
        if report.text:
            writer.add_text(TEXT_TAG, report.text, report.step)
        writer.flush()


class _Wandb(_Writer):
    name = "W&B"

    def __init__(self, callback: Any) -> None:
        super().__init__(callback)
        self.alerted: set[int | None] = set()

    def ready(self) -> bool:
        wandb = getattr(self.callback, "_wandb", None)
        return bool(getattr(self.callback, "_initialized", False)) and getattr(wandb, "run", None) is not None

    def write(self, report: Report) -> None:
        wandb = self.callback._wandb
        if report.scalars:  # the callback plots everything against train/global_step
            wandb.log({**report.scalars, "train/global_step": report.step})
        if report.text:
            wandb.run.summary["guardian/last_event"] = report.text
            if report.action and (report.incident not in self.alerted or report.stop):
                self.alerted.add(report.incident)
                level = wandb.AlertLevel.ERROR if report.critical else wandb.AlertLevel.WARN
                title = f"Guardian at step {report.step}" + (f" (incident {report.incident})"
                                                              if report.incident is not None else "")
                wandb.run.alert(title=title, text=report.text, level=level)


class _Mlflow(_Writer):
    name = "MLflow"

    def __init__(self, callback: Any) -> None:
        super().__init__(callback)
        self.lines: list[str] = []

    def ready(self) -> bool:
        mlflow = getattr(self.callback, "_ml_flow", None)
        return bool(getattr(self.callback, "_initialized", False)) and mlflow is not None \
            and mlflow.active_run() is not None

    def write(self, report: Report) -> None:
        mlflow = self.callback._ml_flow
        if report.scalars:
            mlflow.log_metrics(report.scalars, step=report.step)
        if report.text:
            mlflow.set_tag("guardian.last_event", report.text[:5000])  # MLflow's limit on a tag value
            if len(self.lines) < MAX_TEXT_LINES:
                self.lines.append(f"step {report.step}: {report.text}")
                mlflow.log_text("\n".join(self.lines) + "\n", "guardian/events.txt")


def _writers_for(callbacks: list[Any]) -> list[_Writer]:
    try:
        from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback
    except ImportError:  # transformers without the integrations module: nothing to write to
        return []
    kinds: list[tuple[type, type[_Writer]]] = [(TensorBoardCallback, _TensorBoard), (WandbCallback, _Wandb),
                                               (MLflowCallback, _Mlflow)]
    found: list[_Writer] = []
    for callback in callbacks:
        for kind, writer in kinds:
            if isinstance(callback, kind):
                found.append(writer(callback))
                break
    return found


def _quietly(method: F) -> F:
    """A failure in the bridge itself is logged once and the bridge turns itself off; training goes on."""

    @functools.wraps(method)
    def safe(self: IntegrationBridge, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception:
            self.writers = []
            log.exception("Guardian: writing to the Trainer's reporting integrations failed; they get no more "
                          "of Guardian's decisions this run (guardian/events.jsonl has them all)")

    return safe  # type: ignore[return-value]


@dataclass
class IntegrationBridge:
    """Carries Guardian's decisions and actions to the Trainer's reporting integrations (rank 0 only)."""

    enabled: bool = True
    writers: list[_Writer] = field(default_factory=list)
    _step_decisions: dict[int, list[Decision]] = field(default_factory=dict)
    _incident_shown: bool = False
    _failed: set[str] = field(default_factory=set)

    @_quietly
    def attach(self, trainer: Any, *, main_process: bool) -> None:
        """Find the integration callbacks of `trainer` (their writers are looked up at each write: they are made
        in the callbacks' own `on_train_begin`)."""
        self.writers = []
        self._step_decisions.clear()
        self._incident_shown = False
        if not self.enabled or not main_process or trainer is None:
            return
        handler = getattr(trainer, "callback_handler", None)
        self.writers = _writers_for(list(getattr(handler, "callbacks", []) or []))
        if self.writers:
            log.info("Guardian: decisions and actions also go to %s",
                     ", ".join(dict.fromkeys(w.name for w in self.writers)))

    @_quietly
    def decision(self, decision: Decision) -> None:
        """A rule fired: the incident is open; a decision that only alerts gets its line now."""
        if not self.writers:
            return
        earlier = self._step_decisions.get(decision.step, [])
        self._step_decisions = {decision.step: [*earlier, decision]}
        shown = any(d.incident is not None for d in earlier)  # once a step
        scalars = {"guardian/incident": 1.0} if decision.incident is not None and not shown else {}
        self._incident_shown = self._incident_shown or bool(scalars)
        text = decision_line(decision) if alert_only(decision) else None
        if scalars or text:
            self._write(Report(decision.step, scalars, text, decision.incident,
                               decision.severity.value == "critical"))

    @_quietly
    def action(self, record: ActionEvent, counts: Mapping[str, int], lr_scale: float) -> None:
        """Guardian acted at `record.step`: the running counts, the rate's scale and the action's line."""
        if not self.writers:
            return
        step = record.step
        decisions = self._step_decisions.get(step, [])
        scalars = {f"guardian/{k}": float(counts.get(k, 0)) for k in COUNTS}
        scalars["guardian/lr_scale"] = float(lr_scale)
        incident = next((d.incident for d in decisions if d.incident is not None), None)
        stop = bool(record.stopped)
        critical = stop or any(d.severity.value == "critical" for d in decisions)
        self._write(Report(step, scalars, action_line(record, decisions), incident, critical, action=True, stop=stop))

    @_quietly
    def step_end(self, step: int, incident_open: bool) -> None:
        """After each step: `guardian/incident` goes back to 0 at the step the incident closed."""
        if self._incident_shown and not incident_open and self.writers:
            self._incident_shown = False
            self._write(Report(step, {"guardian/incident": 0.0}))

    def _write(self, report: Report) -> None:
        for writer in self.writers:
            if writer.name in self._failed or not writer.ready():
                continue
            try:
                writer.write(report)
            except Exception as exc:
                self._failed.add(writer.name)
                log.warning("Guardian: could not write to %s (%s: %s); its decisions stay in "
                            "guardian/events.jsonl, and %s gets no more of them this run",
                            writer.name, type(exc).__name__, exc, writer.name)
