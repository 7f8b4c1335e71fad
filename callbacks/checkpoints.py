"""Checkpoints on disk known to be good: kept safe from rotation, and loadable in place for a rollback.

Trainer deletes old `checkpoint-*` folders when `save_total_limit` is set, and it rotates before the
`on_save` callback runs. Each checkpoint saved while the run was healthy is therefore hard-linked (copied
where links are impossible) into `<output_dir>/guardian/good/checkpoint-N` the moment it is saved; a later
rotation removes only the original names, and the files stay reachable here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from guardian.callbacks.lr import unwrap_scheduler

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MARKER = "guardian_good.json"


def _link_tree(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for path in src.rglob("*"):
        target = tmp / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    os.replace(tmp, dst)


class GoodCheckpoints:
    """The newest `keep` checkpoints that were saved while the run was healthy."""

    def __init__(self, output_dir: str | os.PathLike[str], keep: int = 2) -> None:
        self.root = Path(output_dir) / "guardian" / "good"
        self.keep = keep

    def protect(self, checkpoint_dir: str | os.PathLike[str], step: int, info: dict[str, Any]) -> Path | None:
        """Keep a link to a checkpoint just saved; return where, or None if it is not there."""
        src = Path(checkpoint_dir)
        if not src.is_dir():
            return None
        dst = self.root / f"checkpoint-{step}"
        self.root.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            shutil.rmtree(dst)
        _link_tree(src, dst)
        (dst / MARKER).write_text(json.dumps({"step": step, **info}, indent=1))
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self.root / f"checkpoint-{old}", ignore_errors=True)
        return dst

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = (_CHECKPOINT.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def newest_before(self, step: int) -> Path | None:
        earlier = [s for s in self.steps() if s < step]
        return self.root / f"checkpoint-{earlier[-1]}" if earlier else None


def load_into(checkpoint: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Load a Trainer checkpoint's trainable weights, optimizer and scheduler state in place (None: leave that part)."""
    from safetensors.torch import load_file

    adapter = checkpoint / "adapter_model.safetensors"
    full = checkpoint / "model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(adapter)))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{adapter}: weights do not match the model: {unexpected[:3]}")
    elif full.exists():
        model.load_state_dict(load_file(str(full)), strict=False)
    else:
        raise FileNotFoundError(f"{checkpoint}: no adapter_model.safetensors or model.safetensors")
    if optimizer is None:
        return
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
    sched_file = checkpoint / "scheduler.pt"
    if scheduler is not None and sched_file.exists():
        unwrap_scheduler(scheduler).load_state_dict(torch.load(sched_file, weights_only=True))
