"""The suite's result files: a Markdown report (summary per family, then every unit) and the JSON document."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import outcomes
from scenarios import FAMILIES

PEER_LABELS = {"guardian": "Guardian", "hf_early_stop": "HF early stop", "spike_stop": "spike stop"}


def fmt(x: float | str | None) -> str:
    """A loss with 4 decimals; "nan"/"inf" as such (also when read back from the JSON, where they are strings)."""
    if x is None:
        return "—"
    x = float(x)
    return f"{x:.4f}" if math.isfinite(x) else str(x)


def json_safe(value: Any) -> Any:
    """Strict-JSON types: non-finite floats as "nan", "inf", "-inf"; tuples as lists; tensors as floats."""
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):
        try:
            return json_safe(value.item())
        except (ValueError, RuntimeError):
            pass
    return str(value)


def guardian_summary(guardian: Mapping[str, Any] | None) -> str:
    """`n acts: skip_update x5, rollback x1 (rules)` from the decisions; `quiet` when nothing fired."""
    if not guardian:
        return "—"
    decisions = guardian.get("decisions", [])
    acted = outcomes.count_actions(guardian.get("interventions", []))
    alerts = outcomes.count_alerts(decisions)
    kinds = Counter("+".join(d["actions"]) for d in decisions if not outcomes.is_alert(d))
    rules = sorted({d["rule"] for d in decisions})
    if not decisions:
        return "quiet"
    parts = [f"{acted} acts"] + [f"{k}×{n}" for k, n in kinds.most_common(3)]
    if alerts:
        parts.append(f"{alerts} alerts")
    first = min((d["step"] for d in decisions), default=None)
    return ", ".join(parts) + f" from step {first} ({', '.join(rules)})"


def summary_rows(units: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> list[tuple[str, dict[str, int]]]:
    """Per family (rescuable units), the total over them, then the units no intervention can rescue."""
    rows = []
    rescuable = [u for u in units if u["outcome"]["rescuable"]]
    for family in FAMILIES:
        members = [u for u in rescuable if u["family"] == family]
        if members:
            rows.append((family, outcomes.summarize(members, variants)))
    rows.append(("total (rescuable)", outcomes.summarize(rescuable, variants)))
    unrescuable = [u for u in units if not u["outcome"]["rescuable"]]
    if unrescuable:
        rows.append(("unrescuable (apart)", outcomes.summarize(unrescuable, variants)))
    return rows


def summary_table(rows: list[tuple[str, dict[str, int]]], variants: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    peers = [v for v in outcomes.PEERS if v in variants]
    headers = ["family", "units", "ruined"] + [f"saved {PEER_LABELS[v]}" for v in peers] + [
        f"harmed {PEER_LABELS[v]}" for v in peers]
    if "guardian" in variants:
        headers += ["false actions (healthy)", "alerts (healthy)"]
    headers += [f"healthy stops {PEER_LABELS[v]}" for v in peers if v != "guardian"]
    table = []
    for name, r in rows:
        cells = [name, str(r["units"]), str(r["ruined"])]
        cells += [f"{r[f'saved_{v}']}/{r['ruined']}" for v in peers]
        cells += [str(r[f"harmed_{v}"]) for v in peers]
        if "guardian" in variants:
            cells += [str(r["false_actions"]), f"{r['healthy_alerts']} in {r['healthy_units_alerted']} units"]
        cells += [str(r[f"healthy_stops_{v}"]) for v in peers if v != "guardian"]
        table.append(cells)
    return headers, table


SHORT = {"guardian": "G", "hf_early_stop": "ES", "spike_stop": "SS"}


def console_table(rows: list[tuple[str, dict[str, int]]], variants: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The summary, narrow enough for a terminal: G = Guardian, ES = HF early stop, SS = spike stop."""
    peers = [v for v in outcomes.PEERS if v in variants]
    tag = "/".join(SHORT[v] for v in peers)
    others = [v for v in peers if v != "guardian"]
    headers = ["family", "units", "ruined"] + ([f"saved {tag}", f"harmed {tag}"] if peers else [])
    if "guardian" in peers:
        headers.append("healthy: G false actions / alerts")
    if others:
        headers.append("healthy stops " + "/".join(SHORT[v] for v in others))
    out = []
    for name, r in rows:
        cells = [name, str(r["units"]), str(r["ruined"])]
        if peers:
            cells += ["/".join(str(r[f"saved_{v}"]) for v in peers), "/".join(str(r[f"harmed_{v}"]) for v in peers)]
        if "guardian" in peers:
            cells.append(f"{r['false_actions']} / {r['healthy_alerts']}")
        if others:
            cells.append("/".join(str(r[f"healthy_stops_{v}"]) for v in others))
        out.append(cells)
    return headers, out


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def unit_rows(units: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    peers = [v for v in outcomes.PEERS if v in variants]
    headers = ["scenario", "seed", "family", "trainer", "clip", "accum", "fault", "ref", "clean", "unguarded"] + [
        PEER_LABELS[v] for v in peers] + ["verdict", "Guardian's actions"]
    rows = []
    for u in units:
        o = u["outcome"]
        losses = u["losses"]
        verdict = "healthy" if o["healthy"] else ("ruined" if o["ruined"] else "not ruined")
        if not o["rescuable"]:
            verdict += " (unrescuable)"
        marks = []
        for v in peers:
            if o["ruined"] and o["saved"].get(v):
                marks.append(f"{PEER_LABELS[v]} saved")
            if o["harmed"].get(v):
                marks.append(f"{PEER_LABELS[v]} harmed")
        if o.get("false_action"):
            marks.append("false action")
        rows.append([u["scenario"], str(u["seed"]), u["family"], u["trainer"], "on" if u["clip"] else "off",
                     str(u["accum"]), u["fault"], fmt(o["reference"]), fmt(losses.get("clean")),
                     fmt(losses.get("unguarded"))] + [fmt(losses.get(v)) for v in peers] + [
                    "; ".join([verdict] + marks), guardian_summary(u.get("guardian"))])
    return headers, rows


def markdown(doc: Mapping[str, Any], machine: str) -> str:
    """The report of one suite run, from its JSON document (`suite.build_document`)."""
    info, half, variants, seeds = doc["machine"], doc["half"], doc["variants"], doc["seeds"]
    units, settings, elapsed_seconds, runs = doc["units"], doc["settings"], doc["elapsed_seconds"], len(doc["runs"])
    cpu = doc["cpu_seconds"]
    headers, table = summary_table(summary_rows(units, variants), variants)
    uh, ur = unit_rows(units, variants)
    return "\n".join([
        f"# Fault suite: {half} half",
        "",
        f"- machine: {machine}",
        f"- date (UTC): {info['date_utc']}",
        f"- command: `{info['command']}`",
        f"- half: {half}; seeds {', '.join(map(str, seeds))}; variants {', '.join(variants)}; "
        f"{len(units)} units, {runs} training runs, {elapsed_seconds / 60:.1f} min wall with {settings['workers']} "
        f"workers; the runs' CPU time {cpu / 60:.1f} min (about {cpu / 60 / max(1, settings['workers']):.0f} min of "
        "wall time on an otherwise idle machine with that many cores)",
        f"- settings: {dict(settings)}",
        f"- Guardian code: {info.get('guardian_code')}",
        "",
        "Outcomes are judged by the final test loss (the suite's own forward over 256 fixed test lines, after "
        "`train()` returns). ruined: the unguarded run ends non-finite or more than "
        f"{outcomes.RUIN_TOLERANCE:.0%} above the reference (the clean twin; for overfit_noisy_eval the best test "
        f"loss the unguarded run reached at any evaluation). saved: finite and within {outcomes.RUIN_TOLERANCE:.0%} "
        f"of the reference (counted over the ruined units). harmed: more than {outcomes.HARM_TOLERANCE:.0%} worse "
        "than the unguarded run (or non-finite where it was finite), over every unit. false actions: healthy units "
        "where Guardian carried out any action (alerts counted apart). healthy stops: healthy units a peer stopped "
        "before max_steps. Units no intervention can rescue (every label masked from step 1) are reported apart.",
        "",
        "## Summary",
        "",
        _md_table(headers, table),
        "",
        "## Every unit",
        "",
        _md_table(uh, ur),
        "",
    ])
