"""Where the shared real training logs are, for the tests that read them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from repopaths import REPO_ROOT


def _real_logs_dir() -> Path:
    """GUARDIAN_FIXTURES (the fixtures root, or real-logs itself) or the repo's sibling shared/ folder."""
    override = os.environ.get("GUARDIAN_FIXTURES")
    if override:
        root = Path(override)
        return root / "real-logs" if (root / "real-logs").is_dir() else root
    return REPO_ROOT.parent / "shared/fixtures/real-logs"


REAL_LOGS = _real_logs_dir()
HAVE_FIXTURES = (REAL_LOGS / "SOURCES.tsv").is_file()
NO_FIXTURES = f"real-log fixtures not found at {REAL_LOGS} (set GUARDIAN_FIXTURES to the fixtures folder)"
if os.environ.get("CI") and not HAVE_FIXTURES:
    raise RuntimeError(NO_FIXTURES + "; CI must run these tests")
needs_fixtures = pytest.mark.skipif(not HAVE_FIXTURES, reason=NO_FIXTURES)
