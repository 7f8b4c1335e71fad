"""Read YAML as plain data while remembering the line of every mapping and key.

Rule files are data: they are read with PyYAML's safe loader (no tags, no code), and every mapping comes
back as a `Located` dict that knows its own line and the line of each key, so validation errors can point
at the line to fix. Anchors, aliases and merge keys are refused as the parser meets them (before anything
is expanded: a few hundred bytes of aliases would otherwise grow into gigabytes), and so is nesting deeper
than `MAX_DEPTH`, a value Python cannot hold (a 5,000-digit integer, a bad date), an integer beyond
`MAX_INT` and text with lone surrogates. Values quoted in problems are cut to `QUOTE_CHARS`.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml

from guardian.errors import GuardianError, Problem

MAX_DEPTH = 32  # rule files nest about 7 deep
QUOTE_CHARS = 300  # the most of a value a problem quotes
MAX_INT = 2**53  # the largest integer a float holds exactly; step counts and windows are far below it
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MERGE_TAG = "tag:yaml.org,2002:merge"


def clip(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` with control characters escaped (no forged log lines), cut to `limit` characters with a note of
    how long it was."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters in all)"


def shown(value: Any) -> str:
    """A value as a problem quotes it: its repr, cut to `QUOTE_CHARS`."""
    return clip(repr(value))


class Located(dict):  # type: ignore[type-arg]
    """A dict from a YAML mapping, with `line` (1-based) and `key_lines` for its keys."""

    line: int = 0
    key_lines: dict[Any, int]

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class RefusedYAML(GuardianError, yaml.MarkedYAMLError):
    """YAML that is valid but not allowed in a rule file; `problem` is the whole explanation."""

    def __init__(self, message: str, mark: yaml.Mark) -> None:
        super().__init__(problem=message, problem_mark=mark)


class _Loader(yaml.SafeLoader):
    """Safe loader that records lines, refuses duplicate keys and reads `1e-6` as a float."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.problems: list[Problem] = []
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise RefusedYAML("anchors and aliases are not allowed in rule files (&name, *name); "
                              "write each value out in full", event.start_mark)
        if self.depth >= MAX_DEPTH:
            raise RefusedYAML(f"the YAML nests deeper than {MAX_DEPTH} levels; a rule file needs about 7",
                              event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)  # type: ignore[return-value]
        finally:
            self.depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            value = super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, ArithmeticError, LookupError, AttributeError, TypeError) as exc:
            # what PyYAML's constructors raise for values they cannot hold: int() of 5,000 digits,
            # month 13 in a !!timestamp, `!!bool loss`
            reason = "the number has too many digits" if "digits" in str(exc) else clip(str(exc))
            kind = node.tag.rsplit(":", 1)[-1]
            raise RefusedYAML(f"cannot read this value as {kind} ({reason}); write a plain number or text",
                              node.start_mark) from None
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise RefusedYAML(f"the integer {clip(str(value), 40)} is out of range; integers in rule files are "
                              "at most 2^53 (9007199254740992) in size", node.start_mark)
        if isinstance(value, str) and not value.isascii() and _SURROGATE.search(value):
            raise RefusedYAML(f"text {shown(value)} holds a lone surrogate (\\ud800-\\udfff), which is not a "
                              "character; remove it", node.start_mark)
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Located:
        mapping = Located()
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                raise RefusedYAML("merge keys ('<<') are not allowed in rule files; write the keys out",
                                  key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                self.problems.append(
                    Problem(self.source, line, None, f"a key must be plain text, got {shown(key)}; write 'name: value'")
                )
                continue
            if key in mapping.key_lines:
                self.problems.append(Problem(self.source, line, None,
                                             f"key '{clip(str(key))}' appears twice in the same mapping; keep one"))
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
    """Parse YAML text; return the data and any problems (syntax errors, duplicate keys, refused YAML)."""
    loader = _Loader(text, source)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        return None, [Problem(source, line, None, _explain(exc))]
    except yaml.YAMLError as exc:
        return None, [Problem(source, None, None, f"YAML error: {clip(str(exc))}; fix the YAML syntax")]
    finally:
        loader.dispose()
    return data, loader.problems


def _explain(exc: yaml.MarkedYAMLError) -> str:
    """Say what is wrong and what to do: refused YAML, a refused tag (rule files are data) or a syntax error."""
    reason = clip(exc.problem or str(exc))
    if isinstance(exc, RefusedYAML):
        return reason
    tag = re.search(r"for the tag '([^']+)'", reason)
    if isinstance(exc, yaml.constructor.ConstructorError) and tag:
        return (f"the YAML tag '{tag.group(1)}' is not allowed: rule files are plain data (text, numbers, "
                f"lists, mappings); remove the tag")
    return f"YAML syntax error: {reason}; check the indentation, brackets and quotes on this line and the one before"
