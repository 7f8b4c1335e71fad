"""A tiny, real fine-tuning run built from nothing: a Llama-architecture model from a config, a LoRA adapter
(PEFT), a character tokenizer and generated data. No downloads; a couple of seconds per hundred steps on a
CPU. Used by `guardian demo`, the tests and the benchmarks.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any

import torch

ALPHABET = "0123456789+=;abcdefghijklmnopqrstuvwxyz ."
PAD, BOS = 0, 1
VOCAB = len(ALPHABET) + 2


def encode(text: str) -> list[int]:
    return [BOS] + [ALPHABET.index(c) + 2 for c in text]


class CharTokenizer:
    """Turns token ids back into text, as a run's `processing_class` does (for Guardian's excerpts)."""

    pad_token_id = PAD
    model_input_names = ["input_ids", "attention_mask"]

    def decode(self, token_ids: Any, skip_special_tokens: bool = False) -> str:
        special = {PAD: "<pad>", BOS: "<s>"}
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids
        return "".join("" if skip_special_tokens and i in special else special.get(i) or ALPHABET[i - 2]
                       for i in ids)

    def save_pretrained(self, directory: str) -> None:
        """Trainer saves its processing class with each checkpoint: the alphabet is all there is."""
        import json
        import os

        with open(os.path.join(directory, "char_tokenizer.json"), "w") as f:
            json.dump({"alphabet": ALPHABET, "pad": PAD, "bos": BOS}, f)


def make_texts(n: int, seed: int, length: int = 62) -> list[str]:
    """Lines of small sums and counting words: learnable structure with some noise."""
    rng = random.Random(seed)
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    texts = []
    for _ in range(n):
        parts: list[str] = []
        while sum(len(p) for p in parts) < length:
            if rng.random() < 0.5:
                a, b = rng.randint(0, 49), rng.randint(0, 49)
                parts.append(f"{a}+{b}={a + b};")
            else:
                start = rng.randint(0, 6)
                parts.append(" ".join(words[start:start + 4]) + ".")
        texts.append("".join(parts)[:length])
    return texts


class TextDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, texts: list[str]) -> None:
        self.items = [torch.tensor(encode(t)) for t in texts]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.items[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def build_model(seed: int = 0, *, hidden_size: int = 64, layers: int = 2, lora_r: int = 8) -> Any:
    """A Llama-architecture model initialised from a config, wrapped with a LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=BOS,
    )
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      modules_to_save=["lm_head", "embed_tokens"], task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT asks for `is_gradient_checkpointing`, deprecated in transformers 5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(base, lora)


@dataclass
class TinyRun:
    """Settings of a tiny run; `trainer()` builds a real `transformers.Trainer` for them."""

    output_dir: str
    max_steps: int = 200
    seed: int = 0
    learning_rate: float = 2e-3
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    eval_steps: int = 50
    save_steps: int = 0
    save_total_limit: int | None = None
    logging_steps: int = 10
    logging_nan_inf_filter: bool = True  # Trainer's default: a NaN step is logged as the running average
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 10
    train_size: int = 2000
    eval_size: int = 128
    max_grad_norm: float = 1.0
    quiet: bool = True  # no printing of every log line
    tokenizer: bool = False  # give the Trainer a CharTokenizer as its processing class

    def trainer(self, callbacks: list[Any] | None = None, model: Any = None, optimizers: tuple[Any, Any] = (None, None),
                train_dataset: Any = None) -> Any:
        """A Trainer for these settings; `train_dataset` replaces the generated training data."""
        from transformers import PrinterCallback, Trainer, TrainingArguments

        args = TrainingArguments(
            output_dir=self.output_dir, max_steps=self.max_steps, seed=self.seed,
            learning_rate=self.learning_rate, per_device_train_batch_size=self.batch_size,
            per_device_eval_batch_size=64, gradient_accumulation_steps=self.gradient_accumulation_steps,
            eval_strategy="steps" if self.eval_steps else "no", eval_steps=self.eval_steps or None,
            save_strategy="steps" if self.save_steps else "no", save_steps=self.save_steps or 500,
            save_total_limit=self.save_total_limit, logging_steps=self.logging_steps,
            logging_nan_inf_filter=self.logging_nan_inf_filter,
            lr_scheduler_type=self.lr_scheduler_type, warmup_steps=self.warmup_steps,
            max_grad_norm=self.max_grad_norm, report_to=[], use_cpu=True, disable_tqdm=True,
            dataloader_num_workers=0,
        )
        tokenizer: Any = CharTokenizer() if self.tokenizer else None
        trainer = Trainer(
            model=model if model is not None else build_model(self.seed), args=args,
            train_dataset=train_dataset if train_dataset is not None
            else TextDataset(make_texts(self.train_size, seed=self.seed)),
            eval_dataset=TextDataset(make_texts(self.eval_size, seed=10_000 + self.seed)),
            callbacks=callbacks or [], optimizers=optimizers,
            processing_class=tokenizer,
        )
        if self.quiet:
            trainer.remove_callback(PrinterCallback)
        return trainer
