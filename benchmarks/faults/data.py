"""The suite's own synthetic language task and character tokenizer (nothing shared with guardian.testing.tinyrun).

Each line is one small exercise of a toy grammar over the letters a-h and the digits:

    c:fbad>fbad           copy
    r:fbad>dabf           reverse
    s:fbad>abdf           sort
    k:a3,e1,h7?e>1        key lookup
    n:ggg>3               count the repeats

The part after `>` is a function of the part before it, so a model can learn it; with probability `noise`
each character of the answer is replaced by a random one (irreducible loss, and something to overfit to).

`build_tokenizer()` is a real `transformers.PreTrainedTokenizerFast` (a `tokenizers` WordLevel model whose
words are single characters) with `<pad>`, `<s>`, `<\\s>`, `<unk>`: it adds `<s>` in front of every text;
`encode_line()` also appends `</s>` (TRL's SFTTrainer appends the eos text itself), so both trainers see
the same token ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LETTERS = "abcdefgh"
DIGITS = "0123456789"
SYMBOLS = ":>,?"
TASKS = "crskn"
CHARS = LETTERS + DIGITS + SYMBOLS + "".join(sorted(set(TASKS) - set(LETTERS)))
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def make_line(rng: random.Random, noise: float = 0.05) -> str:
    """One exercise of the toy grammar; each answer character is random with probability `noise`."""
    task = rng.choice(TASKS)
    if task == "c":
        w = _word(rng)
        prompt, answer = w, w
    elif task == "r":
        w = _word(rng)
        prompt, answer = w, w[::-1]
    elif task == "s":
        w = _word(rng)
        prompt, answer = w, "".join(sorted(w))
    elif task == "k":
        keys = rng.sample(LETTERS, rng.randint(2, 4))
        vals = [rng.choice(DIGITS) for _ in keys]
        ask = rng.randrange(len(keys))
        prompt = ",".join(k + v for k, v in zip(keys, vals)) + "?" + keys[ask]
        answer = vals[ask]
    else:
        n = rng.randint(1, 9)
        prompt, answer = rng.choice(LETTERS) * n, str(n)
    alphabet = LETTERS + DIGITS
    answer = "".join(rng.choice(alphabet) if rng.random() < noise else ch for ch in answer)
    return f"{task}:{prompt}>{answer}"


def make_lines(n: int, seed: int, noise: float = 0.05) -> list[str]:
    rng = random.Random(seed)
    return [make_line(rng, noise) for _ in range(n)]


@dataclass(frozen=True)
class Splits:
    """Train, eval and test lines; the test lines are only ever used for scoring."""

    train: list[str]
    eval: list[str]
    test: list[str]
    eval_pool: list[str]  # lines a resampling eval set draws its subsets from


TEST_SEED = 90_001  # the test set is the same for every scenario and seed


def make_splits(*, seed: int, train_size: int, eval_size: int, test_size: int = 256, noise: float = 0.05,
                eval_pool_size: int = 256) -> Splits:
    """Disjoint draws: train and eval from `seed`, test from a fixed seed (same test set for every run)."""
    return Splits(train=make_lines(train_size, 1000 + seed, noise), eval=make_lines(eval_size, 2000 + seed, noise),
                  test=make_lines(test_size, TEST_SEED, noise),
                  eval_pool=make_lines(eval_pool_size, 3000 + seed, noise))


def vocabulary() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A character-level PreTrainedTokenizerFast over the grammar's characters, with pad/bos/eos/unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, padding_side="right")


def encode_line(tokenizer, line: str) -> list[int]:
    """`<s>` + the characters + `</s>`: what both trainers train on."""
    return list(tokenizer(line)["input_ids"]) + [tokenizer.eos_token_id]
