"""Rule files: every mistake is reported with file, line, rule and what to do; good files load as data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guardian.engine.actions import ActionKind, ActionSpec
from guardian.engine.rules import RuleSet
from guardian.errors import GuardianError, Problem, RuleFileError
from guardian.events import Severity
from guardian.rulefile.reader import default_rules_path, load_rules, parse_rules

SOURCE = "rules.yaml"


def spike(
    *,
    metric: str | None = "metric: grad_norm",
    detector: str | None = "detector: {kind: threshold, above: 10.0}",
    actions: str | None = "actions: [alert]",
    extra: tuple[str, ...] = (),
) -> str:
    """A one-rule file. Lines: 1 version, 2 rules, 3 name, 4 metric, 5 detector, 6 actions, 7+ `extra`.

    A part given as None is left out and the lines after it move up by one.
    """
    body = [line for line in (metric, detector, actions) if line is not None]
    lines = ["version: 1", "rules:", "  - name: spike", *(f"    {x}" for x in (*body, *extra))]
    return "\n".join(lines) + "\n"


def problems_of(text: str) -> list[Problem]:
    with pytest.raises(RuleFileError) as info:
        parse_rules(text, SOURCE)
    return info.value.problems


def where(line: int, rule: str | None) -> str:
    """The start of a problem's rendering: 'rules.yaml:LINE: rule 'NAME': ' as a regex."""
    named = f" rule '{re.escape(rule)}':" if rule else ""
    return rf"{re.escape(SOURCE)}:{line}:{named} "


def test_the_template_rule_is_valid() -> None:
    rules = parse_rules(spike(), SOURCE)
    assert [rule.name for rule in rules.rules] == ["spike"]
    assert rules.rules[0].watches == ("grad_norm",)


# --- one mistake, one problem: (text, line, rule, what the message says) -------------------------------------

NUMBER_KINDS = ("grad_collapse, jump, non_finite, overfitting, plateau, ratio, reversal, robust_zscore, threshold, "
                "warmup_rise")
ZSCORE = "detector: {kind: robust_zscore, %s}"
ESCALATE = ("escalation:", "  - after_firings: 3", "    within_steps: 20", "    actions: [stop]")

MISTAKES = [
    # the YAML itself
    ("syntax_error_unclosed_brace", spike(detector="detector: {kind: threshold, above: 10.0"), 6, "spike",
     r"YAML syntax error: expected ',' or '\}'.*; check the indentation, brackets and quotes"),
    ("syntax_error_bad_indent", spike(actions=" actions: [alert]"), 6, "spike",
     r"YAML syntax error: .*; check the indentation"),
    ("syntax_error_top_level", "version: 1\n\trules: []\n", 2, None,
     r"YAML syntax error: found character '\\t' that cannot start any token"),
    ("duplicate_key_in_rule", spike(extra=("metric: loss",)), 7, "spike",
     r"key 'metric' appears twice in the same mapping; keep one"),
    ("duplicate_top_level_key", "version: 1\nversion: 1\n" + spike().split("\n", 1)[1], 2, None,
     r"key 'version' appears twice in the same mapping; keep one"),
    ("duplicate_key_after_the_rules", spike() + "policy:\n  rollback_budget: 2\n  rollback_budget: 3\n", 9, None,
     r"key 'rollback_budget' appears twice in the same mapping; keep one"),
    ("list_as_key", spike(extra=("? [a, b]", ": 1")), 7, "spike", r"a key must be plain text, got \['a', 'b'\]"),
    # the top level
    ("top_level_list", "- version\n- rules\n", 1, None,
     r"a rule file is a mapping with 'version: 1' and a 'rules:' list"),
    ("empty_file", "", 1, None, r"a rule file is a mapping with 'version: 1' and a 'rules:' list"),
    ("version_missing", spike().split("\n", 1)[1], 1, None,
     r"'version' is missing; add 'version: 1' at the top of the file"),
    ("version_2", spike().replace("version: 1", "version: 2"), 1, None,
     r"'version' must be 1 \(the rule-file format this Guardian reads\), got 2"),
    ("version_string", spike().replace("version: 1", "version: '1'"), 1, None, r"'version' must be 1 .*got '1'"),
    ("version_bool", spike().replace("version: 1", "version: true"), 1, None, r"'version' must be 1 .*got True"),
    ("unknown_top_key", spike() + "polcy: {rollback_budget: 2}\n", 7, None,
     r"unknown key 'polcy' in top level; did you mean 'policy'\?"),
    ("unknown_top_key_no_hint", spike() + "zzz: 1\n", 7, None,
     r"unknown key 'zzz' in top level; valid keys: policy, rules, version"),
    ("rules_missing", "version: 1\n", 1, None, r"'rules' must be a non-empty list of rules"),
    ("rules_empty", "version: 1\nrules: []\n", 2, None, r"'rules' must be a non-empty list of rules"),
    ("rules_a_mapping", "version: 1\nrules: {name: spike}\n", 2, None, r"'rules' must be a non-empty list"),
    ("rule_not_a_mapping", "version: 1\nrules:\n  - 5\n", 2, None,
     r"each rule must be a mapping with name, detector and actions, got 5"),
    # policy
    ("rollback_budget_negative", "policy: {rollback_budget: -1}\n" + spike(), 1, None,
     r"policy.rollback_budget must be an integer >= 0, got -1"),
    ("rollback_budget_float", "policy: {rollback_budget: 1.5}\n" + spike(), 1, None,
     r"policy.rollback_budget must be an integer >= 0, got 1.5"),
    ("policy_not_a_mapping", "policy: 3\n" + spike(), 1, None,
     r"'policy' must be a mapping, e.g. 'policy: \{rollback_budget: 3\}'"),
    ("unknown_policy_key", "policy:\n  rollback_budgets: 2\n" + spike(), 2, None,
     r"unknown key 'rollback_budgets' in policy; did you mean 'rollback_budget'\?"),
    # the rule's own keys
    ("name_missing", spike().replace("  - name: spike\n    metric", "  - metric"), 3, None,
     r"every rule needs a 'name' \(a non-empty string\)"),
    ("name_empty", spike().replace("name: spike", "name: ''"), 3, None, r"every rule needs a 'name'"),
    ("unknown_rule_key", spike(extra=("cooldown: 3",)), 7, "spike",
     r"unknown key 'cooldown' in a rule; did you mean 'cooldown_steps'\?"),
    ("severity_invalid", spike(extra=("severity: fatal",)), 7, "spike",
     r"severity must be one of info, warning, critical, got 'fatal'"),
    ("cooldown_negative", spike(extra=("cooldown_steps: -1",)), 7, "spike",
     r"'cooldown_steps' must be an integer >= 0, got -1"),
    ("cooldown_float", spike(extra=("cooldown_steps: 2.5",)), 7, "spike",
     r"'cooldown_steps' must be an integer >= 0, got 2.5"),
    ("enabled_not_bool", spike(extra=("enabled: 0",)), 7, "spike", r"'enabled' must be true or false, got 0"),
    ("description_not_text", spike(extra=("description: 5",)), 7, "spike", r"'description' must be text, got 5"),
    # the detector
    ("detector_missing", spike(detector=None), 3, "spike",
     rf"'detector' must be a mapping with a 'kind' \({NUMBER_KINDS}\) and its parameters"),
    ("detector_a_string", spike(detector="detector: threshold"), 5, "spike",
     r"'detector' must be a mapping with a 'kind'"),
    ("detector_without_kind", spike(detector="detector: {above: 10.0}"), 5, "spike",
     r"'detector' must be a mapping with a 'kind'"),
    ("kind_typo", spike(detector="detector: {kind: robust_zscor}"), 5, "spike",
     r"unknown detector kind 'robust_zscor'; did you mean 'robust_zscore'\?"),
    ("kind_unknown", spike(detector="detector: {kind: magic}"), 5, "spike",
     rf"unknown detector kind 'magic'; valid kinds: {NUMBER_KINDS}"),
    ("kind_a_list", spike(detector="detector: {kind: [threshold]}"), 5, "spike",
     r"unknown detector kind '\['threshold'\]'"),
    ("unknown_parameter", spike(detector="detector: {kind: threshold, above: 10.0, abov: 2}"), 5, "spike",
     r"detector 'threshold' has no parameter 'abov'; did you mean 'above'\?"),
    ("string_for_number", spike(detector="detector: {kind: threshold, above: high}"), 5, "spike",
     r"detector 'threshold' parameter 'above' must be a number or null, got 'high'"),
    ("float_for_int", spike(detector="detector: {kind: threshold, above: 1.0, consecutive_steps: 2.5}"), 5,
     "spike", r"detector 'threshold' parameter 'consecutive_steps' must be an integer, got 2.5"),
    ("bool_for_float", spike(detector=ZSCORE % "z_threshold: true"), 5, "spike",
     r"detector 'robust_zscore' parameter 'z_threshold' must be a number, got True"),
    ("int_for_bool", spike(detector=ZSCORE % "log_scale: 1"), 5, "spike",
     r"detector 'robust_zscore' parameter 'log_scale' must be true or false, got 1"),
    ("wrong_literal", spike(detector=ZSCORE % "direction: sideways"), 5, "spike",
     r"detector 'robust_zscore' parameter 'direction' must be one of 'up', 'down', 'both', got 'sideways'"),
    ("post_init_negative_z", spike(detector=ZSCORE % "z_threshold: -1"), 5, "spike",
     r"detector 'robust_zscore': z_threshold must be a finite number > 0, got -1.0"),
    ("post_init_nan_limit", spike(detector="detector: {kind: threshold, above: .nan}"), 5, "spike",
     r"detector 'threshold': above must be a finite number, got nan"),
    ("post_init_no_limit", spike(detector="detector: {kind: threshold}"), 5, "spike",
     r"detector 'threshold': above or below must be given \(a number\), got neither"),
    ("post_init_warmup_too_long", spike(detector=ZSCORE % "window_steps: 10, warmup_steps: 20"), 5, "spike",
     r"detector 'robust_zscore': warmup_steps must be between 1 and window_steps \(10\), got 20"),
    # metrics
    ("metric_and_metrics", spike(extra=("metrics: [loss]",)), 7, "spike",
     r"give either 'metric' or 'metrics', not both"),
    ("metric_missing", spike(metric=None), 4, "spike", r"detector 'threshold' needs 'metric'"),
    ("metric_twice", spike(detector="detector: {kind: threshold, above: 10.0, metric: loss}"), 5, "spike",
     r"the metric is given twice, as the rule's 'metric' and as detector 'metric'; keep one"),
    ("metric_not_a_name", spike(metric="metric: 5"), 4, "spike",
     r"detector 'threshold' parameter 'metric' must be a string, got 5"),
    ("metrics_not_names", spike(metric="metrics: 5", detector="detector: {kind: non_finite}"), 4, "spike",
     r"detector 'non_finite' parameter 'metrics' must be a metric name or a list of metric names, got 5"),
    # actions
    ("action_typo", spike(actions="actions: [alrt]"), 6, "spike", r"unknown action 'alrt'; did you mean 'alert'\?"),
    ("action_unknown", spike(actions="actions: [explode]"), 6, "spike",
     r"unknown action 'explode'; valid actions: alert, skip_update, restore_lr, reduce_lr, rollback, stop"),
    ("reduce_lr_factor_too_big", spike(actions="actions: [{reduce_lr: {factor: 1.5}}]"), 6, "spike",
     r"reduce_lr factor must be between 0 and 1 \(exclusive\), got 1.5"),
    ("reduce_lr_unknown_param", spike(actions="actions: [{reduce_lr: {fator: 0.5}}]"), 6, "spike",
     r"action 'reduce_lr' has no parameter 'fator' \(valid: factor, min_lr, from_evidence\)"),
    ("reduce_lr_wrong_type", spike(actions="actions: [{reduce_lr: {factor: half}}]"), 6, "spike",
     r"action 'reduce_lr' parameter 'factor' must be a float, got 'half'"),
    ("reduce_lr_bool", spike(actions="actions: [{reduce_lr: {factor: true}}]"), 6, "spike",
     r"action 'reduce_lr' parameter 'factor' must be a float, got True"),
    ("reduce_lr_min_lr_inf", spike(actions="actions: [{reduce_lr: {min_lr: .inf}}]"), 6, "spike",
     r"action 'reduce_lr' parameter 'min_lr' must be a finite number, got inf"),
    ("reduce_lr_min_lr_negative", spike(actions="actions: [{reduce_lr: {min_lr: -1.0e-6}}]"), 6, "spike",
     r"reduce_lr min_lr must be >= 0, got -1e-06"),
    ("stop_restore_best_text", spike(actions="actions: [{stop: {restore_best: 'yes'}}]"), 6, "spike",
     r"action 'stop' parameter 'restore_best' must be a bool, got 'yes'"),
    ("alert_takes_no_params", spike(actions="actions: [{alert: {loud: true}}]"), 6, "spike",
     r"action 'alert' has no parameter 'loud' \(valid: none\)"),
    ("action_params_not_a_mapping", spike(actions="actions: [{reduce_lr: [0.5]}]"), 6, "spike",
     r"parameters of action 'reduce_lr' must be a mapping, got \[0.5\]"),
    ("action_a_list", spike(actions="actions: [[alert]]"), 6, "spike",
     r"an action is a name \(alert, skip_update, restore_lr, reduce_lr, rollback, stop\) or a one-key mapping"),
    ("actions_a_number", spike(actions="actions: 7"), 6, "spike",
     r"'actions' must be a list, e.g. \[skip_update\] or \[\{reduce_lr: \{factor: 0.5\}\}\]"),
    ("actions_empty", spike(actions="actions: []"), 6, "spike", r"'actions' must be a list"),
    ("actions_missing", spike(actions=None), 3, "spike", r"'actions' must be a list"),
    # escalation
    ("escalation_a_mapping", spike(extra=("escalation: {after_firings: 3}",)), 7, "spike",
     r"'escalation' must be a list of \{after_firings, within_steps, actions\}"),
    ("escalation_entry_not_a_mapping", spike(extra=("escalation: [3]",)), 7, "spike",
     r"each escalation entry must be a mapping, got 3"),
    ("escalation_unknown_key", spike(extra=(*ESCALATE, "    within: 5")), 11, "spike",
     r"unknown key 'within' in an escalation entry; did you mean 'within_steps'\?"),
    ("after_firings_1", spike(extra=tuple(x.replace("3", "1") for x in ESCALATE)), 8, "spike",
     r"'after_firings' must be an integer >= 2, got 1"),
    ("within_steps_0", spike(extra=tuple(x.replace("20", "0") for x in ESCALATE)), 9, "spike",
     r"'within_steps' must be an integer >= 1, got 0"),
    ("after_firings_not_increasing", spike(extra=(*ESCALATE, *ESCALATE[1:])), 7, "spike",
     r"escalation entries must have increasing 'after_firings'"),
    ("escalation_action_typo", spike(extra=(*ESCALATE[:3], "    actions: [rolback]")), 10, "spike",
     r"unknown action 'rolback'; did you mean 'rollback'\?"),
    ("escalation_actions_missing", spike(extra=ESCALATE[:3]), 8, "spike", r"'actions' must be a list"),
]


@pytest.mark.parametrize(
    ("text", "line", "rule", "message"), [case[1:] for case in MISTAKES], ids=[case[0] for case in MISTAKES]
)
def test_each_mistake_is_one_problem_naming_file_line_and_rule(
    text: str, line: int, rule: str | None, message: str
) -> None:
    with pytest.raises(RuleFileError, match=where(line, rule) + message) as info:
        parse_rules(text, SOURCE)
    (problem,) = info.value.problems
    assert (problem.file, problem.line, problem.rule) == (SOURCE, line, rule)


def test_duplicate_rule_names_point_at_the_second_rule() -> None:
    text = spike() + "  - name: spike\n    metric: loss\n    detector: {kind: non_finite}\n    actions: [alert]\n"
    with pytest.raises(RuleFileError, match=where(7, "spike") + "another rule already has this name") as info:
        parse_rules(text, SOURCE)
    assert [(p.line, p.rule) for p in info.value.problems] == [(7, "spike")]


def test_duplicate_rule_names_are_found_after_an_invalid_rule() -> None:
    """An invalid rule before two same-named ones must not shift which line is reported."""
    rule = "  - name: {}\n    metric: loss\n    detector: {{kind: {}}}\n    actions: [alert]\n"
    text = "version: 1\nrules:\n" + rule.format("a", "nope") + rule.format("b", "non_finite") + rule.format(
        "b", "non_finite"
    )
    assert [(p.line, p.rule) for p in problems_of(text)] == [(5, "a"), (11, "b")]


def test_a_disabled_copy_may_keep_the_name() -> None:
    copy = "  - name: spike\n    enabled: false\n    metric: loss\n    detector: {kind: non_finite}\n    actions: [alert]\n"
    rules = parse_rules(spike() + copy, SOURCE)
    assert [(rule.name, rule.detector) for rule in rules.rules] == [("spike", "threshold")]


# --- several mistakes: all of them at once, in file order ---------------------------------------------------

SEVERAL = """\
version: 2
polcy: {rollback_budget: 2}
rules:
  - name: spike
    metric: grad_norm
    detector: {kind: robust_zscor}
    severity: loud
    actions: [alrt]
  - name: slow
    metric: loss
    detector: {kind: plateau, window_steps: 1.5}
    actions: [{reduce_lr: {factor: 1.5}}]
    cooldown: 3
  - name: spike
    metric: loss
    detector: {kind: non_finite}
    actions: [skip_update]
    escalation:
      - after_firings: 1
        within_steps: 5
        actions: [stop]
"""


def test_every_problem_in_a_file_is_reported_at_once_in_file_order() -> None:
    problems = problems_of(SEVERAL)
    assert [(p.line, p.rule) for p in problems] == [
        (1, None), (2, None),
        (6, "spike"), (7, "spike"), (8, "spike"),
        (11, "slow"), (12, "slow"), (13, "slow"),
        (14, "spike"), (19, "spike"),
    ]
    expected = [
        "'version' must be 1", "unknown key 'polcy'", "unknown detector kind 'robust_zscor'",
        "severity must be one of", "unknown action 'alrt'", "parameter 'window_steps' must be an integer",
        "reduce_lr factor must be between 0 and 1", "unknown key 'cooldown'", "another rule already has this name",
        "'after_firings' must be an integer >= 2",
    ]
    for problem, text in zip(problems, expected, strict=True):
        assert text in problem.message
    assert str(RuleFileError(problems)).splitlines() == [str(p) for p in problems]


def test_the_error_is_a_guardian_error_and_a_value_error() -> None:
    with pytest.raises(RuleFileError) as info:
        parse_rules("", SOURCE)
    assert isinstance(info.value, GuardianError)
    assert isinstance(info.value, ValueError)


# --- values that must be read right --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("written", "read"),
    [("1e-6", 1e-6), ("1E-6", 1e-6), ("2e3", 2000.0), ("-1e+2", -100.0), ("1.0e-7", 1e-7), ("10", 10.0)],
)
def test_numbers_without_a_dot_are_floats(written: str, read: float) -> None:
    rules = parse_rules(spike(detector=f"detector: {{kind: threshold, below: {written}}}"), SOURCE)
    value = rules.rules[0].params["below"]
    assert (type(value), value) == (float, read)


def test_exponent_floats_in_action_parameters() -> None:
    rules = parse_rules(spike(actions="actions: [{reduce_lr: {factor: 5e-1, min_lr: 1e-6}}]"), SOURCE)
    assert rules.rules[0].actions == (ActionSpec(ActionKind.REDUCE_LR, {"factor": 0.5, "min_lr": 1e-6}),)


def test_integers_given_for_floats_become_floats() -> None:
    rules = parse_rules(spike(detector="detector: {kind: threshold, above: 10}"), SOURCE)
    assert type(rules.rules[0].params["above"]) is float


def test_enabled_false_drops_the_rule() -> None:
    other = "  - name: nan\n    metric: loss\n    detector: {kind: non_finite}\n    actions: [skip_update]\n"
    rules = parse_rules(spike(extra=("enabled: false",)) + other, SOURCE)
    assert [rule.name for rule in rules.rules] == ["nan"]
    rules = parse_rules(spike(extra=("enabled: true",)) + other, SOURCE)
    assert [rule.name for rule in rules.rules] == ["spike", "nan"]


def test_a_full_rule_is_read_into_a_rule() -> None:
    text = """\
version: 1
policy: {rollback_budget: 2}
rules:
  - name: loss_spike
    description: >
      The loss jumps.
    metric: loss
    detector: {kind: robust_zscore, window_steps: 50, z_threshold: 8}
    severity: critical
    actions: [skip_update]
    cooldown_steps: 5
    escalation:
      - after_firings: 3
        within_steps: 20
        actions: [rollback, {reduce_lr: {factor: 0.5}}]
    diagnosis: a bad batch
    fix: lower the learning rate
"""
    rules = parse_rules(text, SOURCE)
    assert (rules.rollback_budget, rules.source) == (2, SOURCE)
    rule = rules.by_name("loss_spike")
    assert (rule.detector, dict(rule.params)) == (
        "robust_zscore", {"window_steps": 50, "z_threshold": 8.0, "metric": "loss"})
    assert (rule.severity, rule.cooldown_steps, rule.watches) == (Severity.CRITICAL, 5, ("loss",))
    assert rule.actions == (ActionSpec(ActionKind.SKIP_UPDATE),)
    (step,) = rule.escalation
    assert (step.after_firings, step.within_steps) == (3, 20)
    assert step.actions == (ActionSpec(ActionKind.ROLLBACK), ActionSpec(ActionKind.REDUCE_LR, {"factor": 0.5}))
    assert (rule.description, rule.diagnosis, rule.fix) == ("The loss jumps.", "a bad batch", "lower the learning rate")
    assert rule.build_detector().z_threshold == 8.0


@pytest.mark.parametrize(
    ("lines", "watches"),
    [
        (("metric: loss", "detector: {kind: non_finite}"), ("loss",)),
        (("metrics: [loss, grad_norm]", "detector: {kind: non_finite}"), ("loss", "grad_norm")),
        (("metric: eval_loss", "detector: {kind: overfitting}"), ("eval_loss", "loss")),
        (("metrics: [learning_rate]", "detector: {kind: jump}"), ("learning_rate",)),
    ],
)
def test_metric_and_metrics_map_onto_the_detector(lines: tuple[str, str], watches: tuple[str, ...]) -> None:
    rules = parse_rules(spike(metric=lines[0], detector=lines[1]), SOURCE)
    assert rules.rules[0].watches == watches


# --- the shipped file and files on disk ----------------------------------------------------------------------

def test_the_shipped_rules_load() -> None:
    rules = load_rules()
    assert isinstance(rules, RuleSet)
    assert rules.rules and rules.source == str(default_rules_path())
    assert len({rule.name for rule in rules.rules}) == len(rules.rules)
    for rule in rules.rules:
        rule.build_detector()


@pytest.mark.parametrize("field", ["description", "diagnosis", "fix"])
def test_every_shipped_rule_explains_itself(field: str) -> None:
    missing = [rule.name for rule in load_rules().rules if not getattr(rule, field).strip()]
    assert missing == []


def test_a_missing_file_names_the_path() -> None:
    with pytest.raises(RuleFileError, match=r"^/nonexistent\.yaml: cannot read the file: No such file") as info:
        load_rules("/nonexistent.yaml")
    (problem,) = info.value.problems
    assert (problem.file, problem.line, problem.rule) == ("/nonexistent.yaml", None, None)


def test_a_file_on_disk_is_named_in_its_problems(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(spike(extra=("cooldown: 3",)), encoding="utf-8")
    with pytest.raises(RuleFileError, match=re.escape(f"{path}:7: rule 'spike': unknown key 'cooldown'")):
        load_rules(path)
    path.write_text(spike(), encoding="utf-8")
    assert load_rules(str(path)).source == str(path)


# --- rule files are data -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("template", "line", "rule", "tag"),
    [
        ('!!python/object/apply:os.system ["touch {marker}"]\n', 1, None, "tag:yaml.org,2002:python/object/apply:os.system"),
        ('version: 1\nrules: !!python/object/apply:os.system ["touch {marker}"]\n', 2, None,
         "tag:yaml.org,2002:python/object/apply:os.system"),
        ("version: 1\nrules:\n  - name: spike\n    metric: !!python/object/apply:os.system [\"touch {marker}\"]\n", 4,
         "spike", "tag:yaml.org,2002:python/object/apply:os.system"),
        ("version: 1\nrules:\n  - name: spike\n    detector: !!python/name:os.system\n", 4, "spike",
         "tag:yaml.org,2002:python/name:os.system"),
        ("version: 1\nrules: !include other.yaml\n", 2, None, "!include"),
    ],
)
def test_yaml_tags_are_refused_and_nothing_runs(
    tmp_path: Path, template: str, line: int, rule: str | None, tag: str
) -> None:
    marker = tmp_path / "executed"
    text = template.replace("{marker}", str(marker))
    message = re.escape(f"the YAML tag '{tag}' is not allowed: rule files are plain data")
    with pytest.raises(RuleFileError, match=where(line, rule) + message + r".*; remove the tag") as info:
        parse_rules(text, SOURCE)
    assert [(p.line, p.rule) for p in info.value.problems] == [(line, rule)]
    assert not marker.exists()
