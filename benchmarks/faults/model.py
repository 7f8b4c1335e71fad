"""The suite's tiny model: a Llama-architecture network built from a config, with a PEFT LoRA adapter.

Hidden size 64, 2 layers, 4 heads, intermediate size 128, weights drawn with std 0.1 (with the default 0.02 the
frozen random head keeps the logits so small that the adapter barely learns: 3.40 -> 2.9 nats in 250 steps
instead of 3.7 -> 1.85); LoRA r 8, alpha 16, on every linear layer of the
blocks (`target_modules="all-linear"`, which leaves `lm_head` out). Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch


def build_model(*, seed: int, vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int) -> Any:
    """A freshly initialised LlamaForCausalLM (from `seed`) wrapped in a LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=False, initializer_range=0.1)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def lora_weights(model: Any) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable LoRA matrices by name (`...lora_A.default.weight`, `...lora_B.default.weight`)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad and "lora_" in name}
