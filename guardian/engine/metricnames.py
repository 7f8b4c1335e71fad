"""The metric names rules can watch: what Hugging Face's Trainer and TRL's trainers log, and what Guardian adds.

A rule watching a name no source produces never fires, silently (`metric: los`). `guardian rules check` warns
about such names with the closest known one; they are warnings, not errors, since a run may log metrics of its
own (`Trainer.log({...})`, a `compute_metrics`).
"""

from __future__ import annotations

import difflib
import re

# Hugging Face Trainer's log keys (train entries and the run summary).
HF_KEYS = frozenset({
    "loss", "grad_norm", "learning_rate", "epoch", "num_input_tokens_seen", "total_flos", "train_loss",
    "train_runtime", "train_samples_per_second", "train_steps_per_second",
})
# What Guardian's callback measures (`scheduled_lr`, the reference batch's `probe_loss`/`probe_loss_ref`) and
# the daemon computes (`seconds_since_report`).
GUARDIAN_KEYS = frozenset({"scheduled_lr", "probe_loss", "probe_loss_ref", "seconds_since_report"})
# TRL 1.x: SFT, DPO, KTO, ORPO/CPO, GRPO/RLOO, reward modelling, online DPO / PPO.
TRL_KEYS = frozenset({
    "entropy", "num_tokens", "mean_token_accuracy", "aux_loss",
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
    "nll_loss", "log_odds_ratio", "log_odds_chosen", "kl",
    "reward", "reward_std", "frac_reward_zero_std", "policy_loss", "entropy_coef", "step_time",
    "accuracy", "margin", "mean_reward", "min_reward", "max_reward",
    "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward", "objective/scores",
    "val/contain_eos_token", "objective/scores_margin", "beta",
})
KNOWN_KEYS = HF_KEYS | GUARDIAN_KEYS | TRL_KEYS
# Families of keys named after something of the run's own: eval_* (`eval_loss`, a compute_metrics key), a
# GRPO reward function's `rewards/<name>/mean|std`, and TRL's grouped statistics.
KNOWN_PATTERNS = (
    re.compile(r"eval_.+"),
    re.compile(r"rewards/[^/]+/(mean|std)"),
    re.compile(r"(completions|clip_ratio|sampling|tools|objective|policy|loss|val|eps)/.+"),
)


def is_known(name: str) -> bool:
    return name in KNOWN_KEYS or any(p.fullmatch(name) for p in KNOWN_PATTERNS)


def closest(name: str) -> str | None:
    """The known name `name` most likely meant, or None."""
    candidates = sorted(KNOWN_KEYS | {"eval_loss"})
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return match[0] if match else None
