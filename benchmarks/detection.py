"""Detection quality of Guardian's shipped rules next to its peers', on the same labelled streams.

Run from the repository root: ``.venv/bin/python benchmarks/detection.py`` (defaults: ``--seed 0 --runs 4
--persistent-runs 8 --healthy-runs 50``, streams of 1,000 to 5,000 steps: 138 streams, about 0.4 M steps;
about 2 minutes with ``--jobs 2`` on an idle 2-core machine: Lightning's SpikeDetection costs ~0.3 ms a step,
Guardian's twelve rules ~12 µs). Writes ``benchmarks/results/detection.json`` (``--out``) and ``detection.md``
next to it, and prints the tables.

The streams come from ``detection_corpus.py`` (synthetic, labelled, deterministic by seed; see its docstring)
plus the real logs of ``../shared/fixtures/real-logs`` (scored separately: their labels are weak, per file).
Every system sees the same streams, value by value:

* ``guardian``: the rules of ``rules/default.yaml`` (or ``--rules FILE``) through
  ``guardian.commands.replay.replay_observations`` over ``guardian.logs.training.Observation`` lists: a train observation
  (loss, grad_norm, learning_rate) at every step, an eval observation (eval_loss) every ``eval_every`` steps.
  A firing is a `Decision` (so cooldowns apply, as in a live run).
* ``lightning`` (``lightning`` package, its own code, not a re-implementation):
  ``EarlyStopping(monitor="loss", check_finite=True, divergence_threshold=2 x the first loss,
  patience=10**9)`` checked after every step (the most favourable cadence: Lightning checks at validation or
  epoch end; patience is off because patience on a per-step loss stops every run), and
  ``EarlyStopping(monitor="eval_loss", patience=3, check_finite=True, divergence_threshold=2 x the first
  eval loss)`` checked at every evaluation, both driven through their ``on_validation_end`` hook with a
  minimal trainer object (``callback_metrics``, a real ``SingleDeviceStrategy``, ``state.fn=FITTING``); a
  firing is ``trainer.should_stop`` turning true, split by ``stopping_reason`` (non_finite, divergence,
  patience). ``SpikeDetection()`` (defaults: window 10, warmup 1, rtol 2.0, finite_only) through its
  ``on_train_batch_end`` hook with the step's loss as ``outputs``; a firing is the
  ``TrainingSpikeException`` it raises (caught so the stream goes on; in a real run it ends training).
* ``lightning_extra``: the same ``SpikeDetection`` fed the grad norm instead of the loss (not how Lightning
  wires it; run and scored on the healthy, grad-spike, NaN and fast-divergence streams only).
* ``transformers``: ``EarlyStoppingCallback(early_stopping_patience=3)`` with a real ``TrainingArguments``
  (``metric_for_best_model="eval_loss"``, ``load_best_model_at_end=True``), ``TrainerState`` and
  ``TrainerControl``: ``on_train_begin``, then at every evaluation ``on_evaluate(args, state, control,
  metrics={"eval_loss": v})`` followed by ``Trainer._determine_best_metric`` (Trainer's own code, which sets
  ``state.best_metric`` after the callbacks, as in ``Trainer._maybe_log_save_evaluate``); a firing is
  ``control.should_training_stop`` turning true (reset afterwards so the stream goes on).
* ``naive``: fixed thresholds: loss > 2 x its running minimum; grad_norm > 10; the seeds' rule "loss above
  the mean of the last 3 losses".

Scoring (functions `episodes`, `match_stream`, `score`; tests in tests/benchmarks/test_detection_corpus.py):

* A rule's firings in a stream are grouped into episodes: consecutive observations of its cadence (train
  rules: steps at most 1 apart; eval rules: at most one evaluation interval apart) form one episode.
* A labelled anomaly (type, start, end) is detected by a rule meant for its type (`RULE_TYPES` below) when the
  rule fires at any step in [start, end + tolerance] (tolerance 50 steps); the delay is the first such
  firing's step minus start.
* An episode whose first firing lies in no labelled window [start, end + tolerance] of its stream is a false
  alarm. One that starts in the window of a type the rule is not meant for is "off-target": neither a true
  nor a false alarm (a loss rule reacting to a fast divergence's grad explosion, say).
* precision = detected anomalies / (detected anomalies + false alarms); recall = detected / labelled;
  F1 their harmonic mean; false alarms per 10,000 healthy steps = false-alarm episodes / steps outside every
  labelled window (+ tolerance) x 10^4. Per anomaly type the streams are those of that type plus the healthy
  streams; per rule, every synthetic stream. A system's row for a type unions its rules meant for that type
  (an anomaly is detected when any of them fires; overlapping false-alarm episodes count once).

The product's aim: F1 >= 0.95 per rule and <= 1 false alarm per 10,000 healthy steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detection_corpus as dc

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "detection.json"
TOLERANCE = 50
AIM_F1 = 0.95
AIM_FA_PER_10K = 1.0
SYSTEMS = ("guardian", "lightning", "lightning_extra", "transformers", "naive")

LOSS = set(dc.LOSS_SPIKE_TYPES)
GRAD = set(dc.GRAD_SPIKE_TYPES)
NAN = set(dc.NAN_KINDS)
DIVERGENCE = {"divergence_slow", "divergence_fast"}
PLATEAU = {"plateau_flat", "plateau_zero"}
NAN_EVAL = "nan_eval"  # no synthetic anomaly of this type; the weak label of a real log with NaN eval losses

# Which anomaly types each rule is meant for (documented in the results). Types a rule only catches as a side
# effect are included where the rule's purpose covers them (a rising loss has "stopped improving"), so that a
# detection there counts for it, never against it.
GUARDIAN_TYPES: dict[str, set[str]] = {
    "non_finite_loss": set(NAN),
    "non_finite_eval_loss": {NAN_EVAL},
    "grad_explosion_absolute": GRAD | {"divergence_fast"},
    "grad_explosion": GRAD | {"divergence_fast"},
    "loss_spike": LOSS | {"divergence_fast"},  # a slow divergence is loss_divergence's: a 10-value baseline follows it
    "lr_blowup": set(),  # no learning-rate fault in the corpus: scored for false alarms only
    "overfitting": {"overfitting"},
    "loss_stuck_at_zero": {"plateau_zero"},
    "plateau": {"plateau_flat", "divergence_slow"},  # zero_steps: 0 - a loss stuck at 0 is loss_stuck_at_zero's
    "loss_divergence": set(DIVERGENCE),
    "vanishing_gradient": {"plateau_zero"},  # the zero-loss streams have a zero grad norm too
    "stalled": set(),  # watches seconds_since_report, which no log has
}
PEER_RULES: dict[str, tuple[str, set[str], str]] = {
    # name: (system, types, cadence)
    "EarlyStopping(loss)/non_finite": ("lightning", set(NAN), "train"),
    "EarlyStopping(loss)/divergence": ("lightning", set(DIVERGENCE), "train"),
    "EarlyStopping(eval_loss)/patience": ("lightning", {"overfitting", "divergence_slow"} | PLATEAU, "eval"),
    "EarlyStopping(eval_loss)/divergence": ("lightning", set(DIVERGENCE), "eval"),
    "EarlyStopping(eval_loss)/non_finite": ("lightning", {NAN_EVAL}, "eval"),
    "SpikeDetection(loss)": ("lightning", LOSS | {"divergence_fast", "nan_loss", "nan_both"}, "train"),
    "SpikeDetection(grad_norm)": ("lightning_extra", GRAD | {"divergence_fast", "nan_grad", "nan_both"}, "train"),
    "EarlyStoppingCallback(patience=3)": ("transformers", {"overfitting", "divergence_slow"} | PLATEAU, "eval"),
    "loss>2x_running_min": ("naive", LOSS | DIVERGENCE, "train"),
    "grad_norm>10": ("naive", GRAD | {"divergence_fast"}, "train"),
    "loss>mean(last3)": ("naive", LOSS | DIVERGENCE, "train"),
}
WEAK_LABEL_TYPES = {
    "grad_spike": GRAD, "loss_spike": LOSS, "nan": NAN | {NAN_EVAL}, "overfit": {"overfitting"},
    "plateau": PLATEAU, "mixed": GRAD | LOSS | {"overfitting"},
}


# The streams SpikeDetection(grad_norm) runs on (it is the slowest system; only its grad-norm rows are scored).
EXTRA_KINDS = {dc.HEALTHY} | GRAD | NAN | {"divergence_fast"}


def guardian_rule_types(rule: Any) -> set[str]:
    """The types a Guardian rule is meant for: by name for the shipped rules, else by detector and metric."""
    if rule.name in GUARDIAN_TYPES:
        return set(GUARDIAN_TYPES[rule.name])
    metric = rule.watches[0] if rule.watches else ""
    kind = rule.detector
    if kind == "non_finite":
        return {NAN_EVAL} if metric.startswith("eval_") else set(NAN)
    if kind == "overfitting":
        return {"overfitting"}
    if kind == "plateau":
        return {"plateau_flat", "divergence_slow"} | ({"plateau_zero"} if rule.params.get("zero_steps", 20) else set())
    if metric == "grad_norm" and kind in ("robust_zscore", "threshold", "jump"):
        return GRAD | {"divergence_fast"}
    if metric == "loss" and kind in ("robust_zscore", "threshold", "jump"):
        return LOSS | DIVERGENCE
    return set()


def _cadence(watches: Iterable[str]) -> str:
    return "eval" if any(m.startswith("eval_") for m in watches) else "train"


# --- running the systems over one stream -----------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_init(rules_path: str | None, systems: tuple[str, ...], tmp: str | None = None) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from guardian.rulefile.reader import load_rules

    _WORKER["ruleset"] = load_rules(rules_path)
    _WORKER["systems"] = systems
    _WORKER["tmp"] = tmp or tempfile.mkdtemp(prefix="guardian-detection-")  # Lightning's skip_batches.json, HF args
    if {"lightning", "lightning_extra", "transformers"} & set(systems):
        import torch

        torch.set_num_threads(1)
    if "transformers" in systems:
        from transformers import TrainingArguments

        _WORKER["hf_args"] = TrainingArguments(
            output_dir=_WORKER["tmp"], eval_strategy="steps", eval_steps=100, save_strategy="steps",
            save_steps=100, load_best_model_at_end=True, metric_for_best_model="eval_loss",
            greater_is_better=False, report_to=[],
        )


def _run_guardian(stream: dc.Stream) -> dict[str, list[int]]:
    from guardian.commands.replay import replay_observations

    out: dict[str, list[int]] = {rule.name: [] for rule in _WORKER["ruleset"].rules}
    for decision in replay_observations(stream.observations(), _WORKER["ruleset"]):
        out[decision.rule].append(decision.step)
    return out


def _lightning_trainer() -> SimpleNamespace:
    import torch
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.trainer.states import TrainerFn

    return SimpleNamespace(
        callback_metrics={}, fast_dev_run=False, strategy=SingleDeviceStrategy(device=torch.device("cpu")),
        should_stop=False, current_epoch=0, state=SimpleNamespace(fn=TrainerFn.FITTING), sanity_checking=False,
        global_rank=0, world_size=1, default_root_dir=_WORKER["tmp"],
    )


class _LightningEarlyStopping:
    """Lightning's EarlyStopping, built at the first finite value (its divergence threshold is 2x that value)."""

    def __init__(self, monitor: str, patience: int) -> None:
        self.monitor, self.patience = monitor, patience
        self.callback: Any = None
        self.trainer = _lightning_trainer()

    def check(self, value: float) -> str | None:
        import torch
        from lightning.pytorch.callbacks import EarlyStopping

        if self.callback is None:
            if not math.isfinite(value):
                return None
            self.callback = EarlyStopping(
                monitor=self.monitor, patience=self.patience, mode="min", check_finite=True,
                divergence_threshold=2.0 * value, check_on_train_epoch_end=False, strict=True,
            )
        self.trainer.callback_metrics = {self.monitor: torch.tensor(value)}
        self.callback.on_validation_end(self.trainer, None)
        if not self.trainer.should_stop:
            return None
        self.trainer.should_stop = False  # keep watching the stream (a real run would end here)
        reason = self.callback.stopping_reason.name
        return {"NON_FINITE_METRIC": "non_finite", "DIVERGENCE_THRESHOLD": "divergence",
                "PATIENCE_EXHAUSTED": "patience"}.get(reason, reason.lower())


class _LightningSpike:
    def __init__(self) -> None:
        from lightning.pytorch.callbacks import SpikeDetection

        self.callback = SpikeDetection(exclude_batches_path=os.path.join(_WORKER["tmp"], "skip_batches.json"))
        self.trainer = _lightning_trainer()
        self.batch_idx = 0

    def check(self, value: float) -> bool:
        import torch
        from lightning.fabric.utilities.spike import TrainingSpikeException

        try:
            self.callback.on_train_batch_end(  # the minimal trainer carries what the hook reads
                self.trainer, None, torch.tensor(value), None, self.batch_idx)  # type: ignore[arg-type]
            return False
        except TrainingSpikeException:
            return True
        finally:
            self.batch_idx += 1


def _run_lightning(stream: dc.Stream, extra: bool) -> dict[str, list[int]]:
    names = ["SpikeDetection(grad_norm)"] if extra else [n for n, (s, _, _) in PEER_RULES.items() if s == "lightning"]
    out: dict[str, list[int]] = {n: [] for n in names}
    es_loss = _LightningEarlyStopping("loss", 10**9)
    es_eval = _LightningEarlyStopping("eval_loss", 3)
    spike = _LightningSpike()
    for obs in stream.observations():
        m = obs.metrics
        if extra:
            if obs.phase == dc.TRAIN and "grad_norm" in m and spike.check(m["grad_norm"]):
                out["SpikeDetection(grad_norm)"].append(obs.step)
            continue
        if obs.phase == dc.TRAIN and "loss" in m:
            reason = es_loss.check(m["loss"])
            if reason:
                out[f"EarlyStopping(loss)/{reason}"].append(obs.step)
            if spike.check(m["loss"]):
                out["SpikeDetection(loss)"].append(obs.step)
        if obs.phase == dc.EVAL and "eval_loss" in m:
            reason = es_eval.check(m["eval_loss"])
            if reason:
                out[f"EarlyStopping(eval_loss)/{reason}"].append(obs.step)
    return out


def _run_transformers(stream: dc.Stream) -> dict[str, list[int]]:
    from transformers import EarlyStoppingCallback, Trainer, TrainerControl, TrainerState

    args = _WORKER["hf_args"]
    state, control = TrainerState(), TrainerControl()
    callback = EarlyStoppingCallback(early_stopping_patience=3)
    callback.on_train_begin(args, state, control)
    trainer_view = SimpleNamespace(args=args, state=state)  # what Trainer._determine_best_metric reads
    fired: list[int] = []
    for obs in stream.observations():
        if obs.phase != dc.EVAL or "eval_loss" not in obs.metrics:
            continue
        state.global_step = obs.step
        metrics = {"eval_loss": obs.metrics["eval_loss"]}
        callback.on_evaluate(args, state, control, metrics=metrics)
        if control.should_training_stop:
            fired.append(obs.step)
            control.should_training_stop = False  # keep watching (a real run would end here)
        Trainer._determine_best_metric(trainer_view, metrics=metrics, trial=None)  # type: ignore[arg-type]
    return {"EarlyStoppingCallback(patience=3)": fired}


def _run_naive(stream: dc.Stream) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"loss>2x_running_min": [], "grad_norm>10": [], "loss>mean(last3)": []}
    running_min = math.inf
    last: list[float] = []
    for obs in stream.observations():
        if obs.phase != dc.TRAIN:
            continue
        loss, grad = obs.metrics.get("loss"), obs.metrics.get("grad_norm")
        if loss is not None and math.isfinite(loss):
            if loss > 2 * running_min:
                out["loss>2x_running_min"].append(obs.step)
            if len(last) == 3 and loss > sum(last) / 3:
                out["loss>mean(last3)"].append(obs.step)
            running_min = min(running_min, loss)
            last = [*last[-2:], loss]
        if grad is not None and grad > 10:
            out["grad_norm>10"].append(obs.step)
    return out


def run_task(task: tuple[str, int, int, str, int, int]) -> dict[str, Any]:
    """Build one stream (synthetic or real) and run every selected system over it."""
    source, seed, index, kind, min_steps, max_steps = task
    if source == "real":
        stream = dc.real_streams()[index]
    else:
        stream = dc.make_stream(seed, index, kind, min_steps, max_steps)
    firings: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    runners = {
        "guardian": _run_guardian, "lightning": lambda s: _run_lightning(s, extra=False),
        "lightning_extra": lambda s: _run_lightning(s, extra=True), "transformers": _run_transformers,
        "naive": _run_naive,
    }
    for system in _WORKER["systems"]:
        if system == "lightning_extra" and source == "synthetic" and kind not in EXTRA_KINDS:
            continue  # SpikeDetection on grad_norm is scored on healthy, grad-spike, NaN and fast-divergence streams
        t0 = time.perf_counter()
        firings.update(runners[system](stream))
        seconds[system] = time.perf_counter() - t0
    return {"source": source, "meta": stream.meta(), "firings": firings, "seconds": seconds,
            "observations": len(stream.observations()) if source == "real" else None}


# --- scoring ---------------------------------------------------------------------------------------------------------


def episodes(steps: Iterable[int], max_gap: float) -> list[tuple[int, int]]:
    """Group sorted firing steps into (first, last) episodes: a gap above `max_gap` starts a new one."""
    out: list[tuple[int, int]] = []
    for step in sorted(set(steps)):
        if out and step - out[-1][1] <= max_gap:
            out[-1] = (out[-1][0], step)
        else:
            out.append((step, step))
    return out


def healthy_steps(n_steps: int, anomalies: Iterable[tuple[str, int, int]], tolerance: int,
                  first_step: int = 1) -> int:
    """Steps first_step..n_steps outside every window [start, end + tolerance]."""
    covered: list[tuple[int, int]] = []
    for _, s, e in sorted(anomalies, key=lambda a: a[1]):
        lo, hi = max(first_step, s), min(n_steps, e + tolerance)
        if hi < lo:
            continue
        if covered and lo <= covered[-1][1] + 1:
            covered[-1] = (covered[-1][0], max(covered[-1][1], hi))
        else:
            covered.append((lo, hi))
    return (n_steps - first_step + 1) - sum(hi - lo + 1 for lo, hi in covered)


def match_stream(firings: list[int], anomalies: list[tuple[str, int, int]], types: set[str], tolerance: int,
                 max_gap: float) -> dict[str, Any]:
    """One rule on one stream: which labelled anomalies it detected (with delays) and its false alarms.

    Returns {"detected": {anomaly index: delay}, "false": [episodes], "off_target": [episodes],
    "on_target": [episodes]}."""
    detected: dict[int, int] = {}
    ordered = sorted(firings)
    for i, (typ, s, e) in enumerate(anomalies):
        if typ not in types:
            continue
        hit = next((f for f in ordered if s <= f <= e + tolerance), None)
        if hit is not None:
            detected[i] = hit - s
    false, off, on = [], [], []
    for ep in episodes(ordered, max_gap):
        inside = [typ for typ, s, e in anomalies if s <= ep[0] <= e + tolerance]
        if not inside:
            false.append(ep)
        elif any(t in types for t in inside):
            on.append(ep)
        else:
            off.append(ep)
    return {"detected": detected, "false": false, "off_target": off, "on_target": on}


def merge_episodes(eps: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of episodes from several rules: overlapping or adjacent ones count once."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(eps):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def prf(detected: int, labelled: int, false_alarms: int) -> dict[str, float | None]:
    """Precision, recall and F1 from detected anomalies, labelled anomalies and false-alarm episodes."""
    precision = detected / (detected + false_alarms) if detected + false_alarms else None
    recall = detected / labelled if labelled else None
    if precision is None or recall is None or precision + recall == 0:
        f1 = 0.0 if recall == 0 or precision == 0 else None
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def score(results: list[dict[str, Any]], rules: Mapping[str, tuple[set[str], str]], types: set[str] | None,
          tolerance: int = TOLERANCE) -> dict[str, Any]:
    """Score a group of rules (one rule, or a system's rules meant for `types`) over synthetic results.

    rules: rule name -> (types it is meant for, cadence). `types`: restrict to these anomaly types (streams of
    those types plus healthy streams); None scores each rule's own types over every stream. The group detects an
    anomaly when any of its rules does (delay: the earliest); false-alarm episodes of its rules are merged."""
    labelled = detected = 0
    delays: list[int] = []
    false_eps = off_eps = 0
    steps = 0
    false_starts: list[tuple[str, int]] = []
    for res in results:
        meta = res["meta"]
        anomalies = [tuple(a) for a in meta["anomalies"]]
        if types is not None and meta["kind"] != dc.HEALTHY and not any(a[0] in types for a in anomalies):
            continue
        if not any(name in res["firings"] for name in rules):
            continue  # these rules did not run on this stream
        steps += healthy_steps(meta["n_steps"], anomalies, tolerance, meta["first_step"])
        best: dict[int, int] = {}
        false_here: list[tuple[int, int]] = []
        wanted_all: set[str] = set()
        for name, (rule_types, cadence) in rules.items():
            wanted = rule_types if types is None else rule_types & types
            wanted_all |= wanted
            gap = 1.5 * (meta["eval_every"] if cadence == "eval" and meta["eval_every"] else 1)
            m = match_stream(res["firings"].get(name, []), anomalies, wanted, tolerance, gap)
            for i, d in m["detected"].items():
                best[i] = min(d, best.get(i, d))
            false_here.extend(m["false"])
            off_eps += len(m["off_target"])
        labelled += sum(1 for a in anomalies if a[0] in wanted_all)
        detected += len(best)
        delays.extend(best.values())
        merged = merge_episodes(false_here)
        false_eps += len(merged)
        false_starts.extend((meta["name"], a) for a, _ in merged[:5])
    out: dict[str, Any] = {"labelled": labelled, "detected": detected, "false_alarms": false_eps,
                           "off_target_episodes": off_eps, "healthy_steps": steps,
                           "fa_per_10k": false_eps / steps * 1e4 if steps else None,
                           "delay_median": statistics.median(delays) if delays else None,
                           "delay_p90": _pct(delays, 0.9), "false_alarm_examples": false_starts[:10]}
    out.update(prf(detected, labelled, false_eps))
    return out


# --- the run ------------------------------------------------------------------------------------------------------


def rule_table(ruleset: Any, systems: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Every rule scored: name -> {system, types, cadence}."""
    out: dict[str, dict[str, Any]] = {}
    if "guardian" in systems:
        for rule in ruleset.rules:
            out[rule.name] = {"system": "guardian", "types": guardian_rule_types(rule),
                              "cadence": _cadence(rule.watches)}
    for name, (system, types, cadence) in PEER_RULES.items():
        if system in systems:
            out[name] = {"system": system, "types": set(types), "cadence": cadence}
    return out


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and x.is_integer() and digits == 0:
        return str(int(x))
    return f"{x:.{digits}f}"


def _delay(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def _type_rows() -> list[tuple[str, set[str]]]:
    rows: list[tuple[str, set[str]]] = []
    rows.append(("loss_spike (all)", LOSS))
    rows.extend((t, {t}) for t in dc.LOSS_SPIKE_TYPES)
    rows.append(("grad_spike (all)", GRAD))
    rows.extend((t, {t}) for t in dc.GRAD_SPIKE_TYPES)
    rows.append(("nan (all)", NAN))
    rows.extend((t, {t}) for t in dc.NAN_KINDS)
    rows.extend((t, {t}) for t in dc.PERSISTENT_TYPES)
    return rows


def analyse(results: list[dict[str, Any]], rules: dict[str, dict[str, Any]], systems: tuple[str, ...],
            tolerance: int) -> dict[str, Any]:
    synthetic = [r for r in results if r["source"] == "synthetic"]
    by_type: list[dict[str, Any]] = []
    for label, types in _type_rows():
        for system in systems:
            members = {n: (info["types"], info["cadence"]) for n, info in rules.items()
                       if info["system"] == system and info["types"] & types}
            if not members:
                continue
            s = score(synthetic, members, types, tolerance)
            by_type.append({"type": label, "system": system, "rules": sorted(members), **s})
    per_rule: list[dict[str, Any]] = []
    for name, info in rules.items():
        s = score(synthetic, {name: (info["types"], info["cadence"])}, None, tolerance)
        per_type = {}
        for t in sorted(info["types"] & set(dc.TYPES)):
            st = score(synthetic, {name: (info["types"], info["cadence"])}, {t}, tolerance)
            per_type[t] = {k: st[k] for k in ("labelled", "detected", "recall", "delay_median", "delay_p90")}
        per_rule.append({"rule": name, "system": info["system"], "types": sorted(info["types"]),
                         "cadence": info["cadence"], **s, "per_type": per_type,
                         "meets_aim": (s["f1"] is not None and s["f1"] >= AIM_F1 and s["fa_per_10k"] is not None
                                       and s["fa_per_10k"] <= AIM_FA_PER_10K)})
    per_system = []
    for system in systems:
        members = {n: (info["types"], info["cadence"]) for n, info in rules.items() if info["system"] == system}
        s = score(synthetic, members, None, tolerance)
        per_system.append({"system": system, "rules": sorted(members), "false_alarms": s["false_alarms"],
                           "healthy_steps": s["healthy_steps"], "fa_per_10k": s["fa_per_10k"]})
    return {"by_type": by_type, "per_rule": per_rule, "per_system": per_system,
            "spike_snr": spike_snr(synthetic, rules, systems, tolerance),
            "real_logs": analyse_real([r for r in results if r["source"] == "real"], rules, systems)}


SNR_BUCKETS = ((0.0, 4.0), (4.0, 8.0), (8.0, 16.0), (16.0, math.inf))


def _snr(anomaly_type: str, params: Mapping[str, Any]) -> float | None:
    """How far a spike stands out of its stream's noise, in noise sigmas: (m - 1) / loss sigma for a loss spike
    (a relative jump against relative noise), ln(m) / grad sigma for a grad spike (the grad norm's noise is
    log-normal); roughly the robust z the spike has."""
    if anomaly_type in LOSS:
        m = float(anomaly_type.split("_")[2].rstrip("x"))
        return (m - 1) / params["loss_sigma"]
    if anomaly_type in GRAD:
        m = float(anomaly_type.split("_")[2].rstrip("x"))
        return math.log(m) / params["grad_sigma"]
    return None


def spike_snr(results: list[dict[str, Any]], rules: dict[str, dict[str, Any]], systems: tuple[str, ...],
              tolerance: int) -> list[dict[str, Any]]:
    """Recall of loss and grad spikes by signal-to-noise ratio, per system (its rules meant for the type)."""
    rows = []
    for group, members_types in (("loss_spike", LOSS), ("grad_spike", GRAD)):
        for system in systems:
            members = {n: i for n, i in rules.items() if i["system"] == system and i["types"] & members_types}
            if not members:
                continue
            counts = [[0, 0] for _ in SNR_BUCKETS]
            for res in results:
                meta = res["meta"]
                if meta["kind"] not in members_types or not any(n in res["firings"] for n in members):
                    continue
                anomalies = [tuple(a) for a in meta["anomalies"]]
                found: set[int] = set()
                for name, info in members.items():
                    m = match_stream(res["firings"].get(name, []), anomalies, info["types"], tolerance, 1)
                    found |= set(m["detected"])
                for i, a in enumerate(anomalies):
                    snr = _snr(a[0], meta["params"])
                    if snr is None:
                        continue
                    b = next(k for k, (lo, hi) in enumerate(SNR_BUCKETS) if lo <= snr < hi)
                    counts[b][1] += 1
                    counts[b][0] += i in found
            rows.append({"group": group, "system": system, "buckets": [
                {"snr": f"{lo:g}-{hi:g}", "detected": d, "labelled": n} for (lo, hi), (d, n) in zip(SNR_BUCKETS, counts)]})
    return rows


def analyse_real(results: list[dict[str, Any]], rules: dict[str, dict[str, Any]],
                 systems: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for res in results:
        meta = res["meta"]
        label = meta["weak_label"]
        wanted = WEAK_LABEL_TYPES.get(label, set())
        row: dict[str, Any] = {"file": meta["name"], "label": label, "observations": res["observations"],
                               "train_observations": meta["params"]["train_observations"], "systems": {}}
        for system in systems:
            fired = {}
            hits = []
            eps_all: list[tuple[int, int]] = []
            for name, info in rules.items():
                if info["system"] != system:
                    continue
                steps = res["firings"].get(name, [])
                if not steps:
                    continue
                gap_unit = meta["eval_every"] if info["cadence"] == "eval" else meta["params"]["log_interval"]
                eps = episodes(steps, 1.5 * max(1, gap_unit))
                fired[name] = {"episodes": len(eps), "first_step": steps[0]}
                eps_all.extend(eps)
                if info["types"] & wanted:
                    hits.append(name)
            row["systems"][system] = {
                "fired": fired, "weak_label_hit": bool(hits) if wanted else None, "hit_rules": hits,
                "alarm_episodes": len(merge_episodes(eps_all)),
            }
        rows.append(row)
    return rows


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def tables(analysis: dict[str, Any], corpus: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    headers = ["type", "n", "system", "P", "R", "F1", "delay med", "delay p90", "FA/10k", "rules"]
    rows = []
    for r in analysis["by_type"]:
        rows.append([r["type"], str(r["labelled"]), r["system"], _fmt(r["precision"]), _fmt(r["recall"]),
                     _fmt(r["f1"]), _delay(r["delay_median"]), _delay(r["delay_p90"]), _fmt(r["fa_per_10k"]),
                     ", ".join(r["rules"])])
    out["by_type"] = (headers, rows)
    headers = ["system", "rule", "meant for", "n", "P", "R", "F1", "delay med", "delay p90", "FA", "FA/10k",
               "off-target", "aim"]
    rows = []
    for r in analysis["per_rule"]:
        rows.append([r["system"], r["rule"], _types_short(r["types"]), str(r["labelled"]), _fmt(r["precision"]),
                     _fmt(r["recall"]), _fmt(r["f1"]), _delay(r["delay_median"]), _delay(r["delay_p90"]),
                     str(r["false_alarms"]), _fmt(r["fa_per_10k"]), str(r["off_target_episodes"]),
                     "yes" if r["meets_aim"] else ("n/a" if not r["labelled"] else "no")])
    out["per_rule"] = (headers, rows)
    headers = ["rule", *[t for t in dc.TYPES]]
    rows = []
    for r in analysis["per_rule"]:
        if r["system"] != "guardian" or not r["per_type"]:
            continue
        cells = []
        for t in dc.TYPES:
            pt = r["per_type"].get(t)
            cells.append("" if pt is None else f"{pt['detected']}/{pt['labelled']}")
        rows.append([r["rule"], *cells])
    out["guardian_matrix"] = (headers, rows)
    headers = ["system", "rules", "false-alarm episodes", "healthy steps", "FA/10k"]
    out["per_system"] = (headers, [[r["system"], str(len(r["rules"])), str(r["false_alarms"]),
                                    str(r["healthy_steps"]), _fmt(r["fa_per_10k"])] for r in analysis["per_system"]])
    systems = [s["system"] for s in analysis["per_system"]]
    headers = ["file", "weak label", "obs", *systems]
    rows = []
    for r in analysis["real_logs"]:
        cells = []
        for system in systems:
            s = r["systems"][system]
            fired = ", ".join(f"{n}×{v['episodes']}" for n, v in s["fired"].items()) or "quiet"
            mark = "" if s["weak_label_hit"] is None else (" [hit]" if s["weak_label_hit"] else " [miss]")
            cells.append(fired + mark)
        rows.append([r["file"][:48], r["label"], str(r["train_observations"]), *cells])
    out["real_logs"] = (headers, rows)
    headers = ["set", "streams", "loss noise (min/med/max)", "loss p99|z|", "grad noise", "grad p99|z|",
               "loss late drop"]
    rows = []
    for key in ("synthetic_healthy", "real_healthy"):
        c = corpus["calibration"][key]

        def triple(name: str, c: dict[str, Any] = c) -> str:
            v = c.get(name) or {}
            return "/".join(f"{v[k]:.3g}" for k in ("min", "median", "max")) if v else "—"
        rows.append([key, str(c["streams"]), triple("loss_noise"), triple("loss_p99_abs_z"),
                     triple("grad_norm_noise"), triple("grad_norm_p99_abs_z"), triple("loss_late_drop")])
    out["calibration"] = (headers, rows)
    headers = ["spikes", "system", *[f"SNR {lo:g}-{hi:g}" for lo, hi in SNR_BUCKETS]]
    out["spike_snr"] = (headers, [[r["group"], r["system"], *[f"{b['detected']}/{b['labelled']}" for b in r["buckets"]]]
                                  for r in analysis["spike_snr"]])
    return out


def _types_short(types: list[str]) -> str:
    groups: list[str] = []
    ts = set(types)
    for name, members in (("loss_spike*", LOSS), ("grad_spike*", GRAD), ("nan*", NAN)):
        if members <= ts:
            groups.append(name)
            ts -= members
    groups.extend(sorted(ts))
    return ", ".join(groups) or "(none in corpus)"


def real_summary(analysis: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in analysis["per_system"]:
        system = s["system"]
        healthy = [r for r in analysis["real_logs"] if r["label"] == dc.HEALTHY]
        weak = [r for r in analysis["real_logs"] if r["label"] in WEAK_LABEL_TYPES]
        hits = sum(1 for r in weak if r["systems"][system]["weak_label_hit"])
        quiet = sum(1 for r in healthy if r["systems"][system]["alarm_episodes"] == 0)
        eps = sum(r["systems"][system]["alarm_episodes"] for r in healthy)
        obs = sum(r["train_observations"] for r in healthy)
        rows.append([system, f"{hits}/{len(weak)}", f"{quiet}/{len(healthy)}", str(eps),
                     _fmt(eps / obs * 1e4 if obs else None)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=4,
                        help="streams per transient anomaly type, 3 events each (default 4; 12 types)")
    parser.add_argument("--persistent-runs", type=int, default=None,
                        help="streams per persistent anomaly type, 1 event each (default 2 x --runs; 5 types)")
    parser.add_argument("--healthy-runs", type=int, default=50, help="healthy streams (default 50)")
    parser.add_argument("--min-steps", type=int, default=1000)
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--tolerance", type=int, default=TOLERANCE, help="steps after an anomaly's end (50)")
    parser.add_argument("--rules", default=None, help="Guardian rule file (default: the shipped rules)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--no-real", action="store_true", help="leave out the real logs")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results; the .md goes next to it")
    args = parser.parse_args(argv)
    systems = tuple(s for s in args.systems.split(",") if s)
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    if {"lightning", "lightning_extra"} & set(systems) and importlib.util.find_spec("lightning") is None:
        parser.error("the Lightning peers need the `lightning` package: "
                     ".venv/bin/pip install -c constraints.txt -e '.[bench]' (or leave them out with "
                     "--systems guardian,transformers,naive)")

    from _common import _from_repo, machine_info, table, write_json

    from guardian.rulefile.reader import load_rules

    started = time.perf_counter()
    ruleset = load_rules(args.rules)
    rules = rule_table(ruleset, systems)
    plan = dc.corpus_plan(args.runs, args.healthy_runs, args.persistent_runs)
    tasks = [("synthetic", args.seed, i, kind, args.min_steps, args.max_steps) for i, kind in enumerate(plan)]
    real = [] if args.no_real else dc.real_streams()
    tasks += [("real", 0, i, "real", 0, 0) for i in range(len(real))]
    print(f"{len(plan)} synthetic streams ({args.healthy_runs} healthy, {args.runs} per transient anomaly type, "
          f"{plan.count('overfitting')} per persistent type) + {len(real)} real logs; systems: "
          f"{', '.join(systems)}; jobs {args.jobs}", file=sys.stderr)
    results: list[dict[str, Any]] = []
    ctx = get_context("fork")
    with tempfile.TemporaryDirectory(prefix="guardian-detection-") as tmp, \
            ctx.Pool(args.jobs, initializer=_worker_init, initargs=(args.rules, systems, tmp)) as pool:
        for i, res in enumerate(pool.imap(run_task, tasks, chunksize=1), start=1):
            results.append(res)
            if i % 25 == 0 or i == len(tasks):
                print(f"  {i}/{len(tasks)} streams, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    corpus_streams = [dc.make_stream(args.seed, i, k, args.min_steps, args.max_steps)
                      for i, k in enumerate(plan) if k == dc.HEALTHY]
    corpus = {
        "streams": len(plan), "persistent_runs": plan.count("overfitting"),
        "steps": sum(r["meta"]["n_steps"] for r in results if r["source"] == "synthetic"),
        "anomalies": {t: sum(1 for r in results for a in r["meta"]["anomalies"] if a[0] == t) for t in dc.TYPES},
        "calibration": _strip_rows(dc.calibration(corpus_streams, real)),
    }
    analysis = analyse(results, rules, systems, args.tolerance)
    seconds: dict[str, float] = {}
    for r in results:
        if r["source"] == "synthetic":
            for k, v in r["seconds"].items():
                seconds[k] = seconds.get(k, 0.0) + v
    cost = {k: {"seconds": v, "us_per_step": v / corpus["steps"] * 1e6} for k, v in seconds.items()}
    tabs = tables(analysis, corpus)
    real_rows = real_summary(analysis)
    text = _report_text(args, corpus, tabs, real_rows, cost, table, rules)
    print(text)
    elapsed = time.perf_counter() - started
    out = Path(args.out)
    data = {
        "benchmark": "detection", "machine": machine_info(), "elapsed_s": elapsed,
        "settings": {**vars(args), "out": _from_repo(args.out), "systems": systems,
                     "rules_file": _from_repo(str(ruleset.source)),
                     "aim": {"f1": AIM_F1, "fa_per_10k": AIM_FA_PER_10K}},
        "versions": _versions(),
        "rule_types": {n: {"system": i["system"], "types": sorted(i["types"]), "cadence": i["cadence"]}
                       for n, i in rules.items()},
        "corpus": corpus, "analysis": _jsonable(analysis), "cost": cost,
        "streams": [_stream_record(r, rules, args.tolerance) for r in results],
        "table": text,
    }
    write_json(out, data)
    md = out.with_suffix(".md")
    md.write_text(_report_md(args, corpus, tabs, real_rows, cost, data, rules, elapsed))
    print(f"wrote {out} and {md} in {elapsed:.0f} s", file=sys.stderr)
    return 0


def _strip_rows(cal: dict[str, Any]) -> dict[str, Any]:
    return {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in cal.items()}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for mod in ("lightning", "torchmetrics", "transformers", "torch", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, set):
        return sorted(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _stream_record(res: dict[str, Any], rules: dict[str, dict[str, Any]], tolerance: int) -> dict[str, Any]:
    """Per stream: ground truth, and per rule the firings' count, detections and false-alarm episode starts."""
    meta = res["meta"]
    anomalies = [tuple(a) for a in meta["anomalies"]]
    per_rule = {}
    for name, steps in res["firings"].items():
        if not steps or name not in rules:
            continue
        info = rules[name]
        gap = 1.5 * (meta["eval_every"] if info["cadence"] == "eval" and meta["eval_every"] else 1)
        m = match_stream(steps, anomalies, info["types"], tolerance, gap)
        per_rule[name] = {"firings": len(steps), "detected": {str(k): v for k, v in m["detected"].items()},
                          "false_alarm_starts": [a for a, _ in m["false"]][:20],
                          "off_target": len(m["off_target"])}
    return {"source": res["source"], "name": meta["name"], "kind": meta["kind"], "n_steps": meta["n_steps"],
            "eval_every": meta["eval_every"], "anomalies": meta["anomalies"], "weak_label": meta["weak_label"],
            "params": meta["params"], "rules": per_rule}


def _report_text(args: argparse.Namespace, corpus: dict[str, Any], tabs: dict[str, Any], real_rows: list[list[str]],
                 cost: dict[str, Any], table: Any, rules: dict[str, dict[str, Any]]) -> str:
    parts = [
        f"Detection benchmark: seed {args.seed}, {corpus['streams']} synthetic streams, {corpus['steps']} steps, "
        f"tolerance {args.tolerance} steps; rules {args.rules or 'rules/default.yaml (shipped)'}",
        "", "Corpus calibration (per-step log-noise; real logs' averaged losses scaled by sqrt(log interval))",
        table(*tabs["calibration"]),
        "", "Per anomaly type (a system's rules meant for the type, unioned)", table(*tabs["by_type"]),
        "", "Per rule (over every synthetic stream; aim: F1 >= 0.95 and <= 1 false alarm per 10k healthy steps)",
        table(*tabs["per_rule"]),
        "", "Guardian: anomalies detected / labelled, per rule and type", table(*tabs["guardian_matrix"]),
        "", "Spikes detected / labelled by signal-to-noise ratio (loss: (m-1)/sigma; grad: ln(m)/sigma)",
        table(*tabs["spike_snr"]),
        "", "False alarms per system (all its rules)", table(*tabs["per_system"]),
        "", "Real logs (weak, per-file labels): weak-labelled files hit; healthy files with no alarm",
        table(["system", "weak-labelled hit", "healthy quiet", "alarm episodes on healthy", "per 10k obs"],
              real_rows),
        "", table(*tabs["real_logs"]),
        "", "Cost per synthetic step: " + ", ".join(f"{k} {v['us_per_step']:.0f} µs" for k, v in cost.items()),
    ]
    return "\n".join(parts)


def _report_md(args: argparse.Namespace, corpus: dict[str, Any], tabs: dict[str, Any], real_rows: list[list[str]],
               cost: dict[str, Any], data: dict[str, Any], rules: dict[str, dict[str, Any]], elapsed: float) -> str:
    v = data["versions"]
    m = data["machine"]
    mapping = _md_table(["rule", "system", "cadence", "meant for (anomaly types)"],
                        [[n, i["system"], i["cadence"], _types_short(sorted(i["types"]))] for n, i in rules.items()])
    misses = [r for r in data["analysis"]["per_rule"] if r["system"] == "guardian" and r["labelled"]
              and not r["meets_aim"]]
    unmeasured = [r["rule"] for r in data["analysis"]["per_rule"] if r["system"] == "guardian" and not r["labelled"]]
    miss_lines = []
    for r in misses:
        weak = [f"{t} {pt['detected']}/{pt['labelled']}" for t, pt in r["per_type"].items()
                if pt["labelled"] and pt["detected"] < pt["labelled"]]
        miss_lines.append(
            f"- `{r['rule']}`: F1 {_fmt(r['f1'])} (P {_fmt(r['precision'])}, R {_fmt(r['recall'])}), "
            f"{_fmt(r['fa_per_10k'])} false alarms per 10k healthy steps"
            + (f"; missed: {', '.join(weak)}" if weak else ""))
    return "\n".join([
        "# Detection benchmark: Guardian's rules vs Lightning, transformers and fixed thresholds", "",
        f"Generated by `{m['command']}` on {m['date_utc']} ({m['cpu_model']}, {m['cpu_count']} CPUs), "
        f"{elapsed:.0f} s. Rules: `{data['settings']['rules_file']}`. lightning {v['lightning']}, "
        f"transformers {v['transformers']}, torch {v['torch']}. Seed {args.seed}: {corpus['streams']} synthetic "
        f"streams of {args.min_steps}-{args.max_steps} steps ({args.healthy_runs} healthy, {args.runs} per transient "
        f"anomaly type with 3 events each, {corpus['persistent_runs']} per persistent type), {corpus['steps']} steps, "
        f"plus {len(data['analysis']['real_logs'])} real logs. Method, systems and scoring: the docstring of "
        "`benchmarks/detection.py`; the corpus: `benchmarks/detection_corpus.py`. Numbers: "
        f"`{Path(args.out).name}`.", "",
        "P = precision, R = recall (labelled anomalies detected), delay in steps from the anomaly's first step, "
        "FA/10k = false-alarm episodes per 10,000 healthy steps. Aim: F1 >= 0.95 per rule and <= 1 FA/10k.", "",
        "## Per anomaly type", "", _md_table(*tabs["by_type"]), "",
        "## Per rule", "", _md_table(*tabs["per_rule"]), "",
        "## Guardian: detected / labelled per rule and type", "", _md_table(*tabs["guardian_matrix"]), "",
        "## Spikes detected / labelled by signal-to-noise ratio", "",
        "SNR: how many noise sigmas the spike stands out, roughly its robust z: (m - 1) / loss sigma for loss "
        "spikes, ln(m) / grad-norm log-sigma for grad spikes (per-stream sigmas from the generator).", "",
        _md_table(*tabs["spike_snr"]), "",
        "## False alarms per system", "", _md_table(*tabs["per_system"]), "",
        "## Guardian rules that miss the aim", "", *(miss_lines or ["none"]), "",
        *([f"No labelled anomaly in the corpus for {', '.join(f'`{n}`' for n in unmeasured)}: scored for false "
           "alarms only.", ""] if unmeasured else []),
        "## Real logs (weak labels, per file)", "",
        _md_table(["system", "weak-labelled hit", "healthy quiet", "alarm episodes on healthy", "per 10k obs"],
                  real_rows), "", _md_table(*tabs["real_logs"]), "",
        "## Corpus calibration", "", _md_table(*tabs["calibration"]), "",
        "Anomalies per type: " + ", ".join(f"{t} {n}" for t, n in corpus["anomalies"].items()), "",
        "## Rule to anomaly-type mapping", "", mapping, "",
        "## Cost", "", "Per synthetic step, one core: " + ", ".join(
            f"{k} {c['us_per_step']:.0f} µs" for k, c in cost.items()), "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
