"""Guardian's events: typed, immutable-by-convention values tagged by `kind`, and the one codec for them.

Every value that crosses a boundary — callback → event file → daemon → store → report, TUI and exporter — is
one of the structs below. `encode` and `decode` are the only places an event becomes JSON or comes back; the
wire schema (`guardian/schema/wire-v1.schema.json`) is generated from these types by `wire_schema()`.

The JSON is protocol version 1 as before: `{"kind": "metrics", "seq": 17, "time": ..., "step": 17, ...}`.
Non-finite floats keep their wire spelling, the strings "nan", "inf" and "-inf"; a decoder takes them (and
numbers written as strings) for any float field. Fields left at their default are not written.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

VERSION: Final = 1
MAX_SEQ: Final = 2**53 - 1  # seq and step: exact in every JSON reader
MAX_INT: Final = 2**63 - 1  # any other integer: fits SQLite's and Prometheus' 64 bits
MAX_NAME_CHARS: Final = 128  # a string that becomes a label, a key or a file name
MAX_VALUES_PER_EVENT: Final = 256
MAX_GPUS_PER_EVENT: Final = 64
MAX_RULES_PER_EVENT: Final = 1024

Seq = Annotated[int, Meta(ge=0, le=MAX_SEQ)]  # 0: not numbered yet (an event file numbers it when written)
Step = Annotated[int, Meta(ge=0, le=MAX_SEQ)]
Int64 = Annotated[int, Meta(ge=-MAX_INT - 1, le=MAX_INT)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
_NONFINITE_PATTERN: Final = "^(nan|inf|-inf)$"
Number = Annotated[float, Meta(extra_json_schema={
    "pattern": _NONFINITE_PATTERN,
    "description": "a number; non-finite values travel as the strings nan, inf and -inf"})]
Rules = Annotated[list[str], Meta(max_length=MAX_RULES_PER_EVENT)]
Phase: TypeAlias = Literal["train", "eval"]


class ActionKind(str, enum.Enum):
    """What Guardian can do to a run. Ordered here from mildest to strongest."""

    ALERT = "alert"
    SKIP_UPDATE = "skip_update"
    RESTORE_LR = "restore_lr"
    REDUCE_LR = "reduce_lr"
    ROLLBACK = "rollback"
    STOP = "stop"


class Severity(str, enum.Enum):
    """How bad a rule's finding is."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Kind(str, enum.Enum):
    """The kinds of event, as spelled on the wire."""

    START = "start"
    METRICS = "metrics"
    SYSTEM = "system"
    DECISION = "decision"
    ACTION = "action"
    CHECKPOINT = "checkpoint"
    END = "end"


class Event(Struct, tag_field="kind", kw_only=True, omit_defaults=True):
    """What every event has: its number in the run (from 1, no gaps), its Unix time, the optimizer step, and who
    wrote it when that is not the training process itself (`attach`; for a decision, `local` or `daemon`)."""

    seq: Seq = 0
    time: float = 0.0
    step: Step | None = None
    source: str | None = None

    @property
    def kind(self) -> Kind:
        return Kind(self.__struct_config__.tag)


class StartEvent(Event, tag="start", kw_only=True, omit_defaults=True):
    """A run began (or, with `resumed`, an attached reader saw it start again from a checkpoint)."""

    rules: Rules = []
    rule_set: str | None = None  # daemon mode: the daemon's rule set for the run
    rule_file: str | None = None  # attach: the rule file judging the run (the callback's is in `source`)
    run_id: str | None = None
    trainable_bytes: Int64 | None = None
    max_steps: Int64 | None = None
    clipped: bool | None = None
    pre_update: bool | None = None  # whether each optimizer step is judged before its update
    grad_norm_from: str | None = None
    pre_update_why: str | None = None
    output_dir: str | None = None  # attach: the followed folder and log
    log: str | None = None
    resumed: bool = False
    reason: str | None = None
    replaced_observations: Int64 | None = None
    dropped_decisions: Int64 | None = None


class MetricsEvent(Event, tag="metrics", kw_only=True, omit_defaults=True):
    """One step's (phase train) or one evaluation's (phase eval) values, keyed by Hugging Face's log keys."""

    step: Step
    phase: Phase
    epoch: float | None = None
    lr_scale: float | None = None
    values: Annotated[dict[Name, Number], Meta(max_length=MAX_VALUES_PER_EVENT)]
    after_train: bool = False  # an evaluation after `train()` returned: recorded, never judged


class GpuFacts(Struct, kw_only=True, omit_defaults=True):
    """One GPU as NVML reports it, in base units; a fact NVML did not answer is left out."""

    gpu: Int64 | Name = 0
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    utilization_ratio: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None


class SystemEvent(Event, tag="system", kw_only=True, omit_defaults=True):
    """The GPU facts of one rank."""

    rank: Int64 | Name = 0
    gpus: Annotated[list[GpuFacts], Meta(max_length=MAX_GPUS_PER_EVENT)] = []


class ActionRequest(Struct, kw_only=True):
    """An action a rule asks for, with its parameters."""

    kind: ActionKind
    params: dict[str, Any] = {}


class DecisionEvent(Event, tag="decision", kw_only=True, omit_defaults=True):
    """A rule fired: what it saw (metric, value, threshold, onset), what it asks for, and why."""

    step: Step
    rule: str
    severity: Severity
    actions: list[ActionRequest]
    level: Int64 = 0
    metric: str
    value: Number
    threshold: Number | None  # always written, null when the rule has none
    onset_step: Step
    message: str
    evidence: dict[str, Any] = {}
    diagnosis: str = ""
    fix: str = ""
    note: str = ""
    incident: Annotated[int, Meta(ge=1)] | None  # numbered from 1 per run; null for an alert outside one
    late: bool = False  # attach: judged when a checkpoint brought the step's grad_norm


class LrChange(Struct, kw_only=True):
    """A learning rate moved from one value to another."""

    from_: float = msgspec.field(name="from")
    to: float


class ActionOutcome(Struct, kw_only=True, omit_defaults=True):
    """What an intervention did, as the actuator (or `guardian attach`) carried it out."""

    skipped_update: bool = False
    # where the weights came back from: "snapshot" or "checkpoint"; "restart" (sharded: a supervised restart was
    # asked for) or "impossible" (with `reason`)
    rollback: str | None = None
    rollback_to_step: Step | None = None
    rollback_seconds: float | None = None
    reason: str | None = None
    resume_from: str | None = None
    lr_restored: LrChange | None | UnsetType = UNSET  # None: there was no schedule to go back to
    lr_factor: float | None = None
    lr: float | None = None
    lr_scale: float | None = None
    stopped: bool | None = None
    restored: str | None = None  # what a stop left in place
    restored_best: str | None = None  # the older spelling of `restored`
    already_signalled: bool = False  # attach: the process was already asked to stop
    signal: str | None = None
    signal_error: str | None = None
    pid: Int64 | None = None

    def __bool__(self) -> bool:
        return self != _NOTHING_DONE

    def describe(self) -> str:
        """One line saying what the intervention did."""
        parts = []
        if self.rollback == "restart":
            parts.append(f"sharded state: asked for a supervised restart from {self.resume_from}")
        elif self.rollback == "impossible":
            parts.append(f"could not roll back ({self.reason})")
        elif self.rollback is not None:
            parts.append(f"rolled back to step {self.rollback_to_step} from {self.rollback} "
                         f"in {(self.rollback_seconds or 0.0) * 1000:.1f} ms")
        if self.skipped_update:
            parts.append("skipped this update")
        if isinstance(self.lr_restored, LrChange):
            parts.append(f"learning rate put back on its schedule: {self.lr_restored.from_:.3g} -> "
                         f"{self.lr_restored.to:.3g}")
        if self.lr_factor is not None:
            parts.append(f"learning rate x{self.lr_factor:.3g} -> {self.lr or 0.0:.3g} "
                         f"(scale {self.lr_scale or 1.0:.3g})")
        if self.stopped:
            left = f", left {self.restored} in place" if self.restored is not None else ""
            left = f", restored {self.restored_best}" if self.restored_best is not None else left
            parts.append("stopping training" + left)
        return "; ".join(parts) or "recorded"

    def event(self, step: int, rules: Iterable[str], source: str | None = None,
              command_ids: list[int] | None = None) -> ActionEvent:
        """This outcome as the `action` event of `step`."""
        return ActionEvent(step=step, rules=list(rules), source=source, command_ids=command_ids,
                           **{name: getattr(self, name) for name in self.__struct_fields__})


_NOTHING_DONE: Final = ActionOutcome()


class ActionEvent(Event, tag="action", kw_only=True, omit_defaults=True):
    """An intervention at a step: the rules (or `manual:<action>` commands) behind it and its outcome. The
    outcome's fields are ActionOutcome's, written flat (a test keeps the two lists the same)."""

    step: Step = 0
    rules: Rules = []
    command_ids: list[Int64] | None = None  # the daemon commands it carried out
    skipped_update: bool = False
    rollback: str | None = None
    rollback_to_step: Step | None = None
    rollback_seconds: float | None = None
    reason: str | None = None
    resume_from: str | None = None
    lr_restored: LrChange | None | UnsetType = UNSET
    lr_factor: float | None = None
    lr: float | None = None
    lr_scale: float | None = None
    stopped: bool | None = None
    restored: str | None = None
    restored_best: str | None = None
    already_signalled: bool = False
    signal: str | None = None
    signal_error: str | None = None
    pid: Int64 | None = None

    @property
    def outcome(self) -> ActionOutcome:
        return ActionOutcome(**{name: getattr(self, name) for name in ActionOutcome.__struct_fields__})

    @property
    def by_operator(self) -> bool:
        """Carried out for a command someone queued (`guardian ctl`, the TUI), not for a rule."""
        return self.source == "command" or (bool(self.rules) and all(r.startswith("manual:") for r in self.rules))


class CheckpointEvent(Event, tag="checkpoint", kw_only=True, omit_defaults=True):
    """A checkpoint was saved (`protected`: Guardian's copy of a good one) or judged from outside (`good`)."""

    protected: str | None = None
    good: bool | None = None
    path: str | None = None
    why: str | None = None
    rule: str | None = None


class EndEvent(Event, tag="end", kw_only=True, omit_defaults=True):
    """A run ended: what Guardian did over it."""

    skipped_updates: Int64 = 0
    rollbacks: Int64 = 0
    lr_cuts: Int64 = 0
    lr_restores: Int64 = 0
    stops: Int64 = 0
    masked_samples: Int64 = 0  # rows of samples an earlier run named as bad, masked when they came again
    decisions: Int64 = 0
    incidents: list[dict[str, Any]] | None = None
    lr_scale: float | None = None
    guardian_errors: Int64 = 0
    verdicts: dict[str, Int64] = {}
    resumes: Int64 | None = None  # attach: how often the followed run started again


AnyEvent: TypeAlias = (StartEvent | MetricsEvent | SystemEvent | DecisionEvent | ActionEvent | CheckpointEvent
                       | EndEvent)
EVENT_TYPES: Final[tuple[type[Event], ...]] = (StartEvent, MetricsEvent, SystemEvent, DecisionEvent, ActionEvent,
                                               CheckpointEvent, EndEvent)
KINDS: Final = tuple(kind.value for kind in Kind)


class Command(Struct, kw_only=True):
    """An action queued for a run by an operator, delivered with the daemon's next reply."""

    id: Int64
    action: ActionKind
    params: dict[str, Any] = {}
    source: str | None = None  # who queued it: "ctl", "tui", "alert:<alertname>"


# ---- the messages of the HTTP protocol -------------------------------------------------------------------

MAX_EVENTS_PER_REPORT: Final = 5000
MAX_RUN_ID_CHARS: Final = 200


class RunInfo(Struct, kw_only=True):
    """Which run a report is about: its id, the daemon's rule set to judge it by, and free-form facts."""

    id: Annotated[str, Meta(min_length=1, max_length=MAX_RUN_ID_CHARS)]
    rules: Name = "default"
    meta: dict[str, Any] = {}


class Report(Struct, kw_only=True, omit_defaults=True):
    """POST /v1/report: a run's next events (and, with `decisions_since_step`, a request for its decisions)."""

    v: Literal[1]
    run: RunInfo
    events: Annotated[list[AnyEvent], Meta(max_length=MAX_EVENTS_PER_REPORT)]
    decisions_since_step: Int64 | None = None


class Reply(Struct, kw_only=True):  # not omit_defaults: "v" is written in every body
    """The answer to a report: every event up to `ack_seq` is stored; the decisions and queued commands."""

    v: Literal[1] = 1
    ack_seq: Int64
    run_key: str | UnsetType = UNSET  # only when this report bound the run to a key (made by the daemon if none)
    decided_through_step: Int64 | None
    decisions: list[DecisionEvent]
    commands: list[Command]


class Control(Struct, kw_only=True):
    """POST /v1/runs/{run}/control: queue an action for a run."""

    v: Literal[1]
    action: ActionKind
    params: dict[str, Any] = {}


class ErrorReply(Struct, kw_only=True):  # not omit_defaults: "v" is written in every body
    """Any error: what is wrong and what to do; a seq gap (409) adds the run's next seq to resend from."""

    v: Literal[1] = 1
    error: str
    expected_seq: Annotated[int, Meta(ge=1)] | UnsetType = UNSET


# ---- the codec ------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """For the encoder: a numpy or torch scalar as the Python number it holds; anything else is refused."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot encode a {type(value).__name__} in an event; give numbers, strings, lists or dicts")


_encoder = msgspec.json.Encoder(enc_hook=_plain)
_decoder = msgspec.json.Decoder(AnyEvent, strict=False)  # strict=False: "nan", "inf", "-inf" for floats


def encode(value: Struct) -> bytes:
    """JSON for an event (or any struct here); non-finite floats as "nan", "inf", "-inf"."""
    out = _encoder.encode(value)
    if b"null" not in out:  # msgspec writes a non-finite float as null: only then is there anything to respell
        return out
    return _encoder.encode(_spell_nonfinite(msgspec.to_builtins(value, enc_hook=_plain)))


def decode(data: bytes | str) -> AnyEvent:
    """One event from JSON; msgspec.ValidationError or msgspec.DecodeError say what is wrong and where."""
    return _decoder.decode(data)


def to_builtins(value: Any, *, other: Callable[[Any], Any] | None = None) -> Any:
    """The JSON-shaped Python value of a struct, or of any JSON-shaped value holding structs, with non-finite
    floats as their strings: for a JSON body that is not one event. `other` turns any other object into
    something JSON holds (the CLI's `--json` output passes `str`); without it such an object is a TypeError."""
    hook = _plain if other is None else (lambda v: v.item() if hasattr(v, "item") else other(v))
    return _spell_nonfinite(msgspec.to_builtins(value, enc_hook=hook))


def numbered(event: AnyEvent, seq: int, time: float) -> AnyEvent:
    """A copy of `event` with its sequence number and time."""
    return msgspec.structs.replace(event, seq=seq, time=time)


def from_builtins(value: Any) -> AnyEvent:
    """One event from its JSON-shaped Python value (as a daemon's JSON reply holds it)."""
    return msgspec.convert(value, AnyEvent, strict=False)


def wire_schema() -> dict[str, Any]:
    """The JSON Schema of the protocol, generated from the types: `guardian/schema/wire-v1.schema.json` must
    equal it (tests/test_events.py checks, and `python -m guardian.events` writes it)."""
    messages = (Report, Reply, Control, ErrorReply)
    (report, reply, control, error), defs = msgspec.json.schema_components(
        messages, ref_template="#/$defs/{name}")
    return _numbers_take_nonfinite_strings({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "guardian/wire-v1",
        "title": f"Guardian wire protocol, version {VERSION}",
        "description": _PROTOCOL,
        "$defs": {**defs, "report": report, "reply": reply, "control": control, "error": error},
    })


def _numbers_take_nonfinite_strings(node: Any) -> Any:
    """msgspec writes `Number` as {"type": "number", "pattern": ...}: the spelled-out NaN strings must pass too."""
    if isinstance(node, dict):
        if node.get("pattern") == _NONFINITE_PATTERN:
            node["type"] = ["number", "string"]
        for child in node.values():
            _numbers_take_nonfinite_strings(child)
    elif isinstance(node, list):
        for child in node:
            _numbers_take_nonfinite_strings(child)
    return node


_PROTOCOL = (
    "JSON bodies exchanged between training processes and the guardian daemon, generated from guardian/events.py. "
    "Every body carries \"v\": 1; a daemon refuses other versions with HTTP 409. Every write (POST) needs "
    "'Authorization: Bearer <token>' (the daemon's token file, or GUARDIAN_TOKEN), else 401; reads (GET) need it "
    "only off loopback. A report carries its run's key in the 'X-Guardian-Run-Key' header (32-200 printable ASCII "
    "characters): the first report of a run binds the run to the key it carries (or to one the daemon makes, "
    "returned as the reply's run_key); later reports with another key or none are refused with 403 until the run "
    "has ended. Events are numbered by `seq` from 1 without gaps; the daemon stores each (run, seq) once and takes "
    "only the seq after the last one stored (a gap is answered 409 with expected_seq).")


if __name__ == "__main__":
    # regenerate the committed schema: python -m guardian.events > guardian/schema/wire-v1.schema.json
    import json
    import sys

    json.dump(wire_schema(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


def _spell_nonfinite(value: Any) -> Any:
    """A JSON-shaped value with non-finite floats as strings (msgspec.to_builtins keeps floats as floats)."""
    if isinstance(value, float):  # numpy's float64 is one too
        value = float(value)
        return value if math.isfinite(value) else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
    if isinstance(value, dict):
        return {key: _spell_nonfinite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):  # to_builtins keeps tuples
        return [_spell_nonfinite(item) for item in value]
    return value
