"""Streaming detectors: each turns a metric stream into findings, with state that survives a restart."""

from __future__ import annotations

from guardian.detectors.base import Detector, Finding
from guardian.detectors.grad_collapse import GradCollapseDetector
from guardian.detectors.jump import JumpDetector
from guardian.detectors.non_finite import NonFiniteDetector
from guardian.detectors.overfitting import OverfittingDetector
from guardian.detectors.plateau import PlateauDetector
from guardian.detectors.ratio import RatioDetector
from guardian.detectors.reversal import ReversalDetector
from guardian.detectors.robust_zscore import RobustZScoreDetector
from guardian.detectors.threshold import ThresholdDetector
from guardian.detectors.warmup_rise import WarmupRiseDetector

DETECTORS: dict[str, type] = {
    cls.kind: cls
    for cls in (
        NonFiniteDetector,
        ThresholdDetector,
        RobustZScoreDetector,
        OverfittingDetector,
        PlateauDetector,
        JumpDetector,
        RatioDetector,
        ReversalDetector,
        WarmupRiseDetector,
        GradCollapseDetector,
    )
}

__all__ = [
    "DETECTORS",
    "Detector",
    "Finding",
    "GradCollapseDetector",
    "JumpDetector",
    "NonFiniteDetector",
    "OverfittingDetector",
    "PlateauDetector",
    "RatioDetector",
    "ReversalDetector",
    "RobustZScoreDetector",
    "ThresholdDetector",
    "WarmupRiseDetector",
]
