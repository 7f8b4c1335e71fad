"""The daemon's HTTP routes: each request checked (token, path, query) and answered by the core (see
guardian.daemon.core); the events page is built from the stored rows as they are. `json_reply` is the one way a
route answers JSON.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlparse

import msgspec

from guardian import events
from guardian.daemon.core import Guardian, SeqGap
from guardian.daemon.httpserver import Reply, Request
from guardian.daemon.store import Store, is_json
from guardian.events import ErrorReply, Kind
from guardian.transport import intake, wire
from guardian.transport.token import RUN_KEY_HEADER

__all__ = ["ENDPOINTS", "Routes", "event_page", "is_loopback", "json_reply", "scraper_of"]

log = logging.getLogger("guardian.daemon")
# A report body over this is judged in the thread pool, so the event loop keeps answering the others.
INLINE_REPORT_BYTES: Final = 256 * 1024


def json_reply(body: dict[str, Any] | msgspec.Struct, status: int = 200) -> Reply:
    """A JSON reply: a protocol message (events.Reply, events.ErrorReply) through the events codec, any other
    body (a listing, health) as an object with `"v": 1`."""
    data = events.encode(body) if isinstance(body, msgspec.Struct) else wire.dumps(body)
    return Reply(status, data)


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or `localhost`)."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Routes:
    """The daemon's endpoints: one `Request` in, one `Reply` out (see guardian.daemon.httpserver)."""

    def __init__(self, core: Guardian, token: str, token_path: Path, require_token: bool) -> None:
        self.core, self.token, self.token_path, self.require_token = core, token, token_path, require_token
        self.metrics: Any = None

    @staticmethod
    def inline(request: Request) -> bool:
        """Reports are answered on the event loop, and so are scrapes (rendered there a piece at a time, between
        reports); everything else (listings, control) in the thread pool."""
        path = request.target.split("?")[0].rstrip("/")
        if (request.method, path) == ("POST", "/v1/report"):
            return len(request.body) <= INLINE_REPORT_BYTES  # a large one is judged in the pool, off the loop
        return (request.method, path) == ("GET", "/metrics")

    @staticmethod
    def too_large(size: int) -> Reply:
        return json_reply(ErrorReply(error=f"message of {size} bytes is over the limit of {wire.MAX_BODY_BYTES} "
                                           "bytes; send smaller batches"), 413)

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _token_needed(self, parts: list[str]) -> str:
        if parts == ["v1", "alerts"]:
            return ("alert webhooks need the token: 'Authorization: Bearer <token>' (Alertmanager: "
                    f"http_config.authorization.credentials_file: {self.token_path})")
        what = "every request" if self.require_token else "writes (reports, control, alerts)"
        return (f"a valid token is required for {what}; the token is in {self.token_path}. The guardian commands "
                "read it from --token or $GUARDIAN_TOKEN, the callback from token= or $GUARDIAN_TOKEN, both else "
                "from $GUARDIAN_HOME/token; over HTTP send 'Authorization: Bearer <token>'")

    def index(self) -> dict[str, Any]:
        """GET /: what this daemon serves, and which requests need the token."""
        from guardian import __version__

        reads = "token needed" if self.require_token else "open on loopback"
        return {"service": "guardian daemon", "version": __version__, "token_file": str(self.token_path),
                "reads": reads, "writes": "token needed (Authorization: Bearer <token>)",
                "endpoints": [{"method": method, "path": path, "token": self.require_token or method == "POST",
                               "what": what} for method, path, what in ENDPOINTS]}

    def handle(self, request: Request) -> Reply:
        method, url = request.method, urlparse(request.target)
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        try:
            if (self.require_token or method not in ("GET", "HEAD")) and not self._authorized(request):
                raise wire.WireError(self._token_needed(parts), 401)
            return self._route(request, parts, parse_qs(url.query))
        except wire.WireError as exc:
            self.core.count("reports_rejected", method == "POST" and parts[-1:] == ["report"])
            error = ErrorReply(error=str(exc))
            if isinstance(exc, SeqGap):
                error.expected_seq = exc.expected_seq
            return json_reply(error, exc.status)
        except Exception as exc:
            log.exception("error handling %s %s", method, request.target)
            return json_reply(ErrorReply(error=f"internal error: {exc}"), 500)

    def _route(self, request: Request, parts: list[str], query: dict[str, list[str]]) -> Reply:
        core, method = self.core, request.method
        if method == "GET" and parts == ["healthz"]:
            return json_reply({"ok": True})
        if method == "GET" and parts == ["metrics"] and self.metrics is not None:
            pieces, content_type = self.metrics(scraper_of(request, query))
            return Reply(200, content_type=content_type, pieces=pieces)
        if method == "GET" and not parts:
            return json_reply(self.index())
        if parts[:1] != ["v1"]:
            raise wire.WireError(f"no such endpoint: {method} {request.target}", 404)
        if method == "POST" and parts == ["v1", "report"]:
            started = time.perf_counter()
            reply = json_reply(core.report(intake.parse_report(request.body),
                                           request.headers.get(RUN_KEY_HEADER.lower())))
            core.report_seconds.observe(time.perf_counter() - started)
            return reply
        if method == "GET" and parts == ["v1", "runs"]:
            return json_reply({"runs": core.runs()})
        if method == "GET" and len(parts) == 4 and parts[:2] == ["v1", "runs"] and parts[3] == "events":
            return Reply(200, event_page(core.store, parts[2], query))
        if method == "POST" and len(parts) == 4 and parts[:2] == ["v1", "runs"] and parts[3] == "control":
            message = intake.parse_object(request.body)
            params = message.get("params", {})
            if not isinstance(params, dict) or not isinstance(message.get("action"), str):
                raise wire.WireError("body must be {\"v\": 1, \"action\": \"stop|rollback|reduce_lr\", \"params\": {}}")
            return json_reply({"command_id": core.control(parts[2], message["action"], params, source="ctl")})
        if method == "POST" and parts == ["v1", "alerts"]:
            return json_reply({"queued": core.alerts(intake.parse_json(request.body))})
        if method == "GET" and parts == ["v1", "rules"]:
            return json_reply({"rule_sets": core.library.names(), "errors": core.library.errors,
                               "reloads": core.store.reloads()})
        raise wire.WireError(f"no such endpoint: {method} {request.target}", 404)


ENDPOINTS = (
    ("GET", "/", "this index"),
    ("GET", "/healthz", "liveness: {\"ok\": true}"),
    ("GET", "/metrics", "Prometheus metrics (?scraper=NAME tells scrapers apart for the *_max gauges)"),
    ("GET", "/v1/runs", "every run with its status, rule states and meta"),
    ("GET", "/v1/runs/{run_id}/events", "a run's events, a page at a time (since_seq, limit, kinds), decisions "
                                        "and commands"),
    ("GET", "/v1/rules", "rule sets, reload errors and reloads"),
    ("POST", "/v1/report", "a run's events (the callback sends these)"),
    ("POST", "/v1/runs/{run_id}/control", "queue stop, rollback, reduce_lr or skip_update for a run"),
    ("POST", "/v1/alerts", "Alertmanager or Grafana webhooks, mapped to actions by alert-actions.yaml"),
)
MAX_SCRAPER_NAME = 200


def scraper_of(request: Request, query: dict[str, list[str]]) -> str:
    """Who is scraping /metrics, for the peaks since its previous scrape: `?scraper=NAME` (Prometheus scrape
    config `params: {scraper: [NAME]}`), else its address and User-Agent."""
    named = query.get("scraper", [""])[0]
    who = f"name {named}" if named else f"{request.peer} {request.headers.get('user-agent', '')}"
    return who[:MAX_SCRAPER_NAME]


EVENTS_PAGE_DEFAULT = 1000
EVENTS_PAGE_MAX = 10_000


def event_page(store: Store, run_id: str, query: dict[str, list[str]]) -> bytes:
    """The JSON body of one page of GET /v1/runs/{id}/events: the events after `since_seq` (at most `limit`,
    default 1000, at most 10,000; `kinds` a comma-separated filter) as they were stored, `next_since_seq` to ask
    for the next page with (null when this was the last), and the run's decisions and commands. A stored row that
    is not JSON is left out (and the page still ends where the rows read end)."""
    since_seq = _query_int(query, "since_seq", 0, 0, wire.MAX_SEQ)
    limit = _query_int(query, "limit", EVENTS_PAGE_DEFAULT, 1, EVENTS_PAGE_MAX)
    names = tuple(query["kinds"][0].split(",")) if query.get("kinds") else ()
    if not set(names) <= set(events.KINDS):
        raise wire.WireError(f"query parameter 'kinds' must be a comma-separated list of {', '.join(events.KINDS)}")
    rows = store.event_rows(run_id, tuple(Kind(name) for name in names), since_seq=since_seq, limit=limit)
    following = rows[-1][0] if len(rows) == limit else None
    decisions = [row for row in store.decision_rows(run_id) if is_json(row)]
    tail = wire.dumps({"next_since_seq": following, "commands": store.commands(run_id)})
    return b"".join((b'{"events":[', ",".join(body for _, body in rows if is_json(body)).encode(),
                     b'],"decisions":[', ",".join(decisions).encode(), b"],", tail[1:]))


def _query_int(query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    """A query parameter as an integer from `low` to `high` (`default` when absent); WireError (400) otherwise."""
    text = query.get(name, [""])[0]
    if not text:
        return default
    if not text.isdigit() or len(text) > 16 or not low <= int(text) <= high:
        raise wire.WireError(f"query parameter '{name}' must be an integer from {low} to {high}, got {text[:20]!r}")
    return int(text)
