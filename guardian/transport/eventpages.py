"""Reading a run's events from the daemon a page at a time (GET /v1/runs/{id}/events?since_seq=&limit=).

The daemon answers at most `limit` events after `since_seq` and says where the next page starts
(`next_since_seq`, null on the last page); the run's decisions and commands come with every page."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlencode

Get = Callable[[str], dict[str, Any]]
PAGE_EVENTS = 1000


def events_path(run_id: str, since_seq: int = 0, kinds: tuple[str, ...] = (), limit: int = PAGE_EVENTS) -> str:
    """The path of one page; the run id is quoted whole (`/ ? # %` and non-ASCII included)."""
    query: dict[str, Any] = {"since_seq": since_seq, "limit": limit}
    if kinds:
        query["kinds"] = ",".join(kinds)
    return f"/v1/runs/{quote(run_id, safe='')}/events?{urlencode(query)}"


def pages(get: Get, run_id: str, kinds: tuple[str, ...] = (), since_seq: int = 0,
          max_pages: int | None = None) -> Iterator[dict[str, Any]]:
    """The replies of successive pages from `since_seq` on, until the last (or `max_pages` of them)."""
    count = 0
    while max_pages is None or count < max_pages:
        page = get(events_path(run_id, since_seq, kinds))
        count += 1
        yield page
        following = page.get("next_since_seq")
        if not isinstance(following, int) or following <= since_seq:
            return
        since_seq = following


def all_events(get: Get, run_id: str, kinds: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every event of the run (page by page), with the decisions and commands of the last page."""
    events: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    for last in pages(get, run_id, kinds):
        events.extend(last.get("events", []))
    return {"events": events, "decisions": last.get("decisions", []), "commands": last.get("commands", [])}
