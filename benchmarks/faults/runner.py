"""One (scenario, seed, variant) run: build the trainer, inject the fault, add the variant's callbacks, train,
score on the test set with the suite's own no-grad forward.

    run_unit(scenario, seed, variant, rules=None, guardian_kwargs=None) -> RunRecord

Variants: `clean` (no fault), `unguarded` (the fault, nothing else), `guardian` (the fault +
`GuardianCallback(rules=rules, **guardian_kwargs)`), `hf_early_stop` (the fault + transformers'
`EarlyStoppingCallback(early_stopping_patience=3)`, `load_best_model_at_end=True` on `eval_loss`, a
checkpoint at every evaluation), `spike_stop` (the fault + `SpikeStopCallback`, Lightning's SpikeDetection
semantics). Every run: one torch thread, CPU, `report_to=[]`, no tqdm, `logging_steps=1` with
`logging_nan_inf_filter=False` (so the per-step loss is recorded as it was), a fresh temporary output_dir
deleted afterwards. The final score never goes through `trainer.evaluate()` (which would run callbacks).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import data
import injectors
import torch
from model import build_model
from peers import SpikeStopCallback
from scenarios import NO_INJECTION, Scenario
from transformers import TrainerCallback

from guardian import events

VARIANTS = ["clean", "unguarded", "guardian", "hf_early_stop", "spike_stop"]
TEST_BATCH = 128


@dataclass
class RunRecord:
    """What one run did and how it ended. Losses are floats (NaN/inf kept; the JSON writer spells them out)."""

    scenario_id: str
    family: str
    seed: int
    variant: str
    final_test_loss: float
    steps_completed: int
    max_steps: int
    stopped_early: bool
    seconds: float
    cpu_seconds: float = 0.0  # this process's CPU time for the run (a load-independent measure of its cost)
    train_loss: list[float] = field(default_factory=list)  # per optimizer step, from step 1
    grad_norm: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)  # (step, eval_loss)
    test_at_eval: list[tuple[int, float]] = field(default_factory=list)  # (step, test loss) at each evaluation
    fault: dict[str, Any] = field(default_factory=dict)  # the injector's report of what it did
    guardian: dict[str, Any] | None = None  # decisions, interventions, counts (raw), events_lines
    peer: dict[str, Any] | None = None  # what the peer callback did (spike step, best checkpoint)
    error: str | None = None  # the exception, when train() raised


# ---- data and scoring ------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    return data.build_tokenizer()


class LineDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Tokenized lines as {"input_ids": [...]} items (what both trainers' collators take)."""

    def __init__(self, lines: list[str]) -> None:
        self.items = [data.encode_line(tokenizer(), line) for line in lines]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.items[i]}


class ResamplingDataset(LineDataset):
    """`size` lines drawn from a pool; `advance()` draws a different random subset (one per evaluation)."""

    def __init__(self, pool: list[str], size: int, seed: int) -> None:
        super().__init__(pool)
        self.pool_items, self.size = self.items, size
        self.rng = __import__("random").Random(seed)
        self.advance()

    def advance(self) -> None:
        self.items = self.rng.sample(self.pool_items, self.size)


class ResampleOnEvaluate(TrainerCallback):
    def __init__(self, dataset: ResamplingDataset) -> None:
        self.dataset = dataset

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.dataset.advance()


def pad_batch(items: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return ids, mask


@lru_cache(maxsize=1)
def test_items() -> tuple[tuple[int, ...], ...]:
    lines = data.make_splits(seed=0, train_size=0, eval_size=0).test
    return tuple(tuple(data.encode_line(tokenizer(), line)) for line in lines)


@torch.no_grad()
def test_loss(model: torch.nn.Module) -> float:
    """Mean next-token cross-entropy (nats per token) of `model` over the fixed test set."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        items = [list(x) for x in test_items()]
        for i in range(0, len(items), TEST_BATCH):
            ids, mask = pad_batch(items[i : i + TEST_BATCH], tokenizer().pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / count


class TestProbe(TrainerCallback):
    """At every evaluation: the eval loss Trainer computed, and the test loss by the suite's own forward."""

    def __init__(self) -> None:
        self.eval_history: list[tuple[int, float]] = []
        self.test_at_eval: list[tuple[int, float]] = []

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, metrics: Any = None,
                    **kwargs: Any) -> None:
        self.eval_history.append((state.global_step, float((metrics or {}).get("eval_loss", math.nan))))
        self.test_at_eval.append((state.global_step, test_loss(model)))


class StepLog(TrainerCallback):
    """Each optimizer step's logged loss, pre-clip grad norm and learning rate (needs logging_steps=1)."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.grad_norm: dict[int, float] = {}
        self.learning_rate: dict[int, float] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            step = state.global_step
            self.loss[step] = float(logs["loss"])
            self.grad_norm[step] = float(logs.get("grad_norm", math.nan))
            self.learning_rate[step] = float(logs.get("learning_rate", math.nan))

    @staticmethod
    def series(values: dict[int, float], steps: int) -> list[float]:
        """Steps 1..steps, 6 significant digits (NaN where nothing was logged)."""
        return [float(f"{values.get(s, math.nan):.6g}") for s in range(1, steps + 1)]


# ---- building the trainer --------------------------------------------------------------------------


class _LossScale:
    """Multiplies the training loss by `loss_scale` (healthy_large_grad: natural grad norms of 1e3-1e7)."""

    loss_scale = 1.0

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                      num_items_in_batch=num_items_in_batch)
        if return_outputs:
            loss, outputs = result
            return loss * self.loss_scale, outputs
        return result * self.loss_scale


def _trainer_class(kind: str, scaled: bool) -> type:
    if kind == "sft":
        from trl import SFTTrainer

        base: type = SFTTrainer
    else:
        from transformers import Trainer

        base = Trainer
    if not scaled:
        return base
    return type(f"LossScaled{base.__name__}", (_LossScale, base), {})


def training_arguments(s: Scenario, seed: int, variant: str, output_dir: str) -> Any:
    lr = s.learning_rate * (s.params.get("multiplier", 1.0) if s.fault == "lr_too_high" and variant != "clean" else 1.0)
    common: dict[str, Any] = dict(
        output_dir=output_dir, max_steps=s.max_steps, learning_rate=lr, per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=64, gradient_accumulation_steps=s.grad_accum, max_grad_norm=s.max_grad_norm,
        lr_scheduler_type="cosine", warmup_steps=s.warmup_steps, weight_decay=0.0, logging_steps=1,
        logging_nan_inf_filter=False, eval_strategy="steps", eval_steps=s.eval_steps, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=seed, dataloader_num_workers=0,
        remove_unused_columns=False)
    if variant == "hf_early_stop":
        common.update(save_strategy="steps", save_steps=s.eval_steps, load_best_model_at_end=True,
                      metric_for_best_model="eval_loss", greater_is_better=False, save_total_limit=2,
                      save_only_model=True)
    if s.trainer == "sft":
        from trl import SFTConfig

        return SFTConfig(**common, dataset_text_field="text", max_length=64, packing=False,
                         gradient_checkpointing=False, bf16=False, fp16=False)
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def build_trainer(s: Scenario, seed: int, variant: str, output_dir: str) -> tuple[Any, ResamplingDataset | None]:
    tok = tokenizer()
    splits = data.make_splits(seed=s.data_seed * 10 + seed, train_size=s.train_size, eval_size=s.eval_size,
                              noise=s.data_noise)
    model = build_model(seed=seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    args = training_arguments(s, seed, variant, output_dir)
    cls = _trainer_class(s.trainer, s.loss_scale != 1.0)
    if s.trainer == "sft":
        from datasets import Dataset

        trainer = cls(model=model, args=args, processing_class=tok,
                      train_dataset=Dataset.from_dict({"text": splits.train}),
                      eval_dataset=Dataset.from_dict({"text": splits.eval}))
    else:
        from transformers import DataCollatorForLanguageModeling

        trainer = cls(model=model, args=args, train_dataset=LineDataset(splits.train),
                      eval_dataset=LineDataset(splits.eval),
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    if s.loss_scale != 1.0:
        trainer.loss_scale = s.loss_scale
    resampling = None
    if s.eval_resample:
        resampling = ResamplingDataset(splits.eval_pool, s.eval_size, seed=s.data_seed + 7 * seed)
        trainer.eval_dataset = resampling
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer, resampling


def make_injector(s: Scenario, seed: int) -> Any | None:
    """The scenario's fault as an injector object (None for the families whose fault is the configuration)."""
    p = s.params
    if s.fault == "bad_stretch":
        tok = tokenizer()
        return injectors.BadStretch(p["start"], p["steps"], low_id=len(data.SPECIALS), high_id=len(tok),
                                    seed=s.data_seed + seed)
    if s.fault == "masked_labels":
        return injectors.MaskedLabels(p["start"], p["steps"])
    if s.fault == "weight_corruption":
        return injectors.WeightCorruption(p["step"], param_index=p["param_index"], value=p["value"],
                                          pattern=p["pattern"], entries=p["entries"], seed=p["seed"] + seed)
    if s.fault == "nan_microbatch":
        return injectors.NanMicrobatch(p["step"], p["micro_index"])
    if s.fault == "grad_spike":
        return injectors.GradSpike(p["start"], p["steps"], p["factor"])
    if s.fault == "lr_jump_once":
        return injectors.LrJumpOnce(p["step"], p["factor"])
    if s.fault == "lr_forced":
        return injectors.LrForced(p["start"], p["factor"])
    return None  # lr_too_high (the rate itself), overfit_* and healthy_* (the configuration)


# ---- one run -----------------------------------------------------------------------------------------


def quiet() -> None:
    """Only errors from the libraries (a worker prints progress lines, not training logs)."""
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("guardian").setLevel(logging.CRITICAL + 1)  # its decisions are in the records
    warnings.filterwarnings("ignore")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def _guardian_record(cb: Any, output_dir: str) -> dict[str, Any]:
    event_file = Path(output_dir) / "guardian" / "events.jsonl"
    lines = sum(1 for _ in event_file.open()) if event_file.is_file() else 0
    decisions = [{"rule": d.rule, "step": d.step, "actions": [str(a) for a in d.actions], "message": d.message}
                 for d in cb.decisions]
    interventions = [events.to_builtins(i) for i in cb.interventions]  # the record is written as JSON
    return {"decisions": decisions, "interventions": interventions, "counts": dict(cb.counts),
            "events_lines": lines}


def run_unit(scenario: Scenario, seed: int, variant: str, rules: str | None = None,
             guardian_kwargs: dict[str, Any] | None = None) -> RunRecord:
    """Train `scenario` with training seed `seed` as `variant`; score it on the test set."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    quiet()
    started, cpu_started = time.perf_counter(), time.process_time()
    output_dir = tempfile.mkdtemp(prefix=f"faults-{scenario.id}-{variant}-")
    try:
        trainer, resampling = build_trainer(scenario, seed, variant, output_dir)
        faulted = variant != "clean" and scenario.family not in NO_INJECTION
        injector = make_injector(scenario, seed) if faulted else None
        if injector is not None:
            injector.attach(trainer)
        probe, steps = TestProbe(), StepLog()
        for cb in (probe, steps, *([ResampleOnEvaluate(resampling)] if resampling else [])):
            trainer.add_callback(cb)
        variant_cb: Any = None
        if variant == "guardian":
            from guardian.callbacks import GuardianCallback

            variant_cb = GuardianCallback(rules=rules, **(guardian_kwargs or {}))
        elif variant == "hf_early_stop":
            from transformers import EarlyStoppingCallback

            variant_cb = EarlyStoppingCallback(early_stopping_patience=3)
        elif variant == "spike_stop":
            variant_cb = SpikeStopCallback()
        if variant_cb is not None:
            trainer.add_callback(variant_cb)
        error = None
        try:
            trainer.train()
        except Exception as exc:
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        final = test_loss(trainer.model)
        state = trainer.state
        record = RunRecord(
            scenario_id=scenario.id, family=scenario.family, seed=seed, variant=variant, final_test_loss=final,
            steps_completed=state.global_step, max_steps=scenario.max_steps,
            stopped_early=state.global_step < scenario.max_steps, seconds=0.0,
            train_loss=StepLog.series(steps.loss, state.global_step),
            grad_norm=StepLog.series(steps.grad_norm, state.global_step),
            learning_rate=StepLog.series(steps.learning_rate, state.global_step),
            eval_history=probe.eval_history, test_at_eval=probe.test_at_eval,
            fault=injector.report() if injector is not None else {}, error=error)
        if variant == "guardian":
            record.guardian = _guardian_record(variant_cb, output_dir)
        elif variant == "spike_stop":
            record.peer = variant_cb.report()
        elif variant == "hf_early_stop":
            record.peer = {"best_checkpoint": state.best_model_checkpoint and os.path.basename(
                state.best_model_checkpoint), "best_metric": state.best_metric}
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    record.seconds = round(time.perf_counter() - started, 2)
    record.cpu_seconds = round(time.process_time() - cpu_started, 2)
    return record
