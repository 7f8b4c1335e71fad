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
     "decisions": [<DecisionEvent>...], "commands": [{"id": 3, "action": "stop", "params": {}}]}

Every write carries `Authorization: Bearer <token>`, and a report its run's key in `X-Guardian-Run-Key` (the
first report binds the run to it; the reply then carries `run_key`). Errors are
`{"v": 1, "error": "<what is wrong and what to do>"}` with status 400 (malformed), 401 (no valid token), 403
(another process's run, or a browser's request), 404, 408 (too slow), 409 (unsupported version; a seq gap,
with `"expected_seq"` added: resend from there), 413 (too large), 415 (not JSON), 421 (a Host that is not
loopback), 429 (too many new runs) or 503 (the daemon is full; retry). The messages are the structs of
guardian.events; the JSON Schema, `guardian/schema/wire-v1.schema.json`, is generated from them; the daemon
checks a report with guardian.transport.intake.

Bounds, checked at intake so that nothing stored can break a later listing or scrape: a body of at most 4 MiB
in UTF-8 (no lone surrogates), nested at most 32 deep, integers within 64 bits (seq and step within 2^53-1);
at most 5,000 events a report and 256 values an event; `run.meta` at most 16 KiB encoded and 8 deep; every
string that becomes a label, a key or a file name (`run.id` up to 200 characters; `run.rules`, value keys,
`meta.host`, a system event's `rank` and `gpu`, an event's `source` up to 128) printable, without control
characters. A metrics event sent without `phase` is a training step.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from guardian import events
from guardian.errors import GuardianError
from guardian.events import (
    MAX_EVENTS_PER_REPORT,
    MAX_GPUS_PER_EVENT,
    MAX_INT,
    MAX_NAME_CHARS,
    MAX_RUN_ID_CHARS,
    MAX_SEQ,
    MAX_VALUES_PER_EVENT,
    VERSION,
)

__all__ = ["MAX_BODY_BYTES", "MAX_DEPTH", "MAX_EVENTS_PER_REPORT", "MAX_GPUS_PER_EVENT", "MAX_INT", "MAX_META_BYTES",
           "MAX_NAME_CHARS", "MAX_RUN_ID_CHARS", "MAX_SEQ", "MAX_VALUES_PER_EVENT", "VERSION", "WireError", "dumps"]

MAX_BODY_BYTES: Final = 4 * 1024 * 1024
MAX_DEPTH: Final = 32  # nesting of objects and lists in a message
MAX_META_BYTES: Final = 16 * 1024


class WireError(GuardianError, ValueError):
    """A message that does not follow the protocol; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def dumps(message: dict[str, Any]) -> bytes:
    """A JSON body that is not an event message (a listing, health, a control request): `"v": 1` added,
    non-finite floats as "nan", "inf", "-inf"."""
    return msgspec.json.encode(events.to_builtins({"v": VERSION, **message}))
