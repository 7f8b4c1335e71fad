"""Where things are in the repository, for tests in any subfolder of tests/ (and the benchmarks that borrow the kits)."""

from __future__ import annotations

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent  # tests/: the shared kits, scripts/ and stubs/
REPO_ROOT = TESTS_DIR.parent
SCRIPTS_DIR = TESTS_DIR / "scripts"
STUBS_DIR = TESTS_DIR / "stubs"
