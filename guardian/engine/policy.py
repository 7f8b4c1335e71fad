"""The recovery policy: what the rules ask for, checked against what has already been tried in this incident.

An incident opens at the first firing of a rule that asks for more than an alert and closes once no rule has
fired for `incident_quiet_steps` steps. The rules say what each anomaly calls for; the policy keeps the
responses from compounding and from doing harm:

- Skipping is always allowed: a long stretch of bad batches costs skipped updates, never the run.
- A rollback is only carried out once per incident on its own. A second request in the same incident is turned
  into a skip when every update since the first rollback was skipped (the weights are the restored ones; rolling
  back to the same state again changes nothing). If updates were made since and the damage came back, the rate
  is the likely cause: roll back again and cut the learning rate, once; if it comes back after that too, stop.
- The rollback budget counts incidents, not firings. With the budget used up, a rollback becomes a stop.
- A second incident that needs a rollback within `repeat_window_steps` of the last one also cuts the learning
  rate: the run keeps getting into trouble after recovering.
- The learning rate is cut at most once per incident.
- Every stop leaves good weights in place: the newest good state from before the incident's onset (the
  actuator picks it, or the best evaluation's if that is better), or the best evaluation's when asked.

Pure Python, no I/O: the same policy runs embedded, in the daemon and in replay.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from guardian.engine.actions import ActionKind, ActionSpec, Restore, stop_restore

if TYPE_CHECKING:
    from guardian.engine.engine import Decision

INCIDENTS_KEPT = 200  # closed incidents remembered per run (the counts stay exact beyond that)
LOSS_HISTORY = 10     # healthy losses kept to say what "back to normal" means


@dataclass(frozen=True)
class PolicySettings:
    """The run-wide policy of a rule file (its `policy:` section)."""

    rollback_budget: int = 3          # incidents per run that may roll back; after that a rollback is a stop
    incident_quiet_steps: int = 20    # an incident closes after this many steps without a firing
    lr_cut_factor: float = 0.5        # the cut when the policy itself blames the rate
    repeat_window_steps: int = 200    # a rollback incident this soon after the previous one also cuts the rate

    def to_dict(self) -> dict[str, Any]:
        return {"rollback_budget": self.rollback_budget, "incident_quiet_steps": self.incident_quiet_steps,
                "lr_cut_factor": self.lr_cut_factor, "repeat_window_steps": self.repeat_window_steps}


@dataclass
class Incident:
    """One episode of trouble: every firing from the first until the run is quiet again, and what was done."""

    id: int
    opened_step: int
    onset_step: int
    last_firing_step: int
    rules: dict[str, int] = field(default_factory=dict)   # rule -> firings
    skips: int = 0
    rollbacks: list[int] = field(default_factory=list)     # steps of the rollbacks carried out
    lr_cuts: int = 0
    lr_restores: int = 0
    stopped: bool = False
    updates_since_rollback: int = 0  # updates made (not skipped) since the last rollback of this incident
    loss_before: float | None = None  # median train loss just before the incident opened
    losses_after: list[float] = field(default_factory=list)  # train losses once quiet again (at most 10)
    closed_step: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.closed_step is None

    @property
    def loss_after(self) -> float | None:
        return statistics.median(self.losses_after) if self.losses_after else None

    @property
    def outcome(self) -> str:
        """What became of it, in words: stopped, recovered (and whether the loss came back), or still open."""
        if self.stopped:
            return "stopped"
        if self.open:
            return "open"
        before, after = self.loss_before, self.loss_after
        if before is None or after is None:
            return "recovered"
        verdict = "back to its level" if after <= before * 1.1 else "still above its level"
        return f"recovered: loss {after:.4g} after vs {before:.4g} before ({verdict})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "opened_step": self.opened_step, "onset_step": self.onset_step,
            "last_firing_step": self.last_firing_step, "rules": dict(self.rules), "skips": self.skips,
            "rollbacks": list(self.rollbacks), "lr_cuts": self.lr_cuts, "lr_restores": self.lr_restores,
            "stopped": self.stopped, "updates_since_rollback": self.updates_since_rollback,
            "loss_before": self.loss_before, "losses_after": list(self.losses_after),
            "closed_step": self.closed_step, "notes": list(self.notes), "outcome": self.outcome,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Incident:
        fields = {k: data[k] for k in (
            "id", "opened_step", "onset_step", "last_firing_step", "skips", "lr_cuts", "lr_restores", "stopped",
            "updates_since_rollback", "loss_before", "closed_step") if k in data}
        return cls(**fields, rules=dict(data.get("rules", {})), rollbacks=list(data.get("rollbacks", [])),
                   losses_after=list(data.get("losses_after", [])), notes=list(data.get("notes", [])))


def _alert_only(decision: Decision) -> bool:
    return all(a.kind is ActionKind.ALERT for a in decision.actions)


class IncidentPolicy:
    """Groups decisions into incidents and checks each step's actions against what the incident already did."""

    def __init__(self, settings: PolicySettings | None = None) -> None:
        self.settings = settings or PolicySettings()
        self.incidents: deque[Incident] = deque(maxlen=INCIDENTS_KEPT)
        self.incident_count = 0
        self.rollback_incidents = 0                  # incidents that rolled back (the budget counts these)
        self.last_rollback_incident_step: int | None = None
        self._healthy_losses: deque[float] = deque(maxlen=LOSS_HISTORY)

    @property
    def current(self) -> Incident | None:
        """The open incident, if any."""
        return self.incidents[-1] if self.incidents and self.incidents[-1].open else None

    # ---- the per-step review -------------------------------------------------------------------

    def review(self, step: int, decisions: Sequence[Decision], values: Mapping[str, float]) -> list[Decision]:
        """The decisions of one train step with their actions checked and their incident set.

        Call once per train step, after every rule has seen the step (also when no rule fired: the policy
        counts the updates that were made and closes quiet incidents)."""
        incident = self.current
        if incident is not None and step - incident.last_firing_step >= self.settings.incident_quiet_steps:
            self._close(incident, step)
            incident = None
        if any(not _alert_only(d) for d in decisions):
            incident = incident or self._open(step, decisions)
        reviewed = [self._review_one(step, d, incident) for d in decisions]
        if reviewed:
            reviewed = self._merge_step(step, reviewed, incident)
        self._after_step(step, reviewed, incident, values)
        return reviewed

    def review_eval(self, step: int, decisions: Sequence[Decision]) -> list[Decision]:
        """Decisions made on evaluation metrics: the same checks, but no update is counted."""
        incident = self.current
        if any(not _alert_only(d) for d in decisions):
            incident = incident or self._open(step, decisions)
        reviewed = [self._review_one(step, d, incident) for d in decisions]
        return self._merge_step(step, reviewed, incident) if reviewed else []

    def _open(self, step: int, decisions: Sequence[Decision]) -> Incident:
        self.incident_count += 1
        onset = min(d.finding.onset_step for d in decisions)
        before = statistics.median(self._healthy_losses) if self._healthy_losses else None
        incident = Incident(self.incident_count, step, onset, step, loss_before=before)
        self.incidents.append(incident)
        return incident

    def _close(self, incident: Incident, step: int) -> None:
        incident.closed_step = step

    def _review_one(self, step: int, decision: Decision, incident: Incident | None) -> Decision:
        if incident is None:
            return replace(decision, incident=None)
        if not _alert_only(decision):
            incident.rules[decision.rule] = incident.rules.get(decision.rule, 0) + 1
            incident.last_firing_step = step
        return replace(decision, incident=incident.id)

    def _merge_step(self, step: int, decisions: list[Decision], incident: Incident | None) -> list[Decision]:
        """Check the step's actions together: one rollback, one LR cut and one stop per step at most."""
        out: list[Decision] = []
        state = _StepState()
        for decision in decisions:
            actions: list[ActionSpec] = []
            notes: list[str] = []
            for action in decision.actions:
                actions += self._check(step, action, incident, state, notes, decision)
            note = "; ".join(filter(None, [decision.note, *notes]))
            if incident is not None:
                incident.notes += [n for n in notes if n not in incident.notes][:20]
            out.append(replace(decision, actions=tuple(actions) or (ActionSpec(ActionKind.ALERT),), note=note))
        return out

    def _check(self, step: int, action: ActionSpec, incident: Incident | None, state: _StepState,
               notes: list[str], decision: Decision) -> list[ActionSpec]:
        kind = action.kind
        if kind is ActionKind.ALERT or kind is ActionKind.SKIP_UPDATE or kind is ActionKind.RESTORE_LR:
            return [action]
        if incident is None:  # alert-only steps never get here with stronger actions
            return [action]
        if kind is ActionKind.ROLLBACK:
            return self._rollback(step, incident, state, notes)
        if kind is ActionKind.REDUCE_LR:
            return self._reduce_lr(action, incident, state, notes, decision)
        return self._stop(action, incident, state)

    def _rollback(self, step: int, incident: Incident, state: _StepState, notes: list[str]) -> list[ActionSpec]:
        settings = self.settings
        if state.rollback or state.stop:
            return []
        if incident.rollbacks and incident.updates_since_rollback == 0:
            notes.append(f"every update since the rollback at step {incident.rollbacks[-1]} was skipped, so the "
                         "weights are the restored ones: skipping instead of rolling back again")
            return [ActionSpec(ActionKind.SKIP_UPDATE)]
        if incident.rollbacks:
            if incident.lr_cuts == 0:
                notes.append(f"the damage came back {incident.updates_since_rollback} updates after the rollback at "
                             f"step {incident.rollbacks[-1]}: the learning rate is the likely cause; rolling back "
                             f"and cutting it x{settings.lr_cut_factor:g}")
                state.rollback = state.lr_cut = True
                return [ActionSpec(ActionKind.ROLLBACK), self._cut()]
            notes.append("the damage came back after a rollback and a learning-rate cut: stopping with the last "
                         "good weights in place")
            state.stop = True
            return [ActionSpec(ActionKind.STOP, {"restore": Restore.LAST_GOOD.value})]
        if self.rollback_incidents >= settings.rollback_budget:
            notes.append(f"rollback budget of {settings.rollback_budget} incidents used up: stopping with the last "
                         "good weights in place")
            state.stop = True
            return [ActionSpec(ActionKind.STOP, {"restore": Restore.LAST_GOOD.value})]
        state.rollback = True
        actions = [ActionSpec(ActionKind.ROLLBACK)]
        last = self.last_rollback_incident_step
        if last is not None and step - last <= settings.repeat_window_steps and not incident.lr_cuts:
            notes.append(f"the second incident needing a rollback within {step - last} steps: cutting the "
                         f"learning rate x{settings.lr_cut_factor:g}")
            state.lr_cut = True
            actions.append(self._cut())
        notes.append(f"rollback incident {self.rollback_incidents + 1} of {settings.rollback_budget}")
        return actions

    def _reduce_lr(self, action: ActionSpec, incident: Incident, state: _StepState, notes: list[str],
                   decision: Decision) -> list[ActionSpec]:
        if incident.lr_cuts:  # several cuts asked at one step merge into one (the strongest)
            notes.append("the learning rate was already cut in this incident: not cutting it again")
            return []
        state.lr_cut = True
        factor = action.param("factor")
        if action.param("from_evidence"):
            suggested = decision.finding.evidence.get("lr_factor")
            if isinstance(suggested, (int, float)) and math.isfinite(suggested) and 0.0 < suggested < factor:
                factor = float(suggested)
        params = {"factor": factor, **({"min_lr": action.param("min_lr")} if action.param("min_lr") else {})}
        return [ActionSpec(ActionKind.REDUCE_LR, params)]

    def _stop(self, action: ActionSpec, incident: Incident, state: _StepState) -> list[ActionSpec]:
        if state.stop:
            return []
        state.stop = True
        restore = stop_restore(action)
        if restore is Restore.AUTO:  # a rule fired, so the current weights are suspect: go back to before it
            restore = Restore.LAST_GOOD
        return [ActionSpec(ActionKind.STOP, {"restore": restore.value})]

    def _cut(self) -> ActionSpec:
        return ActionSpec(ActionKind.REDUCE_LR, {"factor": self.settings.lr_cut_factor})

    def _after_step(self, step: int, decisions: Sequence[Decision], incident: Incident | None,
                    values: Mapping[str, float]) -> None:
        """Count what this step's plan does to the weights: a skip, a rollback, an LR cut, or an update."""
        kinds = {a.kind for d in decisions for a in d.actions}
        loss = values.get("loss")
        finite_loss = isinstance(loss, float) and math.isfinite(loss)
        if incident is None:
            if finite_loss and not decisions:
                self._healthy_losses.append(loss)  # type: ignore[arg-type]
            self._note_quiet_loss(loss if finite_loss else None)
            return
        if ActionKind.ROLLBACK in kinds:
            incident.rollbacks.append(step)
            incident.updates_since_rollback = 0
            if len(incident.rollbacks) == 1:
                self.rollback_incidents += 1
                self.last_rollback_incident_step = step
        elif ActionKind.SKIP_UPDATE in kinds or ActionKind.STOP in kinds:
            incident.skips += 1
        else:
            incident.updates_since_rollback += 1
        if ActionKind.REDUCE_LR in kinds:
            incident.lr_cuts += 1
        if ActionKind.RESTORE_LR in kinds:
            incident.lr_restores += 1
        if ActionKind.STOP in kinds:
            incident.stopped = True
        if not decisions and finite_loss and len(incident.losses_after) < LOSS_HISTORY:
            incident.losses_after.append(loss)  # type: ignore[arg-type]
        elif decisions:
            incident.losses_after.clear()

    def _note_quiet_loss(self, loss: float | None) -> None:
        """Losses of the steps right after an incident closed still tell whether it recovered."""
        last = self.incidents[-1] if self.incidents else None
        if last is not None and not last.open and loss is not None and len(last.losses_after) < LOSS_HISTORY:
            last.losses_after.append(loss)

    # ---- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "incidents": [i.to_dict() for i in self.incidents], "incident_count": self.incident_count,
            "rollback_incidents": self.rollback_incidents,
            "last_rollback_incident_step": self.last_rollback_incident_step,
            "healthy_losses": list(self._healthy_losses),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.incidents = deque((Incident.from_dict(i) for i in state.get("incidents", [])), maxlen=INCIDENTS_KEPT)
        self.incident_count = int(state.get("incident_count", len(self.incidents)))
        self.rollback_incidents = int(state.get("rollback_incidents", 0))
        last = state.get("last_rollback_incident_step")
        self.last_rollback_incident_step = None if last is None else int(last)
        self._healthy_losses = deque((float(x) for x in state.get("healthy_losses", [])), maxlen=LOSS_HISTORY)


@dataclass
class _StepState:
    """What the actions checked so far at this step already do (one rollback and one stop per step)."""

    rollback: bool = False
    lr_cut: bool = False
    stop: bool = False
