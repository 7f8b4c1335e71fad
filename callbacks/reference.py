"""A reference batch: the loss of one fixed batch tells damaged weights from a bad batch.

When a rule fires, the loss of the step's own batch cannot say whether the batch is bad or the weights are:
both make it abnormal. The loss of a batch that is known to be fine, measured with the current weights and
with the weights of the state a rollback would restore, can: if the weights are fine the two agree; if they
are damaged the current one is much worse. Guardian keeps the run's first micro-batch (a copy on the device,
a few kilobytes) and measures it, with no gradient and dropout off, when a snapshot is taken and when a rule
fires. It costs one forward pass of one micro-batch at those moments and nothing on other steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

log = logging.getLogger("guardian")

# What a causal LM forward needs; other keys (a DPO batch's chosen/rejected, custom columns) are left out.
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")


class ReferenceBatch:
    """The first micro-batch with labels that training saw, and its loss under given weights."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] | None = None

    def offer(self, inputs: Any) -> None:
        """Keep a copy of the first micro-batch that has input ids and labels."""
        if self.inputs is not None or not isinstance(inputs, Mapping):
            return
        picked = {k: inputs[k] for k in MODEL_INPUTS if isinstance(inputs.get(k), torch.Tensor)}
        if "input_ids" in picked and "labels" in picked:
            self.inputs = {k: v.detach().clone() for k, v in picked.items()}

    @property
    def ready(self) -> bool:
        return self.inputs is not None

    def loss(self, model: torch.nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float | None:
        """The mean loss of the batch with the model's current weights, or None when it cannot be measured.

        `reduce` combines the value across ranks before it is read (every rank must call this together)."""
        if self.inputs is None:
            return None
        was_training = model.training
        try:
            device = next(model.parameters()).device
            inputs = {k: v.to(device) for k, v in self.inputs.items()}
            model.eval()
            with torch.no_grad():
                output = model(**inputs)
            loss = getattr(output, "loss", None)
            if loss is None and isinstance(output, Mapping):
                loss = output.get("loss")
            if not isinstance(loss, torch.Tensor):
                return None
            value = loss.detach().float().reshape(())
            if reduce is not None:
                value = reduce(value)
            return float(value.item())
        except Exception:
            log.warning("Guardian: the reference batch cannot be run through this model; rollbacks will not "
                        "be checked against it", exc_info=True)
            self.inputs = None
            return None
        finally:
            model.train(was_training)
