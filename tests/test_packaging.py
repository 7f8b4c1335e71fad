"""A plain `pip install` gives the `guardian` package with its callbacks and shipped rules, nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
    )
    [built] = out.glob("training_guardian-*.whl")
    return built


def test_wheel_holds_one_top_level_package_with_rules_and_callbacks(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"guardian"}
    assert "guardian/shipped_rules/default.yaml" in names
    assert "guardian/callbacks/trainer_callback.py" in names
    assert "guardian/py.typed" in names
    assert "guardian/schema/wire-v1.schema.json" in names
    for init in (ROOT / "guardian").rglob("__init__.py"):  # every subpackage of the source tree ships
        assert f"guardian/{init.relative_to(ROOT / 'guardian').as_posix()}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "guardian = guardian.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_finds_its_shipped_rules(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    code = ("import guardian, guardian.rulefile.reader as r; rs = r.load_rules(); "
            "print(guardian.__file__); print(r.default_rules_path()); print(len(rs.rules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(target)}, cwd=tmp_path)
    module, rules_path, count = result.stdout.split()
    assert module.startswith(str(target)) and rules_path.startswith(str(target))
    assert int(count) >= 9
