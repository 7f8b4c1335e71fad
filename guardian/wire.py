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

Errors are `{"v": 1, "error": "<what is wrong and what to do>"}` with status 400 (malformed), 401 (token),
404, 413 (too large) or 409 (unsupported version). The JSON Schema: `guardian/schema/wire-v1.schema.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

VERSION = 1
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_EVENTS_PER_REPORT = 5000
EVENT_KINDS = ("start", "metrics", "system", "decision", "action", "checkpoint", "end")


class WireError(ValueError):
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
    """A metric value from the wire: a number or one of the strings nan/inf/-inf."""
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
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"body is not valid JSON: {exc}") from None
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


def parse_report(message: dict[str, Any]) -> Report:
    """Check a `/v1/report` body field by field."""
    run = message.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("id"), str) or not run["id"].strip():
        raise WireError("'run' must be an object with a non-empty string 'id'")
    if len(run["id"]) > 200:
        raise WireError("'run.id' must be at most 200 characters")
    rules = run.get("rules", "default")
    if not isinstance(rules, str):
        raise WireError("'run.rules' must be the name of a rule set, e.g. \"default\"")
    meta = run.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("'run.meta' must be an object")
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
    step = event.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise WireError(f"{where}.step must be an integer >= 0, got {step!r}")
    if event["kind"] == "metrics":
        values = event.get("values")
        if not isinstance(values, dict) or step is None:
            raise WireError(f"{where}: a metrics event needs 'step' and a 'values' object")
        for key, value in values.items():
            if decode_number(value) is None:
                raise WireError(f"{where}.values.{key} must be a number (or \"nan\"/\"inf\"), got {value!r}")


def metric_values(event: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics event, NaN and inf restored."""
    out = {}
    for key, value in event.get("values", {}).items():
        number = decode_number(value)
        if number is not None:
            out[key] = number
    return out
