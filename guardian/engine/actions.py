"""The actions a rule can ask for, and how several of them merge into one plan for a step."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from guardian.events import ActionKind


class Restore(str, Enum):
    """Which weights a stop leaves in place. A stop never leaves weights that are known to be worse."""

    AUTO = "auto"            # decided by the policy: CURRENT when no incident is open, else LAST_GOOD
    CURRENT = "current"      # the weights as they are: with no incident open they are the newest good ones
    LAST_GOOD = "last_good"  # the newest good state from before the incident (or the best evaluation's, if better)
    BEST_EVAL = "best_eval"  # the weights of the best evaluation so far


# Parameters each action accepts: name -> (type, default).
ACTION_PARAMS: dict[ActionKind, dict[str, tuple[type, Any]]] = {
    ActionKind.ALERT: {},
    ActionKind.SKIP_UPDATE: {},
    ActionKind.RESTORE_LR: {},
    ActionKind.REDUCE_LR: {"factor": (float, 0.5), "min_lr": (float, 0.0), "from_evidence": (bool, False)},
    ActionKind.ROLLBACK: {},
    ActionKind.STOP: {"restore_best": (bool, False), "restore": (str, Restore.AUTO.value)},
}
# The actions that must happen before the update being made now: they cannot wait for a daemon's verdict.
IMMEDIATE = frozenset({ActionKind.SKIP_UPDATE, ActionKind.RESTORE_LR})


def check_action_params(kind: ActionKind, params: Mapping[str, Any]) -> list[str]:
    """Return one message per bad parameter of an action (empty when all are fine)."""
    problems = []
    allowed = ACTION_PARAMS[kind]
    for name, value in params.items():
        if name not in allowed:
            valid = ", ".join(allowed) or "none"
            problems.append(f"action '{kind.value}' has no parameter '{name}' (valid: {valid})")
            continue
        expected, _ = allowed[name]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected in (float, int) and isinstance(value, bool)):
            problems.append(
                f"action '{kind.value}' parameter '{name}' must be a {expected.__name__}, got {value!r}"
            )
            continue
        if isinstance(value, str):
            if (problem := _check_choice(kind, name, value)) is not None:
                problems.append(problem)
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"action '{kind.value}' parameter '{name}' must be a finite number, got {value!r}")
            continue
        number = float(value)  # type: ignore[arg-type]  # checked to be a float just above
        if kind is ActionKind.REDUCE_LR and name == "factor" and not 0.0 < number < 1.0:
            problems.append(f"reduce_lr factor must be between 0 and 1 (exclusive), got {value!r}")
        if kind is ActionKind.REDUCE_LR and name == "min_lr" and number < 0.0:
            problems.append(f"reduce_lr min_lr must be >= 0, got {value!r}")
    return problems


def _check_choice(kind: ActionKind, name: str, value: str) -> str | None:
    if kind is ActionKind.STOP and name == "restore" and value not in {r.value for r in Restore}:
        valid = ", ".join(r.value for r in Restore)
        return f"stop restore must be one of {valid}, got {value!r}"
    return None


@dataclass(frozen=True)
class ActionSpec:
    """One action with its parameters, as written in a rule file."""

    kind: ActionKind
    params: Mapping[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Any:
        """The parameter's value, or its documented default."""
        return self.params.get(name, ACTION_PARAMS[self.kind][name][1])

    def __str__(self) -> str:
        if not self.params:
            return self.kind.value
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind.value}({args})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "params": dict(self.params)}


@dataclass(frozen=True)
class Plan:
    """Everything to do at one step, merged from all decisions made at that step."""

    skip_update: bool = False
    rollback: bool = False
    lr_factor: float = 1.0
    min_lr: float = 0.0
    stop: bool = False
    restore: Restore = Restore.CURRENT
    restore_lr: bool = False

    @property
    def empty(self) -> bool:
        return self == Plan()


_RESTORE_ORDER = (Restore.CURRENT, Restore.LAST_GOOD, Restore.BEST_EVAL)


def stop_restore(action: ActionSpec) -> Restore:
    """What a stop action asks to leave in place (`restore_best: true` is the older spelling of best_eval)."""
    if action.param("restore_best"):
        return Restore.BEST_EVAL
    return Restore(action.param("restore"))


def merge(actions: Iterable[ActionSpec]) -> Plan:
    """Merge actions into one plan: the strongest LR cut wins; a rollback or a stop also skips the update.

    A stop whose restore is still `auto` (not resolved by the policy) keeps the current weights."""
    skip = rollback = stop = restore_lr = False
    restore = Restore.CURRENT
    lr_factor, min_lr = 1.0, 0.0
    for action in actions:
        if action.kind is ActionKind.SKIP_UPDATE:
            skip = True
        elif action.kind is ActionKind.RESTORE_LR:
            restore_lr = True
        elif action.kind is ActionKind.ROLLBACK:
            rollback = skip = True
        elif action.kind is ActionKind.REDUCE_LR:
            lr_factor = min(lr_factor, action.param("factor"))
            min_lr = max(min_lr, action.param("min_lr"))
        elif action.kind is ActionKind.STOP:
            stop = skip = True
            wanted = stop_restore(action)
            if wanted is not Restore.AUTO and _RESTORE_ORDER.index(wanted) > _RESTORE_ORDER.index(restore):
                restore = wanted
    return Plan(skip, rollback, lr_factor, min_lr, stop, restore, restore_lr)
