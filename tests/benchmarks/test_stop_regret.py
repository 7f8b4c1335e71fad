"""benchmarks/stop_regret.py runs on the real-log fixtures and its figures stay within the 5 % limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from realpaths import needs_fixtures
from repopaths import REPO_ROOT


@needs_fixtures
def test_stop_regret_runs_on_the_real_logs_and_no_stop_costs_more_than_five_percent(tmp_path: Path) -> None:
    out = tmp_path / "stop_regret.json"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "stop_regret.py"), "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "within the 5% limit" in result.stdout
    assert json.loads(out.read_text())
