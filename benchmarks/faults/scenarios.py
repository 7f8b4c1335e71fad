"""The suite's scenarios: a fixed number per fault family, every parameter drawn at random.

    generate(master_seed=20261203) -> list[Scenario]     # 68 scenarios, the same on every machine
    split(scenarios) -> (tune, heldout)                  # stratified per family, by a hash of the id

Each family has its own `random.Random` seeded from the master seed and the family's name, so adding a
family or changing one family's draws leaves the others as they are. A scenario is frozen and plain data
(picklable, JSON-able); `base_key()` is everything but the fault, so scenarios drawn from one base share
their clean run.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

MASTER_SEED = 20261203
TRAIN_SIZE = 4032  # batches per epoch divisible by 2, 3 and 4 at batch sizes 2-8: no short last step
HEALTHY_LR = (2e-3, 6e-3)  # a LoRA rate at which this tiny model learns steadily (measured: 1e-3 is slow, 3e-2 hurts)
STEPS = (150, 260)

# family -> number of scenarios (the tune and held-out halves each get half of every family)
FAMILY_COUNTS: dict[str, int] = {
    "bad_stretch": 8,
    "weight_corruption": 6,
    "nan_microbatch": 6,
    "grad_spike": 8,
    "lr_jump_once": 6,
    "lr_forced": 6,
    "lr_too_high": 6,
    "masked_labels": 6,
    "overfit_noisy_eval": 4,
    "healthy_noisy": 4,
    "healthy_large_grad": 4,
    "healthy_noisy_eval": 4,
}
FAMILIES = list(FAMILY_COUNTS)
# Families whose "fault" is the configuration itself (or none): the unguarded run is the clean run.
NO_INJECTION = frozenset({"overfit_noisy_eval", "healthy_noisy", "healthy_large_grad", "healthy_noisy_eval"})
HEALTHY = frozenset({"healthy_noisy", "healthy_large_grad", "healthy_noisy_eval"})


@dataclass(frozen=True)
class Scenario:
    """One training configuration and the fault injected into it (`fault` "none": the config is the test)."""

    id: str
    family: str
    trainer: str  # "trainer" (transformers.Trainer) or "sft" (trl.SFTTrainer)
    learning_rate: float
    max_steps: int
    batch_size: int
    grad_accum: int
    max_grad_norm: float  # 0.0: clipping off
    warmup_steps: int
    eval_steps: int
    eval_size: int
    eval_resample: bool  # a different random subset of an eval pool at every evaluation
    train_size: int
    data_noise: float
    data_seed: int
    loss_scale: float = 1.0  # healthy_large_grad: the training loss multiplied by this
    fault: str = "none"
    fault_params: tuple[tuple[str, Any], ...] = field(default=())
    rescuable: bool = True

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.fault_params)

    def base_key(self) -> str:
        """Everything but the fault: scenarios with equal keys have the same clean run."""
        base = {k: v for k, v in asdict(self).items() if k not in ("id", "family", "fault", "fault_params",
                                                                    "rescuable")}
        return hashlib.sha256(repr(sorted(base.items())).encode()).hexdigest()[:12]

    def describe_fault(self) -> str:
        if self.fault == "none":
            return {"overfit_noisy_eval": f"train {self.train_size} lines", "healthy_large_grad":
                    f"loss x{self.loss_scale:.0e}"}.get(self.family, "none")
        return f"{self.fault}(" + ", ".join(f"{k}={_short(v)}" for k, v in self.fault_params) + ")"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _loguniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _base(rng: random.Random, sid: str, family: str, **override: Any) -> Scenario:
    steps = override.pop("max_steps", None) or rng.randint(*STEPS)
    values: dict[str, Any] = dict(
        id=sid, family=family, trainer=rng.choice(["trainer", "sft"]),
        learning_rate=round(_loguniform(rng, *HEALTHY_LR), 6), max_steps=steps,
        batch_size=rng.choice([4, 8]), grad_accum=rng.choice([1, 2, 4]),
        max_grad_norm=rng.choice([1.0, 0.0]), warmup_steps=max(5, round(steps * rng.uniform(0.05, 0.1))),
        eval_steps=rng.choice([20, 25, 30]), eval_size=48, eval_resample=False, train_size=TRAIN_SIZE,
        data_noise=round(rng.uniform(0.02, 0.1), 3), data_seed=rng.randrange(10**6))
    values.update(override)
    return Scenario(**values)


_BASES: dict[tuple[str, int], Scenario] = {}


def _shared_base(rng: random.Random, sid: str, family: str, group: int) -> Scenario:
    """The base drawn for (family, group) by this `generate()` call: such scenarios share their clean run."""
    if (family, group) not in _BASES:
        _BASES[family, group] = _base(rng, sid, family)
    return replace(_BASES[family, group], id=sid)


def _onset(rng: random.Random, s: Scenario, room: int = 1) -> int:
    """A step after warm-up, 15-85 % into the run, leaving `room` steps for the fault."""
    lo = max(s.warmup_steps + 1, round(0.15 * s.max_steps))
    hi = max(lo, min(round(0.85 * s.max_steps), s.max_steps - room))
    return rng.randint(lo, hi)


def _with_fault(s: Scenario, sid: str, fault: str, rescuable: bool = True, **params: Any) -> Scenario:
    return replace(s, id=sid, fault=fault, fault_params=tuple(params.items()), rescuable=rescuable)


def _bad_stretch(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    s = _base(rng, sid, "bad_stretch")
    steps = rng.choice([rng.randint(1, 5), rng.randint(6, 20), rng.randint(21, 60)])
    return [_with_fault(s, sid, "bad_stretch", start=_onset(rng, s, steps + 5), steps=steps)]


def _weight_corruption(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    s = _shared_base(rng, sid, "weight_corruption", i // 3)  # inf, NaN and a huge value on one base
    kind = ["inf", "nan", "huge"][i % 3]
    value = {"inf": math.inf, "nan": math.nan}.get(kind) or rng.choice([-1, 1]) * round(_loguniform(rng, 1e3, 1e6))
    pattern = rng.choice(["entries", "row"])
    return [_with_fault(s, sid, "weight_corruption", step=_onset(rng, s), kind=kind, value=float(value),
                        param_index=rng.randrange(1000), pattern=pattern, entries=rng.randint(1, 4),
                        seed=rng.randrange(10**6))]


def _nan_microbatch(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    s = _base(rng, sid, "nan_microbatch", grad_accum=rng.choice([2, 3, 4]))
    return [_with_fault(s, sid, "nan_microbatch", step=_onset(rng, s), micro_index=rng.randrange(s.grad_accum))]


def _grad_spike(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    s = _base(rng, sid, "grad_spike", max_grad_norm=1.0 if i % 2 == 0 else 0.0)
    steps = rng.randint(1, 5)
    return [_with_fault(s, sid, "grad_spike", start=_onset(rng, s, steps), steps=steps,
                        factor=round(_loguniform(rng, 1e2, 1e4), 1))]


def _lr_jump_once(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    s = _base(rng, sid, "lr_jump_once")
    return [_with_fault(s, sid, "lr_jump_once", step=_onset(rng, s), factor=round(_loguniform(rng, 10, 100), 1))]


def _lr_forced(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    s = _base(rng, sid, "lr_forced")
    return [_with_fault(s, sid, "lr_forced", start=_onset(rng, s), factor=round(_loguniform(rng, 5, 100), 1))]


def _lr_too_high(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    s = _base(rng, sid, "lr_too_high")
    return [_with_fault(s, sid, "lr_too_high", multiplier=round(rng.uniform(10, 30), 1))]


def _masked_labels(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    s = _shared_base(rng, sid, "masked_labels", i // 2)  # a stretch and the template bug on one base
    if i % 2 == 0:
        steps = rng.randint(5, 40)
        return [_with_fault(s, sid, "masked_labels", start=_onset(rng, s, steps + 5), steps=steps)]
    # the template bug: every label masked from the first step; nothing can be learned, nothing to rescue
    return [_with_fault(s, sid, "masked_labels", rescuable=False, start=1, steps=None)]


def _overfit_noisy_eval(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    return [_base(rng, sid, "overfit_noisy_eval", train_size=rng.randint(16, 48), eval_steps=rng.randint(10, 25),
                  eval_size=rng.randint(8, 16), eval_resample=rng.random() < 0.5)]


def _healthy_noisy(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    return [_base(rng, sid, "healthy_noisy", batch_size=rng.randint(2, 4), eval_steps=rng.randint(10, 25),
                  eval_size=rng.randint(8, 16), eval_resample=rng.random() < 0.5)]


def _healthy_large_grad(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    return [_base(rng, sid, "healthy_large_grad", max_grad_norm=0.0,
                  loss_scale=float(f"{_loguniform(rng, 3e3, 1e6):.2g}"))]


def _healthy_noisy_eval(rng: random.Random, i: int, sid: str) -> list[Scenario]:
    return [_base(rng, sid, "healthy_noisy_eval", max_steps=rng.randint(220, 260), eval_steps=rng.randint(10, 20),
                  eval_size=rng.randint(4, 8), eval_resample=rng.random() < 0.5)]


_DRAW = {name: globals()[f"_{name}"] for name in FAMILY_COUNTS}


def generate(master_seed: int = MASTER_SEED) -> list[Scenario]:
    """`FAMILY_COUNTS` scenarios per family, drawn from per-family generators seeded by `master_seed`."""
    out: list[Scenario] = []
    _BASES.clear()
    for family, count in FAMILY_COUNTS.items():
        rng = random.Random(f"{master_seed}/{family}")
        for i in range(count):
            out.extend(_DRAW[family](rng, i, f"{family}-{i:02d}"))
    return out


def _id_hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def split(scenarios: list[Scenario]) -> tuple[list[Scenario], list[Scenario]]:
    """(tune, heldout): within each family, scenarios ordered by a hash of their id go alternately to each half."""
    tune: list[Scenario] = []
    heldout: list[Scenario] = []
    for family in dict.fromkeys(s.family for s in scenarios):
        members = sorted((s for s in scenarios if s.family == family), key=lambda s: _id_hash(s.id))
        for j, s in enumerate(members):
            (tune if j % 2 == 0 else heldout).append(s)
    return tune, heldout


def select(scenarios: list[Scenario], half: str) -> list[Scenario]:
    tune, heldout = split(scenarios)
    return {"tune": tune, "heldout": heldout, "all": scenarios}[half]
