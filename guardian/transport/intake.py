"""The daemon's intake: a `/v1/report` body checked and decoded in one pass into typed events, each with the raw
JSON it arrived as (the store keeps those bytes; nothing is encoded again).

The envelope is decoded by msgspec with the events left raw; each raw event is then decoded by `events.decode`
into its struct. What the types bound (lengths, integer ranges, required fields) msgspec checks, and its message
names the place (`events[3].seq: Expected `int`...`). What is left is checked here: seq from 1, the names that
become labels, keys or file names printable, `run.meta` at most MAX_META_BYTES encoded and 8 deep, free-form
fields (evidence, incidents, params, fields no type knows) nested at most MAX_DEPTH deep with integers within 64
bits and valid Unicode. The bounds and statuses are the protocol's (see guardian.transport.wire).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from guardian import events
from guardian.events import AnyEvent, DecisionEvent, EndEvent, Int64, MetricsEvent, SystemEvent
from guardian.transport.wire import (
    MAX_BODY_BYTES,
    MAX_DEPTH,
    MAX_EVENTS_PER_REPORT,
    MAX_INT,
    MAX_META_BYTES,
    MAX_NAME_CHARS,
    MAX_RUN_ID_CHARS,
    VERSION,
    WireError,
)

# Value keys already found valid: a report's keys are checked with one subset test (the same few keys come in
# every report); bounded, so keys made up to fill it are still checked, one by one.
_GOOD_KEYS: set[str] = set()
MAX_GOOD_KEYS = 4096
# An event's raw JSON is walked as a tree only when something in it could break a bound no type checks: more
# openers than levels allowed (a deep field), a run of 19 digits (an integer beyond 64 bits) or an escape (a lone
# surrogate); a metrics event, the common one, is then never walked.
_EVENT_DEPTH: Final = MAX_DEPTH - 2  # an event sits two levels down in the body
_DIGITS_AS_NINES: Final = bytes.maketrans(b"0123456789", b"9" * 10)
_NINETEEN_DIGITS: Final = b"9" * 19  # the fewest digits of an integer beyond 64 bits, after _DIGITS_AS_NINES
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class StoredEvent(msgspec.Struct, frozen=True, gc=False):
    """An event as the intake decoded it and the raw JSON it arrived as (what the store keeps)."""

    event: AnyEvent
    raw: bytes


@dataclass(frozen=True)
class ReportIntake:
    """A checked `/v1/report`: its run, its events in the order sent, and the step its decisions are asked from."""

    run: events.RunInfo
    events: list[StoredEvent]
    decisions_since_step: int | None = None

    @property
    def run_id(self) -> str:
        return self.run.id

    @property
    def rules(self) -> str:
        return self.run.rules

    @property
    def meta(self) -> dict[str, Any]:
        return self.run.meta


class _Envelope(msgspec.Struct, kw_only=True):
    """A report body with its events left raw; `v` and a missing `run` or `events` are judged by hand."""

    v: Any = None
    run: events.RunInfo | None = None
    events: list[msgspec.Raw] | None = None
    decisions_since_step: Int64 | None = None


class _Version(msgspec.Struct):
    """A body's protocol version alone, whatever the rest holds."""

    v: Any = None


class _Seq(msgspec.Struct):
    """An event's seq alone, whatever the rest holds."""

    seq: Any = None


_envelope: Final = msgspec.json.Decoder(_Envelope)
_version: Final = msgspec.json.Decoder(_Version)
_seq: Final = msgspec.json.Decoder(_Seq)
_tree: Final = msgspec.json.Decoder()


def parse_report(body: bytes, *, max_bytes: int = MAX_BODY_BYTES) -> ReportIntake:
    """A `/v1/report` body as typed events with their raw JSON; WireError (with the status) names what is wrong."""
    envelope = _decode_envelope(body, max_bytes)
    if envelope.run is None:
        raise WireError("'run' must be an object with a non-empty string 'id'")
    check_name(envelope.run.id, "'run.id'", max_chars=MAX_RUN_ID_CHARS)
    check_name(envelope.run.rules, "'run.rules'")
    check_meta(envelope.run.meta)
    if envelope.events is None:
        raise WireError("'events' must be a list")
    if len(envelope.events) > MAX_EVENTS_PER_REPORT:
        raise WireError(f"{len(envelope.events)} events in one report; send at most {MAX_EVENTS_PER_REPORT}", 413)
    suspect = _NINETEEN_DIGITS in body.translate(_DIGITS_AS_NINES) or b"\\u" in body  # one pass over the body
    taken = [_stored(i, raw, suspect) for i, raw in enumerate(envelope.events)]
    return ReportIntake(envelope.run, taken, envelope.decisions_since_step)


def parse_object(body: bytes, *, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """Another message (a control request) as a JSON object of protocol version 1, bounded like a report."""
    message = parse_json(body, max_bytes=max_bytes)
    if not isinstance(message, dict):
        raise WireError("body must be a JSON object with a 'v' field")
    if message.get("v") != VERSION:
        raise _version_error(message.get("v"))
    return message


def _decode_envelope(body: bytes, max_bytes: int) -> _Envelope:
    """A report body's envelope (its events left raw), of protocol version 1."""
    _check_size_and_utf8(body, max_bytes)
    try:
        envelope = _envelope.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        _check_version(body)  # a body of another version is refused as such, whatever else it holds
        raise _decode_error("body", exc, body) from None
    if envelope.v != VERSION:
        raise _version_error(envelope.v)
    return envelope


def _check_size_and_utf8(body: bytes, max_bytes: int) -> None:
    """Refuse a body over `max_bytes` (413) or not valid UTF-8 (400)."""
    if len(body) > max_bytes:
        raise WireError(f"message of {len(body)} bytes is over the limit of {max_bytes}; send smaller batches", 413)
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError as exc:
            raise WireError(f"body is not valid UTF-8: {exc}") from None


def _check_version(body: bytes) -> None:
    """Refuse a body that did not decode when its `v` is another version (409): that is what is wrong with it."""
    try:
        version = _version.decode(body).v
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return
    if version != VERSION:
        raise _version_error(version)


def _version_error(version: Any) -> WireError:
    """The 409 for a body of another protocol version."""
    return WireError(f"unsupported protocol version {version!r}; this guardian speaks version {VERSION}", 409)


def _decode_error(where: str, exc: Exception, data: bytes) -> WireError:
    """A msgspec error as a WireError naming the field: `events[3].seq: Expected `int`, got `str``."""
    if isinstance(exc, RecursionError):
        return WireError(f"{where} is nested too deeply; at most {MAX_DEPTH} levels of objects and lists")
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        if _SURROGATE_ESCAPE.search(data):
            return WireError(f"{where} holds a lone surrogate (\\ud800-\\udfff); send valid Unicode")
        return WireError(f"{where} is not valid JSON: {exc}")
    message, _, at = str(exc).partition(" - at `")
    if message == "Integer value out of range":
        message = "holds an integer beyond 64 bits; send smaller numbers"
    if at.startswith("key` in `$"):  # a dict key: "- at `key` in `$.values`"
        path = at.removeprefix("key` in `$").rstrip("`") + " key"
    else:
        path = at.removeprefix("$").rstrip("`")
    if where == "body":
        if not path:
            return WireError(f"body must be a JSON object with a 'v' field: {message}")
        return WireError(f"{path.lstrip('.')}: {message}")
    return WireError(f"{where}{path}: {message}")


def _stored(i: int, raw: msgspec.Raw, suspect: bool) -> StoredEvent:
    """Event `i` of a report with the JSON the store keeps: the bytes as sent (re-encoded only for a metrics
    event sent without its phase, so that every stored row decodes as it is). Without `suspect` the body holds
    no escape and no run of 19 digits, so no event needs looking at for them."""
    data = bytes(raw)
    try:
        event = events.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return _stored_slowly(i, data, suspect)
    if (type(event) is MetricsEvent and event.seq >= 1 and event.source is None and not suspect
            and data.count(b"{") + data.count(b"[") <= _EVENT_DEPTH):  # the usual event: only its keys to check
        if not event.values.keys() <= _GOOD_KEYS:
            _check_value_keys(f"events[{i}]", event.values)
        return StoredEvent(event, data)
    _check_event(f"events[{i}]", event, data, suspect)
    return StoredEvent(event, data)


def _stored_slowly(i: int, data: bytes, suspect: bool) -> StoredEvent:
    """An event that did not decode as it is: a phaseless metrics event (stored re-encoded), else WireError."""
    where = f"events[{i}]"
    event, as_sent = _decoded(where, data)
    _check_event(where, event, data, suspect)
    return StoredEvent(event, data if as_sent else events.encode(event))


def _check_event(where: str, event: AnyEvent, data: bytes, suspect: bool = True) -> None:
    """An event's bounds beyond what its type checks: seq from 1, names, free-form fields."""
    if event.seq < 1:
        raise WireError(f"{where}.seq must be an integer >= 1, got {event.seq}")
    if (data.count(b"{") + data.count(b"[") > _EVENT_DEPTH or isinstance(event, (DecisionEvent, EndEvent))
            or (suspect and (b"\\u" in data or _holds_long_integer(data)))):  # DecisionEvent, EndEvent: free-form
        _check_event_tree(where, data, event)
    if event.source is not None:
        check_name(event.source, f"{where}.source")
    match event:
        case MetricsEvent():
            _check_value_keys(where, event.values)
        case SystemEvent():
            _check_system(where, event)


def _holds_long_integer(data: bytes) -> bool:
    """Whether the JSON holds a run of 19 or more digits that is not a fraction or an exponent (an integer that
    may be beyond 64 bits, or digits in a string: either way worth a full check)."""
    nines = data.translate(_DIGITS_AS_NINES)
    start = nines.find(_NINETEEN_DIGITS)
    while start != -1:
        if start == 0 or data[start - 1] not in b".eE+":
            return True
        end = start + len(_NINETEEN_DIGITS)
        while end < len(nines) and nines[end] == 57:  # the rest of this run ('9')
            end += 1
        start = nines.find(_NINETEEN_DIGITS, end)
    return False


def phaseless_metrics(raw: msgspec.Raw | bytes | str) -> MetricsEvent | None:
    """A metrics event written without `phase` (protocol v1 lets a sender leave it out: a training step), or None
    when `raw` is not one. Guardian's own senders always write the phase."""
    try:
        tree = _tree.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(tree, dict) or "phase" in tree:
        return None
    try:
        event = events.from_builtins({**tree, "phase": "train"})
    except msgspec.ValidationError:
        return None
    return event if isinstance(event, MetricsEvent) else None


def _decoded(where: str, raw: bytes) -> tuple[AnyEvent, bool]:
    """An event decoded into its struct, and whether as it is (not a phaseless metrics event); WireError naming
    the field (seq and kind first) when it does not decode."""
    try:
        return events.decode(raw), True
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        legacy = phaseless_metrics(raw) if isinstance(exc, msgspec.ValidationError) else None
        if legacy is not None:
            return legacy, False
        if isinstance(exc, msgspec.ValidationError):
            _check_seq_first(where, raw)  # as before typed events: a bad seq is named before anything else
            if "`$.kind`" in str(exc) or "field `kind`" in str(exc):
                raise WireError(f"{where}.kind must be one of {', '.join(events.KINDS)}: {exc}") from None
            if "`$.values[...]`" in str(exc):  # msgspec does not name the key: find it
                _check_values_are_numbers(where, raw)
        raise _decode_error(where, exc, raw) from None


def _check_values_are_numbers(where: str, raw: bytes) -> None:
    """Name the first value of a metrics event that is not a number (called when it failed to decode)."""
    try:
        values = _tree.decode(raw).get("values")
    except (msgspec.DecodeError, RecursionError, AttributeError):
        return
    for key, value in values.items() if isinstance(values, dict) else ():
        try:
            msgspec.convert(value, float, strict=False)
        except msgspec.ValidationError:
            raise WireError(f"{where}.values.{key} must be a number (or \"nan\"/\"inf\"), got {value!r}") from None


def _check_seq_first(where: str, raw: bytes) -> None:
    """Refuse an event whose seq is missing or below 1 (called when it failed to decode, to name that first)."""
    try:
        seq = _seq.decode(raw).seq
    except (msgspec.DecodeError, RecursionError):
        return
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise WireError(f"{where}.seq must be an integer >= 1, got {seq!r}")


def _check_event_tree(where: str, data: bytes, event: AnyEvent) -> None:
    """Every field of an event's raw JSON within the bounds of the body (depth, 64 bits, valid Unicode)."""
    try:
        tree = _tree.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _decode_error(where, exc, data) from None
    for key, field in tree.items():
        if not key.isascii():
            _check_scalar(key, where)
        if isinstance(field, (dict, list)):
            if not (key == "values" and isinstance(event, MetricsEvent)):
                check_tree(field, f"{where}.{key}", max_depth=MAX_DEPTH - 3)
        else:
            _check_scalar(field, f"{where}.{key}")


def _check_value_keys(where: str, values: dict[str, float]) -> None:
    if values.keys() <= _GOOD_KEYS:
        return
    for key in values.keys() - _GOOD_KEYS:
        check_name(key, f"{where}.values key")
        if len(_GOOD_KEYS) < MAX_GOOD_KEYS:
            _GOOD_KEYS.add(key)


def _check_system(where: str, event: SystemEvent) -> None:
    if isinstance(event.rank, str):
        check_name(event.rank, f"{where}.rank")
    for gpu in event.gpus:
        if isinstance(gpu.gpu, str):
            check_name(gpu.gpu, f"{where}.gpus[].gpu")


def check_meta(meta: dict[str, Any]) -> None:
    """`run.meta`: at most MAX_META_BYTES encoded, 8 deep; `host` (a label) a plain name."""
    check_tree(meta, "'run.meta'", max_depth=8)
    size = len(msgspec.json.encode(meta))
    if size > MAX_META_BYTES:
        raise WireError(f"'run.meta' is {size} bytes encoded; send at most {MAX_META_BYTES}")
    if "host" in meta:
        check_name(meta["host"], "'run.meta.host'")


def parse_json(body: bytes, *, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """A free-form JSON body (an alert webhook) with bounded nesting and integers, valid UTF-8; WireError (400)
    otherwise."""
    _check_size_and_utf8(body, max_bytes)
    try:
        message = _tree.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _decode_error("body", exc, body) from None
    check_tree(message, "body")
    return message


def check_tree(value: Any, where: str, *, max_depth: int = MAX_DEPTH) -> None:
    """Refuse nesting over `max_depth`, integers beyond 64 bits and lone surrogates (which no UTF-8 writer,
    Prometheus' included, can encode)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise WireError(f"{where} is nested too deeply; at most {max_depth} levels of objects and lists")
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            if type(key) is str and not key.isascii():
                _check_scalar(key, where)
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            else:
                _check_scalar(child, where)
    if not isinstance(value, (dict, list)):
        _check_scalar(value, where)


def _check_scalar(value: Any, where: str) -> None:
    kind = type(value)
    if kind is int and not -MAX_INT - 1 <= value <= MAX_INT:
        raise WireError(f"{where} holds the integer {str(value)[:20]}... beyond 64 bits; send smaller numbers")
    if kind is str and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise WireError(f"{where} holds a lone surrogate (\\ud800-\\udfff) in {value[:40]!r}; "
                            "send valid Unicode") from None


def check_name(value: Any, where: str, *, max_chars: int = MAX_NAME_CHARS) -> str:
    """A string that becomes a label, a key or a file name: 1..max_chars printable characters (no control
    characters, no lone surrogates)."""
    if isinstance(value, str) and 0 < len(value) <= max_chars and value.isprintable():
        return value
    if not isinstance(value, str) or not value.strip():
        raise WireError(f"{where} must be a non-empty string, got {str(value)[:40]!r}")
    if len(value) > max_chars:
        raise WireError(f"{where} must be at most {max_chars} characters, got {len(value)}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise WireError(f"{where} holds a lone surrogate (\\ud800-\\udfff) in {value[:40]!r}; "
                        "send valid Unicode") from None
    raise WireError(f"{where} must not hold control or other unprintable characters, got {value[:40]!r}")
