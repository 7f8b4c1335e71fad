"""What a run left on disk now: its checkpoints (Trainer's and Guardian's protected copies), whether their
weights are finite, the final weights, and the checkpoint to resume from.

Read-only, and bounded: weights are read tensor by tensor from safetensors files (or a `pytorch_model.bin`);
a folder whose weights exceed `WEIGHTS_CHECK_MAX_BYTES` is listed without being checked, and once
`READ_BUDGET_BYTES` have been read (newest weights first) older folders are listed unchecked too. Guardian's
protected copies are hard links to the checkpoint's files, so a file already checked is not read again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHTS_CHECK_MAX_BYTES = 4 * 1024**3
READ_BUDGET_BYTES = 4 * 1024**3
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")


@dataclass(frozen=True)
class Weights:
    """A folder's saved weights: finite True/False, or None when not checked (none saved, too big, unreadable)."""

    folder: Path
    finite: bool | None
    why_unchecked: str = ""


@dataclass(frozen=True)
class CheckpointOnDisk:
    step: int
    weights: Weights
    protected: bool  # Guardian's hard-linked copy in <output_dir>/guardian/good/

    @property
    def path(self) -> Path:
        return self.weights.folder


@dataclass(frozen=True)
class DiskState:
    """The run's output directory as it is now."""

    run_dir: Path
    checkpoints: list[CheckpointOnDisk]  # by step; a protected copy after the original of the same step
    final: Weights | None  # the weights saved in the output directory itself (`trainer.save_model()`), if any

    @property
    def latest(self) -> Weights | None:
        """The newest weights on disk: the output directory's own, else the newest checkpoint's."""
        if self.final is not None:
            return self.final
        return self.checkpoints[-1].weights if self.checkpoints else None

    def unchecked(self) -> list[CheckpointOnDisk]:
        return [c for c in self.checkpoints if c.weights.finite is None]

    def resume_from(self) -> CheckpointOnDisk | None:
        """The newest checkpoint whose weights were checked and are finite (the original before Guardian's copy)."""
        good = [c for c in self.checkpoints if c.weights.finite]
        if not good:
            return None
        newest = max(c.step for c in good)
        return next(c for c in good if c.step == newest)

    def steps(self, *, protected: bool) -> set[int]:
        return {c.step for c in self.checkpoints if c.protected == protected}


def read_disk(run_dir: Path, budget_bytes: int = READ_BUDGET_BYTES) -> DiskState:
    """The checkpoints in `run_dir` and `run_dir/guardian/good`, and the weights saved in `run_dir` itself."""
    folders = [(step, path, protected) for protected, root in ((False, run_dir), (True, run_dir / "guardian" / "good"))
               for step, path in _checkpoint_dirs(root)]
    checker = _Checker(budget_bytes)
    final = checker.check(run_dir) if _weight_files(run_dir) else None
    found = [CheckpointOnDisk(step, checker.check(path), protected)
             for step, path, protected in sorted(folders, key=lambda f: (-f[0], f[2]))]  # newest first
    found.sort(key=lambda c: (c.step, c.protected))
    return DiskState(run_dir, found, final)


class _Checker:
    """Checks folders' weights within a byte budget, each distinct file (by inode) once."""

    def __init__(self, budget_bytes: int) -> None:
        self.left = budget_bytes
        self.seen: dict[tuple[tuple[int, int, int, int], ...], Weights] = {}

    def check(self, folder: Path) -> Weights:
        files = _weight_files(folder)
        try:
            key = tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in (f.stat() for f in files))
        except OSError as exc:
            return Weights(folder, None, f"unreadable ({exc})")
        if key in self.seen:
            known = self.seen[key]
            return Weights(folder, known.finite, known.why_unchecked)
        size = sum(k[2] for k in key)
        if files and WEIGHTS_CHECK_MAX_BYTES >= size > self.left:
            return Weights(folder, None, "not read: the report reads at most "
                                         f"{READ_BUDGET_BYTES / 1024**3:.0f} GiB of weights, newest first")
        weights = check_weights(folder)
        if weights.finite is not None:
            self.left -= size
        self.seen[key] = weights
        return weights


def _checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    try:
        entries = list(root.iterdir()) if root.is_dir() else []
    except OSError:  # unreadable: listed as nothing rather than failing the report
        return []
    out = []
    for path in entries:
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            out.append((int(match.group(1)), path))
    return sorted(out)


def _weight_files(folder: Path) -> list[Path]:
    named = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    try:
        shards = sorted(p for p in folder.glob("model-*.safetensors") if _SHARD.match(p.name))
    except OSError:
        shards = []
    return named + shards


def check_weights(folder: Path) -> Weights:
    """Whether every tensor saved in `folder` is finite."""
    files = _weight_files(folder)
    if not files:
        return Weights(folder, None, "no weights saved")
    size = sum(f.stat().st_size for f in files)
    if size > WEIGHTS_CHECK_MAX_BYTES:
        return Weights(folder, None, f"{size / 1024**3:.1f} GiB of weights, not read")
    try:
        return Weights(folder, all(_file_finite(f) for f in files))
    except Exception as exc:  # a damaged file is reported, never raised
        return Weights(folder, None, f"unreadable ({type(exc).__name__}: {exc})")


def _file_finite(path: Path) -> bool:
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return all(_tensor_finite(f.get_tensor(key)) for key in f.keys())
    state = torch.load(path, map_location="cpu", weights_only=True)
    return all(_tensor_finite(t) for t in state.values() if isinstance(t, torch.Tensor))


def _tensor_finite(tensor: Any) -> bool:
    import torch

    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def describe(weights: Weights) -> str:
    if weights.finite is None:
        return f"not checked ({weights.why_unchecked})"
    return "finite" if weights.finite else "NaN/inf"
