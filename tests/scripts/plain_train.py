"""An ordinary fine-tuning script that knows nothing of Guardian: a tiny Llama + LoRA, Trainer, generated data.

Faults, set by environment variables (so the script itself stays unmodified between tests):
  FAULT_NAN_STEP=N      the forward pass of step N overflows to NaN
  FAULT_KILL_STEP=N     the process SIGKILLs itself after step N, on its first attempt only
  FAULT_CRASH_STEP=N    the process raises at step N, every time (a crash loop)
  SUBCLASS=1            train with a Trainer subclass shaped like LLaMA-Factory's CustomSeq2SeqTrainer
Writes OUTPUT_DIR/result.json at the end.
"""

import json
import os
import random
import signal
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

out = sys.argv[1]
max_steps = int(os.environ.get("MAX_STEPS", "40"))


class Data(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        rng = random.Random(seed)
        self.items = [torch.tensor([1] + [rng.randint(2, 40) for _ in range(15)] * 2) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids = self.items[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


class Faults(TrainerCallback):
    def __init__(self):
        self.step = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def pre_forward(module, a, kw):
            if module.training and self.step == int(os.environ.get("FAULT_NAN_STEP", "-1")):
                kw["inputs_embeds"] = module.get_input_embeddings()(kw.pop("input_ids")) * float("nan")
            return a, kw
        model.register_forward_pre_hook(pre_forward, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1
        if self.step == int(os.environ.get("FAULT_CRASH_STEP", "-1")):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    def on_step_end(self, args, state, control, **kwargs):
        marker = os.path.join(out, "killed-once")
        if state.global_step == int(os.environ.get("FAULT_KILL_STEP", "-1")) and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


torch.manual_seed(0)
config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=64)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
arguments = Seq2SeqTrainingArguments if os.environ.get("SUBCLASS") else TrainingArguments
args = arguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=8, learning_rate=2e-3,
                         save_steps=10, save_strategy="steps", logging_steps=5, report_to=[], use_cpu=True,
                         disable_tqdm=True)
class CustomSeq2SeqTrainer(Seq2SeqTrainer):
    """Like LLaMA-Factory's: its own __init__ (extra arguments, its own callbacks) and compute_loss."""

    def __init__(self, finetuning_args=None, processor=None, **kwargs):
        super().__init__(**kwargs)
        self.finetuning_args = finetuning_args

    def compute_loss(self, model, inputs, *args, **kwargs):
        return super().compute_loss(model, inputs, *args, **kwargs)


cls = CustomSeq2SeqTrainer if os.environ.get("SUBCLASS") else Trainer
trainer = cls(model=model, args=args, train_dataset=Data(400, 0), callbacks=[Faults()])
trainer.train()
weights_finite = all(torch.isfinite(p).all() for p in model.parameters())
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump({"global_step": trainer.state.global_step, "finite": bool(weights_finite)}, f)
