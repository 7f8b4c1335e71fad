"""The engine is the pure core: importing it loads no YAML and nothing that reads rule files."""

from __future__ import annotations

import subprocess
import sys

CHECK = ("import guardian.engine.engine, sys; "
         "assert 'yaml' not in sys.modules and not any(m.startswith('guardian.rulefile') for m in sys.modules), "
         "sorted(m for m in sys.modules if m == 'yaml' or m.startswith('guardian.rulefile'))")


def test_the_engine_imports_no_yaml_and_no_rule_file_reader() -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
