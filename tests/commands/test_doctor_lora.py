"""`guardian doctor` knows LoRA on a plain TrainingArguments JSON (the PEFT adapter_config.json beside it, or
--finetuning), and the pre-flight at train begin knows a PEFT model and a 4-bit base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guardian.commands.doctor import check_config, preflight
from guardian.rulefile.reader import load_rules

GUARDIAN = [sys.executable, "-m", "guardian.cli"]
WIDE = {**os.environ, "COLUMNS": "300"}  # error lines unwrapped
# A plain TrainingArguments dump, every other setting in range: LR 1e-3 is 2x LoRA's top (a note), inside QLoRA's.
ARGS = {"output_dir": "out", "learning_rate": 1e-3, "warmup_ratio": 0.05, "max_grad_norm": 1.0,
        "eval_strategy": "steps", "eval_steps": 50, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
        "weight_decay": 0.0, "logging_nan_inf_filter": False}
# What PEFT's save_pretrained writes for QLoRA's published recipe (r 64, alpha 16, dropout 0.1).
QLORA_PAPER_ADAPTER = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 64, "lora_alpha": 16, "lora_dropout": 0.1,
                       "init_lora_weights": True, "use_rslora": False, "use_dora": False, "bias": "none",
                       "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "base_model_name_or_path": "m"}


def doctor(folder: Path, *extra: str, adapter: dict[str, Any] | None = None, **files: str) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_args.json").write_text(json.dumps(ARGS))
    if adapter is not None:
        (folder / "adapter_config.json").write_text(json.dumps(adapter))
    for name, text in files.items():
        (folder / name.replace("_", ".")).write_text(text)
    result = subprocess.run([*GUARDIAN, "doctor", str(folder / "training_args.json"), "--json", *extra],
                            capture_output=True, text=True, env=WIDE)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def learning_rate_why(report: dict[str, Any]) -> str:
    [advice] = [a for a in report["advice"] if a["setting"] == "learning_rate"]
    return str(advice["why"])


def test_the_adapter_config_beside_a_plain_json_says_lora(tmp_path: Path) -> None:
    without = doctor(tmp_path / "plain")
    assert "fine-tuning type is unknown" in learning_rate_why(without)
    report = doctor(tmp_path / "lora", adapter=QLORA_PAPER_ADAPTER)
    assert report["finetuning"] == "lora" and report["adapter"].endswith("adapter_config.json")
    assert "above the usual 1e-4–5e-4 for LoRA (2.0x)" in learning_rate_why(report)
    # r 64 with alpha 16 (the QLoRA paper), dropout 0.1, weight_decay 0 (the Trainer's default): not findings.
    assert {a["setting"] for a in report["advice"]} == {"learning_rate", "effective batch"}


@pytest.mark.parametrize(("files", "adapter"), [
    ({"config_json": json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}})}, QLORA_PAPER_ADAPTER),
    ({"README_md": "## Training procedure\n\nThe following `bitsandbytes` quantization config was used during "
                   "training:\n- quant_method: bitsandbytes\n- load_in_8bit: False\n- load_in_4bit: True\n"},
     QLORA_PAPER_ADAPTER),
    ({}, {**QLORA_PAPER_ADAPTER, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}),
])
def test_a_quantized_base_beside_the_adapter_says_qlora(tmp_path: Path, files: dict[str, str],
                                                        adapter: dict[str, Any]) -> None:
    report = doctor(tmp_path, adapter=adapter, **files)
    assert report["finetuning"] == "qlora"
    assert "learning_rate" not in {a["setting"] for a in report["advice"]}  # 1e-3 is inside QLoRA's 2e-4–1e-3


def test_finetuning_option_says_the_type_and_wins_over_the_adapter(tmp_path: Path) -> None:
    assert "for LoRA (2.0x)" in learning_rate_why(doctor(tmp_path / "lora", "--finetuning", "lora"))
    full = doctor(tmp_path / "full", "--finetuning", "full", adapter=QLORA_PAPER_ADAPTER)
    assert full["finetuning"] == "full" and "for full fine-tuning (20x)" in learning_rate_why(full)
    qlora = doctor(tmp_path / "qlora", "--finetuning", "QLoRA")
    assert qlora["finetuning"] == "qlora" and "learning_rate" not in {a["setting"] for a in qlora["advice"]}
    result = subprocess.run([*GUARDIAN, "doctor", str(tmp_path / "lora" / "training_args.json"), "--finetuning",
                             "adapter"], capture_output=True, text=True, env=WIDE)
    assert result.returncode == 2 and "--finetuning: invalid choice: 'adapter'" in result.stderr


def test_an_adapter_that_starts_random_is_a_note(tmp_path: Path) -> None:
    """A note, not a warning: scripts set it on purpose on trained adapters, whose weights are loaded."""
    report = doctor(tmp_path, adapter={**QLORA_PAPER_ADAPTER, "init_lora_weights": False})
    [advice] = [a for a in report["advice"] if a["setting"] == "init_lora_weights"]
    assert advice["severity"] == "info" and "remove init_lora_weights" in advice["fix"]
    from guardian.commands.doctor import read_adapter

    for init in (True, "gaussian", "pissa", "olora"):
        found = check_config(ARGS, rules=None, peft=read_adapter(_adapter(tmp_path / str(init), init_lora_weights=init)))
        assert "init_lora_weights" not in {a.setting for a in found}


def test_rslora_alpha_is_not_judged_by_its_ratio_to_r_and_prompt_tuning_is_not_lora(tmp_path: Path) -> None:
    from guardian.commands.doctor import read_adapter

    rank_scaled = read_adapter(_adapter(tmp_path / "rs", r=256, lora_alpha=16, use_rslora=True))
    assert "lora_alpha" not in {a.setting for a in check_config(ARGS, rules=None, peft=rank_scaled)}
    plain = read_adapter(_adapter(tmp_path / "plain", r=256, lora_alpha=16))
    assert "lora_alpha" in {a.setting for a in check_config(ARGS, rules=None, peft=plain)}
    # Prompt tuning trains at rates far above LoRA's: it is not judged against LoRA's range.
    prompt = read_adapter(_adapter(tmp_path / "prompt", peft_type="PROMPT_TUNING", num_virtual_tokens=20))
    assert not any("for LoRA" in a.why for a in check_config({**ARGS, "learning_rate": 3e-2}, rules=None, peft=prompt))


@pytest.mark.parametrize(("text", "message"), [
    ('{"r": 8}', "adapter_config.json: no peft_type, so this is not a PEFT adapter config"),
    ('{"peft_type": "LORA", ', "adapter_config.json:1: not valid JSON"),
])
def test_a_broken_adapter_config_is_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "training_args.json").write_text(json.dumps(ARGS))
    (tmp_path / "adapter_config.json").write_text(text)
    result = subprocess.run([*GUARDIAN, "doctor", str(tmp_path / "training_args.json")], capture_output=True, text=True,
                            env=WIDE)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_preflight_knows_a_peft_model_on_a_4bit_base(tmp_path: Path) -> None:
    """A 4-bit model carries `quantization_config` in its config (bitsandbytes cannot load one on this CPU, so the
    tiny model is given the config a `load_in_4bit` load writes there)."""
    from transformers import TrainingArguments

    from guardian.testing.tinyrun import build_model

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=8e-4, warmup_steps=10,
                             eval_strategy="steps", eval_steps=50, report_to=[])
    model = build_model()
    lora = {a.setting: a.why for a in preflight(args, model, load_rules(), snapshots_enabled=True)}
    assert "for LoRA" in lora["learning_rate"]
    model.base_model.model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                         "bnb_4bit_quant_type": "nf4"}
    advice = {a.setting: a.why for a in preflight(args, model, load_rules(), snapshots_enabled=True)}
    assert "learning_rate" not in advice  # 8e-4 is inside QLoRA's range


def _adapter(folder: Path, **fields: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**QLORA_PAPER_ADAPTER, **fields}))
    return path
