"""The metrics a TRL trainer keeps per micro-batch (`rewards/margins`, `reward_std`, `kl`, ...), read each
optimizer step before the update.

TRL's trainers compute these inside `training_step` (DPO, KTO and GRPO's loss, GRPO's generation and scoring)
and append them, already on the host, to a store on the trainer: `trainer._metrics["train"][key]` (DPO, KTO,
GRPO, RLOO), `trainer._stored_metrics["train"][key]` (ORPO, CPO) or `trainer.stats[key]` (online DPO, whose
`objective/kl` and `rewards/*` are per step). `Trainer.log` averages and clears the store
every `logging_steps`. So at `on_pre_optimizer_step` the store already holds this step's values: this reader
returns, per key, the mean of the entries added since the previous optimizer step, and a rule can skip the
update of a step whose batch is bad. Costs no host sync (the values are Python floats already).
"""

from __future__ import annotations

import math
from typing import Any

STORES = ("_metrics", "_stored_metrics")  # where TRL's trainers keep their per-micro-batch metrics, per mode
FLAT_STORE = "stats"  # online DPO: train metrics only, no mode level
MAX_KEYS = 64  # a trainer logs 10-30 keys; a store beyond this is not TRL's


class StoredMetrics:
    """Per optimizer step, the mean of the values a TRL trainer stored since the last step (NaN left out)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        # key -> (the list last seen, its length then): `Trainer.log` clears the store, and the next append makes
        # a new list, so a different list object means "start from its first entry". Holding the list keeps its
        # identity from being reused.
        self._seen: dict[str, tuple[list[Any], int]] = {}

    def _store(self) -> Any:
        for name in STORES:
            store = getattr(self.trainer, name, None)
            train = store.get("train") if isinstance(store, dict) else None
            if isinstance(train, dict):
                return train
        flat = getattr(self.trainer, FLAT_STORE, None)
        if isinstance(flat, dict) and flat and all(isinstance(v, list) for v in flat.values()):
            return flat
        return None

    def read(self) -> dict[str, float]:
        store = self._store()
        if store is None or len(store) > MAX_KEYS:
            return {}
        values: dict[str, float] = {}
        for key, entries in list(store.items()):
            if not isinstance(key, str) or not isinstance(entries, list):
                continue
            last, length = self._seen.get(key, (None, 0))
            start = length if entries is last and length <= len(entries) else 0
            self._seen[key] = (entries, len(entries))
            new = [float(v) for v in entries[start:]
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
            if new:
                values[key] = sum(new) / len(new)
        return values
