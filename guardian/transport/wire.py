"""The wire protocol between training processes and the guardian daemon: versioned JSON over HTTP.

Every body is a JSON object with `"v": 1`. A training process POSTs its events to `/v1/report`:

    {"v": 1,
     "run": {"id": "llama-lora-3f2a9c1d", "rules": "default", "meta": {"output_dir": "...", "max_steps": 1000}},
     "events": [{"seq": 17, "kind": "metrics", "time": 1764000000.1, "step": 17, "phase": "train",
                 "values": {"loss": 1.93, "grad_norm": 0.82, "learning_rate": 0.0002}}, ...]}

`seq` numbers a run's events from 1 without gaps; the daemon stores each (run, seq) once, so a sender may
resend freely. Event kinds: `start`, `metrics` (phase train or eval), `system` (GPU facts of a rank),
`decision`, `action`, `checkpoint`, `end`. Non-finite floats travel as the strings "nan", "inf", "-inf". The reply:

    {"v": 1, "ack_seq": 17, "decided_through_step": 17,
     "decisions": [<Decision.to_dict()>...], "commands": [{"id": 3, "action": "stop", "params": {}}]}

Every write carries `Authorization: Bearer <token>`, and a report its run's key in `X-Guardian-Run-Key` (the
first report binds the run to it; the reply then carries `run_key`). Errors are
`{"v": 1, "error": "<what is wrong and what to do>"}` with status 400 (malformed), 401 (no valid token), 403
(another process's run, or a browser's request), 404, 408 (too slow), 409 (unsupported version; a seq gap,
with `"expected_seq"` added: resend from there), 413 (too large), 415 (not JSON), 421 (a Host that is not
loopback), 429 (too many new runs) or 503 (the daemon is full; retry). The JSON Schema:
`guardian/schema/wire-v1.schema.json`.

Bounds, checked at intake so that nothing stored can break a later listing or scrape: a body of at most 4 MiB
in UTF-8 (no lone surrogates), nested at most 32 deep, integers within 64 bits (seq and step within 2^53-1);
at most 5,000 events a report and 256 values an event; `run.meta` at most 16 KiB encoded and 8 deep; every
string that becomes a label, a key or a file name (`run.id` up to 200 characters; `run.rules`, value keys,
`meta.host`, a system event's `rank` and `gpu`, an action's `source` up to 128) printable, without control
characters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from guardian.errors import GuardianError

VERSION = 1
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_EVENTS_PER_REPORT = 5000
MAX_DEPTH = 32  # nesting of objects and lists in a message
MAX_SEQ = 2**53 - 1  # seq and step: exact in every JSON reader
MAX_INT = 2**63 - 1  # any other integer: fits SQLite's and Prometheus' 64 bits
MAX_META_BYTES = 16 * 1024
MAX_VALUES_PER_EVENT = 256
MAX_GPUS_PER_EVENT = 64
MAX_NAME_CHARS = 128  # a string that becomes a label, a key or a file name
MAX_RUN_ID_CHARS = 200
# Value keys already found valid: a report's keys are checked with one subset test (the same few keys come in
# every report); bounded, so keys made up to fill it are still checked, one by one.
_GOOD_KEYS: set[str] = set()
MAX_GOOD_KEYS = 4096

EVENT_KINDS = ("start", "metrics", "system", "decision", "action", "checkpoint", "end")


class WireError(GuardianError, ValueError):
    """A message that does not follow the protocol; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def encode_value(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    return value


def decode_number(value: Any) -> float | None:
    """A metric value from the wire: a number (an integer within 64 bits) or one of the strings nan/inf/-inf."""
    kind = type(value)
    if kind is float:
        return value  # type: ignore[no-any-return]
    if kind is int:
        return float(value) if -MAX_INT - 1 <= value <= MAX_INT else None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def dumps(message: dict[str, Any]) -> bytes:
    return json.dumps(encode_value({"v": VERSION, **message}), separators=(",", ":"), allow_nan=False).encode()


def loads(body: bytes, *, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """Parse and check the envelope of a message; raise WireError with a clear reason."""
    if len(body) > max_bytes:
        raise WireError(f"message of {len(body)} bytes is over the limit of {max_bytes}; send smaller batches", 413)
    message = parse_json(body, events_checked_later=True)
    if not isinstance(message, dict):
        raise WireError("body must be a JSON object with a 'v' field")
    version = message.get("v")
    if version != VERSION:
        raise WireError(f"unsupported protocol version {version!r}; this guardian speaks version {VERSION}", 409)
    return message


@dataclass(frozen=True)
class Report:
    run_id: str
    rules: str
    meta: dict[str, Any]
    events: list[dict[str, Any]]


def parse_json(body: bytes, *, events_checked_later: bool = False) -> Any:
    """JSON with bounded nesting and integers, valid Unicode (no lone surrogates); WireError (400) otherwise.

    With `events_checked_later` the top-level `events` list is left to `parse_report`, which checks each event
    as it reads it (walking every event twice cost a batched report 2.5 µs an event)."""
    try:
        message = json.loads(body.decode())  # strict UTF-8: json.loads(bytes) would let raw surrogates through
    except RecursionError:
        raise WireError(f"body is nested too deeply; at most {MAX_DEPTH} levels of objects and lists") from None
    except UnicodeDecodeError as exc:
        raise WireError(f"body is not valid UTF-8: {exc}") from None
    except ValueError as exc:  # JSONDecodeError; an integer of over 4,300 digits
        problem = "an integer beyond 64 bits" if "integer string conversion" in str(exc) else exc
        raise WireError(f"body is not valid JSON: {problem}") from None
    skip = message.get("events") if events_checked_later and isinstance(message, dict) else None
    check_tree(message, "body", skip=skip)
    return message


def check_tree(value: Any, where: str, *, max_depth: int = MAX_DEPTH, skip: Any = None) -> None:
    """Refuse nesting over `max_depth`, integers beyond 64 bits and lone surrogates (json.loads accepts
    "\\ud800", which no UTF-8 writer, Prometheus' included, can encode); `skip` (one container) is not entered."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if node is skip:
            continue
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


def parse_report(message: dict[str, Any]) -> Report:
    """Check a `/v1/report` body field by field."""
    run = message.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("id"), str) or not run["id"].strip():
        raise WireError("'run' must be an object with a non-empty string 'id'")
    check_name(run["id"], "'run.id'", max_chars=MAX_RUN_ID_CHARS)
    rules = run.get("rules", "default")
    if not isinstance(rules, str):
        raise WireError("'run.rules' must be the name of a rule set, e.g. \"default\"")
    check_name(rules, "'run.rules'")
    meta = run.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("'run.meta' must be an object")
    check_meta(meta)
    events = message.get("events")
    if not isinstance(events, list):
        raise WireError("'events' must be a list")
    if len(events) > MAX_EVENTS_PER_REPORT:
        raise WireError(f"{len(events)} events in one report; send at most {MAX_EVENTS_PER_REPORT}", 413)
    for i, event in enumerate(events):
        _check_event(i, event)
    return Report(run["id"], rules, meta, events)


def _check_event(i: int, event: Any) -> None:
    where = f"events[{i}]"
    if not isinstance(event, dict):
        raise WireError(f"{where} must be an object")
    seq = event.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise WireError(f"{where}.seq must be an integer >= 1, got {seq!r}")
    if event.get("kind") not in EVENT_KINDS:
        raise WireError(f"{where}.kind must be one of {', '.join(EVENT_KINDS)}, got {event.get('kind')!r}")
    if seq > MAX_SEQ:
        raise WireError(f"{where}.seq must be at most 2^53-1, got {seq}")
    step = event.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_SEQ):
        raise WireError(f"{where}.step must be an integer from 0 to 2^53-1, got {step!r}")
    kind = event["kind"]
    for key, field in event.items():  # the fields no check below reads: bounded like the rest of the body
        if not key.isascii():
            _check_scalar(key, where)
        kind_of = type(field)
        if kind_of is dict or kind_of is list:
            if key != "values" or kind != "metrics":
                check_tree(field, f"{where}.{key}", max_depth=MAX_DEPTH - 3)
        elif (kind_of is int and not -MAX_INT - 1 <= field <= MAX_INT) or (kind_of is str and not field.isascii()):
            _check_scalar(field, f"{where}.{key}")
    if kind == "metrics":
        values = event.get("values")
        if not isinstance(values, dict) or step is None:
            raise WireError(f"{where}: a metrics event needs 'step' and a 'values' object")
        if len(values) > MAX_VALUES_PER_EVENT:
            raise WireError(f"{where}.values has {len(values)} keys; send at most {MAX_VALUES_PER_EVENT}")
        if not values.keys() <= _GOOD_KEYS:
            for key in values.keys() - _GOOD_KEYS:
                check_name(key, f"{where}.values key")
                if len(_GOOD_KEYS) < MAX_GOOD_KEYS:
                    _GOOD_KEYS.add(key)
        for key, value in values.items():
            if decode_number(value) is None:
                raise WireError(f"{where}.values.{key} must be a number (or \"nan\"/\"inf\"), got {value!r}")
    elif kind == "system":
        _check_system(where, event)
    elif kind == "action" and "source" in event:
        check_name(event["source"], f"{where}.source")


def _check_system(where: str, event: dict[str, Any]) -> None:
    rank = event.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, (int, str)):
        raise WireError(f"{where}.rank must be an integer or a short string, got {rank!r}")
    if isinstance(rank, str):
        check_name(rank, f"{where}.rank")
    gpus = event.get("gpus", [])
    if not isinstance(gpus, list) or len(gpus) > MAX_GPUS_PER_EVENT or not all(isinstance(g, dict) for g in gpus):
        raise WireError(f"{where}.gpus must be a list of at most {MAX_GPUS_PER_EVENT} objects")
    for gpu in gpus:
        if isinstance(gpu.get("gpu"), str):
            check_name(gpu["gpu"], f"{where}.gpus[].gpu")


def check_meta(meta: dict[str, Any]) -> None:
    """`run.meta`: at most MAX_META_BYTES encoded; `host` (a label) a plain name."""
    check_tree(meta, "'run.meta'", max_depth=8)
    size = len(json.dumps(meta))
    if size > MAX_META_BYTES:
        raise WireError(f"'run.meta' is {size} bytes encoded; send at most {MAX_META_BYTES}")
    if "host" in meta:
        check_name(meta["host"], "'run.meta.host'")


def metric_values(event: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics event, NaN and inf restored."""
    out = {}
    for key, value in event.get("values", {}).items():
        number = decode_number(value)
        if number is not None:
            out[key] = number
    return out
