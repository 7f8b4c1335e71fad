"""Prometheus metrics, built at scrape time from the runs' state (a custom collector, no mirrored gauges).

Names follow Prometheus conventions: a `guardian_` prefix, base units, `_total` counters, and only
low-cardinality labels (run_id, rule, action, source, metric, rank, gpu) — never the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from guardian.events import ActionKind
from guardian.runview import RunView

# The run's latest values: metric name here -> key in RunView.latest (HF's own log keys).
RUN_GAUGES = {
    "train_loss": ("loss", "Training loss at the last reported step."),
    "eval_loss": ("eval_loss", "Evaluation loss at the last evaluation."),
    "grad_norm": ("grad_norm", "Gradient norm (before clipping) at the last reported step."),
    "learning_rate": ("learning_rate", "Learning rate of the first parameter group."),
    "lr_scale": ("lr_scale", "Product of Guardian's learning-rate cuts (1 = none)."),
    "global_step": ("step", "Last reported optimizer step."),
    "epoch": ("epoch", "Last reported epoch (fractional)."),
    "tokens_per_second": ("tokens_per_second", "Training throughput in tokens per second (this rank)."),
    "samples_per_second": ("samples_per_second", "Training throughput in samples per second (this rank)."),
}
GPU_GAUGES = {
    "memory_used_bytes": "GPU memory in use.",
    "memory_total_bytes": "GPU memory in total.",
    "utilization_ratio": "GPU utilization (0-1) over the last sample period.",
    "temperature_celsius": "GPU temperature.",
    "power_watts": "GPU power draw.",
}
# Per-step values whose spikes fall between two scrapes (a 6.0 loss at one step, 1.8 at the next, scraped at
# the next): also exported as the highest value reported since the scraper's previous scrape (see `Peaks`).
PEAK_GAUGES = {
    "train_loss_max": ("loss", "Highest training loss reported since this scraper's previous scrape (the last "
                               "value when no step came between; NaN if any was NaN)."),
    "grad_norm_max": ("grad_norm", "Highest gradient norm reported since this scraper's previous scrape (the last "
                                   "value when no step came between; NaN if any was NaN)."),
}
RULE_STATES = ("ok", "warming_up", "firing", "cooling_down")
ACTIONS = tuple(kind.value for kind in (ActionKind.SKIP_UPDATE, ActionKind.ROLLBACK, ActionKind.REDUCE_LR,
                                         ActionKind.STOP))
SOURCES = ("local", "daemon", "command")
WATCHED_FINITE = ("loss", "grad_norm", "eval_loss")  # exported from 0, so the first NaN is an increase


def _value_gauges(gauges: dict[str, tuple[str, str]], views: list[RunView],
                  values: Callable[[RunView], dict[str, float]]) -> Iterator[Metric]:
    """One family per gauge (`guardian_NAME`, labelled by run), each run's `values(view)[key]` where it has one."""
    for name, (key, doc) in gauges.items():
        family = GaugeMetricFamily(f"guardian_{name}", doc, labels=["run_id"])
        for view in views:
            if key in values(view):
                family.add_metric([view.run_id], values(view)[key])
        yield family


class GuardianCollector(Collector):
    """Yields every Guardian metric from `views()` (and `health()` for the daemon) at each scrape."""

    def __init__(self, views: Callable[[], list[RunView]], health: Callable[[], dict[str, Any]] | None = None) -> None:
        self.views = views
        self.health = health

    def collect(self) -> Iterator[Metric]:
        yield from self.run_families(self.views())
        if self.health is not None:
            yield from self.health_families(self.health())

    def run_families(self, views: list[RunView]) -> Iterator[Metric]:
        """The per-run metric families of these views."""
        yield from self._run_metrics(views)
        yield from self._rule_metrics(views)
        yield from self._action_metrics(views)
        yield from self._gpu_metrics(views)

    def _run_metrics(self, views: list[RunView]) -> Iterator[Metric]:
        yield from _value_gauges(RUN_GAUGES, views, lambda view: view.latest)
        yield from _value_gauges(PEAK_GAUGES, views, lambda view: view.peaks)
        info = GaugeMetricFamily("guardian_run_info", "A run Guardian watches (always 1).",
                                 labels=["run_id", "rules", "host"])
        seen = GaugeMetricFamily("guardian_last_report_timestamp_seconds", "Unix time of the run's last report.",
                                 labels=["run_id"])
        stalled = GaugeMetricFamily("guardian_run_stalled", "1 while the run has stopped reporting.", labels=["run_id"])
        ended = GaugeMetricFamily("guardian_run_ended", "1 once the run has ended.", labels=["run_id"])
        for view in views:
            info.add_metric([view.run_id, view.rules, view.host], 1)
            seen.add_metric([view.run_id], view.last_report)
            stalled.add_metric([view.run_id], float(view.stalled))
            ended.add_metric([view.run_id], float(view.ended))
        yield from (info, seen, stalled, ended)

    def _rule_metrics(self, views: list[RunView]) -> Iterator[Metric]:
        firing = GaugeMetricFamily("guardian_rule_firing", "1 while the rule is firing.", labels=["run_id", "rule"])
        state = GaugeMetricFamily("guardian_rule_state", "1 for the rule's current state.",
                                  labels=["run_id", "rule", "state"])
        firings = CounterMetricFamily("guardian_rule_firings", "Times the rule fired and was acted on.",
                                      labels=["run_id", "rule"])
        for view in views:
            for rule, status in view.rule_status.items():
                status = "ok" if view.ended else status  # an ended run has nothing firing any more
                firing.add_metric([view.run_id, rule], float(status == "firing"))
                for s in RULE_STATES:
                    state.add_metric([view.run_id, rule, s], float(status == s))
            for rule, count in view.rule_firings.items():
                firings.add_metric([view.run_id, rule], count)
        yield from (firing, state, firings)

    def _action_metrics(self, views: list[RunView]) -> Iterator[Metric]:
        actions = CounterMetricFamily("guardian_actions", "Actions carried out in the training process.",
                                      labels=["run_id", "action", "source"])
        rollbacks = CounterMetricFamily("guardian_rollbacks", "Rollbacks carried out.", labels=["run_id"])
        skipped = CounterMetricFamily("guardian_skipped_updates", "Optimizer updates skipped.", labels=["run_id"])
        nonfinite = CounterMetricFamily("guardian_nonfinite_values", "NaN or infinite values reported.",
                                        labels=["run_id", "metric"])
        for view in views:
            # Every (action, source) starts at 0, so the first action is a visible change (increase, changes).
            for key in sorted({*((a, s) for a in ACTIONS for s in SOURCES), *view.actions}):
                actions.add_metric([view.run_id, *key], view.actions.get(key, 0))
            rollbacks.add_metric([view.run_id], view.rollbacks)
            skipped.add_metric([view.run_id], view.skipped_updates)
            for metric in sorted({*WATCHED_FINITE, *view.nonfinite}):
                nonfinite.add_metric([view.run_id, metric], view.nonfinite.get(metric, 0))
        yield from (actions, rollbacks, skipped, nonfinite)

    def _gpu_metrics(self, views: list[RunView]) -> Iterator[Metric]:
        for name, doc in GPU_GAUGES.items():
            family = GaugeMetricFamily(f"guardian_gpu_{name}", doc, labels=["run_id", "rank", "gpu"])
            for view in views:
                for (rank, gpu), facts in view.gpus.items():
                    if name in facts:
                        family.add_metric([view.run_id, rank, gpu], facts[name])
            yield family

    def health_families(self, health: dict[str, Any]) -> Iterator[Metric]:
        for name, doc in (("events_ingested", "Events stored."), ("events_duplicate", "Resent events already stored."),
                          ("reports", "Reports answered."), ("reports_rejected", "Reports refused as malformed."),
                          ("value_keys_dropped", "Value keys (and GPUs) not kept: over the per-run or daemon cap.")):
            yield CounterMetricFamily(f"guardian_{name}", doc, value=health.get(name, 0))
        reloads = CounterMetricFamily("guardian_rule_reloads", "Rule-file reloads.", labels=["result"])
        for result in ("ok", "error"):
            reloads.add_metric([result], health.get(f"reloads_{result}", 0))
        yield reloads
        yield GaugeMetricFamily("guardian_store_size_bytes", "Size of the daemon's SQLite files.",
                                value=health.get("store_size_bytes", 0))
        runs = GaugeMetricFamily("guardian_runs", "Runs by status.", labels=["status"])
        for status in ("running", "firing", "stalled", "ended"):
            runs.add_metric([status], health.get("runs", {}).get(status, 0))
        yield runs


class _Just:
    """A collector of given families, for `generate_latest`."""

    def __init__(self, *families: Metric) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def exposition_pieces(collector: GuardianCollector, extra: tuple[Collector, ...] = (), *, runs_per_piece: int = 5,
                      samples_per_piece: int = 200) -> Iterator[bytes]:
    """The Prometheus text exposition of `collector` (then of `extra`), a piece at a time.

    The daemon renders /metrics on its event loop, advancing this between reports: at 1,000 runs the text is
    ~100,000 lines and about a second of Python, which, rendered in a thread, held the GIL and stalled the
    reports for as long (BENCHMARKS.md §7). Lines are formatted by `prometheus_client.generate_latest`, one
    slice of a family's samples at a time; the slices after the first drop the repeated HELP and TYPE."""
    from prometheus_client import generate_latest

    views = collector.views()
    yield b""
    merged: dict[str, Metric] = {}
    for i in range(0, max(len(views), 1), runs_per_piece):
        for family in collector.run_families(views[i:i + runs_per_piece]):
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = family
        yield b""
    if collector.health is not None:
        for family in collector.health_families(collector.health()):
            merged[family.name] = family
    for family in merged.values():
        samples = family.samples
        for j in range(0, max(len(samples), 1), samples_per_piece):
            piece = Metric(family.name, family.documentation, family.type, family.unit)
            piece.samples = samples[j:j + samples_per_piece]
            text = generate_latest(_Just(piece))  # type: ignore[arg-type]
            yield text if j == 0 else text.split(b"\n", 2)[2]
    for other in extra:
        yield generate_latest(other)  # type: ignore[arg-type]
