"""A metric judged against a reference measured alongside it, such as a reference batch's loss now and before."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from guardian.detectors.base import Finding, JSONValue
from guardian.detectors.non_finite import check_finite, check_metric


@dataclass
class RatioDetector:
    """Detects a metric more than `above` times a reference metric reported with it, or not finite.

    Both values must be in the same observation; an observation without the reference is not judged. Guardian's
    training side reports `probe_loss` (the loss of a fixed reference batch with the current weights) and
    `probe_loss_ref` (the same batch's loss with the best good state it can roll back to) when a rule fires, so
    this tells damaged weights (the reference batch got much worse) from a bad batch (it did not).

    Parameters:
        metric: the metric to judge, e.g. "probe_loss".
        reference_metric: the metric it is compared with, e.g. "probe_loss_ref".
        above: fire when metric > above x reference; greater than 1.
        min_difference: and metric - reference is more than this (in the metric's units); 0 or more.
        non_finite: also fire when the metric is NaN or infinite while the reference is finite.
    """

    kind: ClassVar[str] = "ratio"

    metric: str
    reference_metric: str
    above: float = 1.5
    min_difference: float = 0.0
    non_finite: bool = True
    _fired: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        check_metric("metric", self.metric)
        check_metric("reference_metric", self.reference_metric)
        if self.metric == self.reference_metric:
            raise ValueError(f"metric and reference_metric must differ, both are {self.metric!r}")
        check_finite("above", self.above, 1.0, strict=True)
        check_finite("min_difference", self.min_difference, 0.0)
        if not isinstance(self.non_finite, bool):
            raise ValueError(f"non_finite must be true or false, got {self.non_finite!r}")

    @property
    def warming_up(self) -> bool:
        return False

    def update(self, step: int, values: Mapping[str, float]) -> Finding | None:
        value, reference = values.get(self.metric), values.get(self.reference_metric)
        if value is None or reference is None or not math.isfinite(reference) or reference < 0:
            return None
        value = float(value)
        if math.isfinite(value):
            if value <= self.above * reference or value - reference <= self.min_difference:
                return None
            why = f"{value / reference:.3g}x" if reference > 0 else "above"
        elif self.non_finite:
            why = "not finite, against"
        else:
            return None
        self._fired += 1
        return Finding(
            metric=self.metric, value=value, threshold=self.above * reference, onset_step=step,
            message=(f"{self.metric} {value:.4g} at step {step} is {why} its reference {self.reference_metric} "
                     f"{reference:.4g} (limit {self.above:g}x)"),
            evidence={"reference": reference, "ratio": value / reference if reference > 0 else math.inf,
                      "above": self.above},
        )

    def state_dict(self) -> dict[str, JSONValue]:
        return {"fired": self._fired}

    def load_state_dict(self, state: Mapping[str, JSONValue]) -> None:
        self._fired = int(state.get("fired", 0))  # type: ignore[arg-type]
