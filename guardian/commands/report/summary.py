"""What a report says happened, in numbers and one line: what Guardian did (or, replayed, would have done)
and the verdict on the run."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from guardian.commands.report.record import RunRecord, Series
from guardian.engine.actions import ActionKind, Restore, merge, stop_restore
from guardian.engine.engine import Decision
from guardian.events import ActionEvent, LrChange


@dataclass(frozen=True)
class Interventions:
    """What Guardian did (or, in replay, would have done, up to the first stop)."""

    skipped: list[int]
    rollbacks: list[ActionEvent]  # replayed: an event with only the step
    lr_cuts: list[int]
    stops: list[int]
    lr_scale: float
    lr_restores: list[int] = field(default_factory=list)  # steps where a jumped rate was put back on its schedule


def operator_actions(record: RunRecord) -> list[ActionEvent]:
    """The actions an operator asked for (`guardian ctl`, the TUI, the control API), not a rule."""
    return [a for a in record.actions if a.by_operator]


def interventions(record: RunRecord) -> Interventions:
    """What Guardian did (an operator's commands are not Guardian's: see `operator_actions`)."""
    if record.replayed:
        return _would_do(record.decisions)
    acts = [a for a in record.actions if not a.by_operator]
    rollbacks = [a for a in acts if a.rollback is not None]
    cuts = [a.step for a in acts if is_lr_cut(a)]
    scale = next((a.lr_scale for a in reversed(record.actions) if a.lr_scale is not None), None)
    if scale is None:
        scale = record.lr_scale.values[-1] if record.lr_scale.values else 1.0
    # A stop skips its step's update too, but it is the stop (as in `_would_do`).
    return Interventions([a.step for a in acts if a.skipped_update and not a.stopped], rollbacks, cuts,
                         [a.step for a in acts if a.stopped], scale,
                         [a.step for a in acts if isinstance(a.lr_restored, LrChange)])


def first_change(acts: Interventions) -> int | None:
    """The first step at which an intervention would have changed the run (a skip, rollback, cut or restore)."""
    steps = [*acts.skipped, *(a.step for a in acts.rollbacks), *acts.lr_cuts, *acts.lr_restores]
    return min(steps, default=None)


def is_lr_cut(action: ActionEvent) -> bool:
    """The action cut the learning rate (a factor below 1)."""
    return action.lr_factor is not None and action.lr_factor < 1.0


def left_in_place(action: ActionEvent) -> str | None:
    """What a stop left in place (the best evaluation's weights, say), in either spelling."""
    return action.restored or action.restored_best


def _would_do(decisions: list[Decision]) -> Interventions:
    """What the decisions of a replay would have done, step by step, up to the first stop."""
    by_step: dict[int, list[Decision]] = {}
    for d in decisions:
        by_step.setdefault(d.step, []).append(d)
    skipped, cuts, stops, restores, scale = [], [], [], [], 1.0
    rollbacks: list[ActionEvent] = []
    for step in sorted(by_step):
        plan = merge(a for d in by_step[step] for a in d.actions)
        if plan.skip_update and not plan.stop:  # a stop skips its step's update too, but it is the stop
            skipped.append(step)
        if plan.rollback:
            rollbacks.append(ActionEvent(step=step))
        if plan.lr_factor < 1.0:
            cuts.append(step)
            scale *= plan.lr_factor
        if plan.restore_lr:
            restores.append(step)
        if plan.stop:
            stops.append(step)
            break  # the run would have ended here
    return Interventions(skipped, rollbacks, cuts, stops, scale, restores)


def restored_best(record: RunRecord) -> tuple[int, float] | None:
    """(step, eval loss) of the best evaluation whose weights a stop restored (or, replayed, would restore)."""
    evals = dict(finite_points(record.eval.get("eval_loss")))
    if record.replayed:
        acts = interventions(record)
        stop = next((d for d in record.decisions if acts.stops and d.step == acts.stops[0]), None)
        restores = stop is not None and any(a.kind is ActionKind.STOP and stop_restore(a) is Restore.BEST_EVAL
                                            for a in stop.actions)
        step = stop.finding.evidence.get("best_step") if stop is not None and restores else None
    else:
        text = next((left for a in record.actions if (left := left_in_place(a))), "")
        found = re.search(r"step (\d+)", text)
        step = int(found.group(1)) if found else None
    return (step, evals[step]) if isinstance(step, int) and step in evals else None


def finite_points(series: Series | None) -> list[tuple[int, float]]:
    """(step, value) of the finite values of a series."""
    return [(s, v) for s, v in zip(series.steps, series.values) if math.isfinite(v)] if series else []


def non_finite_steps(record: RunRecord) -> set[int]:
    """The steps with a NaN/inf loss or gradient norm."""
    steps: set[int] = set()
    for key in ("loss", "grad_norm"):
        series = record.train.get(key)
        if series:
            steps.update(s for s, v in zip(series.steps, series.values) if not math.isfinite(v))
    return steps


def final_and_best(series: Series | None) -> str:
    """"final 0.81 (step 400), best 0.79 (step 300)" of a series."""
    points = finite_points(series)
    if not points:
        return "not logged"
    last_step, last = points[-1]
    best_step, best = min(points, key=lambda p: p[1])
    text = f"final {last:.4g} (step {last_step}), best {best:.4g} (step {best_step})"
    if series is not None and series.values and not math.isfinite(series.values[-1]):
        text += f"; the last value logged (step {series.steps[-1]}) is {series.values[-1]}"
    return text


def verdict(record: RunRecord) -> str:
    """One line: how the run went and what Guardian did about it."""
    acts = interventions(record)
    loss = record.train.get("loss")
    if record.replayed:
        if not record.decisions:
            return "replayed: no rule would have fired"
        until = acts.stops[0] if acts.stops else record.last_step
        fired = ", ".join(sorted({d.rule for d in record.decisions if d.step <= until}))
        would = _did(acts, replayed=True)
        if acts.stops:
            would = (would + ", and " if would else "") + f"stopped this run at step {acts.stops[0]}"
        text = f"replayed: the rules would have {would or 'raised ' + plural(len(record.decisions), 'alert')} ({fired})"
        first = first_change(acts)
        changes = len(acts.skipped) + len(acts.rollbacks) + len(acts.lr_cuts) + len(acts.lr_restores)
        if first is not None and changes > 1:
            text += (f"; counted on this log as it ran unguarded: from step {first} on, a guarded run would have "
                     "gone differently")
        improved = improved_after_stop(record)
        if improved is not None:
            text += f", but the run improved later ({improved[0]} {improved[2]:.4g} at step {improved[1]})"
        return text
    return _verdict_of_guarded(record, acts, loss) + _operator_clause(record) + _weights_clause(record)


def _verdict_of_guarded(record: RunRecord, acts: Interventions, loss: Series | None) -> str:
    # A NaN loss whose update Guardian skipped (and stopped on) never reached the weights: that is not divergence.
    if loss and loss.values and not math.isfinite(loss.values[-1]) and loss.steps[-1] not in acts.skipped \
            and not acts.stops:
        return f"diverged: the training loss is {loss.values[-1]} at the last step ({loss.steps[-1]})"
    done = _did(acts)
    if acts.stops:
        stops = [a for a in record.actions if a.stopped and not a.by_operator]
        rules = ", ".join(sorted({r for a in stops for r in a.rules}))
        left = next((left for a in stops if (left := left_in_place(a))), "")
        return (f"stopped at step {acts.stops[0]} by {rules or 'Guardian'}" + (f", leaving {left}" if left else "")
                + (f"; {done}" if done else ""))
    if done:
        return f"Guardian stepped in: {done}; ended at step {record.last_step}{_end_loss(record)}"
    if record.decisions:
        return f"{plural(len(record.decisions), 'alert')}, no action taken by Guardian; ended at step {record.last_step}"
    if operator_actions(record):
        return f"no rule fired in {record.last_step} steps"
    return f"healthy: no rule fired in {record.last_step} steps"


def _operator_clause(record: RunRecord) -> str:
    """"; the operator stopped the run at step 41" — manual actions are the operator's, never Guardian's."""
    done = [operator_did(a) for a in operator_actions(record)]
    return f"; the operator {_join(done)}" if done else ""


def operator_did(action: ActionEvent) -> str:
    """"cut the LR x0.5 at step 41": what an operator's command did."""
    parts = []
    if action.rollback is not None:
        parts.append("rolled back" if action.rollback_to_step is not None else "asked for a rollback")
    if action.lr_factor is not None and action.lr_factor < 1:
        parts.append(f"cut the LR x{action.lr_factor:.3g}")
    if action.stopped:
        parts.append("stopped the run")
    return f"{_join(parts) or 'acted'} at step {action.step}"


def operator_cut(record: RunRecord) -> bool:
    """An operator cut the learning rate (the final scale includes it)."""
    return any(is_lr_cut(a) for a in operator_actions(record))


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1] if parts else ""


def _weights_clause(record: RunRecord) -> str:
    """"; the final weights are NaN/inf: resume from …" when the newest weights on disk are not finite."""
    disk = record.disk
    latest = disk.latest if disk is not None else None
    if disk is None or latest is None or latest.finite is not False:
        return ""
    resume = disk.resume_from()
    where = f"resume from {resume.path}" if resume is not None else \
        "no checked checkpoint on disk has finite weights" if disk.unchecked() else \
        "no checkpoint on disk has finite weights"
    return f"; the final weights ({latest.folder.name}) are NaN/inf: {where}"


def _end_loss(record: RunRecord) -> str:
    for label, series in (("eval loss", record.eval.get("eval_loss")), ("train loss", record.train.get("loss"))):
        points = finite_points(series)
        if points:
            return f" with {label} {points[-1][1]:.4g}"
    return ""


def _did(acts: Interventions, *, replayed: bool = False) -> str:
    parts = []
    if replayed:
        if acts.skipped:
            parts.append(f"skipped {plural(len(acts.skipped), 'update')}")
        if acts.rollbacks:
            parts.append(f"rolled back {plural(len(acts.rollbacks), 'time')}")
        if acts.lr_restores:
            parts.append(f"put the LR back on its schedule {plural(len(acts.lr_restores), 'time')}")
        if acts.lr_cuts:
            parts.append(f"cut the LR to x{acts.lr_scale:.3g}")
        return ", ".join(parts)
    if acts.skipped:
        parts.append(f"{plural(len(acts.skipped), 'update')} skipped")
    if acts.rollbacks:
        parts.append(plural(len(acts.rollbacks), "rollback"))
    if acts.lr_restores:
        parts.append(f"LR put back on its schedule {plural(len(acts.lr_restores), 'time')}")
    if acts.lr_cuts:
        parts.append(f"LR x{acts.lr_scale:.3g}")
    return ", ".join(parts)


def plural(count: int, word: str) -> str:
    """"1 step", "2 steps"."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def improved_after_stop(record: RunRecord) -> tuple[str, int, float] | None:
    """(metric, step, value) where a replayed run did better after the stop the rules would have made than the
    best before it (the stop would have cost that); None when it did not, or there was no stop."""
    stops = interventions(record).stops
    if not record.replayed or not stops:
        return None
    stop = next(d for d in record.decisions if d.step == stops[0] and any(a.kind is ActionKind.STOP for a in d.actions))
    metric = stop.finding.metric
    points = finite_points(record.eval.get(metric) or record.train.get(metric))
    before = [v for s, v in points if s <= stops[0]]
    later = [(s, v) for s, v in points if s > stops[0]]
    if not before or not later:
        return None
    step, value = min(later, key=lambda p: p[1])
    return (metric, step, value) if value < min(before) else None


def by_rule(decisions: list[Decision]) -> dict[str, list[Decision]]:
    """The decisions of each rule, in order."""
    groups: dict[str, list[Decision]] = {}
    for d in decisions:
        groups.setdefault(d.rule, []).append(d)
    return groups


def count_each(items: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in counts.items())

