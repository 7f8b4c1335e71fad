"""Prometheus metrics, built at scrape time from the runs' state (a custom collector, no mirrored gauges).

Names follow Prometheus conventions: a `guardian_` prefix, base units, `_total` counters, and only
low-cardinality labels (run_id, rule, action, source, metric, rank, gpu) — never the step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from guardian.events import ActionEvent, AnyEvent, EndEvent, MetricsEvent, StartEvent, SystemEvent

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
PEAK_KEYS = frozenset(key for key, _ in PEAK_GAUGES.values())
MAX_SCRAPERS = 8  # scrapers a run keeps a window for; the one that scraped longest ago is dropped first
RULE_STATES = ("ok", "warming_up", "firing", "cooling_down")
ACTIONS = ("skip_update", "rollback", "reduce_lr", "stop")
SOURCES = ("local", "daemon", "command")
WATCHED_FINITE = ("loss", "grad_norm", "eval_loss")  # exported from 0, so the first NaN is an increase
MAX_KEYS_PER_RUN = 512  # value keys (and GPUs) a run's view keeps; more are dropped and counted
MAX_KEYS_PER_DAEMON = 200_000  # the same across every run in memory: bounds the series of one scrape


class KeyBudget:
    """The value keys the views in memory may hold together; shared by the trackers of one daemon."""

    def __init__(self, limit: int = MAX_KEYS_PER_DAEMON) -> None:
        self.limit, self.used, self.dropped = limit, 0, 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                self.dropped += 1
                return False
            self.used += 1
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)

    def count_dropped(self, n: int = 1) -> None:
        with self._lock:
            self.dropped += n


class Peaks:
    """The highest value of each of a run's PEAK_KEYS since each scraper's previous scrape.

    Every scraper (the daemon tells them apart by address and User-Agent, or `?scraper=NAME`) has a window of
    its own, so two Prometheus servers both see a spike, and a `curl /metrics` takes it from neither. A window
    starts at the scraper's first scrape; until then (and when no step came between two scrapes) the scrape
    shows the run's last value. A NaN in a window stays (a NaN step is never hidden behind a larger value)."""

    def __init__(self, max_scrapers: int = MAX_SCRAPERS) -> None:
        self.max_scrapers = max_scrapers
        self._windows: dict[str, dict[str, float]] = {}  # scraper -> key -> max; oldest scrape first

    def observe(self, key: str, value: float) -> None:
        for window in self._windows.values():
            old = window.get(key)
            if old is None or value != value or (old == old and value > old):
                window[key] = value

    def take(self, scraper: str, latest: dict[str, float]) -> dict[str, float]:
        """The peaks for this scrape by `scraper`; its window starts again, empty."""
        window = self._windows.pop(scraper, {})
        peaks = {key: window.get(key, latest.get(key, 0.0)) for key in PEAK_KEYS if key in window or key in latest}
        self._windows[scraper] = {}
        while len(self._windows) > self.max_scrapers:
            del self._windows[next(iter(self._windows))]
        return peaks


@dataclass
class RunView:
    """What the exporter needs to know about one run."""

    run_id: str
    rules: str = "default"
    host: str = ""
    latest: dict[str, float] = field(default_factory=dict)
    last_report: float = 0.0
    stalled: bool = False
    ended: bool = False
    rule_status: dict[str, str] = field(default_factory=dict)
    rule_firings: dict[str, int] = field(default_factory=dict)
    actions: dict[tuple[str, str], int] = field(default_factory=dict)  # (action, source) -> count
    rollbacks: int = 0
    skipped_updates: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)  # metric -> count
    gpus: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # (rank, gpu) -> facts
    peaks: dict[str, float] = field(default_factory=dict)  # PEAK_KEYS since the scraper's last scrape (Peaks)

    def copy(self) -> RunView:
        """A copy to render from while the run moves on (its dicts copied; ~10x faster than deepcopy)."""
        return replace(self, latest=dict(self.latest), rule_status=dict(self.rule_status),
                       rule_firings=dict(self.rule_firings), actions=dict(self.actions), nonfinite=dict(self.nonfinite),
                       peaks=dict(self.peaks), gpus={key: dict(facts) for key, facts in self.gpus.items()})


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
        info = GaugeMetricFamily("guardian_run_info", "A run Guardian watches (always 1).", labels=["run_id", "rules", "host"])
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


class RunTracker:
    """Keeps a RunView up to date from a run's events (used by the daemon and the embedded exporter).

    The view keeps at most `max_keys` value keys and GPUs (and, with a `budget`, only as many as the daemon's
    budget has left); later new ones are dropped and counted in `dropped`, so one run cannot blow up a scrape."""

    def __init__(self, run_id: str, rules: str = "default", host: str = "", *, max_keys: int = MAX_KEYS_PER_RUN,
                 budget: KeyBudget | None = None) -> None:
        self.view = RunView(run_id, rules, host)
        self.max_keys, self.budget = max_keys, budget
        self.keys: set[Any] = set()  # the value keys and (rank, gpu) pairs the view holds
        self.dropped = 0
        self.peaks = Peaks()

    def _keep(self, key: Any) -> bool:
        if key in self.keys:
            return True
        if len(self.keys) >= self.max_keys:
            self.dropped += 1
            if self.budget is not None:
                self.budget.count_dropped()
            return False
        if self.budget is not None and not self.budget.take():
            self.dropped += 1
            return False
        self.keys.add(key)
        return True

    def release(self) -> None:
        """Give the keys back to the budget (the run leaves memory)."""
        if self.budget is not None:
            self.budget.give_back(len(self.keys))
        self.keys.clear()

    def apply(self, event: AnyEvent) -> None:
        """Update from one event."""
        view = self.view
        view.last_report = event.time or time.time()
        match event:
            case MetricsEvent():
                self._metrics(event)
            case ActionEvent():
                self._action(event)
            case SystemEvent():
                rank = str(event.rank)
                for gpu in event.gpus:
                    facts = {name: float(value) for name in GPU_GAUGES
                             if isinstance(value := getattr(gpu, name), (int, float))}
                    key = (rank, str(gpu.gpu))
                    if self._keep(key):
                        view.gpus[key] = facts
            case EndEvent():
                view.ended = True
            case StartEvent():
                view.ended = False

    def _metrics(self, event: MetricsEvent) -> None:
        view = self.view
        for key, value in event.values.items():
            if key not in self.keys and not self._keep(key):
                continue
            if value != value or value in (float("inf"), float("-inf")):
                view.nonfinite[key] = view.nonfinite.get(key, 0) + 1
            if key in PEAK_KEYS:
                self.peaks.observe(key, value)
            view.latest[key] = value  # NaN and infinities too: a run that ended on NaN must not look healthy
        view.latest["step"] = float(event.step)
        if event.epoch is not None:
            view.latest["epoch"] = float(event.epoch)
        if event.lr_scale is not None:
            view.latest["lr_scale"] = float(event.lr_scale)

    def _action(self, event: ActionEvent) -> None:
        view, source = self.view, (event.source or "local").split(" ")[0]
        done = []
        if event.skipped_update:
            done.append("skip_update")
            view.skipped_updates += 1
        if event.rollback not in (None, "impossible", "restart"):
            done.append("rollback")
            view.rollbacks += 1
        if event.lr_factor is not None:
            done.append("reduce_lr")
            view.latest["lr_scale"] = event.lr_scale if event.lr_scale is not None else view.latest.get("lr_scale", 1.0)
        if event.stopped:
            done.append("stop")
        for action in done:
            view.actions[(action, source)] = view.actions.get((action, source), 0) + 1


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
