"""Alerts that act: map Alertmanager or Grafana webhook alerts to actions on runs.

The daemon reads `<state_dir>/alert-actions.yaml` (or `--alert-actions FILE`):

    version: 1
    mappings:
      - match: {alertname: GuardianRunDiverging}   # every label given must equal the alert's
        action: rollback                           # stop | rollback | reduce_lr | skip_update
        params: {}                                 # reduce_lr: {factor: 0.5}
        runs: labelled                             # the run named by the alert's run_id label
      - match: {alertname: ClusterMaintenance}
        action: stop
        runs: all                                  # every run still reporting

Only firing alerts act, each (alert, start time, mapping) once however often it is re-sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardian.errors import Problem, RuleFileError
from guardian.events import ActionKind
from guardian.rulefile.yamlfile import Located, load_yaml

ACTIONS = tuple(kind.value for kind in (ActionKind.STOP, ActionKind.ROLLBACK, ActionKind.REDUCE_LR,
                                         ActionKind.SKIP_UPDATE))  # as the daemon's CONTROL_ACTIONS
TARGETS = ("labelled", "all")


@dataclass(frozen=True)
class AlertAction:
    """One entry of an alert-actions file: the action to queue for the runs of an alert whose labels match."""

    match: dict[str, str]
    action: str
    params: dict[str, Any] = field(default_factory=dict)
    runs: str = "labelled"

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match.items())


def load_alert_actions(path: Path) -> list[AlertAction]:
    """Read and validate an alert-actions file; RuleFileError lists every problem with its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleFileError([Problem(str(path), None, None, f"cannot read the file: {exc.strerror}")]) from None
    data, problems = load_yaml(text, str(path))
    mappings: list[AlertAction] = []
    if data is not None:
        mappings = _read(data, str(path), problems)
    if problems:
        raise RuleFileError(problems)
    return mappings


def _read(data: Any, source: str, problems: list[Problem]) -> list[AlertAction]:
    def problem(line: int | None, message: str) -> None:
        problems.append(Problem(source, line, None, message))

    if not isinstance(data, Located) or data.get("version") != 1 or not isinstance(data.get("mappings"), list):
        problem(1, "an alert-actions file is a mapping with 'version: 1' and a 'mappings:' list")
        return []
    out = []
    for item in data["mappings"]:
        if not isinstance(item, Located):
            problem(data.line_of("mappings"), "each mapping must be a mapping with match, action and runs")
            continue
        unknown = set(item) - {"match", "action", "params", "runs"}
        for key in sorted(unknown):
            problem(item.line_of(key), f"unknown key '{key}' in a mapping; valid keys: action, match, params, runs")
        match, action = item.get("match"), item.get("action")
        params, runs = item.get("params", {}) or {}, item.get("runs", "labelled")
        if not isinstance(match, dict) or not match or not all(isinstance(v, str) for v in match.values()):
            problem(item.line_of("match"), "'match' must map label names to values, e.g. {alertname: MyAlert}")
        if action not in ACTIONS:
            problem(item.line_of("action"), f"'action' must be one of {', '.join(ACTIONS)}, got {action!r}")
        if not isinstance(params, dict):
            problem(item.line_of("params"), "'params' must be a mapping, e.g. {factor: 0.5}")
        if runs not in TARGETS:
            problem(item.line_of("runs"), f"'runs' must be 'labelled' (the alert's run_id) or 'all', got {runs!r}")
        if not unknown and isinstance(match, dict) and action in ACTIONS and isinstance(params, dict) and runs in TARGETS:
            out.append(AlertAction(dict(match), str(action), dict(params), str(runs)))
    return out


def firing_alerts(payload: Any) -> list[dict[str, Any]]:
    """The firing alerts of an Alertmanager (version 4) or Grafana webhook body."""
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        raise ValueError("expected an Alertmanager or Grafana webhook body with an 'alerts' list")
    out = []
    for alert in payload["alerts"]:
        if isinstance(alert, dict) and alert.get("status", "firing") == "firing" and isinstance(alert.get("labels"), dict):
            out.append(alert)
    return out
