"""What peers do instead of Guardian, as Trainer callbacks.

`SpikeStopCallback` is Lightning's `SpikeDetection` (lightning.fabric.utilities.spike) re-implemented for
Trainer, because Lightning is not installed in this environment: the same semantics with its defaults
(mode "min", window 10, warmup 1, atol None, rtol 2.0, finite_only True):

- a non-finite loss is a spike;
- a loss not above the previous accepted loss is never a spike;
- otherwise it is a spike when |loss - mean| >= rtol * mean, the mean being the running mean of the last
  `window_steps` accepted (non-spike) losses;
- the first `warmup_steps` batches are not checked (Lightning's `batch_idx >= warmup`).

On a spike Lightning raises `TrainingSpikeException`, which ends the fit; here the run stops
(`control.should_training_stop`) and keeps the weights it has. It reads the per-step loss from `on_log`, so
the run needs `logging_steps=1` and `logging_nan_inf_filter=False` (the suite sets both for every variant).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from transformers import TrainerCallback


class SpikeStopCallback(TrainerCallback):
    """Stops the run at the first loss spike, Lightning-style (see the module docstring)."""

    def __init__(self, *, window_steps: int = 10, warmup_steps: int = 1, rtol: float = 2.0) -> None:
        self.window: deque[float] = deque(maxlen=window_steps)
        self.warmup_steps, self.rtol = warmup_steps, rtol
        self.last = 0.0
        self.batches = 0
        self.spike_step: int | None = None
        self.spike_loss: float | None = None

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if loss - self.last <= 0.0:
            return False
        mean = sum(self.window) / len(self.window) if self.window else math.nan
        return abs(loss - mean) >= abs(self.rtol * mean)  # NaN mean (empty window): False, as in torchmetrics

    def observe(self, loss: float) -> bool:
        """Feed one step's loss; True when it is a spike (the run should stop)."""
        index, self.batches = self.batches, self.batches + 1
        if index >= self.warmup_steps and self.is_spike(loss):
            return True
        self.window.append(loss)
        self.last = loss
        return False

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs or self.spike_step is not None:
            return
        loss = float(logs["loss"])
        if self.observe(loss):
            self.spike_step, self.spike_loss = state.global_step, loss
            control.should_training_stop = True

    def report(self) -> dict[str, Any]:
        return {"spike_step": self.spike_step, "spike_loss": self.spike_loss}
