"""Real TRL trainers (DPOTrainer, GRPOTrainer) on the tiny Llama of `guardian.testing.tinyrun`, with data built in code.

No downloads: a character tokenizer (a real `PreTrainedTokenizerFast`) over tinyrun's alphabet, preference
pairs and prompts generated from a seed. Data is read in order (`train_sampling_strategy="sequential"`), so
"the batch of step N" is rows (N-1)*batch to N*batch: a fault can be put into exactly those steps.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from guardian.testing.tinyrun import ALPHABET, build_model

PAIR_BATCH = 8  # preference pairs per DPO step


def char_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(ALPHABET)}}  # tinyrun's ids
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<s>", bos_token="<s>")


def preference_rows(n: int, seed: int, *, swapped_steps: Iterable[int] = (), noise: float = 0.1,
                    batch: int = PAIR_BATCH) -> dict[str, list[str]]:
    """Pairs whose chosen answer is the preferred style ("yes." over "no.", "one two." over "ten."); `noise` of
    them are mislabelled at random (as real preference data is), and every pair of `swapped_steps` is swapped."""
    rng = random.Random(seed)
    swapped = {i for step in swapped_steps for i in range((step - 1) * batch, step * batch)}
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        number = rng.randint(0, 99)
        good, bad = ("yes.", "no.") if number % 2 == 0 else ("one two.", "ten.")
        if (rng.random() < noise) != (i in swapped):
            good, bad = bad, good
        rows["prompt"].append(f"{number} is ")
        rows["chosen"].append(good)
        rows["rejected"].append(bad)
    return rows


def dpo_trainer(output_dir: str, *, steps: int, callbacks: list[Any], swapped_steps: Iterable[int] = (),
                seed: int = 0, learning_rate: float = 5e-3, eval_size: int = 0) -> Any:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=PAIR_BATCH, learning_rate=learning_rate,
        logging_steps=5, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", beta=0.1, seed=seed,
        train_sampling_strategy="sequential", max_length=16, lr_scheduler_type="constant", log_level="error",
        per_device_eval_batch_size=64, eval_strategy="no", bf16=False,
    )
    train = Dataset.from_dict(preference_rows(PAIR_BATCH * steps, seed, swapped_steps=swapped_steps))
    evaluation = Dataset.from_dict(preference_rows(eval_size, 10_000 + seed, noise=0.0)) if eval_size else None
    trainer = DPOTrainer(model=build_model(seed, hidden_size=32, layers=1, lora_r=4), args=args,
                         train_dataset=train, eval_dataset=evaluation, processing_class=char_tokenizer(),
                         callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    return trainer


def sum_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """1 for a completion that starts with a digit, 0 otherwise: easy to learn, varied at the start."""
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def grpo_trainer(output_dir: str, *, steps: int, callbacks: list[Any],
                 reward: Callable[..., list[float]] = sum_reward, seed: int = 0, beta: float = 0.0) -> Any:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    rng = random.Random(seed)
    prompts = [f"{rng.randint(0, 9)}+{rng.randint(0, 9)}=" for _ in range(4 * steps)]
    args = GRPOConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=4, learning_rate=5e-3, logging_steps=5, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no", seed=seed, log_level="error", temperature=1.0,
        lr_scheduler_type="constant", bf16=False, beta=beta,
    )
    trainer = GRPOTrainer(model=build_model(seed, hidden_size=32, layers=1, lora_r=4), reward_funcs=reward,
                          args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=char_tokenizer(), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    return trainer
