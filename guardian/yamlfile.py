"""Read YAML as plain data while remembering the line of every mapping and key.

Rule files are data: they are read with PyYAML's safe loader (no tags, no code), and every mapping comes
back as a `Located` dict that knows its own line and the line of each key, so validation errors can point
at the line to fix.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml

from guardian.errors import Problem


class Located(dict):  # type: ignore[type-arg]
    """A dict from a YAML mapping, with `line` (1-based) and `key_lines` for its keys."""

    line: int = 0
    key_lines: dict[Any, int]

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class _Loader(yaml.SafeLoader):
    """Safe loader that records lines, refuses duplicate keys and reads `1e-6` as a float."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.problems: list[Problem] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Located:
        mapping = Located()
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                self.problems.append(
                    Problem(self.source, line, None, f"a key must be plain text, got {key!r}; write 'name: value'")
                )
                continue
            if key in mapping.key_lines:
                self.problems.append(
                    Problem(self.source, line, None, f"key '{key}' appears twice in the same mapping; keep one")
                )
            mapping.key_lines[key] = line
            mapping[key] = self.construct_object(value_node, deep=True)
        return mapping


# YAML 1.1 reads 1e-6 (no dot) as a string; users write it that way, so accept it as a float.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_mapping)


def load_yaml(text: str, source: str) -> tuple[Any, list[Problem]]:
    """Parse YAML text; return the data and any problems (syntax errors, duplicate keys)."""
    loader = _Loader(text, source)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        return None, [Problem(source, line, None, _explain(exc))]
    except yaml.YAMLError as exc:
        return None, [Problem(source, None, None, f"YAML error: {exc}; fix the YAML syntax")]
    finally:
        loader.dispose()
    return data, loader.problems


def _explain(exc: yaml.MarkedYAMLError) -> str:
    """Say what is wrong and what to do: a refused tag (rule files are data) or a syntax error."""
    reason = exc.problem or str(exc)
    tag = re.search(r"for the tag '([^']+)'", reason)
    if isinstance(exc, yaml.constructor.ConstructorError) and tag:
        return (f"the YAML tag '{tag.group(1)}' is not allowed: rule files are plain data (text, numbers, "
                f"lists, mappings); remove the tag")
    return f"YAML syntax error: {reason}; check the indentation, brackets and quotes on this line and the one before"
