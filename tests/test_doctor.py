"""`guardian doctor` and the pre-flight check at train begin: settings in, findings (setting, severity) out."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guardian.doctor import Advice, Level, check_config, finetuning_type, preflight, read_config
from guardian.errors import ConfigError
from guardian.ruleset import load_rules, parse_rules

GUARDIAN = [sys.executable, "-m", "guardian.cli"]

# Every setting inside its usual range: only the effective batch is reported (as a note).
CLEAN: dict[str, Any] = {
    "finetuning_type": "lora", "learning_rate": 2e-4, "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05,
    "warmup_ratio": 0.05, "max_grad_norm": 1.0, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 8,
    "eval_strategy": "steps", "eval_steps": 100, "save_steps": 100, "weight_decay": 0.01,
    "logging_nan_inf_filter": False, "bf16": True, "num_train_epochs": 3,
}
BATCH_NOTE = ("effective batch", "info")

NO_ROLLBACK_NO_OVERFITTING = parse_rules("""
version: 1
rules:
  - name: nan
    metric: loss
    detector: {kind: non_finite}
    actions: [skip_update]
""", "quiet.yaml")


def findings(advice: list[Advice]) -> set[tuple[str, str]]:
    return {(a.setting, a.severity.value) for a in advice}


@pytest.mark.parametrize(
    ("changes", "options", "expected"),
    [
        ({}, {}, set()),
        ({"learning_rate": 5e-5}, {}, {("learning_rate", "warning")}),  # too low for LoRA
        ({"learning_rate": "1e-4"}, {}, set()),  # YAML reads 1e-4 as a string
        ({"learning_rate": 2e-3}, {}, {("learning_rate", "warning")}),
        ({"quantization_bit": 4, "learning_rate": 1e-4}, {}, {("learning_rate", "warning")}),  # QLoRA: 2e-4–1e-3
        ({"quantization_bit": 4, "learning_rate": 5e-4}, {}, set()),
        ({"finetuning_type": "full", "learning_rate": 2e-5}, {}, set()),  # and no LoRA checks
        ({"finetuning_type": "full", "learning_rate": 2e-4}, {}, {("learning_rate", "warning")}),
        ({"finetuning_type": "freeze"}, {}, {("learning_rate", "info")}),
        ({"warmup_ratio": 0}, {}, {("warmup_ratio / warmup_steps", "warning")}),
        ({"warmup_ratio": 0, "warmup_steps": 100}, {}, set()),
        ({"warmup_ratio": 0, "warmup_steps": 0.05}, {}, set()),  # a fraction in warmup_steps is a ratio
        ({"warmup_ratio": 0.3}, {}, {("warmup_ratio", "info")}),
        ({"max_grad_norm": 0}, {}, {("max_grad_norm", "warning")}),
        ({"max_grad_norm": None}, {}, {("max_grad_norm", "warning")}),
        ({"max_grad_norm": 5.0}, {}, {("max_grad_norm", "info")}),
        ({}, {"device": "cpu"}, {("bf16", "error")}),
        ({"bf16": False, "fp16": True, "use_cpu": True}, {}, {("fp16", "error")}),
        ({"bf16": False, "fp16": True, "no_cuda": True}, {}, {("fp16", "error")}),
        ({"bf16": False, "fp16": True}, {"device": "cuda"}, {("fp16", "info")}),
        ({"eval_strategy": "no"}, {}, {("eval_strategy", "warning")}),
        ({"eval_strategy": "no", "val_size": 0.1}, {}, set()),
        ({"eval_strategy": None, "evaluation_strategy": "no"}, {}, {("eval_strategy", "warning")}),
        ({"eval_strategy": "no"}, {"rules": NO_ROLLBACK_NO_OVERFITTING}, set()),
        ({"save_strategy": "no"}, {"snapshots_enabled": False}, {("save_strategy", "warning")}),
        ({"save_strategy": "no"}, {}, set()),
        ({"save_strategy": "no"}, {"snapshots_enabled": False, "rules": NO_ROLLBACK_NO_OVERFITTING}, set()),
        ({"save_total_limit": 1}, {}, {("save_total_limit", "info")}),
        ({"save_total_limit": 1}, {"snapshots_enabled": False}, {("save_total_limit", "warning")}),
        ({"save_total_limit": 1, "load_best_model_at_end": True}, {}, set()),
        ({"save_total_limit": 5}, {}, set()),
        ({"logging_nan_inf_filter": True}, {}, {("logging_nan_inf_filter", "info")}),
        ({"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1}, {}, {("effective batch", "warning")}),
        ({"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}, {"world_size": 4}, set()),
        ({"per_device_train_batch_size": 64, "gradient_accumulation_steps": 4}, {}, {("effective batch", "warning")}),
        ({"lora_rank": 4, "lora_alpha": 8}, {}, {("lora_rank", "info")}),
        ({"lora_alpha": 16}, {}, {("lora_alpha", "info")}),  # 1 x r
        ({"lora_dropout": 0.0}, {}, {("lora_dropout", "info")}),
        ({"weight_decay": 0.0}, {}, {("weight_decay", "info")}),
        ({"num_train_epochs": 1}, {"dataset_size": 5000}, {("num_train_epochs", "info")}),
        ({"num_train_epochs": 1}, {}, set()),  # dataset size unknown: not judged
        ({"lr_scheduler_type": "cosine_with_restarts"}, {}, {("lr_scheduler_type", "warning")}),
    ],
)
def test_config_findings(changes: dict[str, Any], options: dict[str, Any], expected: set[tuple[str, str]]) -> None:
    options = {"rules": load_rules(), **options}
    config = {k: v for k, v in {**CLEAN, **changes}.items() if v is not None or k == "max_grad_norm"}
    assert findings(check_config(config, **options)) == expected | {BATCH_NOTE} - _batch_replaced(expected)


def _batch_replaced(expected: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {BATCH_NOTE} if ("effective batch", "warning") in expected else set()


def test_findings_say_why_and_what_to_change_most_serious_first() -> None:
    advice = check_config({**CLEAN, "learning_rate": 5e-5, "weight_decay": 0, "bf16": True}, rules=None, device="cpu")
    assert [a.severity for a in advice] == sorted((a.severity for a in advice), key=["error", "warning", "info"].index)
    lr = next(a for a in advice if a.setting == "learning_rate")
    assert lr.value == 5e-5 and "below the usual 1e-4–5e-4 for LoRA" in lr.why and lr.fix == "raise it to 1e-4–5e-4"
    batch = next(a for a in advice if a.setting == "effective batch")
    assert batch.value == "4 x 8 x 1 = 32"


@pytest.mark.parametrize(
    ("config", "peft", "expected"),
    [
        ({"finetuning_type": "lora"}, None, "lora"),
        ({"finetuning_type": "lora", "quantization_bit": 4}, None, "qlora"),
        ({"finetuning_type": "qlora"}, None, "qlora"),
        ({"finetuning_type": "full"}, None, "full"),
        ({}, {"type": "LORA"}, "lora"),
        ({}, {"type": "LORA", "quantized": True}, "qlora"),
        ({}, None, None),
    ],
)
def test_finetuning_type(config: dict[str, Any], peft: dict[str, Any] | None, expected: str | None) -> None:
    assert finetuning_type(config, peft) == expected


LLAMA_FACTORY_YAML = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct

### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all

### dataset
dataset: alpaca_zh_demo
template: llama3
cutoff_len: 1024

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 5
save_steps: 100
plot_loss: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
bf16: true

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 100
"""


def test_a_typical_llama_factory_yaml(tmp_path: Path) -> None:
    path = tmp_path / "llama3_lora_sft.yaml"
    path.write_text(LLAMA_FACTORY_YAML)
    advice = check_config(read_config(path), rules=load_rules())
    assert findings(advice) == {
        ("learning_rate", "warning"),  # 5e-5 is a full fine-tuning rate, too low for LoRA
        ("warmup_ratio / warmup_steps", "warning"),  # none
        ("effective batch", "warning"),  # 1 x 8 = 8
        ("logging_nan_inf_filter", "info"), ("lora_dropout", "info"), ("weight_decay", "info"),  # defaults
    }


def guardian(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARDIAN, *args], capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""})


def test_cli_prints_a_table_and_exits_1_with_strict_only(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(LLAMA_FACTORY_YAML)
    result = guardian("doctor", str(path))
    assert result.returncode == 0, result.stderr
    assert "learning_rate" in result.stdout and "below the usual 1e-4–5e-4 for LoRA" in result.stdout
    assert "0 errors, 3 warnings, 3 notes" in result.stdout
    assert guardian("doctor", str(path), "--strict").returncode == 1
    clean = tmp_path / "training_args.json"
    clean.write_text(json.dumps(CLEAN))
    result = guardian("doctor", str(clean), "--strict")
    assert result.returncode == 0, result.stdout
    assert guardian("doctor", str(clean), "--device", "cpu").returncode == 0  # an error, but not --strict
    assert guardian("doctor", str(clean), "--device", "cpu", "--strict").returncode == 1


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "learning_rate: [1e-4\n", "bad.yaml:2: not valid YAML"),
        ("bad.json", '{"learning_rate": }', "bad.json:1: not valid JSON"),
        ("list.yaml", "- learning_rate\n", "list.yaml: expected a mapping of training settings"),
        ("missing.yaml", None, "missing.yaml: cannot read the file"),
    ],
)
def test_cli_names_the_file_it_cannot_use(tmp_path: Path, name: str, text: str | None, message: str) -> None:
    if text is not None:
        (tmp_path / name).write_text(text)
    result = guardian("doctor", str(tmp_path / name))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_the_module_does_not_import_torch() -> None:
    code = "import sys, guardian.doctor; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_preflight_on_live_training_arguments_and_a_peft_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import TrainingArguments

    from guardian.tinyrun import build_model

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=False, learning_rate=2e-3, warmup_steps=10,
                             eval_strategy="steps", eval_steps=50, report_to=[])
    model = build_model()  # a PeftModel with a LoRA adapter, r=8, alpha 16, dropout 0
    with caplog.at_level(logging.INFO, logger="guardian"):
        advice = preflight(args, model, load_rules(), snapshots_enabled=True)
    assert findings(advice) == {
        ("learning_rate", "warning"),  # 2e-3 is above LoRA's range: the adapter was detected
        ("effective batch", "warning"), ("logging_nan_inf_filter", "info"), ("lora_dropout", "info"),
        ("weight_decay", "info"),
    }
    assert "Guardian pre-flight: [warning] learning_rate=0.002: above the usual 1e-4–5e-4 for LoRA" in caplog.text
    with pytest.raises(ConfigError, match=r"(?s)strict mode.*learning_rate=0.002"):
        preflight(args, model, load_rules(), strict=True, snapshots_enabled=True)


def test_preflight_on_a_full_model_on_the_cpu_with_bf16() -> None:
    import torch

    class Args:
        world_size = 2
        device = torch.device("cpu")

        def to_dict(self) -> dict[str, Any]:
            return {**CLEAN, "finetuning_type": None, "learning_rate": 2e-5, "bf16": True}

    advice = preflight(Args(), torch.nn.Linear(4, 4), None, snapshots_enabled=True)
    assert findings(advice) == {("bf16", "error"), ("effective batch", "info")}
    assert next(a for a in advice if a.setting == "effective batch").value == "4 x 8 x 2 = 64"
    assert Level.ERROR == "error"
