"""Guardian inside every `transformers.Trainer` a process creates, without editing the script.

`guardian run` puts a folder holding a `sitecustomize.py` first on PYTHONPATH; Python imports it at start-up
in the child and in every process the child starts (torchrun and accelerate ranks inherit the environment).
It calls `install()`, which only registers an import hook: nothing else is imported, so processes that never
touch transformers pay nothing. When `transformers.trainer` is first imported, from wherever and in whatever
order, the hook patches `Trainer.__init__` (subclasses such as TRL's SFTTrainer and LLaMA-Factory's trainers
call it) to add a `GuardianCallback` unless the script added one itself, and `Trainer.train` to resume from
the checkpoint the supervisor chose after a crash.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import os
import sys
from types import ModuleType
from typing import Any

TARGET = "transformers.trainer"
ENV_OPTIONS = "GUARDIAN_CALLBACK_OPTIONS"  # JSON: keyword arguments for GuardianCallback
ENV_RESUME = "GUARDIAN_RESUME_FROM"  # a checkpoint folder the next train() must resume from


class _TrainerHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of `transformers.trainer` to patch it once loaded."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        patch(module.Trainer)


def install() -> None:
    """Register the hook (idempotent); patch at once if transformers.trainer is already imported."""
    if TARGET in sys.modules:
        patch(sys.modules[TARGET].Trainer)
    elif not any(isinstance(f, _TrainerHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TrainerHook())


def patch(trainer_class: type) -> None:
    if getattr(trainer_class, "_guardian_patched", False):
        return
    original_init: Any = getattr(trainer_class, "__init__")  # noqa: B009 - mypy refuses the attribute on a bare type
    original_train: Any = getattr(trainer_class, "train")  # noqa: B009

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        try:
            add_guardian(self)
        except Exception as exc:  # never break the user's Trainer
            print(f"guardian: could not attach to this Trainer ({exc}); training continues unguarded", file=sys.stderr)

    @functools.wraps(original_train)
    def train(self: Any, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        forced = os.environ.get(ENV_RESUME)
        if forced:
            print(f"guardian: resuming from {forced}", file=sys.stderr)
            resume_from_checkpoint = forced
        return original_train(self, resume_from_checkpoint, *args, **kwargs)

    trainer_class.__init__ = __init__  # type: ignore[misc]
    trainer_class.train = train  # type: ignore[attr-defined]
    trainer_class._guardian_patched = True  # type: ignore[attr-defined]


def add_guardian(trainer: Any) -> None:
    from guardian.callbacks import GuardianCallback

    if any(isinstance(cb, GuardianCallback) for cb in trainer.callback_handler.callbacks):
        return
    options = json.loads(os.environ.get(ENV_OPTIONS) or "{}")
    trainer.add_callback(GuardianCallback(**options))
