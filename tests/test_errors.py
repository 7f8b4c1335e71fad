"""One error root: every exception class Guardian defines is a GuardianError and the nearest builtin error."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import guardian
from guardian.errors import GuardianError

SKIP = ("guardian.callbacks", "guardian.tui", "guardian.testing", "guardian.commands.report.plot")


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(guardian.__path__, "guardian.")]
    return [name for name in names if not name.startswith(SKIP)]


def test_every_error_class_has_the_one_root() -> None:
    found = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name:
                found.append(cls)
                assert issubclass(cls, GuardianError), f"{name}.{cls.__name__} is not a GuardianError"
    assert {cls.__name__ for cls in found} >= {"WireError", "DaemonError", "StoreError", "RefusedYAML", "SeqGap"}


def test_the_yaml_refusal_keeps_its_mark() -> None:
    import yaml

    from guardian.rulefile.yamlfile import RefusedYAML

    mark = yaml.Mark("rules.yaml", 0, 3, 0, None, None)
    error = RefusedYAML("anchors are not allowed", mark)
    assert isinstance(error, GuardianError) and isinstance(error, yaml.YAMLError)
    assert error.problem == "anchors are not allowed" and error.problem_mark is mark
