"""Read the Grafana dashboard in dashboards/ and turn its queries into plain PromQL.

Grafana fills in template variables before it sends a query; `substitute` does the same with fixed values
(`$__rate_interval` -> 1m, `$__interval` -> 15s, `$__range` -> 1h), so a test can check each query with
promtool or run it against a real Prometheus.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS_DIR = REPO / "dashboards"
DASHBOARD_JSON = DASHBOARDS_DIR / "grafana" / "guardian.json"

# Grafana's own variables, with the values a query gets here.
BUILTIN_VALUES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

# $name, ${name} and ${name:format}; [[name]] is Grafana's deprecated form.
VARIABLE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def load_dashboard(path: Path = DASHBOARD_JSON) -> dict[str, Any]:
    """The dashboard JSON as a dict."""
    with open(path, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def variables_in(text: str) -> list[str]:
    """The names of the template variables `text` uses, in order."""
    return [next(g for g in m.groups() if g) for m in VARIABLE.finditer(text)]


def substitute(expr: str, run_id_regex: str = ".*", values: dict[str, str] | None = None) -> str:
    """`expr` with `$run_id` -> `run_id_regex` and Grafana's built-ins replaced; other names from `values`.

    `run_id_regex` lands inside a double-quoted PromQL string (`run_id=~"$run_id"`), so backslashes and
    quotes in it are escaped, as Grafana does. An unknown variable raises KeyError.
    """
    table = {**BUILTIN_VALUES, "run_id": run_id_regex.replace("\\", "\\\\").replace('"', '\\"'), **(values or {})}

    def one(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        if name not in table:
            raise KeyError(f"no value for template variable ${name} in {expr!r}")
        return table[name]

    return VARIABLE.sub(one, expr)


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, with the panels nested in collapsed rows after their row."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: dict[str, Any], run_id_regex: str = ".*") -> list[tuple[str, str]]:
    """(panel title, expr with variables substituted) for every target of every panel, rows' panels included."""
    return [(panel.get("title", ""), substitute(target["expr"], run_id_regex))
            for panel in iter_panels(dashboard)
            for target in panel.get("targets", [])
            if target.get("expr")]


def annotation_queries(dashboard: dict[str, Any], run_id_regex: str = ".*") -> list[tuple[str, str]]:
    """(annotation name, expr with variables substituted) for every Prometheus annotation."""
    return [(a.get("name", ""), substitute(a["expr"], run_id_regex))
            for a in dashboard.get("annotations", {}).get("list", [])
            if a.get("expr")]
