"""The run model shared by the daemon, the TUI and the callback's embedded exporter: a RunView (what is known of
one run: latest values, actions, GPUs, rule states) kept up to date from the run's events by a RunTracker, with
the Peaks between scrapes and the KeyBudget that bounds the value keys of all runs in memory together.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Final

from guardian.events import ActionEvent, ActionKind, AnyEvent, EndEvent, GpuFacts, MetricsEvent, StartEvent, SystemEvent

# Per-step values whose spikes fall between two scrapes: kept as the highest value since each scraper's
# previous scrape (the exporter's *_max gauges).
PEAK_KEYS: Final = frozenset({"loss", "grad_norm"})
GPU_FACTS: Final = tuple(name for name in GpuFacts.__struct_fields__ if name != "gpu")  # a GPU's gauges
MAX_SCRAPERS = 8  # scrapers a run keeps a window for; the one that scraped longest ago is dropped first
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
                    facts = {name: float(value) for name in GPU_FACTS
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
            done.append(ActionKind.SKIP_UPDATE.value)
            view.skipped_updates += 1
        if event.rollback not in (None, "impossible", "restart"):
            done.append(ActionKind.ROLLBACK.value)
            view.rollbacks += 1
        if event.lr_factor is not None:
            done.append(ActionKind.REDUCE_LR.value)
            view.latest["lr_scale"] = event.lr_scale if event.lr_scale is not None else view.latest.get("lr_scale", 1.0)
        if event.stopped:
            done.append(ActionKind.STOP.value)
        for action in done:
            view.actions[(action, source)] = view.actions.get((action, source), 0) + 1
