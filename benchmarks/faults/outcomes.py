"""How a (scenario, seed) unit ended, judged by final test loss only: pure functions over numbers and records.

- reference: the clean run's final test loss; for `overfit_noisy_eval` the best test loss the unguarded run
  reached at any evaluation (its final one is the overfitted one); for `lr_too_high` the clean run is the same
  run at the healthy rate, so the clean loss again.
- ruined: the unguarded final test loss is non-finite or above reference x (1 + RUIN_TOLERANCE).
- saved (per variant): its final test loss is finite and at most reference x (1 + RUIN_TOLERANCE).
- harmed (per variant): its final test loss is above unguarded x (1 + HARM_TOLERANCE), or non-finite where the
  unguarded one was finite.
- on healthy families, false_action: Guardian carried out any action (every record in `interventions` is one);
  alerts (decisions whose actions are all `alert`) are counted apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

RUIN_TOLERANCE = 0.05
HARM_TOLERANCE = 0.02
PEERS = ("guardian", "hf_early_stop", "spike_stop")


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def reference_loss(family: str, clean_final: float, unguarded_test_at_eval: Sequence[tuple[int, float]] = ()) -> float:
    if family == "overfit_noisy_eval":
        best = [loss for _, loss in unguarded_test_at_eval if finite(loss)]
        if best:
            return min(best)
    return clean_final


def is_ruined(unguarded: float, reference: float) -> bool:
    return not finite(unguarded) or unguarded > reference * (1 + RUIN_TOLERANCE)


def is_saved(loss: float, reference: float) -> bool:
    return finite(loss) and loss <= reference * (1 + RUIN_TOLERANCE)


def is_harmed(loss: float, unguarded: float) -> bool:
    if not finite(unguarded):
        return False
    return not finite(loss) or loss > unguarded * (1 + HARM_TOLERANCE)


def count_actions(interventions: Iterable[Any]) -> int:
    """Every intervention record (a dict) is an action Guardian carried out."""
    return sum(1 for r in interventions if isinstance(r, dict))


def is_alert(decision: Mapping[str, Any]) -> bool:
    return all(str(a).split("(", 1)[0].strip() == "alert" for a in decision.get("actions", []))


def count_alerts(decisions: Iterable[Mapping[str, Any]]) -> int:
    return sum(1 for d in decisions if is_alert(d))


def classify(*, family: str, healthy: bool, rescuable: bool, clean: float, unguarded: float,
             unguarded_test_at_eval: Sequence[tuple[int, float]] = (), variants: Mapping[str, float],
             guardian: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The outcome of one unit: `variants` maps each variant run (guardian, peers) to its final test loss."""
    reference = reference_loss(family, clean, unguarded_test_at_eval)
    out: dict[str, Any] = {
        "reference": reference, "ruined": (not healthy) and is_ruined(unguarded, reference), "healthy": healthy,
        "rescuable": rescuable,
        "saved": {v: is_saved(loss, reference) for v, loss in variants.items()},
        "harmed": {v: is_harmed(loss, unguarded) for v, loss in variants.items()},
    }
    if guardian is not None:
        actions, alerts = count_actions(guardian.get("interventions", [])), count_alerts(guardian.get("decisions", []))
        out.update(actions=actions, alerts=alerts, false_action=healthy and actions > 0)
    return out


def summarize(units: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> dict[str, int]:
    """Counts over `units` (each a dict with an "outcome" from `classify` and "stopped": {variant: bool})."""
    row = {"units": len(units), "ruined": sum(u["outcome"]["ruined"] for u in units)}
    for v in variants:
        row[f"saved_{v}"] = sum(u["outcome"]["ruined"] and u["outcome"]["saved"].get(v, False) for u in units)
        row[f"harmed_{v}"] = sum(u["outcome"]["harmed"].get(v, False) for u in units)
        row[f"healthy_stops_{v}"] = sum(u["outcome"]["healthy"] and u.get("stopped", {}).get(v, False) for u in units)
    row["false_actions"] = sum(bool(u["outcome"].get("false_action")) for u in units)
    row["healthy_alerts"] = sum(u["outcome"].get("alerts", 0) for u in units if u["outcome"]["healthy"])
    row["healthy_units_alerted"] = sum(u["outcome"].get("alerts", 0) > 0 for u in units if u["outcome"]["healthy"])
    return row
