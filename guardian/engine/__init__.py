"""The rule engine: the rule model and metric names, the detectors' verdicts turned into decisions, incidents and actions."""
from guardian.engine.engine import Decision, Engine, RuleStatus, decision_from_dict, decision_from_event

__all__ = ["Decision", "Engine", "RuleStatus", "decision_from_dict", "decision_from_event"]
