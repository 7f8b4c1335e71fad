"""The text of `guardian report`: report.md (summary, incidents, timeline, what was saved, what is on disk, what
to try next time), and the terminal's and `--json`'s lists of bad samples and of what is on disk."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from guardian.commands.report.record import STORED, RunRecord
from guardian.commands.report.summary import (
    by_rule,
    count_each,
    final_and_best,
    finite_points,
    interventions,
    left_in_place,
    non_finite_steps,
    operator_actions,
    operator_cut,
    operator_did,
    plural,
    verdict,
)
from guardian.engine.actions import ActionKind, Restore, stop_restore
from guardian.engine.engine import Decision
from guardian.events import ActionEvent
from guardian.logs.badsample import BadSample
from guardian.logs.ondisk import describe

PNG_NAME = "report.png"
MD_NAME = "report.md"
TIMELINE_ROWS_MAX = 200
BAD_SAMPLE_ROWS_MAX = 40  # samples of skipped updates listed in report.md (and --json); the file has them all
BAD_SAMPLE_LINES_MAX = 10  # ... and printed in the terminal

# DIGEST.md's pathologies: key -> (symptom, usual cause, usual fix).
PATHOLOGIES: dict[str, tuple[str, str, str]] = {
    "explosion": ("gradient explosion", "LR too high, no clipping", "lower the LR; `max_grad_norm` 0.5–1.0"),
    "vanishing": ("vanishing gradient", "deep net, bad initialisation", "check the initialisation"),
    "oscillation": ("gradient or loss oscillation", "batch too small, LR too high",
                    "raise `gradient_accumulation_steps`, lower the LR, more warm-up"),
    "abnormal": ("single abnormal samples", "bad data", "skip the update above a gradient threshold"),
    "spike": ("loss spike", "—", "roll back to a checkpoint"),
    "nan": ("NaN loss", "—", "roll back"),
    "overfitting": ("overfitting: train loss ↓ while eval loss ↑", "too many epochs, too little data",
                    "early stopping (patience 3), weight decay 0.1, dropout 0.2, fewer epochs"),
    "underfitting": ("underfitting: both losses fall slowly", "LR too low, too few steps", "raise the LR / train longer"),
    "slow_start": ("slow convergence early", "LR too low", "raise the LR"),
}


def render_markdown(record: RunRecord, *, image: str = PNG_NAME) -> str:
    """The summary, timeline, what was saved and what to try next time, as Markdown."""
    parts = [f"# Guardian report: {record.name}", "", f"**{verdict(record)}**", "", _source_line(record), ""]
    parts += [f"> {note}" for note in record.notes]
    parts += [f"![Loss, gradient norm, learning rate and Guardian's decisions for {record.name}]({image})", ""]
    parts += _summary(record) + _incidents(record) + _operator(record) + _timeline(record) + _saved(record)
    parts += _on_disk(record) + _bad_samples(record)
    parts += _next_time(record)
    return "\n".join(parts).rstrip() + "\n"


def _source_line(record: RunRecord) -> str:
    if record.replayed:
        return (f"Source: `{record.source}`, rules `{record.rules}`. **Replayed: what the rules would have done.** "
                "No action was taken in this run, and the rules judged the log as it ran unguarded: after the first "
                "skip, rollback or learning-rate change a guarded run would have gone differently, and after a stop "
                "it would have ended, so what follows the first of them is counted, not what would have happened.")
    if record.mode == STORED:
        return f"Source: the daemon's store, `{record.source}` (decisions: the run's and the daemon's)."
    return f"Source: Guardian's event log, `{record.source}`."


def _summary(record: RunRecord) -> list[str]:
    acts = interventions(record)
    would = "would be " if record.replayed else ""
    nan_skips = len(set(acts.skipped) & non_finite_steps(record))
    severities = count_each(d.severity.value for d in record.decisions)
    rows = [
        ("steps", str(record.last_step)),
        ("train loss", final_and_best(record.train.get("loss"))),
        ("eval loss", final_and_best(record.eval.get("eval_loss"))),
        ("decisions", f"{len(record.decisions)}" + (f" ({severities})" if severities else "")),
        (f"updates {would}skipped",
         f"{len(acts.skipped)}" + (f" ({nan_skips} with a NaN/inf loss or gradient)" if nan_skips else "")),
        (f"rollbacks{' (would be)' if would else ''}", str(len(acts.rollbacks))),
        (f"LR put back on its schedule{' (would be)' if would else ''}",
         f"{len(acts.lr_restores)}" + (f" (steps {_ranges(acts.lr_restores)})" if acts.lr_restores else "")),
        (f"LR cuts{' (would be)' if would else ''}", f"{len(acts.lr_cuts)} (final LR scale {acts.lr_scale:.3g}"
         + (", the operator's cuts included)" if operator_cut(record) else ")")),
        (f"stops{' (would be)' if would else ''}", ", ".join(f"step {s}" for s in acts.stops) or "0"),
    ]
    operator = operator_actions(record)
    if operator:
        rows.append(("operator actions (not Guardian's)", "; ".join(operator_did(a) for a in operator)))
    return ["## Summary", "", "| | |", "| --- | --- |", *(f"| {k} | {_cell(v)} |" for k, v in rows), ""]


def _incidents(record: RunRecord) -> list[str]:
    """One row per incident: when, which rules, what was tried, and how it ended."""
    if not record.incidents:
        return []
    out = ["## Incidents", "",
           "An incident runs from the first firing of a rule that acts until no rule has fired for a while; "
           "within one, the policy keeps the actions from compounding." + (" (Replay: what would have happened.)"
                                                                               if record.replayed else ""), "",
           "| # | steps | rules | what was tried | outcome |", "| ---: | --- | --- | --- | --- |"]
    for item in record.incidents[:TIMELINE_ROWS_MAX]:
        end = item.get("closed_step")
        steps = f"{item.get('opened_step')}–{item.get('last_firing_step', item.get('opened_step'))}"
        steps += f" (quiet again by {end})" if isinstance(end, int) else ""
        rules = ", ".join(f"{rule} ×{count}" for rule, count in dict(item.get("rules", {})).items())
        out.append(f"| {item.get('id')} | {steps} | {_cell(rules)} | {_cell(_tried(item))} | "
                   f"{_cell(str(item.get('outcome', '')))} |")
    if len(record.incidents) > TIMELINE_ROWS_MAX:
        out.append(f"\n{len(record.incidents) - TIMELINE_ROWS_MAX} later incidents are not listed.")
    notes = [(item.get("id"), note) for item in record.incidents[:TIMELINE_ROWS_MAX] for note in item.get("notes", [])
             if "rollback incident" not in note]
    if notes:
        out += ["", "Why the policy changed course:", ""]
        out += [f"- incident {number}: {note}" for number, note in notes[:TIMELINE_ROWS_MAX]]
    return out + [""]


def _tried(item: Mapping[str, Any]) -> str:
    parts = []
    if item.get("skips"):
        parts.append(plural(int(item["skips"]), "update") + " skipped")
    if item.get("lr_restores"):
        parts.append(f"rate put back on its schedule {plural(int(item['lr_restores']), 'time')}")
    rollbacks = item.get("rollbacks") or []
    if rollbacks:
        parts.append(f"rolled back at step {', '.join(str(s) for s in rollbacks)}")
    if item.get("lr_cuts"):
        parts.append(f"learning rate cut {plural(int(item['lr_cuts']), 'time')}")
    if item.get("stopped"):
        parts.append("stopped the run")
    return "; ".join(parts) or "alerts only"


def _operator(record: RunRecord) -> list[str]:
    """The manual actions (`guardian ctl`, the TUI's keys, the control API): the operator's, listed apart."""
    actions = operator_actions(record)
    if not actions:
        return []
    out = ["## What the operator did", "",
           "Manual commands, carried out by the run at its next step; no rule asked for them.", "",
           "| step | command | outcome |", "| ---: | --- | --- |"]
    for action in actions:
        commands = ", ".join(r.removeprefix("manual:") for r in action.rules) or "manual"
        out.append(f"| {action.step} | {_cell(commands)} | {_cell(action.outcome.describe())} |")
    return out + [""]


def _timeline(record: RunRecord) -> list[str]:
    out = ["## Timeline of decisions", ""]
    if not record.decisions:
        return out + ["No rule fired.", ""]
    out += ["| step | rule | severity | evidence | action | outcome |", "| ---: | --- | --- | --- | --- | --- |"]
    for d in record.decisions[:TIMELINE_ROWS_MAX]:
        actions = ", ".join(map(str, d.actions)) or "none"
        if d.level:
            actions += f" (escalation {d.level})"
        out.append(f"| {d.step} | {d.rule} | {d.severity.value} | {_cell(d.finding.message)} | {_cell(actions)} "
                   f"| {_cell(_outcome(record, d))} |")
    if len(record.decisions) > TIMELINE_ROWS_MAX:
        out.append(f"\n{len(record.decisions) - TIMELINE_ROWS_MAX} later decisions are not listed.")
    return out + [""]


def _outcome(record: RunRecord, decision: Decision) -> str:
    if record.replayed:
        return "not taken (replay)"
    for action in record.actions:
        if action.step == decision.step and decision.rule in action.rules:
            return action.outcome.describe() + (f"; {decision.note}" if decision.note else "")
    if all(a.kind is ActionKind.ALERT for a in decision.actions):
        return "logged (alert)"
    return "no action reported by the run" if record.mode == STORED else "—"


def _saved(record: RunRecord) -> list[str]:
    acts = interventions(record)
    out = ["## What the rules would have done" if record.replayed else "## What Guardian did", ""]
    bad = non_finite_steps(record)
    nan_skips = sorted(set(acts.skipped) & bad)
    other_skips = sorted(set(acts.skipped) - bad)
    for action in acts.rollbacks:
        out.append("- " + _rollback_line(record, action))
    if nan_skips:
        verb = "would have been skipped" if record.replayed else "skipped"
        out.append(f"- Updates with a NaN/inf loss or gradient {verb} (they never reach the weights or the "
                   f"optimizer's moments): steps {_ranges(nan_skips)}.")
    if other_skips:
        verb = "would have been skipped" if record.replayed else "skipped"
        out.append(f"- Other updates {verb} (spikes, learning-rate jumps): steps {_ranges(other_skips)}.")
    if acts.lr_restores:
        verb = "would have been put" if record.replayed else "put"
        out.append(f"- Learning rate {verb} back on its schedule after it jumped: steps {_ranges(acts.lr_restores)}.")
    unguarded = sorted(bad - set(acts.skipped))
    if unguarded and record.replayed:
        out.append(f"- NaN/inf values in this log at steps {_ranges(unguarded)} (after the run would have stopped, "
                   "or not watched by a rule).")
    for action in record.actions:
        restored = left_in_place(action)
        if restored and not action.by_operator:
            out.append(f"- At step {action.step}: stopped and left {restored} in place.")
    if record.replayed and acts.stops:
        out.append("- " + _would_stop_line(record, acts.stops[0]))
    if len(out) == 2:
        out.append("Nothing: no rule would have acted." if record.replayed else "Nothing: Guardian took no action.")
    return out + [""]


def _on_disk(record: RunRecord) -> list[str]:
    """The checkpoints that exist now (and the protected ones rotation removed), the final weights, where to resume."""
    protected_steps = sorted({c.step for c in record.checkpoints if c.step is not None})
    disk = record.disk
    if disk is None:
        if not protected_steps:
            return []
        return ["## On disk now", "", f"- Guardian protected good checkpoints at steps {_ranges(protected_steps)}; "
                "this source does not say which are still on disk (run `guardian report` on the run's output "
                "directory).", ""]
    out = ["## On disk now", "", f"In `{disk.run_dir}`:", ""]
    for item in disk.checkpoints:
        where = "Guardian's protected copy" if item.protected else "Trainer's checkpoint"
        out.append(f"- `{item.path.relative_to(disk.run_dir)}` (step {item.step}, {where}): weights "
                   f"{describe(item.weights)}.")
    if not disk.checkpoints and disk.final is None:
        out.append("- No checkpoint folders and no saved weights: nothing to resume from.")
    elif not disk.checkpoints:
        out.append("- No checkpoint folders.")
    gone = sorted(set(protected_steps) - disk.steps(protected=True))
    if gone:
        out.append(f"- Protected by Guardian at steps {_ranges(gone)}, removed since by rotation (Guardian keeps "
                   "the newest good checkpoints; Trainer's `save_total_limit` removes the originals): not on disk.")
    if disk.final is not None:
        out.append(f"- Final weights saved in the output directory: {describe(disk.final)}.")
    latest, resume = disk.latest, disk.resume_from()
    if latest is not None and latest.finite is False:
        out.append(f"- **The final weights (`{latest.folder}`) are not finite (NaN/inf).**")
    if resume is not None and latest is not None and latest.finite is False:
        out.append(f"- Resume from `{resume.path}` (the newest checkpoint with finite weights): "
                   f"`trainer.train(resume_from_checkpoint=\"{resume.path}\")`.")
    elif latest is not None and latest.finite is False and disk.unchecked():
        out.append("- No checked checkpoint has finite weights; these were not checked: "
                   + ", ".join(f"`{c.path.relative_to(disk.run_dir)}`" for c in disk.unchecked()) + ".")
    elif latest is not None and latest.finite is False:
        out.append("- No checkpoint on disk has finite weights: start again from the base model.")
    elif resume is not None:
        out.append(f"- To continue: the newest checkpoint with finite weights is `{resume.path}`.")
    return out + [""]


def _bad_samples(record: RunRecord) -> list[str]:
    """The samples of the skipped updates, from the run's bad-sample file (the first BAD_SAMPLE_ROWS_MAX)."""
    samples = record.bad_samples
    if not samples:
        return []
    steps = sorted({s.step for s in samples})
    verified = sum(s.index_verified for s in samples)
    out = ["## Samples of the skipped updates", "",
           f"{plural(len(samples), 'sample')} of {plural(len(steps), 'skipped step')} ({_ranges(steps)}) in "
           f"`{record.bad_samples_file}`; {verified} with a dataset index checked against the dataset. A later "
           "run in the same output folder masks them (labels -100) unless `mask_known_bad_samples=False`.", "",
           "| step | rules | micro-batch, row | index | verified | excerpt |",
           "| ---: | --- | --- | ---: | --- | --- |"]
    for s in samples[:BAD_SAMPLE_ROWS_MAX]:
        excerpt = "`" + _cell(_flat(s.excerpt, 80).replace("`", "'")) + "`" if s.excerpt else "—"
        out.append(f"| {s.step} | {_cell(', '.join(s.rules))} | {s.micro_batch}, {s.row} | {_index(s)} "
                   f"| {'yes' if s.index_verified else 'no'} | {excerpt} |")
    if len(samples) > BAD_SAMPLE_ROWS_MAX:
        out.append(f"\n{len(samples) - BAD_SAMPLE_ROWS_MAX} more samples are not listed (see the file).")
    return out + [""]


def bad_sample_lines(record: RunRecord, limit: int = BAD_SAMPLE_LINES_MAX) -> list[str]:
    """The samples of the skipped updates as plain lines for the terminal (the first `limit`, then a count)."""
    samples = record.bad_samples
    if not samples:
        return []
    steps = sorted({s.step for s in samples})
    lines = [f"{plural(len(samples), 'sample')} of skipped updates (steps {_ranges(steps)}) in "
             f"{record.bad_samples_file}:"]
    for s in samples[:limit]:
        checked = " (verified)" if s.index_verified else ""
        excerpt = f"  {_flat(s.excerpt, 60)!r}" if s.excerpt else ""
        lines.append(f"  step {s.step:>7}  {', '.join(s.rules):<22} index {_index(s)}{checked}{excerpt}")
    if len(samples) > limit:
        lines.append(f"  ... and {len(samples) - limit} more")
    return lines


def bad_samples_json(record: RunRecord, limit: int = BAD_SAMPLE_ROWS_MAX) -> dict[str, Any]:
    """The samples of the skipped updates for `guardian report --json` (the first `limit`, and the total)."""
    return {"file": record.bad_samples_file or None, "total": len(record.bad_samples),
            "listed": [s.to_dict() for s in record.bad_samples[:limit]]}


def disk_json(record: RunRecord) -> dict[str, Any] | None:
    """What is on disk now, for `guardian report --json` (None where the source names no output directory)."""
    disk = record.disk
    if disk is None:
        return None
    latest, resume = disk.latest, disk.resume_from()
    return {"run_dir": str(disk.run_dir),
            "checkpoints": [{"path": str(c.path), "step": c.step, "protected": c.protected,
                             "weights_finite": c.weights.finite} for c in disk.checkpoints],
            "final_weights": None if latest is None else {"path": str(latest.folder), "finite": latest.finite},
            "resume_from": None if resume is None else str(resume.path)}


def _index(sample: BadSample) -> str:
    return "null" if sample.index is None else str(sample.index)


def _flat(text: str | None, chars: int) -> str:
    """Text on one line, cut to `chars` characters (an ellipsis marks the cut)."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= chars else flat[:chars - 1] + "…"


def _rollback_line(record: RunRecord, action: ActionEvent) -> str:
    """What a rollback did (replayed: would have done), and when."""
    step = action.step
    if record.replayed:
        return f"Step {step}: would have rolled back to the newest good snapshot or checkpoint before the anomaly."
    if action.rollback_to_step is None:
        return f"Step {step}: {action.outcome.describe()}."
    target = action.rollback_to_step
    when = ""
    if action.time > 0:  # numbered and timed by the event file
        when = " at " + datetime.fromtimestamp(action.time, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        if record.start_time is not None:
            when += f" ({_duration(action.time - record.start_time)} into the run)"
    seconds = action.rollback_seconds
    took = f", restored in {seconds * 1000:.1f} ms" if seconds is not None else ""
    return (f"Step {step}{when}: rolled back to step {target} from {action.rollback}{took}; the "
            f"{step - target} steps since then were discarded, and the data that caused the trouble was not replayed.")


def _would_stop_line(record: RunRecord, step: int) -> str:
    stop = next(d for d in record.decisions if d.step == step and any(a.kind is ActionKind.STOP for a in d.actions))
    line = f"Step {step}: {stop.rule} would have stopped the run"
    restore = any(a.kind is ActionKind.STOP and stop_restore(a) is Restore.BEST_EVAL for a in stop.actions)
    best = stop.finding.evidence.get("best")
    if restore and isinstance(best, (int, float)):
        line += f" and restored the weights of its best evaluation (step {stop.finding.evidence.get('best_step')}, " \
                f"{stop.finding.metric} {best:.4g})"
    metric = stop.finding.metric
    points = finite_points(record.eval.get(metric) or record.train.get(metric))
    if points:
        line += f"; the run went on to step {record.last_step} and ended at {metric} {points[-1][1]:.4g}"
    return line + "." + _after_the_stop(points, step, metric)


def _after_the_stop(points: list[tuple[int, float]], step: int, metric: str) -> str:
    """What the log shows after a stop the rules would have made: the evidence for (or against) stopping."""
    later = [(s, v) for s, v in points if s > step]
    if not later:
        return " The log ends there: it cannot say whether the run would have improved later."
    best_later = min(later, key=lambda p: p[1])
    reference = min((v for s, v in points if s <= step), default=None)
    if reference is None:
        return ""
    if best_later[1] < reference:
        return (f" **The run went on to improve:** {metric} {best_later[1]:.4g} at step {best_later[0]}, below "
                f"{reference:.4g}; this stop would have cost that improvement.")
    return (f" The run never did better afterwards (its best later: {metric} {best_later[1]:.4g} at step "
            f"{best_later[0]}), so the stop would have kept the better weights.")


def _next_time(record: RunRecord) -> list[str]:
    out = ["## What to try next time", ""]
    if not record.decisions:
        return out + ["Nothing fired; keep these settings.", ""]
    pathologies: list[str] = []
    for rule, group in by_rule(record.decisions).items():
        first = group[0]
        out.append(f"### {rule} ({len(group)}×, steps {_ranges(sorted({d.step for d in group}))})")
        out.append("")
        if first.diagnosis:
            out.append(f"- Likely cause: {first.diagnosis}.")
        if first.fix:
            out.append(f"- Usual fix: {first.fix}.")
        if not first.diagnosis and not first.fix:
            out.append(f"- {first.finding.message}")
        out.append("")
        pathologies += [p for p in pathology_keys(first) if p not in pathologies]
    if pathologies:
        out += ["### Common pathologies behind these rules", "", "| symptom | usual cause | usual fix |",
                "| --- | --- | --- |"]
        out += ["| " + " | ".join(PATHOLOGIES[key]) + " |" for key in pathologies]
        out.append("")
    return out


def pathology_keys(decision: Decision) -> list[str]:
    """Which of DIGEST.md's pathologies a decision points at, judged from its metric and evidence."""
    evidence, metric = decision.finding.evidence, decision.finding.metric
    if "non_finite" in evidence:
        return ["nan", "explosion"]
    if "best_step" in evidence or "evals_since_best" in evidence:
        return ["overfitting"]
    if evidence.get("condition") == "no_improvement":
        return ["underfitting", "slow_start"]
    if evidence.get("condition") == "stuck_at_zero":
        return []
    if "ratio" in evidence and metric == "learning_rate":
        return ["explosion", "oscillation"]
    if metric == "grad_norm":
        return ["vanishing"] if evidence.get("side") == "below" else ["explosion", "abnormal", "oscillation"]
    if metric == "loss":
        return ["spike", "abnormal", "oscillation"]
    return []



def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 7] -> "1–3, 7"."""
    spans: list[list[int]] = []
    for s in sorted(set(steps)):
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
