"""Rule files: YAML in, validated `Rule`s (`guardian.engine.rules`) out, with one clear problem per mistake
(file, line, rule); and where the shipped rule files are."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import stat
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from guardian.detectors import DETECTORS
from guardian.detectors.base import Detector
from guardian.engine.actions import ActionKind, ActionSpec, check_action_params
from guardian.engine.metricnames import closest, is_known
from guardian.engine.policy import PolicySettings
from guardian.engine.rules import Escalation, Rule, RuleSet
from guardian.errors import Problem, RuleFileError
from guardian.events import Severity
from guardian.rulefile.yamlfile import Located, clip, load_yaml, shown

SCHEMA_VERSION = 1
# Detector fields that name the metrics a rule watches; set from the rule's `metric`/`metrics`.
METRIC_FIELDS = ("metric", "metrics", "eval_metric")
# Every detector parameter that names a metric (checked against the names known to be logged).
METRIC_PARAMS = (*METRIC_FIELDS, "train_metric", "reference_metric", "lr_metric", "grad_metric")
MAX_FILE_BYTES = 256 * 1024  # a rule file is a few KiB; this bounds the time and memory one can cost
MAX_PROBLEMS = 20  # problems listed per file; the rest are counted
MESSAGE_CHARS = 1000  # the longest problem message kept (values quoted in it are cut shorter still)


def default_rules_path() -> Path:
    """Where the shipped `default.yaml` is, in a source checkout or an installed package."""
    return shipped_rules_path("default.yaml")


def shipped_rules_path(name: str) -> Path:
    """Where the shipped rule file `name` (default.yaml, preference.yaml, rl.yaml) is."""
    return Path(str(resources.files("guardian.shipped_rules").joinpath(name)))


# The shipped rules added to the defaults for a training method (`guardian.commands.doctor.method_of_trainer`).
PREFERENCE_RULES = "preference.yaml"
RL_RULES = "rl.yaml"
METHOD_RULES = {
    **{method: PREFERENCE_RULES for method in ("dpo", "kto", "bco", "orpo", "cpo", "xpo", "nash_md")},
    **{method: RL_RULES for method in ("grpo", "rloo", "ppo")},
}


# Online RL's loss has no level to judge: with advantages normalised per group it sits around 0 by construction,
# negative as often as positive, and exactly 0 when a step has no signal (which `no_reward_signal` reports).
# The default rules about the loss level would misread it, so the RL set leaves them out.
LOSS_LEVEL_RULES = ("loss_spike", "lr_too_high", "lr_collapse", "plateau", "loss_divergence", "loss_stuck_at_zero")


def shipped_rules_for(method: str | None) -> RuleSet:
    """The shipped rules for a training method: `default.yaml`, plus `preference.yaml` for DPO-family
    trainers, or `rl.yaml` for GRPO/RLOO/PPO in place of the default rules about the loss level (the defaults'
    policy applies)."""
    default = load_rules(None)
    extra = METHOD_RULES.get(method or "")
    if extra is None:
        return default
    added = load_rules(shipped_rules_path(extra))
    kept = tuple(r for r in default.rules if extra != RL_RULES or r.name not in LOSS_LEVEL_RULES)
    return RuleSet(kept + added.rules, default.policy, f"{default.source} + {added.source}")


def load_rules(path: str | Path | None = None) -> RuleSet:
    """Load and validate a rule file (the shipped defaults when `path` is None)."""
    path = Path(path) if path is not None else default_rules_path()
    try:
        data = read_rule_bytes(path)
    except FileNotFoundError as exc:
        raise _refused(path, f"cannot read the file: {exc.strerror}") from None
    return parse_rules(rule_text(data, str(path)), str(path))


def read_rule_bytes(path: Path, *, follow_symlinks: bool = True) -> bytes:
    """The bytes of a rule file: a regular file of at most `MAX_FILE_BYTES`, opened without blocking.

    FIFOs, devices, folders (and, unless `follow_symlinks`, symbolic links) are refused before they are
    opened, so nothing can block the reader or feed it forever. Raises `FileNotFoundError` when there is
    no such file and `RuleFileError` for anything else.
    """
    try:
        before = os.stat(path) if follow_symlinks else os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _refused(path, f"cannot read the file: {exc.strerror}") from None
    _check_regular(path, before.st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= 0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: it became a symbolic link since the lstat
        raise _refused(path, f"cannot read the file: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        _check_regular(path, info.st_mode)
        data = _read_at_most(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise _refused(path, f"the file is larger than {MAX_FILE_BYTES // 1024} KiB, the most a rule file may be; "
                             "a rule file needs a few KiB")
    return data


def rule_text(data: bytes, source: str) -> str:
    """The text of a rule file's bytes (UTF-8), or a `RuleFileError` saying where it is not text."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RuleFileError([Problem(source, line, None, f"the file is not UTF-8 text (byte {exc.start}); "
                                                         "save it as UTF-8")]) from None


def _check_regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else
            "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    fix = "put the rule file itself in the rules folder" if stat.S_ISLNK(mode) else "use a plain file"
    raise _refused(path, f"this is {kind}, not a regular file: rules are read only from regular files; {fix}")


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _refused(path: Path, message: str) -> RuleFileError:
    return RuleFileError([Problem(str(path), None, None, message)])


def parse_rules(text: str, source: str = "<string>") -> RuleSet:
    """Validate rule-file text; raise `RuleFileError` listing every problem found (the first `MAX_PROBLEMS`)."""
    data, problems = load_yaml(text, source)
    if data is not None or not problems:
        ruleset = _RuleFileReader(source, problems).read(data)
        if not problems:
            return ruleset
    else:  # the YAML did not parse: name the rule the error is in from the text
        problems = [dataclasses.replace(p, rule=p.rule or _rule_at_line(text, p.line)) for p in problems]
    raise RuleFileError(_bounded(sorted(problems, key=lambda p: p.line or 0), source))


def _bounded(problems: list[Problem], source: str) -> list[Problem]:
    """The first `MAX_PROBLEMS` problems, each cut to `MESSAGE_CHARS`, and a count of the rest."""
    kept = [dataclasses.replace(p, rule=p.rule and clip(p.rule), message=clip(p.message, MESSAGE_CHARS))
            for p in problems[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        kept.append(Problem(source, None, None, f"and {len(problems) - MAX_PROBLEMS} more problems; "
                                                "fix the ones above first"))
    return kept


_RULE_START = re.compile(r"""^\s*-\s+name:\s*['"]?([^'"#\s]+)""")


def _rule_at_line(text: str, line: int | None) -> str | None:
    """The name of the rule whose text holds `line`, found by its '- name:' line; None at top level."""
    name = None
    for row in text.splitlines()[: line or 0]:
        if row[:1].strip() and not row.startswith("#"):
            name = None  # a top-level key ends the rules list
        if match := _RULE_START.match(row):
            name = match.group(1)
    return name


class _RuleFileReader:
    """Walks the parsed YAML once, collecting problems instead of stopping at the first."""

    TOP_KEYS = {"version", "rules", "policy"}
    RULE_KEYS = {
        "name", "description", "metric", "metrics", "detector", "severity", "actions",
        "cooldown_steps", "escalation", "diagnosis", "fix", "enabled", "actions_when_clipped",
    }
    ESCALATION_KEYS = {"after_firings", "within_steps", "actions"}
    POLICY_KEYS = {"rollback_budget", "incident_quiet_steps", "lr_cut_factor", "repeat_window_steps"}

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        self.warnings: list[Problem] = []
        self.yaml_problems = len(problems)  # duplicate keys found while parsing; named after their rule later

    def problem(self, line: int | None, rule: str | None, message: str) -> None:
        self.problems.append(Problem(self.source, line, rule, message))

    def read(self, data: Any) -> RuleSet:
        if not isinstance(data, Located):
            self.problem(1, None, "a rule file is a mapping with 'version: 1' and a 'rules:' list")
            return RuleSet(())
        self.unknown_keys(data, self.TOP_KEYS, None, "top level")
        version = data.get("version")
        if "version" not in data:
            self.problem(1, None, f"'version' is missing; add 'version: {SCHEMA_VERSION}' at the top of the file")
        elif not _is_int(version) or version != SCHEMA_VERSION:
            self.problem(data.line_of("version"), None,
                         f"'version' must be {SCHEMA_VERSION} (the rule-file format this Guardian reads), "
                         f"got {shown(version)}")
        policy = self.read_policy(data.get("policy", Located()), data.line_of("policy"))
        rules_data = data.get("rules")
        if not isinstance(rules_data, list) or not rules_data:
            self.problem(data.line_of("rules"), None, "'rules' must be a non-empty list of rules")
            return RuleSet((), policy, self.source)
        rules = [self.read_rule(item, data.line_of("rules")) for item in rules_data]
        kept = tuple(rule for rule in rules if rule is not None)
        self.check_unique_names(rules_data)
        self.name_yaml_problems(rules_data, data)
        return RuleSet(kept, policy, self.source, tuple(self.warnings[:MAX_PROBLEMS]))

    def read_policy(self, policy: Any, line: int) -> PolicySettings:
        defaults = PolicySettings()
        if not isinstance(policy, Located):
            self.problem(line, None, "'policy' must be a mapping, e.g. 'policy: {rollback_budget: 3}'")
            return defaults
        self.unknown_keys(policy, self.POLICY_KEYS, None, "policy")
        values: dict[str, Any] = {}
        for key in ("rollback_budget", "incident_quiet_steps", "repeat_window_steps"):
            value = policy.get(key, getattr(defaults, key))
            minimum = 1 if key == "incident_quiet_steps" else 0
            if not _is_int(value) or value < minimum:
                self.problem(policy.line_of(key), None, f"policy.{key} must be an integer >= {minimum}, got {shown(value)}")
                continue
            values[key] = int(value)
        factor = policy.get("lr_cut_factor", defaults.lr_cut_factor)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < factor < 1.0:
            self.problem(policy.line_of("lr_cut_factor"), None,
                         f"policy.lr_cut_factor must be a number between 0 and 1 (exclusive), got {shown(factor)}")
        else:
            values["lr_cut_factor"] = float(factor)
        return dataclasses.replace(defaults, **values)

    def check_unique_names(self, items: list[Any]) -> None:
        """Report every enabled rule whose name an earlier enabled rule already has (valid or not)."""
        seen: set[str] = set()
        for item in items:
            if not isinstance(item, Located) or item.get("enabled", True) is False:
                continue
            name = item.get("name")
            if not isinstance(name, str):
                continue
            if name in seen:
                self.problem(item.line_of("name"), name, "another rule already has this name; names must be unique")
            seen.add(name)

    def name_yaml_problems(self, items: list[Any], data: Located) -> None:
        """Give problems found while parsing (duplicate keys) the name of the rule they are in.

        A rule's lines run from its start to the line before the next rule or the next top-level key.
        """
        rules = [item for item in items if isinstance(item, Located)]
        later_keys = [line for line in data.key_lines.values() if line > data.line_of("rules")]
        ends = [item.line - 1 for item in rules[1:]] + [min(later_keys, default=10**9) - 1]
        for i, p in enumerate(self.problems[: self.yaml_problems]):
            for item, last in zip(rules, ends):
                name = item.get("name")
                if p.rule is None and p.line is not None and item.line <= p.line <= last and isinstance(name, str):
                    self.problems[i] = dataclasses.replace(p, rule=name)

    def unknown_keys(self, mapping: Located, allowed: set[str], rule: str | None, where: str) -> None:
        for key in mapping:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                fix = f"did you mean '{hint[0]}'?" if hint else f"valid keys: {', '.join(sorted(allowed))}"
                self.problem(mapping.line_of(key), rule, f"unknown key '{clip(str(key))}' in {where}; {fix}")

    def read_rule(self, item: Any, line: int) -> Rule | None:
        if not isinstance(item, Located):
            self.problem(line, None, f"each rule must be a mapping with name, detector and actions, got {shown(item)}")
            return None
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            self.problem(item.line, None, "every rule needs a 'name' (a non-empty string)")
            name = None
        enabled = item.get("enabled", True)
        if not isinstance(enabled, bool):
            self.problem(item.line_of("enabled"), name, f"'enabled' must be true or false, got {shown(enabled)}")
        elif not enabled:
            return None
        before = len(self.problems)
        self.unknown_keys(item, self.RULE_KEYS, name, "a rule")
        severity = self.read_severity(item, name)
        detector, params, watches = self.read_detector(item, name)
        actions = self.read_actions(item.get("actions"), item.line_of("actions"), name, required=True)
        cooldown = self.read_count(item, "cooldown_steps", name, default=0)
        escalation = self.read_escalation(item, name)
        clipped = self.read_actions(item.get("actions_when_clipped"), item.line_of("actions_when_clipped"), name,
                                    required=False)
        texts = {key: self.read_text(item, key, name) for key in ("description", "diagnosis", "fix")}
        if len(self.problems) > before or name is None or detector is None:
            return None
        self.check_metric_names(item, name)
        return Rule(name, detector, params, watches, severity, actions, cooldown, escalation, **texts,
                    actions_when_clipped=clipped)

    def check_metric_names(self, item: Located, rule: str) -> None:
        """Warn (file, line, rule) about each watched metric name that nothing is known to log."""
        spec = item.get("detector")
        places = [("metric", item), ("metrics", item)]
        places += [(key, spec) for key in METRIC_PARAMS if isinstance(spec, Located)]
        for key, where in places:
            value = where.get(key)
            for name in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
                if not isinstance(name, str) or is_known(name):
                    continue
                hint = closest(name)
                guess = f"did you mean '{hint}'? " if hint else ""
                self.warnings.append(Problem(
                    self.source, where.line_of(key), rule,
                    f"metric '{clip(name)}' is not a name Hugging Face, TRL or Guardian logs, so this rule may never "
                    f"fire; {guess}If your run logs it itself, ignore this warning"))

    def read_text(self, item: Located, key: str, rule: str | None) -> str:
        value = item.get(key, "")
        if not isinstance(value, str):
            self.problem(item.line_of(key), rule, f"'{key}' must be text, got {shown(value)}")
            return ""
        return " ".join(value.split())

    def read_count(self, item: Located, key: str, rule: str | None, default: int, minimum: int = 0) -> int:
        value = item.get(key, default)
        if not _is_int(value) or value < minimum:
            self.problem(item.line_of(key), rule, f"'{key}' must be an integer >= {minimum}, got {shown(value)}")
            return default
        return int(value)

    def read_severity(self, item: Located, rule: str | None) -> Severity:
        value = item.get("severity", "warning")
        try:
            return Severity(value)
        except ValueError:
            valid = ", ".join(s.value for s in Severity)
            self.problem(item.line_of("severity"), rule, f"severity must be one of {valid}, got {shown(value)}")
            return Severity.WARNING

    def read_detector(self, item: Located, rule: str | None) -> tuple[str | None, dict[str, Any], tuple[str, ...]]:
        spec = item.get("detector")
        line = item.line_of("detector")
        if not isinstance(spec, Located) or "kind" not in spec:
            kinds = ", ".join(sorted(DETECTORS))
            self.problem(line, rule, f"'detector' must be a mapping with a 'kind' ({kinds}) and its parameters")
            return None, {}, ()
        kind = spec["kind"]
        if not isinstance(kind, str) or kind not in DETECTORS:
            hint = difflib.get_close_matches(str(kind), DETECTORS, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"valid kinds: {', '.join(sorted(DETECTORS))}"
            self.problem(spec.line_of("kind"), rule, f"unknown detector kind '{clip(str(kind))}'; {fix}")
            return None, {}, ()
        params = {key: value for key, value in spec.items() if key != "kind"}
        from_rule = self.metric_params(item, kind, rule)
        for key in sorted(from_rule.keys() & params.keys()):
            self.problem(spec.line_of(key), rule,
                         f"the metric is given twice, as the rule's 'metric' and as detector '{key}'; keep one")
        params.update(from_rule)
        checked = _DetectorParams(DETECTORS[kind]).check(params)
        for key, message in checked.problems:
            self.problem(spec.line_of(key) if key in spec else item.line_of(key) if key in item else line, rule, message)
        if checked.problems:
            return None, {}, ()
        try:
            detector = DETECTORS[kind](**checked.values)
        except ValueError as exc:
            self.problem(line, rule, f"detector '{kind}': {exc}")
            return None, {}, ()
        return kind, checked.values, _watched_metrics(detector, checked.values)

    def metric_params(self, item: Located, kind: str, rule: str | None) -> dict[str, Any]:
        """Map the rule's `metric`/`metrics` onto the detector's metric field."""
        names = {f.name for f in dataclasses.fields(DETECTORS[kind])}
        if "metric" in item and "metrics" in item:
            self.problem(item.line_of("metrics"), rule, "give either 'metric' or 'metrics', not both")
        value = item.get("metric", item.get("metrics"))
        if value is None:
            return {}
        if "metrics" in names:
            return {"metrics": [value] if isinstance(value, str) else value}
        field_name = "metric" if "metric" in names else "eval_metric" if "eval_metric" in names else None
        if field_name is None:
            self.problem(item.line_of("metric"), rule, f"detector '{kind}' does not take a metric")
            return {}
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        return {field_name: value}

    def read_actions(self, value: Any, line: int, rule: str | None, required: bool) -> tuple[ActionSpec, ...]:
        if value is None and not required:
            return ()
        if isinstance(value, (str, Located)):
            value = [value]
        if not isinstance(value, list) or not value:
            self.problem(line, rule, "'actions' must be a list, e.g. [skip_update] or [{reduce_lr: {factor: 0.5}}]")
            return ()
        return tuple(spec for spec in (self.read_action(v, line, rule) for v in value) if spec is not None)

    def read_action(self, value: Any, line: int, rule: str | None) -> ActionSpec | None:
        params: Any = {}
        if isinstance(value, Located) and len(value) == 1:
            line = value.line
            (value, params), = value.items()
            params = params if params is not None else {}
        valid = ", ".join(kind.value for kind in ActionKind)
        if not isinstance(value, str):
            self.problem(line, rule,
                         f"an action is a name ({valid}) or a one-key mapping like {{reduce_lr: {{factor: 0.5}}}}")
            return None
        try:
            kind = ActionKind(value)
        except ValueError:
            hint = difflib.get_close_matches(value, [k.value for k in ActionKind], n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"valid actions: {valid}"
            self.problem(line, rule, f"unknown action '{clip(value)}'; {fix}")
            return None
        if not isinstance(params, Mapping):
            self.problem(line, rule, f"parameters of action '{value}' must be a mapping, got {shown(params)}")
            return None
        messages = check_action_params(kind, params)
        for message in messages:
            self.problem(line, rule, message)
        clean = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in params.items()}
        return None if messages else ActionSpec(kind, clean)

    def read_escalation(self, item: Located, rule: str | None) -> tuple[Escalation, ...]:
        value = item.get("escalation", [])
        if not isinstance(value, list):
            self.problem(item.line_of("escalation"), rule,
                         "'escalation' must be a list of {after_firings, within_steps, actions}")
            return ()
        steps = []
        for entry in value:
            if not isinstance(entry, Located):
                self.problem(item.line_of("escalation"), rule,
                             f"each escalation entry must be a mapping, got {shown(entry)}")
                continue
            self.unknown_keys(entry, self.ESCALATION_KEYS, rule, "an escalation entry")
            after = self.read_count(entry, "after_firings", rule, default=2, minimum=2)
            within = self.read_count(entry, "within_steps", rule, default=100, minimum=1)
            actions = self.read_actions(entry.get("actions"), entry.line_of("actions"), rule, required=True)
            steps.append(Escalation(after, within, actions))
        for earlier, later in zip(steps, steps[1:]):
            if later.after_firings <= earlier.after_firings:
                self.problem(item.line_of("escalation"), rule, "escalation entries must have increasing 'after_firings'")
        return tuple(steps)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _watched_metrics(detector: Detector, params: Mapping[str, Any]) -> tuple[str, ...]:
    names: list[str] = []
    for key in METRIC_PARAMS:
        value = getattr(detector, key, None)
        if isinstance(value, str):
            names.append(value)
        elif isinstance(value, (tuple, list)):
            names.extend(value)
    return tuple(dict.fromkeys(names))


@dataclass
class _Checked:
    values: dict[str, Any]
    problems: list[tuple[str, str]]


class _DetectorParams:
    """Checks parameters against a detector dataclass's annotated init fields."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        hints = typing.get_type_hints(cls)
        self.fields = {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.init}

    def check(self, params: Mapping[str, Any]) -> _Checked:
        result = _Checked({}, [])
        kind = getattr(self.cls, "kind", self.cls.__name__)
        for key, value in params.items():
            if key not in self.fields:
                hint = difflib.get_close_matches(str(key), self.fields, n=1)
                fix = f"did you mean '{hint[0]}'?" if hint else f"valid parameters: {', '.join(self.fields)}"
                result.problems.append((key, f"detector '{kind}' has no parameter '{clip(str(key))}'; {fix}"))
                continue
            ok, coerced, expected = _coerce(value, self.fields[key][0])
            if ok:
                result.values[key] = coerced
            else:
                result.problems.append((key, f"detector '{kind}' parameter '{key}' must be {expected}, got {shown(value)}"))
        for name, (_, f) in self.fields.items():
            missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if missing and name not in result.values and not any(k == name for k, _ in result.problems):
                where = "'metric'" if name in METRIC_FIELDS else f"'{name}'"
                result.problems.append((name, f"detector '{kind}' needs {where}"))
        return result


def _coerce(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """Check a YAML value against a type hint; return (ok, value as the detector wants it, what was expected)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args, value, "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, __import__("types").UnionType):
        if value is None and type(None) in args:
            return True, None, "null"
        inner = next(a for a in args if a is not type(None))
        ok, coerced, expected = _coerce(value, inner)
        return ok, coerced, f"{expected} or null"
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        ok = isinstance(items, list) and bool(items) and all(isinstance(v, str) for v in items)
        return ok, tuple(items) if ok else value, "a metric name or a list of metric names"
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        return _is_int(value), value, "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value, "a number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    return False, value, str(hint)
