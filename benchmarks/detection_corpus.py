"""A labelled corpus of training curves for the detection benchmark (`detection.py`).

Synthetic streams, deterministic by seed: per optimizer step a loss, a gradient norm and a learning rate,
and an evaluation loss every `eval_every` steps, shaped like real fine-tuning runs:

* learning rate: linear warm-up (0 to 10 % of the run, sometimes none), then linear, cosine or constant;
* loss: a power-law decay to a floor, ``floor + (L0 - floor) * (1 + t / tau) ** -alpha``, a small extra drop
  while the learning rate anneals, occasional healthy bumps (+1 to +4 noise sigmas, at most +30 %, over 5 to
  30 steps), and multiplicative noise ``exp(sigma * m(t) * e)``: ``e`` Student-t (6 to 30 degrees of freedom,
  scaled so its MAD matches a normal's, clipped at 5), ``sigma`` per run (log-uniform 0.01 to 0.2), ``m(t)``
  a slow random modulation (x0.7 to x1.45): heteroscedastic over time as well as with the level;
* grad norm: a level that starts 1x to 20x higher and decays during warm-up, drifts slowly, with its own
  heavier-tailed log-noise (sigma 0.05 to 0.35, Student-t 3 to 8 degrees of freedom, a healthy excursion
  never beyond 8x the level: healthy real runs show single-step jumps up to ~7x);
* eval loss: its own power-law curve with a higher floor and small noise.

The noise levels come from the real logs labelled healthy in ``../shared/fixtures/real-logs/SOURCES.tsv``:
per optimizer step the loss's step-to-step log-noise (MAD of log differences / sqrt 2, times sqrt of the
logging interval when the logged loss is an average) is 0.004 to 0.9 (0.06 to 0.2 for most; runs logged at
every step show 0.1 to 0.3), the grad norm's 0.09 to 0.33; the 99th percentile of |robust z| of the
differences is 2.4 to 4.3 for the loss and 2.5 to 5.9 for the grad norm, and the largest single-step jump
over the rolling median is at most 2x for the loss and 7x for the grad norm. `calibration()` compares the
corpus with those logs (the benchmark prints it).

Anomalies are injected at known steps; every stream carries its ground truth as a list of `Anomaly(type,
start, end)` (inclusive steps). Types (`TYPES`):

=====================  ===========================================================================
loss_spike_<m>x_<w>    the loss is exactly m x its local level (the noise-free curve) for w steps;
                       m in 1.5, 2, 4; w in 1, 3. Three per stream, >= 300 steps apart.
grad_spike_<m>x        the grad norm is exactly m x its local level for one step; m in 5, 20, 100.
nan_loss / nan_grad /  the loss (grad norm / both) is NaN for 1 to 3 steps (a grad norm is NaN or +inf).
nan_both
divergence_slow        from step k the loss doubles every D steps (D 100-400; grad norm x sqrt 2 per D,
                       eval loss follows), to the end of the stream (k + 3D at most).
divergence_fast        from step k the loss grows to F x (F 10-50) over 10 steps and stays there with
                       twice the noise; grad norm G x (G 10-100); the stream ends 100-300 steps later.
overfitting            from step k the eval loss rises by r (10 %-60 %) over the rest of the run while
                       the train loss keeps falling; >= 8 evaluations after k.
plateau_flat           from step k the loss level stays at its value at k (the noise goes on); the
                       healthy curve would still have fallen >= 10 % by the end.
plateau_zero           from step k the loss and the grad norm are exactly 0.0 (masked labels).
=====================  ===========================================================================

Transient anomalies (spikes, NaN) end at their last anomalous step; persistent ones (divergence,
overfitting, plateaus) end at the last step of the stream. Healthy streams have no anomalies and no
non-finite value. `real_streams()` adds the real logs, with SOURCES.tsv's label as a weak, stream-level label.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from guardian.logs.training import EVAL, TRAIN, Observation, read_log

REAL_LOGS = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "real-logs"

LOSS_SPIKE_SIZES = (1.5, 2.0, 4.0)
LOSS_SPIKE_WIDTHS = (1, 3)
GRAD_SPIKE_SIZES = (5.0, 20.0, 100.0)
NAN_KINDS = ("nan_loss", "nan_grad", "nan_both")


def _size(m: float) -> str:
    return f"{m:g}x"


LOSS_SPIKE_TYPES = tuple(f"loss_spike_{_size(m)}_{w}" for m in LOSS_SPIKE_SIZES for w in LOSS_SPIKE_WIDTHS)
GRAD_SPIKE_TYPES = tuple(f"grad_spike_{_size(m)}" for m in GRAD_SPIKE_SIZES)
PERSISTENT_TYPES = ("divergence_slow", "divergence_fast", "overfitting", "plateau_flat", "plateau_zero")
TYPES: tuple[str, ...] = (*LOSS_SPIKE_TYPES, *GRAD_SPIKE_TYPES, *NAN_KINDS, *PERSISTENT_TYPES)
HEALTHY = "healthy"
EVENTS_PER_TRANSIENT_STREAM = 3
MIN_EVENT_SPACING = 300
EVAL_INTERVALS = (50, 100, 200, 250)
MAX_HEALTHY_GRAD_LOG_EXCURSION = math.log(7.0)  # healthy real runs show grad-norm jumps up to ~7x their level


def type_group(anomaly_type: str) -> str:
    """The coarse group of a type: loss_spike, grad_spike, nan, or the type itself."""
    for prefix in ("loss_spike", "grad_spike"):
        if anomaly_type.startswith(prefix):
            return prefix
    return "nan" if anomaly_type.startswith("nan_") else anomaly_type


@dataclass(frozen=True)
class Anomaly:
    type: str
    start: int  # first anomalous step (inclusive)
    end: int  # last anomalous step (inclusive)


@dataclass
class Stream:
    """One run: per-step arrays (steps 1..n) and evaluations, with its ground truth."""

    name: str
    kind: str  # "healthy", an anomaly type, or "real"
    steps: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray
    learning_rate: np.ndarray
    eval_steps: np.ndarray
    eval_loss: np.ndarray
    level: np.ndarray  # noise-free local loss level (what spikes are a multiple of)
    grad_level: np.ndarray  # noise-free local grad-norm level
    eval_every: int
    anomalies: list[Anomaly] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    weak_label: str | None = None  # real logs only
    real_observations: list[Observation] | None = None  # real logs only

    @property
    def n_steps(self) -> int:
        return int(self.steps[-1]) if len(self.steps) else 0

    def index_of(self, step: int) -> int:
        return int(step) - int(self.steps[0])

    def observations(self) -> list[Observation]:
        """Train observations every step; an eval observation after the train one at each eval step."""
        if self.real_observations is not None:
            return list(self.real_observations)
        evals = dict(zip(self.eval_steps.tolist(), self.eval_loss.tolist()))
        out = []
        for step, loss, gn, lr in zip(self.steps.tolist(), self.loss.tolist(), self.grad_norm.tolist(),
                                      self.learning_rate.tolist()):
            out.append(Observation(step, {"loss": loss, "grad_norm": gn, "learning_rate": lr}, TRAIN))
            if step in evals:
                out.append(Observation(step, {"eval_loss": evals[step]}, EVAL))
        return out

    def meta(self) -> dict[str, Any]:
        """What the metrics need: no arrays."""
        return {
            "name": self.name, "kind": self.kind, "n_steps": self.n_steps, "first_step": int(self.steps[0]),
            "eval_every": self.eval_every, "anomalies": [(a.type, a.start, a.end) for a in self.anomalies],
            "weak_label": self.weak_label, "params": self.params,
        }


# --- the plan: which stream gets which anomaly ---------------------------------------------------------------


def corpus_plan(runs_per_type: int = 4, healthy_runs: int = 50, persistent_runs: int | None = None) -> list[str]:
    """The kind of each stream, in order: `healthy_runs` healthy ones, then `runs_per_type` streams of every
    transient type (three events each) and `persistent_runs` (default 2 x runs_per_type) of every persistent
    type (one event each)."""
    persistent = 2 * runs_per_type if persistent_runs is None else persistent_runs
    return [HEALTHY] * healthy_runs + [t for t in TYPES
                                       for _ in range(persistent if t in PERSISTENT_TYPES else runs_per_type)]


def make_stream(seed: int, index: int, kind: str, min_steps: int = 1000, max_steps: int = 5000) -> Stream:
    """Stream number `index` of the corpus for `seed`; the same arguments give the same stream."""
    rng = np.random.default_rng([seed, index, 0x5EED])
    n = int(rng.integers(min_steps, max_steps + 1))
    base = _healthy_base(rng, n, kind)
    stream = _inject(rng, base, kind, f"{kind}-{index:04d}")
    return stream


def make_corpus(seed: int = 0, runs_per_type: int = 4, healthy_runs: int = 50, persistent_runs: int | None = None,
                min_steps: int = 1000, max_steps: int = 5000) -> list[Stream]:
    return [make_stream(seed, i, kind, min_steps, max_steps)
            for i, kind in enumerate(corpus_plan(runs_per_type, healthy_runs, persistent_runs))]


# --- healthy curves --------------------------------------------------------------------------------------------


@cache
def _t_mad(df: int) -> float:
    """Median of |T| for Student-t with `df` degrees of freedom (so noise can be scaled by its MAD)."""
    sample = np.random.default_rng(12345).standard_t(df, 400_001)
    return float(np.median(np.abs(sample)))


def _t_noise(rng: np.random.Generator, n: int, df: int) -> np.ndarray:
    """Student-t noise scaled so that 1.4826 * MAD = 1 (like a standard normal's)."""
    return rng.standard_t(df, n) / (_t_mad(df) * 1.4826)


def _slow_modulation(rng: np.random.Generator, n: int, strength: float) -> np.ndarray:
    """exp(strength * AR(1) with a time constant of ~200 steps, unit variance): slowly varying noise scale."""
    rho = 0.995
    e = rng.standard_normal(n) * math.sqrt(1 - rho * rho)
    x = np.empty(n)
    x[0] = rng.standard_normal()
    for i in range(1, n):  # a short loop; n <= a few thousand
        x[i] = rho * x[i - 1] + e[i]
    return np.exp(strength * np.clip(x, -2.5, 2.5))


def _lr_schedule(rng: np.random.Generator, t: np.ndarray, n: int) -> tuple[np.ndarray, dict[str, Any]]:
    peak = 10 ** rng.uniform(-5.0, -3.3)
    warm = 0 if rng.random() < 0.2 else int(rng.uniform(0.01, 0.1) * n)
    sched = str(rng.choice(["linear", "cosine", "constant"]))
    lr = np.full(n, peak)
    if warm:
        lr[:warm] = peak * t[:warm] / warm
    rest = np.clip((t - warm) / max(1, n - warm), 0.0, 1.0)
    if sched == "linear":
        lr = np.where(t > warm, peak * (1 - rest), lr)
    elif sched == "cosine":
        lr = np.where(t > warm, peak * 0.5 * (1 + np.cos(math.pi * rest)), lr)
    lr = np.maximum(lr, 0.0)
    return lr, {"peak_lr": peak, "warmup_steps": warm, "schedule": sched}


def _loss_curve(t: np.ndarray, l0: float, floor: float, tau: float, alpha: float) -> np.ndarray:
    return floor + (l0 - floor) * (1 + t / tau) ** (-alpha)


def _healthy_base(rng: np.random.Generator, n: int, kind: str) -> dict[str, Any]:
    t = np.arange(1, n + 1, dtype=float)
    lr, lr_params = _lr_schedule(rng, t, n)
    peak, warm = lr_params["peak_lr"], lr_params["warmup_steps"]
    l0 = 10 ** rng.uniform(math.log10(0.8), math.log10(5.0))
    floor = l0 * rng.uniform(0.05, 0.5)
    tau = 10 ** rng.uniform(math.log10(30), math.log10(300))
    alpha = rng.uniform(0.3, 1.2)
    level = _loss_curve(t, l0, floor, tau, alpha)
    anneal = rng.uniform(0.0, 0.08)  # extra drop while the learning rate decays
    level = level * np.where(t > warm, 1 - anneal * (1 - lr / peak), 1.0)
    sigma = 10 ** rng.uniform(math.log10(0.01), math.log10(0.2))
    df = int(rng.integers(6, 31))
    loss_noise = sigma * _slow_modulation(rng, n, 0.15) * np.clip(_t_noise(rng, n, df), -5, 5)
    # healthy bumps, about one per 1000 steps: +1 to +4 noise sigmas (at most +30 %) over 5 to 30 steps
    bumps = np.ones(n)
    for _ in range(int(rng.poisson(n / 1000))):
        width = int(rng.integers(5, 31))
        start = int(rng.integers(0, max(1, n - width)))
        height = min(0.3, sigma * rng.uniform(1, 4))
        bumps[start:start + width] *= 1 + height * np.sin(math.pi * (np.arange(width) + 0.5) / width)
    # grad norm
    g0 = 10 ** rng.uniform(math.log10(0.05), math.log10(20))
    g_warm = 10 ** rng.uniform(0.0, math.log10(20))
    g_tau = rng.uniform(20, 200) + warm / 2
    g_drift = rng.uniform(-0.4, 0.7)
    grad_level = g0 * (1 + (g_warm - 1) * np.exp(-t / g_tau)) * np.exp(g_drift * t / n)
    g_sigma = rng.uniform(0.05, 0.35)
    g_df = int(rng.integers(5, 13))
    grad_noise = g_sigma * _slow_modulation(rng, n, 0.15) * np.clip(_t_noise(rng, n, g_df), -12, 12)
    grad_noise = np.clip(grad_noise, -MAX_HEALTHY_GRAD_LOG_EXCURSION, MAX_HEALTHY_GRAD_LOG_EXCURSION)
    # evaluation
    eval_every = int(rng.choice(EVAL_INTERVALS))
    e0 = l0 * rng.uniform(0.9, 1.1)
    e_floor = floor * rng.uniform(1.05, 1.6)
    e_alpha = alpha * rng.uniform(0.8, 1.2)
    e_sigma = rng.uniform(0.002, 0.01)
    return {
        "t": t, "n": n, "lr": lr, "level": level * bumps, "loss_noise": loss_noise, "grad_level": grad_level,
        "grad_noise": grad_noise, "eval_every": eval_every,
        "eval_curve": lambda s: _loss_curve(s, e0, e_floor, tau, e_alpha),
        "eval_noise_sigma": e_sigma, "clean_level": level,
        "params": {**lr_params, "l0": l0, "floor": floor, "tau": tau, "alpha": alpha, "anneal": anneal,
                   "loss_sigma": sigma, "loss_df": df, "grad_g0": g0, "grad_warm_factor": g_warm,
                   "grad_sigma": g_sigma, "grad_df": g_df, "eval_every": eval_every, "eval_sigma": e_sigma},
    }


# --- anomalies ----------------------------------------------------------------------------------------------------


def _event_starts(rng: np.random.Generator, n: int, count: int, width: int) -> list[int]:
    """`count` steps in [100, n - 100 - width], at least MIN_EVENT_SPACING apart (fewer if the run is too short)."""
    lo, hi = 100, n - 100 - width
    while count > 1 and hi - lo < (count - 1) * MIN_EVENT_SPACING:
        count -= 1
    if count < 1 or hi < lo:
        return []
    free = (hi - lo) - (count - 1) * MIN_EVENT_SPACING
    offsets = np.sort(rng.integers(0, free + 1, size=count))
    return [lo + int(o) + i * MIN_EVENT_SPACING for i, o in enumerate(offsets)]


def _inject(rng: np.random.Generator, b: dict[str, Any], kind: str, name: str) -> Stream:
    n, t = b["n"], b["t"]
    level = b["level"].copy()
    grad_level = b["grad_level"].copy()
    loss_noise, grad_noise = b["loss_noise"].copy(), b["grad_noise"].copy()
    eval_every = b["eval_every"]
    eval_factor = np.ones(n)  # multiplies the eval curve at each step
    eval_hold: int | None = None  # eval curve frozen at this step's value from then on
    anomalies: list[Anomaly] = []
    params = dict(b["params"])
    overrides: list[tuple[str, int, int, float]] = []  # (array, start, end, value or factor)
    end = n  # the stream may be cut short after a divergence

    if kind in LOSS_SPIKE_TYPES or kind in GRAD_SPIKE_TYPES or kind in NAN_KINDS:
        if kind in LOSS_SPIKE_TYPES:
            width = int(kind.rsplit("_", 1)[1])
        elif kind in NAN_KINDS:
            width = 3
        else:
            width = 1
        for s in _event_starts(rng, n, EVENTS_PER_TRANSIENT_STREAM, width):
            i = s - 1
            if kind in LOSS_SPIKE_TYPES:
                m = float(kind.split("_")[2].rstrip("x"))
                overrides.append(("loss_multiple", i, i + width - 1, m))
                anomalies.append(Anomaly(kind, s, s + width - 1))
            elif kind in GRAD_SPIKE_TYPES:
                m = float(kind.split("_")[2].rstrip("x"))
                overrides.append(("grad_multiple", i, i, m))
                anomalies.append(Anomaly(kind, s, s))
            else:
                w = int(rng.choice([1, 1, 1, 2, 3]))
                bad_grad = math.inf if rng.random() < 0.5 else math.nan
                if kind in ("nan_loss", "nan_both"):
                    overrides.append(("loss_value", i, i + w - 1, math.nan))
                if kind in ("nan_grad", "nan_both"):
                    overrides.append(("grad_value", i, i + w - 1, bad_grad if kind == "nan_grad" else math.nan))
                anomalies.append(Anomaly(kind, s, s + w - 1))
    elif kind == "divergence_slow":
        k = int(rng.uniform(0.3, 0.6) * n)
        d = rng.uniform(100, 400)
        end = min(n, k + int(3 * d))
        ramp = np.clip(t - k, 0, None)
        level *= 2 ** (ramp / d)
        grad_level *= 2 ** (0.5 * ramp / d)
        eval_factor = 2 ** (ramp / d)
        anomalies.append(Anomaly(kind, k + 1, end))  # the first step above the healthy curve
        params.update(onset=k, doubling_steps=d)
    elif kind == "divergence_fast":
        k = int(rng.uniform(0.3, 0.6) * n)
        f, g = 10 ** rng.uniform(1, math.log10(50)), 10 ** rng.uniform(1, 2)
        end = min(n, k + int(rng.integers(100, 301)))
        ramp = np.clip((t - k) / 10, 0, 1)
        level *= f ** ramp
        grad_level *= g ** ramp
        loss_noise = np.where(t > k, 2 * loss_noise, loss_noise)
        eval_factor = f ** ramp
        anomalies.append(Anomaly(kind, k + 1, end))
        params.update(onset=k, loss_factor=f, grad_factor=g)
    elif kind == "overfitting":
        k = int(rng.uniform(0.3, 0.6) * n)
        # at least 8 evaluations after the onset
        eval_every = int(min(eval_every, max(10, ((n - k) // 8) // 10 * 10)))
        r, p = rng.uniform(0.1, 0.6), rng.uniform(1.0, 1.5)
        eval_hold = k
        eval_factor = 1 + r * (np.clip(t - k, 0, None) / (n - k)) ** p
        anomalies.append(Anomaly(kind, k + 1, n))
        params.update(onset=k, eval_rise=r, eval_rise_power=p, eval_every=eval_every)
    elif kind in ("plateau_flat", "plateau_zero"):
        k = _plateau_onset(rng, b)
        level[k:] = level[k - 1] if kind == "plateau_flat" else 0.0
        eval_hold = k
        if kind == "plateau_zero":
            overrides.append(("loss_value", k, n - 1, 0.0))
            overrides.append(("grad_value", k, n - 1, 0.0))
        anomalies.append(Anomaly(kind, k + 1, n))
        params.update(onset=k)
    elif kind != HEALTHY:
        raise ValueError(f"unknown stream kind {kind!r}")

    loss = level * np.exp(loss_noise)
    grad = grad_level * np.exp(grad_noise)
    for what, i, j, v in overrides:
        if what == "loss_multiple":
            loss[i:j + 1] = v * level[i:j + 1]
        elif what == "grad_multiple":
            grad[i:j + 1] = v * grad_level[i:j + 1]
        elif what == "loss_value":
            loss[i:j + 1] = v
        elif what == "grad_value":
            grad[i:j + 1] = v
    eval_steps = np.arange(eval_every, n + 1, eval_every)
    curve = b["eval_curve"](eval_steps.astype(float))
    if eval_hold is not None:
        curve = np.where(eval_steps > eval_hold, b["eval_curve"](float(eval_hold)), curve)
    eval_noise = 1 + b["eval_noise_sigma"] * rng.standard_normal(len(eval_steps))
    eval_loss = curve * eval_factor[eval_steps - 1] * eval_noise
    cut = slice(0, end)
    keep_eval = eval_steps <= end
    return Stream(
        name=name, kind=kind, steps=np.arange(1, end + 1), loss=loss[cut], grad_norm=grad[cut],
        learning_rate=b["lr"][cut], eval_steps=eval_steps[keep_eval], eval_loss=eval_loss[keep_eval],
        level=level[cut], grad_level=grad_level[cut], eval_every=eval_every, anomalies=anomalies, params=params,
    )


def _plateau_onset(rng: np.random.Generator, b: dict[str, Any]) -> int:
    """An onset in 25-60 % of the run where the healthy curve would still fall >= 10 % by the end."""
    n, level = b["n"], b["clean_level"]
    for _ in range(50):
        k = int(rng.uniform(0.25, 0.6) * n)
        if level[-1] <= 0.9 * level[k - 1]:
            return k
    # a curve that flattens early: the earliest onset that still has a 10 % drop ahead, else 20 %
    ok = np.nonzero(level[-1] <= 0.9 * level[: n // 2])[0]
    return int(ok[-1]) if len(ok) and ok[-1] >= 0.1 * n else int(0.2 * n)


# --- real logs ------------------------------------------------------------------------------------------------------


def real_streams(directory: Path = REAL_LOGS) -> list[Stream]:
    """The real logs as streams: observations as logged, SOURCES.tsv's label as `weak_label`, no step labels."""
    sources = directory / "SOURCES.tsv"
    if not sources.is_file():
        return []
    out = []
    with sources.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        obs = read_log(directory / row["file"])
        train = [o for o in obs if o.phase == TRAIN]
        evals = [o for o in obs if o.phase == EVAL]
        steps = np.array([o.step for o in train] or [0])
        gaps = np.diff(steps)
        egaps = np.diff([o.step for o in evals])
        out.append(Stream(
            name=row["file"], kind="real", steps=steps,
            loss=np.array([o.metrics.get("loss", math.nan) for o in train]),
            grad_norm=np.array([o.metrics.get("grad_norm", math.nan) for o in train]),
            learning_rate=np.array([o.metrics.get("learning_rate", math.nan) for o in train]),
            eval_steps=np.array([o.step for o in evals]), eval_loss=np.array([o.metrics.get("eval_loss", math.nan)
                                                                              for o in evals]),
            level=np.array([]), grad_level=np.array([]),
            eval_every=int(np.median(egaps)) if len(egaps) else 0, weak_label=row["label"],
            real_observations=obs,
            params={"train_observations": len(train), "eval_observations": len(evals),
                    "log_interval": int(np.median(gaps)) if len(gaps) else 1},
        ))
    return out


# --- calibration: the corpus's noise next to the real healthy logs' ---------------------------------------------------


def noise_stats(values: np.ndarray, log_interval: int = 1, averaged: bool = True) -> dict[str, float]:
    """Per-step log-noise (MAD of log differences / sqrt 2; times sqrt(interval) for averaged logs), the p99
    of |robust z| of the differences, and the relative drop from the 3rd to the 4th quarter's mean."""
    x = values[np.isfinite(values) & (values > 0)]
    if len(x) < 20:
        return {"noise": math.nan, "p99_abs_z": math.nan, "late_drop": math.nan}
    d = np.diff(np.log(x))
    mad = float(np.median(np.abs(d - np.median(d))))
    noise = 1.4826 * mad / math.sqrt(2)
    if averaged:
        noise *= math.sqrt(max(1, log_interval))
    z = np.abs(d - np.median(d)) / max(1.4826 * mad, 1e-12)
    q = len(x) // 4
    late = 1 - float(np.mean(x[-q:])) / float(np.mean(x[-2 * q:-q]))
    return {"noise": noise, "p99_abs_z": float(np.percentile(z, 99)), "late_drop": late}


def calibration(streams: list[Stream], real: list[Stream]) -> dict[str, Any]:
    """Noise statistics of the healthy synthetic streams and of the real logs labelled healthy."""
    def collect(items: list[Stream], synthetic: bool) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        for s in items:
            interval = 1 if synthetic else int(s.params.get("log_interval", 1))
            loss = noise_stats(s.loss, interval, averaged=True)
            grad = noise_stats(s.grad_norm, interval, averaged=False)  # HF logs the last step's grad norm
            rows.append({"name": s.name, "loss": loss, "grad_norm": grad})
        def summary(metric: str, key: str) -> dict[str, float]:
            vals: np.ndarray = np.array([r[metric][key] for r in rows], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            if not len(vals):
                return {}
            return {"n": len(vals), "min": float(vals.min()), "median": float(np.median(vals)),
                    "max": float(vals.max())}
        return {"streams": len(items), **{f"{m}_{k}": summary(m, k) for m in ("loss", "grad_norm")
                                          for k in ("noise", "p99_abs_z", "late_drop")}, "rows": rows}
    healthy_real = [s for s in real if s.weak_label == HEALTHY]
    return {"synthetic_healthy": collect([s for s in streams if s.kind == HEALTHY], True),
            "real_healthy": collect(healthy_real, False)}
