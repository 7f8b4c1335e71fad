"""`guardian doctor` and the pre-flight check at train begin: settings in, findings (setting, severity) out."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guardian.commands.doctor import Advice, Level, check_config, finetuning_type, method_of_trainer, preflight, read_config
from guardian.errors import ConfigError
from guardian.rulefile.reader import load_rules, parse_rules

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
        ({"learning_rate": 5e-5}, {}, {("learning_rate", "info")}),  # 2x below LoRA's range: a note
        ({"learning_rate": 5e-6}, {}, {("learning_rate", "warning")}),  # 20x below
        ({"learning_rate": "1e-4"}, {}, set()),  # YAML reads 1e-4 as a string
        ({"learning_rate": 1e-3}, {}, {("learning_rate", "info")}),  # 2x above
        ({"learning_rate": 3e-3}, {}, {("learning_rate", "warning")}),  # 6x above
        ({"learning_rate": 9e-2}, {}, {("learning_rate", "error")}),  # 180x above: ruinous
        ({"learning_rate": 1e-8}, {}, {("learning_rate", "warning")}),  # too low wastes the run, wrecks nothing
        ({"quantization_bit": 4, "learning_rate": 1e-4}, {}, {("learning_rate", "info")}),  # QLoRA: 2e-4–1e-3
        ({"quantization_bit": 4, "learning_rate": 3e-5}, {}, {("learning_rate", "warning")}),
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
        ({"per_device_train_batch_size": 64, "gradient_accumulation_steps": 8}, {}, {("effective batch", "warning")}),
        ({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}, {}, {("effective batch", "warning")}),
        ({"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}, {}, set()),  # Trainer's default: a note
        ({"lora_rank": 4, "lora_alpha": 8}, {}, {("lora_rank", "info")}),
        ({"lora_alpha": 16}, {}, set()),  # 1 x r: PEFT's own default (r 8, alpha 8)
        ({"lora_rank": 64, "lora_alpha": 16}, {}, set()),  # the QLoRA paper's setting
        ({"lora_rank": 64, "lora_alpha": 8}, {}, {("lora_alpha", "info")}),
        ({"lora_alpha": 128}, {}, {("lora_alpha", "info")}),  # 8 x r
        ({"lora_dropout": 0.0}, {}, set()),  # PEFT's and LLaMA-Factory's default
        ({"lora_dropout": 0.5}, {}, {("lora_dropout", "info")}),
        ({"weight_decay": 0.0}, {}, set()),  # the Trainer's default
        ({"weight_decay": 0.5}, {}, {("weight_decay", "info")}),
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
        ({"stage": "sft", "template": "llama3"}, None, "lora"),  # LLaMA-Factory's default finetuning_type
        ({"stage": "sft", "quantization_bit": 4}, None, "qlora"),
        ({"quantization_bit": 8}, None, "qlora"),
        ({"stage": "sft", "finetuning_type": "full"}, None, "full"),
        ({"use_peft": True}, None, "lora"),  # TRL's ModelConfig
        ({"use_peft": True, "load_in_4bit": True}, None, "qlora"),
        ({"learning_rate": 1e-4}, None, None),  # a plain TrainingArguments dump says nothing
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
        ("learning_rate", "info"),  # 5e-5 is a full fine-tuning rate, 2x below LoRA's range
        ("warmup_ratio / warmup_steps", "warning"),  # none
        ("effective batch", "info"),  # 1 x 8 = 8: within 2x of the typical 16-128, a note
        ("logging_nan_inf_filter", "info"),
    }


def guardian(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARDIAN, *args], capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""})


def test_cli_prints_a_table_and_exits_1_on_an_error_or_with_strict(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(LLAMA_FACTORY_YAML)
    result = guardian("doctor", str(path))
    assert result.returncode == 0, result.stderr
    assert "learning_rate" in result.stdout and "below the usual 1e-4–5e-4 for LoRA" in result.stdout
    assert "0 errors, 1 warning, 3 notes" in result.stdout
    assert guardian("doctor", str(path), "--strict").returncode == 1
    clean = tmp_path / "training_args.json"
    clean.write_text(json.dumps(CLEAN))
    result = guardian("doctor", str(clean), "--strict")
    assert result.returncode == 0, result.stdout
    assert guardian("doctor", str(clean), "--device", "cpu").returncode == 1  # an error exits 1 without --strict
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
    code = "import sys, guardian.commands.doctor; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_preflight_on_live_training_arguments_and_a_peft_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import TrainingArguments

    from guardian.testing.tinyrun import build_model

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=False, learning_rate=2e-3, warmup_steps=10,
                             eval_strategy="steps", eval_steps=50, report_to=[])
    model = build_model()  # a PeftModel with a LoRA adapter, r=8, alpha 16, dropout 0
    with caplog.at_level(logging.INFO, logger="guardian"):
        advice = preflight(args, model, load_rules(), snapshots_enabled=True)
    assert findings(advice) == {
        ("learning_rate", "warning"),  # 2e-3 is above LoRA's range: the adapter was detected
        ("effective batch", "info"), ("logging_nan_inf_filter", "info"),  # 8: Trainer's default batch, a note
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


# ---- LLaMA-Factory stages and TRL trainers (issue #16) ---------------------------------------------------

def llama_factory_yaml(method: str, train: str) -> str:
    """A LLaMA-Factory training file shaped like its examples/train_lora/*.yaml."""
    return f"""\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
{method}
do_train: true
lora_target: all

### dataset
dataset: dpo_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000

### output
output_dir: saves/llama3-8b/lora/run
logging_steps: 10
save_steps: 500
plot_loss: true
report_to: none

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
{train}
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
max_grad_norm: 1.0
logging_nan_inf_filter: false

### eval
val_size: 0.1
eval_strategy: steps
eval_steps: 500
"""


def doctor(path: Path, *args: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    """`guardian doctor --json`: exit status, {setting: severity}, the learning-rate finding (or {})."""
    result = guardian("doctor", "--json", str(path), *args)
    assert result.returncode in (0, 1), result.stderr
    advice = json.loads(result.stdout)["advice"]
    lr = next((a for a in advice if a["setting"] == "learning_rate"), {})
    return result.returncode, {a["setting"]: a["severity"] for a in advice}, lr


@pytest.mark.parametrize(
    ("method", "train", "lr_severity", "says"),
    [
        # SFT with finetuning_type omitted: LLaMA-Factory's default, lora, is what the rate is judged against
        ("stage: sft", "learning_rate: 1.0e-4", None, ""),
        ("stage: sft", "learning_rate: 1.0e-2", "warning", "above the usual 1e-4–5e-4 for LoRA (20x)"),
        ("stage: sft", "learning_rate: 9.0e-2", "error", "above the usual 1e-4–5e-4 for LoRA (180x)"),
        ("stage: sft\nfinetuning_type: full", "learning_rate: 2.0e-5", None, ""),
        # QLoRA: quantization_bit with (the default) lora; 8e-4 is QLoRA's range, 1.6x above LoRA's
        ("stage: sft\nquantization_bit: 4", "learning_rate: 8.0e-4", None, ""),
        ("stage: sft\nquantization_bit: 4", "learning_rate: 5.0e-5", "warning",
         "below the usual 2e-4–1e-3 for QLoRA (4.0x)"),
        # preference and RL stages train at far lower rates (LLaMA-Factory's own DPO/KTO LoRA examples: 5e-6)
        ("stage: dpo\nfinetuning_type: lora\npref_beta: 0.1\npref_loss: sigmoid", "learning_rate: 5.0e-6", None, ""),
        ("stage: dpo", "learning_rate: 5e-6", None, ""),
        ("stage: kto", "learning_rate: 5.0e-6", None, ""),
        ("stage: ppo", "learning_rate: 1.0e-5", None, ""),
        ("stage: dpo\npref_loss: orpo", "learning_rate: 8.0e-6", None, ""),
        ("stage: dpo\nfinetuning_type: full", "learning_rate: 5.0e-7", None, ""),
        ("stage: dpo", "learning_rate: 1.0e-3", "warning", "above the usual 5e-6–5e-5 for DPO with LoRA (20x)"),
        ("stage: dpo\nfinetuning_type: full", "learning_rate: 1.0e-3", "error",
         "above the usual 5e-7–5e-6 for DPO with full fine-tuning (200x)"),
        ("stage: dpo\npref_loss: simpo\nfinetuning_type: full", "learning_rate: 5.0e-5", "warning",
         "above the usual 5e-7–5e-6 for SimPO with full fine-tuning"),
        # reward modelling is supervised: LLaMA-Factory's reward LoRA example uses 1e-4
        ("stage: rm", "learning_rate: 1.0e-4", None, ""),
    ],
)
def test_doctor_judges_a_llama_factory_yaml_by_its_stage_and_type(
        tmp_path: Path, method: str, train: str, lr_severity: str | None, says: str) -> None:
    path = tmp_path / "llama3_lora.yaml"
    path.write_text(llama_factory_yaml(method, train))
    status, found, lr = doctor(path)
    assert found.get("learning_rate") == lr_severity, lr
    assert says in lr.get("why", "")
    # the rest of this file is healthy: only an error makes the command fail
    assert set(found) <= {"learning_rate", "effective batch"}, found
    assert status == (1 if lr_severity == "error" else 0)


def test_doctor_method_option_for_a_file_that_does_not_say(tmp_path: Path) -> None:
    path = tmp_path / "training_args.json"
    path.write_text(json.dumps({**CLEAN, "learning_rate": 5e-6}))  # a DPOConfig's dump: no stage in it
    assert doctor(path)[1]["learning_rate"] == "warning"  # 20x below LoRA's SFT range
    assert "learning_rate" not in doctor(path, "--method", "dpo")[1]


def test_an_unknown_type_is_still_judged_against_every_types_range() -> None:
    plain = {k: v for k, v in CLEAN.items() if k != "finetuning_type"}
    assert findings(check_config({**plain, "learning_rate": 2e-4}, rules=None)) >= {("learning_rate", "info")}
    assert ("learning_rate", "warning") in findings(check_config({**plain, "learning_rate": 1e-2}, rules=None))
    assert ("learning_rate", "error") in findings(check_config({**plain, "learning_rate": 9e-2}, rules=None))


def test_method_of_trainer_names_trl_and_llama_factory_trainers() -> None:
    trl = pytest.importorskip("trl")
    from transformers import Seq2SeqTrainer, Trainer, TrainingArguments

    class CustomDPOTrainer(trl.DPOTrainer):  # how LLaMA-Factory subclasses TRL's trainers
        pass

    class MyTrainer(CustomDPOTrainer):
        pass

    assert method_of_trainer(trl.DPOTrainer) == "dpo" and method_of_trainer(MyTrainer) == "dpo"
    assert [method_of_trainer(getattr(trl, name)) for name in ("KTOTrainer", "GRPOTrainer", "RLOOTrainer",
                                                                "RewardTrainer", "SFTTrainer")] == \
        ["kto", "grpo", "rloo", "rm", "sft"]
    assert method_of_trainer(trl.DPOConfig) == "dpo" and method_of_trainer(trl.GRPOConfig) == "grpo"
    for name, method in (("PPOTrainer", "ppo"), ("PPOv2Trainer", "ppo"), ("CustomPPOTrainer", "ppo"),
                         ("ORPOTrainer", "orpo"), ("CPOTrainer", "cpo"), ("OnlineDPOTrainer", "dpo"),
                         ("PairwiseTrainer", "rm"), ("CustomKTOTrainer", "kto"), ("CustomSeq2SeqTrainer", None),
                         ("Trainer", None), ("", None)):
        assert method_of_trainer(name) == method, name
    assert method_of_trainer(Trainer) is None and method_of_trainer(Seq2SeqTrainer) is None
    assert method_of_trainer(TrainingArguments) is None and method_of_trainer(None) is None


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_preflight_judges_a_dpo_run_by_its_method(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    from transformers import TrainingArguments

    from guardian.testing.tinyrun import build_model

    model = build_model()  # a PeftModel with a LoRA adapter
    options: dict[str, Any] = {"output_dir": str(tmp_path), "use_cpu": True, "learning_rate": 5e-6,
                               "warmup_steps": 10, "report_to": []}
    sft = preflight(TrainingArguments(**options), model, load_rules(), snapshots_enabled=True)
    assert ("learning_rate", "warning") in findings(sft)  # 20x below LoRA's SFT range
    dpo = preflight(TrainingArguments(**options), model, load_rules(), snapshots_enabled=True, method="dpo")
    assert "learning_rate" not in {a.setting for a in dpo}
    assert method_of_trainer(trl.DPOTrainer) == "dpo"  # what the callback passes at train begin
    from_config = preflight(trl.DPOConfig(**options), model, load_rules(), snapshots_enabled=True)
    assert "learning_rate" not in {a.setting for a in from_config}  # TRL's DPOConfig says it by itself
    too_high = preflight(trl.DPOConfig(**{**options, "learning_rate": 1e-3}), model, load_rules(),
                         snapshots_enabled=True)
    (lr,) = [a for a in too_high if a.setting == "learning_rate"]
    assert lr.severity is Level.WARNING and "above the usual 5e-6–5e-5 for DPO with LoRA (20x)" in lr.why
