"""Small robust statistics shared by the detectors."""

from __future__ import annotations

from collections.abc import Iterable

MAD_SCALE = 1.4826  # makes the MAD of normally distributed data estimate its standard deviation


def median(values: Iterable[float]) -> float:
    """The median of the values (at least one)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
