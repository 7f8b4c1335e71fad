"""The monitoring files in dashboards/: Grafana dashboard and provisioning, Prometheus rules, Alertmanager, compose.

The PromQL checks use the real promtool and amtool. Where they are missing a test skips, except in CI
(env CI set), where it fails: CI must install them (Debian: prometheus, prometheus-alertmanager).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from dashboardkit import (
    DASHBOARDS_DIR,
    annotation_queries,
    iter_panels,
    load_dashboard,
    panel_queries,
    substitute,
    variables_in,
)

PROMETHEUS_DIR = DASHBOARDS_DIR / "prometheus"
GRAFANA_DIR = DASHBOARDS_DIR / "grafana"
PROVISIONING = GRAFANA_DIR / "provisioning"
ALERTMANAGER_YML = DASHBOARDS_DIR / "alertmanager" / "alertmanager.yml"
COMPOSE_YML = DASHBOARDS_DIR / "docker-compose.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TOKEN_TARGET = "/etc/guardian/token"

# The contract with guardian/exporter.py: every metric the daemon exports and its labels. A query that
# names anything else is a typo (or the exporter changed: update both).
RUN = ("run_id",)
GPU = ("run_id", "rank", "gpu")
METRICS: dict[str, tuple[str, ...]] = {
    **{name: RUN for name in (
        "guardian_train_loss", "guardian_eval_loss", "guardian_grad_norm", "guardian_learning_rate",
        "guardian_train_loss_max", "guardian_grad_norm_max", "guardian_lr_scale", "guardian_global_step", "guardian_epoch",
        "guardian_tokens_per_second", "guardian_samples_per_second", "guardian_last_report_timestamp_seconds",
        "guardian_run_stalled", "guardian_run_ended", "guardian_rollbacks_total", "guardian_skipped_updates_total")},
    "guardian_run_info": ("run_id", "rules", "host"),
    "guardian_rule_firing": ("run_id", "rule"),
    "guardian_rule_state": ("run_id", "rule", "state"),
    "guardian_rule_firings_total": ("run_id", "rule"),
    "guardian_actions_total": ("run_id", "action", "source"),
    "guardian_nonfinite_values_total": ("run_id", "metric"),
    **{name: GPU for name in (
        "guardian_gpu_memory_used_bytes", "guardian_gpu_memory_total_bytes", "guardian_gpu_utilization_ratio",
        "guardian_gpu_temperature_celsius", "guardian_gpu_power_watts")},
    **{name: () for name in (
        "guardian_events_ingested_total", "guardian_events_duplicate_total", "guardian_reports_total",
        "guardian_reports_rejected_total", "guardian_store_size_bytes")},
    "guardian_rule_reloads_total": ("result",),
    "guardian_report_duration_seconds_bucket": ("le",),
    "guardian_report_duration_seconds_sum": (),
    "guardian_report_duration_seconds_count": (),
    "guardian_runs": ("status",),
    "up": (),  # Prometheus' own, for up{job="guardian"}
}
TARGET_LABELS = ("job", "instance")  # added by Prometheus to every scraped series
ALL_LABELS = {label for labels in METRICS.values() for label in labels} | set(TARGET_LABELS)
DAEMON_METRICS = {name for name, labels in METRICS.items() if "run_id" not in labels}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan", "atan2"}


# ----------------------------------------------------------------------------------------------- helpers

def tool(name: str) -> str:
    """The path of a command-line tool; skip without it, but fail in CI, where it must be installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install prometheus prometheus-alertmanager)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it", pytrace=False)
        pytest.skip(message)
    return path


def run_tool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=60)


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def mask_strings(expr: str) -> str:
    """`expr` with the content of every string literal removed (label values cannot confuse the parsing)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (function names, keywords and labels left out)."""
    text = mask_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", text):
        if m.group(1).lower() not in KEYWORDS:
            names.add(m.group(1))
    return names


def labels_used(expr: str) -> set[str]:
    """Label names in matchers and in by/without/on/ignoring/group_* clauses."""
    text = mask_strings(expr)
    used = {m.group(1) for sel in re.findall(r"\{([^}]*)\}", text)
            for m in re.finditer(r"(\w+)\s*(?:=~|!~|!=|=)", sel)}
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        used |= {label.strip() for label in clause.split(",") if label.strip()}
    return used


def contract_problems(where: str, expr: str) -> list[str]:
    """What in `expr` is not in the metric contract: unknown metrics, and labels no metric in it has."""
    names = metric_names(expr)
    problems = [f"{where}: unknown metric {n!r} in {expr!r}" for n in sorted(names - set(METRICS))]
    known = {label for n in names & set(METRICS) for label in METRICS[n]} | set(TARGET_LABELS)
    problems += [f"{where}: label {label!r} is not on {sorted(names)} in {expr!r}"
                 for label in sorted(labels_used(expr) - known)]
    return problems


def legend_labels(text: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))


def promtool_check_exprs(queries: list[tuple[str, str]]) -> None:
    """Parse every expression with `promtool check rules`, as recording rules of a throwaway file."""
    promtool = tool("promtool")

    rules = [{"record": f"dashboard:query_{i + 1}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queries.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, width=10_000))
        result = run_tool(promtool, "check", "rules", path)
    listing = "\n".join(f"  rule {i + 1}: [{where}] {expr}" for i, (where, expr) in enumerate(queries))
    assert result.returncode == 0, f"promtool rejected a query:\n{result.stdout}{result.stderr}\n{listing}"


def compose_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host source, container target) of a compose service's volumes, short and long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts.append((source, target))
    return mounts


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_YML)
    assert isinstance(data, dict) and "services" in data
    return data


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    data = load_yaml(PROMETHEUS_DIR / "alerts.yml")
    return [rule for group in data["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def grafana_alerts() -> list[dict[str, Any]]:
    data = load_yaml(PROVISIONING / "alerting" / "guardian.yml")
    assert data["apiVersion"] == 1
    return [rule for group in data["groups"] for rule in group["rules"]]


# ---------------------------------------------------------------------------------- Grafana dashboard

def test_dashboard_has_a_pinned_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "guardian-training"
    assert dashboard["title"] == "Guardian — training runs"
    assert dashboard["schemaVersion"] == 39
    assert dashboard.get("id") is None  # provisioned dashboards must not carry a database id


def test_dashboard_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource, run_id = variables["datasource"], variables["run_id"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    assert run_id["type"] == "query" and run_id["datasource"] == DATASOURCE
    query = run_id["query"]["query"] if isinstance(run_id["query"], dict) else run_id["query"]
    assert query == "label_values(guardian_run_info, run_id)"
    assert run_id["multi"] and run_id["includeAll"]
    assert run_id.get("allValue") == ".*", "without allValue, 'All' becomes a regex of every known run"


def test_every_panel_is_complete(dashboard: dict[str, Any]) -> None:
    panels = list(iter_panels(dashboard))
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for panel in panels:
        assert panel.get("type") and panel.get("title"), panel
        assert set(panel.get("gridPos", {})) >= {"h", "w", "x", "y"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        targets = panel.get("targets")
        assert targets, f"panel {panel['title']!r} has no targets"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), f"{panel['title']}: refIds {refs}"
        for target in targets:
            assert target.get("expr"), f"{panel['title']} {target['refId']}: no expr"
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_per_run_panels_follow_the_run_selector(dashboard: dict[str, Any]) -> None:
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            names = metric_names(substitute(target["expr"]))
            if names - DAEMON_METRICS:  # daemon-wide metrics have no run_id to filter on
                assert 'run_id=~"$run_id"' in target["expr"], f"{panel['title']}: {target['expr']}"


def test_no_dangling_variables(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    builtins = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
    texts = [t["expr"] for p in iter_panels(dashboard) for t in p.get("targets", [])]
    texts += [p["datasource"]["uid"] for p in iter_panels(dashboard) if p.get("datasource")]
    texts += [t["datasource"]["uid"] for p in iter_panels(dashboard) for t in p.get("targets", [])
              if t.get("datasource")]
    texts += [a["expr"] for a in dashboard["annotations"]["list"] if a.get("expr")]
    texts += [a["datasource"]["uid"] for a in dashboard["annotations"]["list"]]
    texts += [v["datasource"]["uid"] for v in dashboard["templating"]["list"] if v.get("datasource")]
    used = {name for text in texts for name in variables_in(text)}
    dangling = used - defined - builtins
    assert not dangling, f"variables used but not defined in templating.list: {sorted(dangling)}"
    assert "run_id" in used and "datasource" in used


def test_panels_show_what_the_training_dashboard_needs(dashboard: dict[str, Any]) -> None:
    queried = {name for _, expr in panel_queries(dashboard) for name in metric_names(expr)}
    for metric in ("guardian_train_loss", "guardian_eval_loss", "guardian_grad_norm", "guardian_learning_rate",
                   "guardian_train_loss_max", "guardian_grad_norm_max",
                   "guardian_lr_scale", "guardian_tokens_per_second", "guardian_samples_per_second",
                   "guardian_gpu_memory_used_bytes", "guardian_gpu_memory_total_bytes", "guardian_rule_state",
                   "guardian_actions_total", "guardian_rule_firings_total", "guardian_run_stalled",
                   "guardian_last_report_timestamp_seconds", "guardian_events_ingested_total",
                   "guardian_reports_rejected_total", "guardian_store_size_bytes",
                   "guardian_report_duration_seconds_bucket"):
        assert metric in queried, f"no panel shows {metric}"
    by_title = {p["title"]: p for p in iter_panels(dashboard)}
    grad = by_title["Gradient norm (log scale)"]
    assert grad["fieldConfig"]["defaults"]["custom"]["scaleDistribution"] == {"type": "log", "log": 10}
    assert by_title["GPU memory used per device"]["fieldConfig"]["defaults"]["unit"] == "bytes"


def test_annotations_mark_interventions(dashboard: dict[str, Any]) -> None:
    annotations = dashboard["annotations"]["list"]
    for a in annotations:
        if a.get("builtIn"):
            continue
        assert a["datasource"] == DATASOURCE and a["enable"] and a.get("name"), a
        assert 'run_id=~"$run_id"' in a["expr"], a["name"]
    exprs = " ".join(a.get("expr", "") for a in annotations)
    for metric in ("guardian_rollbacks_total", "guardian_skipped_updates_total", "guardian_lr_scale",
                   "guardian_rule_firing"):
        assert metric in exprs, f"no annotation marks {metric}"


def test_dashboard_queries_use_only_exported_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    problems = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            expr = substitute(target["expr"])
            where = f"panel {panel['title']!r} {target['refId']}"
            problems += contract_problems(where, expr)
            known = {label for n in metric_names(expr) & set(METRICS) for label in METRICS[n]} | set(TARGET_LABELS)
            problems += [f"{where}: legend label {label!r} is not on the result"
                         for label in legend_labels(target.get("legendFormat", "")) - known]
    for a in dashboard["annotations"]["list"]:
        if a.get("expr"):
            expr = substitute(a["expr"])
            problems += contract_problems(f"annotation {a['name']!r}", expr)
            fields = a.get("titleFormat", "") + a.get("textFormat", "")
            tags = {t.strip() for t in a.get("tagKeys", "").split(",") if t.strip()}
            known = {label for n in metric_names(expr) & set(METRICS) for label in METRICS[n]}
            problems += [f"annotation {a['name']!r}: label {label!r} unknown"
                         for label in (legend_labels(fields) | tags) - known - set(TARGET_LABELS)]
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "run_id")
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()  # type: ignore[union-attr]
    if label not in METRICS.get(metric, ()):
        problems.append(f"variable run_id: {metric} has no label {label}")
    assert not problems, "\n".join(problems)


def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any]) -> None:
    queries = [(f"panel {title}", expr) for title, expr in panel_queries(dashboard)]
    queries += [(f"annotation {name}", expr) for name, expr in annotation_queries(dashboard)]
    assert len(queries) >= 20
    promtool_check_exprs(queries)


def test_rule_states_query_numbers_each_state(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """The state timeline's query turns the one-hot guardian_rule_state into 0 ok .. 3 firing, per run."""
    promtool = tool("promtool")
    (expr,) = [e for title, e in panel_queries(dashboard, "r1") if title == "Rule states"]
    states = {"loss_spike": "firing", "plateau": "warming_up", "lr_blowup": "cooling_down", "stalled": "ok"}
    series = [{"series": f'guardian_rule_state{{job="guardian", run_id="r1", rule="{rule}", state="{state}"}}',
               "values": "1x3" if state == current else "0x3"}
              for rule, current in states.items() for state in ("ok", "warming_up", "cooling_down", "firing")]
    series.append({"series": 'guardian_rule_state{job="guardian", run_id="r2", rule="x", state="firing"}',
                   "values": "1x3"})
    expected = {"firing": 3, "cooling_down": 2, "warming_up": 1, "ok": 0}
    samples = [{"labels": f'{{run_id="r1", rule="{rule}"}}', "value": expected[state]} for rule, state in states.items()]
    test = {"interval": "1m", "input_series": series,
            "promql_expr_test": [{"expr": expr, "eval_time": "2m", "exp_samples": samples}]}
    (tmp_path / "state.test.yml").write_text(yaml.safe_dump({"rule_files": [], "tests": [test]}))
    result = run_tool(promtool, "test", "rules", "state.test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    mappings = next(p for p in iter_panels(dashboard) if p["title"] == "Rule states")["fieldConfig"]["defaults"]["mappings"]
    assert {int(k): v["text"] for k, v in mappings[0]["options"].items()} == {
        value: state.replace("_", " ") for state, value in expected.items()}


def test_panel_queries_substitute_a_run(dashboard: dict[str, Any]) -> None:
    queries = panel_queries(dashboard, run_id_regex="run-1|run\\.2")
    assert all("$" not in expr for _, expr in queries)
    assert ("Loss: train and eval", 'guardian_train_loss{run_id=~"run-1|run\\\\.2"}') in queries
    rows_nested = {"panels": [{"type": "row", "title": "r", "panels": [
        {"title": "inner", "targets": [{"refId": "A", "expr": 'x{run_id=~"${run_id}"}[$__rate_interval]'}]}]}]}
    assert panel_queries(rows_nested, "a") == [("inner", 'x{run_id=~"a"}[1m]')]
    with pytest.raises(KeyError, match=r"\$nope"):
        substitute("up{job=~\"$nope\"}")


def test_contract_parsing_catches_typos() -> None:
    assert metric_names('sum by (run_id) (rate(guardian_actions_total{action="stop"}[5m])) > 0') == {
        "guardian_actions_total"}
    assert metric_names("guardian_gpu_memory_used_bytes / guardian_gpu_memory_total_bytes > 0.95 or vector(1e9)") == {
        "guardian_gpu_memory_used_bytes", "guardian_gpu_memory_total_bytes"}
    assert contract_problems("t", "guardian_grad_norms") == [
        "t: unknown metric 'guardian_grad_norms' in 'guardian_grad_norms'"]
    assert contract_problems("t", 'guardian_grad_norm{runid="a"}') == [
        "t: label 'runid' is not on ['guardian_grad_norm'] in 'guardian_grad_norm{runid=\"a\"}'"]
    assert contract_problems("t", "max by (run_id, rule) (guardian_rule_firing)") == []


# ------------------------------------------------------------------------------- Grafana provisioning

def test_datasource_provisioning() -> None:
    data = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")
    assert data["apiVersion"] == 1
    (source,) = data["datasources"]
    assert (source["name"], source["type"], source["uid"]) == ("Prometheus", "prometheus", "prometheus")
    assert source["url"] == "http://prometheus:9090"


def test_grafana_alert_rules_are_complete(grafana_alerts: list[dict[str, Any]], dashboard: dict[str, Any]) -> None:
    datasource_uids = {s["uid"] for s in load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]}
    panel_ids = {p["id"] for p in iter_panels(dashboard)}
    uids = [rule["uid"] for rule in grafana_alerts]
    assert len(uids) == len(set(uids)) and all(len(u) <= 40 for u in uids), uids
    queries, problems = [], []
    for rule in grafana_alerts:
        assert rule["title"] and rule["labels"].get("severity") and rule["annotations"].get("summary"), rule["uid"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["uid"]
        refs = {d["refId"] for d in rule["data"]}
        assert rule["condition"] in refs, rule["uid"]
        for d in rule["data"]:
            assert set(d) >= {"refId", "relativeTimeRange", "datasourceUid", "model"}, (rule["uid"], d)
            assert set(d["relativeTimeRange"]) == {"from", "to"}
            assert d["model"]["refId"] == d["refId"]
            if d["datasourceUid"] == "__expr__":
                assert d["model"]["type"] in {"threshold", "reduce", "math", "classic_conditions"}, rule["uid"]
                assert d["model"].get("expression") in refs, f"{rule['uid']}: {d['refId']} reads a missing query"
            else:
                assert d["datasourceUid"] in datasource_uids, f"{rule['uid']}: unknown datasource {d['datasourceUid']}"
                queries.append((f"grafana alert {rule['uid']}", d["model"]["expr"]))
                problems += contract_problems(f"grafana alert {rule['uid']}", d["model"]["expr"])
        if "dashboardUid" in rule:
            assert rule["dashboardUid"] == dashboard["uid"] and rule["panelId"] in panel_ids, rule["uid"]
    assert not problems, "\n".join(problems)
    watched = {name for _, expr in queries for name in metric_names(expr)}
    assert {"guardian_rule_firing", "guardian_run_stalled", "guardian_nonfinite_values_total"} <= watched
    promtool_check_exprs(queries)


def test_dashboard_provider_reads_where_compose_mounts_the_dashboard(compose: dict[str, Any]) -> None:
    data = load_yaml(PROVISIONING / "dashboards" / "guardian.yml")
    assert data["apiVersion"] == 1
    (provider,) = data["providers"]
    assert provider["type"] == "file"
    mounts = dict(compose_mounts(compose["services"]["grafana"]))
    dashboard_target = PurePosixPath(mounts["./grafana/guardian.json"])
    assert dashboard_target.suffix == ".json"
    assert PurePosixPath(provider["options"]["path"]) == dashboard_target.parent
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# ---------------------------------------------------------------------------------------- Prometheus

def test_alert_rules_pass_promtool() -> None:
    result = run_tool(tool("promtool"), "check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = run_tool(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    # The config names the container's token file; point it at a real one so the full check can run.
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert TOKEN_TARGET in config
    (tmp_path / "prometheus.yml").write_text(config.replace(TOKEN_TARGET, str(token)))
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    result = run_tool(tool("promtool"), "check", "config", tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_daemon() -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "guardian")
    assert job["scrape_interval"] == "5s"
    assert job["static_configs"][0]["targets"] == ["host.docker.internal:8765"]
    assert job["authorization"]["credentials_file"] == TOKEN_TARGET
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_alerts_use_only_exported_metrics(alert_rules: list[dict[str, Any]]) -> None:
    problems = [p for rule in alert_rules for p in contract_problems(f"alert {rule['alert']}", rule["expr"])]
    assert not problems, "\n".join(problems)


def test_alerts_are_the_promised_ones_and_say_what_to_do(alert_rules: list[dict[str, Any]]) -> None:
    names = {rule["alert"] for rule in alert_rules}
    assert names >= {"GuardianRuleFiring", "GuardianActionTaken", "GuardianRunStalled", "GuardianDown",
                     "GuardianNaNReported", "GuardianGPUMemoryNearLimit"}
    severity = {rule["alert"]: rule["labels"]["severity"] for rule in alert_rules}
    assert severity["GuardianNaNReported"] == "critical" and severity["GuardianRuleFiring"] == "warning"
    for rule in alert_rules:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        if metric_names(rule["expr"]) - DAEMON_METRICS:  # about a run: the run must be named
            assert "$labels.run_id" in rule["annotations"]["summary"], rule["alert"]
    assert 'absent(up{job="guardian"})' in next(r["expr"] for r in alert_rules if r["alert"] == "GuardianDown")


def test_every_alert_has_a_firing_and_a_quiet_unit_test(alert_rules: list[dict[str, Any]]) -> None:
    tests = load_yaml(PROMETHEUS_DIR / "alerts.test.yml")["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in alert_rules:
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"{rule['alert']}: no test where it fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{rule['alert']}: no test where it stays quiet"


# -------------------------------------------------------------------------------------- Alertmanager

def test_alertmanager_config_passes_amtool() -> None:
    result = run_tool(tool("amtool"), "check-config", ALERTMANAGER_YML)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_sends_alerts_to_the_daemon() -> None:
    config = load_yaml(ALERTMANAGER_YML)
    route = config["route"]
    assert set(route["group_by"]) >= {"alertname", "run_id"}
    receiver = next(r for r in config["receivers"] if r["name"] == route["receiver"])
    (webhook,) = receiver["webhook_configs"]
    assert webhook["url"] == "http://host.docker.internal:8765/v1/alerts"
    assert webhook["http_config"]["authorization"]["credentials_file"] == TOKEN_TARGET


# ------------------------------------------------------------------------------------ docker compose

def test_compose_mounts_exist(compose: dict[str, Any]) -> None:
    volumes = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, target in compose_mounts(service):
            if target == TOKEN_TARGET:
                assert "${GUARDIAN_HOME:-~/.guardian}/token" == source, name
                continue
            if source in volumes:
                continue
            assert source.startswith("."), f"{name}: {source} is neither a repo path nor a named volume"
            assert (DASHBOARDS_DIR / source).exists(), f"{name}: {source} does not exist"


def test_compose_wires_the_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    images = {name: s["image"].split(":")[0] for name, s in services.items()}
    assert images == {"prometheus": "prom/prometheus", "alertmanager": "prom/alertmanager",
                      "grafana": "grafana/grafana"}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    for name in ("prometheus", "alertmanager"):
        assert "host.docker.internal:host-gateway" in services[name]["extra_hosts"], name
        mounts = {target: source for source, target in compose_mounts(services[name])}
        assert TOKEN_TARGET in mounts, f"{name} needs the daemon's token"
    prometheus = {target: source for source, target in compose_mounts(services["prometheus"])}
    assert prometheus["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    for rule_file in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["rule_files"]:  # relative to the config
        assert str(PurePosixPath("/etc/prometheus") / rule_file) in prometheus, rule_file
    alertmanager = {target: source for source, target in compose_mounts(services["alertmanager"])}
    assert alertmanager["/etc/alertmanager/alertmanager.yml"] == "./alertmanager/alertmanager.yml"
