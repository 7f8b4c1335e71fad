"""Pre-flight: settings that make a run fragile, found before it starts (`guardian doctor`, and at train begin).

The configuration is a dict of Hugging Face `TrainingArguments` fields (`args.to_dict()`, a saved JSON dump)
or LLaMA-Factory YAML keys. A key that is missing takes the Trainer's default (and LLaMA-Factory's own defaults
for its keys: `finetuning_type` lora, `stage` sft). The ranges are the ones the fine-tuning guides our users follow
recommend (learning rate by fine-tuning type and by method, warm-up, clipping, batch, LoRA rank/alpha/dropout,
weight decay, epochs by dataset size). Library defaults and published recipes (weight_decay 0, lora_dropout 0,
QLoRA's r 64 with alpha 16) are not findings. A learning rate is graded by how far it is out of its range.
A plain TrainingArguments JSON does not say LoRA: `guardian doctor` reads the PEFT `adapter_config.json` beside it
(`read_adapter`), or takes `--finetuning`; at train begin the live model says (a `PeftModel`, 4-bit or not).

Pure Python: no torch or transformers import, so the check runs anywhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from guardian.engine.actions import ActionKind
from guardian.engine.rules import RuleSet
from guardian.errors import ConfigError
from guardian.rulefile.reader import load_rules

log = logging.getLogger("guardian")

# The Trainer's defaults for the fields the checks read (LLaMA-Factory passes these through unchanged).
DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5, "warmup_ratio": 0.0, "warmup_steps": 0, "max_grad_norm": 1.0,
    "num_train_epochs": 3.0, "max_steps": -1, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
    "bf16": False, "fp16": False, "eval_strategy": "no", "do_eval": False, "save_strategy": "steps",
    "save_total_limit": None, "logging_nan_inf_filter": True, "load_best_model_at_end": False,
    "weight_decay": 0.0, "lr_scheduler_type": "linear", "use_cpu": False,
}
ALIASES = {"evaluation_strategy": "eval_strategy", "no_cuda": "use_cpu", "lora_rank": "lora_r"}
# Learning rates by fine-tuning type, for supervised stages (pt, sft, rm) ...
LR_RANGES = {"lora": (1e-4, 5e-4), "qlora": (2e-4, 1e-3), "full": (1e-5, 5e-5)}
# ... and for preference and RL methods, which train near the reference model at far lower rates: TRL's DPOConfig
# defaults to 1e-6 (full), LLaMA-Factory's DPO/KTO LoRA examples use 5e-6, its PPO LoRA example 1e-5.
PREFERENCE_LR_RANGES = {"lora": (5e-6, 5e-5), "qlora": (5e-6, 5e-5), "full": (5e-7, 5e-6)}
LR_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "full": "full fine-tuning"}
METHOD_NAMES = {"dpo": "DPO", "kto": "KTO", "bco": "BCO", "ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO",
                "orpo": "ORPO", "simpo": "SimPO", "cpo": "CPO", "xpo": "XPO", "nash_md": "Nash-MD"}
PREFERENCE_METHODS = frozenset(METHOD_NAMES)
# How far out of its range a learning rate may be before it is a warning, and (too high only) an error: a rate
# too low wastes the run's time, one too high wrecks the weights.
LR_NEAR_FACTOR, LR_FAR_FACTOR = 3.0, 30.0
# Keys only LLaMA-Factory's configuration has: with any of them, an omitted finetuning_type means lora.
LLAMA_FACTORY_KEYS = frozenset({"stage", "template", "lora_target", "cutoff_len", "quantization_bit", "plot_loss",
                                "val_size", "dataset_dir", "pref_loss"})
# PEFT adapter types the LoRA learning-rate range and rank/alpha checks apply to (prompt tuning, IA3 and the
# like train at other rates: they are judged as an unknown type).
LORA_LIKE = frozenset({"LORA", "ADALORA", "LOHA", "LOKR"})
FINETUNING_TYPES = ("lora", "qlora", "full")
ADAPTER_FILE = "adapter_config.json"
# Trainer and config class names (TRL's, LLaMA-Factory's subclasses of them) -> method; matched on the name's end.
_METHOD_STEMS = {"dpo": "dpo", "kto": "kto", "bco": "bco", "ppo": "ppo", "ppov2": "ppo", "grpo": "grpo",
                 "rloo": "rloo", "orpo": "orpo", "cpo": "cpo", "xpo": "xpo", "nashmd": "nash_md", "reward": "rm",
                 "pairwise": "rm", "sft": "sft"}


class Level(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


_ORDER = {Level.ERROR: 0, Level.WARNING: 1, Level.INFO: 2}


@dataclass(frozen=True)
class Advice:
    """One finding about a setting: how serious, its value, why it matters and what to change."""

    severity: Level
    setting: str
    value: Any
    why: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.severity.value}] {self.setting}={self.value!r}: {self.why}; {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity.value, "setting": self.setting, "value": self.value, "why": self.why,
                "fix": self.fix}


# ---- reading a configuration -------------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    """A TrainingArguments JSON dump or a LLaMA-Factory YAML file, as a dict; ConfigError names the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of training settings (TrainingArguments as JSON, or a "
                          f"LLaMA-Factory YAML file), got {type(data).__name__}")
    return data


def _parse(path: Path, text: str) -> Any:
    import yaml

    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


def read_adapter(path: Path) -> dict[str, Any]:
    """A PEFT `adapter_config.json` as the `peft` dict `check_config` takes: type, r, lora_alpha, lora_dropout,
    init_lora_weights, use_rslora, use_dora, and `quantized` when a hint of QLoRA is there (a LoftQ
    initialisation, or a 4/8-bit `quantization_config` in the base model's `config.json` or the bitsandbytes
    lines of PEFT's model card `README.md` beside it). ConfigError names the file and what is wrong."""
    data = read_config(path) if path.suffix.lower() == ".json" else None
    if data is None:
        raise ConfigError(f"{path}: expected a PEFT {ADAPTER_FILE}")
    kind = data.get("peft_type")
    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(f"{path}: no peft_type, so this is not a PEFT adapter config; give the {ADAPTER_FILE} "
                          "that PEFT's save_pretrained wrote, or say the type with --finetuning lora|qlora|full")
    peft: dict[str, Any] = {"type": kind.strip().upper()}
    for key in ("r", "lora_alpha", "lora_dropout", "init_lora_weights", "use_rslora", "use_dora"):
        if key in data:
            peft[key] = data[key]
    peft["quantized"] = _quantization_hint(path.parent, data)
    return peft


def _quantization_hint(folder: Path, adapter: Mapping[str, Any]) -> bool:
    init = str(adapter.get("init_lora_weights") or "").lower()
    loftq = adapter.get("loftq_config")
    if init == "loftq" or (isinstance(loftq, Mapping) and loftq.get("loftq_bits")):
        return True
    try:
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        model_config = None
    if isinstance(model_config, dict) and _quantized_config(model_config.get("quantization_config")):
        return True
    try:
        card = (folder / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "load_in_4bit: True" in card or "load_in_8bit: True" in card  # PEFT's card lists the bnb config


def _quantized_config(quantization: Any) -> bool:
    """A `quantization_config` (a dict, or transformers' object) that loads the weights in 4 or 8 bits."""
    if quantization is None:
        return False
    get = quantization.get if isinstance(quantization, Mapping) else lambda k, d=None: getattr(quantization, k, d)
    if get("load_in_4bit") or get("load_in_8bit"):
        return True
    method = str(getattr(get("quant_method"), "value", get("quant_method")) or "").lower()
    return bool(method) and method != "bitsandbytes"  # gptq, awq, ...: quantized; bnb says which bits above


def adapter_beside(config: Path) -> Path | None:
    """The PEFT adapter config in the configuration's folder, if there is one."""
    candidate = config.parent / ADAPTER_FILE
    return candidate if candidate.is_file() and candidate.resolve() != config.resolve() else None


# ---- the checks --------------------------------------------------------------------------------------


def check_config(config: Mapping[str, Any], *, rules: RuleSet | None, world_size: int = 1, device: str | None = None,
                 peft: Mapping[str, Any] | None = None, snapshots_enabled: bool = True,
                 dataset_size: int | None = None, method: str | None = None, quiet: bool = False,
                 finetuning: str | None = None) -> list[Advice]:
    """Every finding about a run's settings, most serious first.

    Args:
        config: TrainingArguments fields or LLaMA-Factory keys; missing keys take the Trainer's defaults.
        rules: the rules the run will use (None: the shipped rules).
        world_size: processes training together (GPUs), for the effective batch.
        device: "cpu" or "cuda" when known.
        peft: the adapter when the model is a PEFT model, e.g. {"type": "LORA", "r": 8, "lora_alpha": 16,
            "lora_dropout": 0.05, "quantized": False}.
        snapshots_enabled: whether Guardian keeps in-memory snapshots (its first rollback source).
        dataset_size: training samples, when known, to judge the number of epochs.
        method: the training method when known ("dpo", "kto", "ppo", "grpo", "sft", ...; see `method_of_trainer`);
            None: LLaMA-Factory's `stage` (and `pref_loss`), else supervised fine-tuning.
        finetuning: "lora", "qlora" or "full" when the user says so (`guardian doctor --finetuning`); it wins
            over what the configuration and the adapter suggest.
    """
    cfg = _Config(config)
    ruleset = rules if rules is not None else load_rules()
    kind = finetuning.strip().lower() if finetuning else finetuning_type(config, peft)
    found: list[Advice] = []
    rate = _learning_rate(cfg, kind, training_method(config, method))
    for check in (rate, _warmup(cfg), _clipping(cfg), _precision(cfg, device),
                  _evaluation(cfg, ruleset), _rollback_source(cfg, ruleset, snapshots_enabled),
                  _rotation(cfg, ruleset, snapshots_enabled), _nan_filter(cfg), _batch(cfg, world_size),
                  _lora(cfg, kind, peft), _lora_init(peft), _weight_decay(cfg), _epochs(cfg, dataset_size),
                  _scheduler(cfg, ruleset)):
        found.extend(check)
    return sorted(found, key=lambda a: _ORDER[a.severity])


class _Config:
    """Typed reads of a settings dict: aliases resolved, numbers from strings ("1e-4" in YAML), defaults filled."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = {ALIASES.get(k, k): getattr(v, "value", v) for k, v in raw.items()}  # enums -> their value

    def has(self, key: str) -> bool:
        return key in self.raw and self.raw[key] is not None

    def get(self, key: str) -> Any:
        return self.raw[key] if key in self.raw else DEFAULTS.get(key)

    def number(self, key: str) -> float | None:
        value = self.get(key)
        if isinstance(value, bool) or value is None:
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    def flag(self, key: str) -> bool:
        value = self.get(key)
        return value.strip().lower() in ("true", "1", "yes") if isinstance(value, str) else bool(value)

    def text(self, key: str) -> str:
        value = self.get(key)
        return "" if value is None else str(value).lower()


def finetuning_type(config: Mapping[str, Any], peft: Mapping[str, Any] | None) -> str | None:
    """lora, qlora, full, freeze or None (unknown), from LLaMA-Factory's keys, TRL's `use_peft`, or the live model's
    adapter. LLaMA-Factory's default is lora; `quantization_bit` 4 or 8 (TRL: load_in_4bit/8bit) with LoRA is QLoRA."""
    quantized = bool(config.get("quantization_bit") or config.get("load_in_4bit") or config.get("load_in_8bit")
                     or (peft or {}).get("quantized"))
    declared = str(config.get("finetuning_type") or "").lower()
    if not declared and (LLAMA_FACTORY_KEYS.intersection(config) or _truthy(config.get("use_peft"))):
        declared = "lora"
    if declared in ("lora", "qlora"):
        return "qlora" if quantized or declared == "qlora" else "lora"
    if declared in ("full", "freeze"):
        return declared
    if peft and str(peft.get("type") or "LORA").upper() in LORA_LIKE:
        return "qlora" if quantized else "lora"  # LoRA and its variants share the range
    return None


def _truthy(value: Any) -> bool:
    return value.strip().lower() in ("true", "1", "yes") if isinstance(value, str) else bool(value)


def training_method(config: Mapping[str, Any], method: str | None = None) -> str:
    """The method the rates are judged for: `method` if given, else LLaMA-Factory's stage (dpo with pref_loss orpo
    or simpo is that method), else sft."""
    if method:
        return method.strip().lower()
    stage = str(config.get("stage") or "sft").strip().lower()
    loss = str(config.get("pref_loss") or "").strip().lower()
    return loss if stage == "dpo" and loss in ("orpo", "simpo") else stage


def method_of_trainer(trainer: Any) -> str | None:
    """The training method of a trainer, its class, its class name, or its TRL config (DPOConfig, ...):
    "dpo", "kto", "bco", "ppo", "grpo", "rloo", "orpo", "cpo", "xpo", "nash_md", "rm", "sft", or None (a plain
    `Trainer`, or one we do not know). Subclasses count as their base (LLaMA-Factory's CustomDPOTrainer is dpo)."""
    if isinstance(trainer, str):
        names = [trainer]
    else:
        cls = trainer if isinstance(trainer, type) else type(trainer)
        names = [c.__name__ for c in getattr(cls, "__mro__", (cls,))]
    for name in names:
        lowered = name.strip().lower()
        stem = next((lowered.removesuffix(end) for end in ("trainer", "config") if lowered.endswith(end)), None)
        if not stem:
            continue
        for key in sorted(_METHOD_STEMS, key=len, reverse=True):
            if stem.endswith(key):
                return _METHOD_STEMS[key]
    return None


def _advice(level: Level, setting: str, value: Any, why: str, fix: str) -> list[Advice]:
    return [Advice(level, setting, value, why, fix)]


def _learning_rate(cfg: _Config, kind: str | None, method: str) -> list[Advice]:
    lr = cfg.number("learning_rate")
    if lr is None or lr <= 0:
        return []
    preference = method in PREFERENCE_METHODS
    ranges = PREFERENCE_LR_RANGES if preference else LR_RANGES
    prefix = f"{METHOD_NAMES[method]} with " if preference else ""
    if kind in ranges:
        low, high = ranges[kind]
        return _rate_against(lr, low, high, prefix + LR_NAMES[kind])
    # Unknown type (or freeze): only a rate outside every type's range is sure to be wrong.
    low, high = min(lo for lo, _ in ranges.values()), max(hi for _, hi in ranges.values())
    what = "freeze tuning" if kind == "freeze" else "the fine-tuning type is unknown"
    found = _rate_against(lr, low, high, f"{prefix}any fine-tuning type")
    if found:
        return found
    usual = "; ".join(f"{prefix}{LR_NAMES[k]} {_sci(lo)}–{_sci(hi)}" for k, (lo, hi) in ranges.items())
    return _advice(Level.INFO, "learning_rate", lr, f"{what}, so the rate was not checked against a range",
                   f"usual ranges: {usual}")


def _rate_against(lr: float, low: float, high: float, name: str) -> list[Advice]:
    """Nothing inside low–high; a note within LR_NEAR_FACTOR of it; a warning beyond; above it, an error beyond
    LR_FAR_FACTOR."""
    span = f"{_sci(low)}–{_sci(high)}"
    if lr < low:
        factor = low / lr
        level = Level.INFO if factor <= LR_NEAR_FACTOR else Level.WARNING
        return _advice(level, "learning_rate", lr, f"below the usual {span} for {name} ({_times(factor)}): the run "
                       "learns slowly and may look like a plateau", f"raise it to {span}")
    if lr > high:
        factor = lr / high
        level = (Level.INFO if factor <= LR_NEAR_FACTOR else Level.WARNING if factor <= LR_FAR_FACTOR
                 else Level.ERROR)
        return _advice(level, "learning_rate", lr, f"above the usual {span} for {name} ({_times(factor)}): spikes, "
                       "gradient explosions and NaN are likelier", f"lower it to {span}")
    return []


def _times(factor: float) -> str:
    """4.2x, 180x."""
    return f"{factor:.1f}x" if factor < 10 else f"{factor:.0f}x"


def _sci(value: float) -> str:
    """1e-4, 5e-5: how learning rates are written."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _warmup_ratio(cfg: _Config) -> float:
    """warmup_ratio, or warmup_steps below 1 (recent transformers read a fraction there as a ratio)."""
    steps = cfg.number("warmup_steps") or 0.0
    return steps if 0 < steps < 1 else cfg.number("warmup_ratio") or 0.0


def _warmup(cfg: _Config) -> list[Advice]:
    steps, ratio = cfg.number("warmup_steps") or 0.0, _warmup_ratio(cfg)
    if steps >= 1:
        return []  # warmup_steps wins over the ratio
    if ratio <= 0:
        return _advice(Level.WARNING, "warmup_ratio / warmup_steps", 0,
                       "no warm-up: the first updates use the full rate on fresh Adam moments, a common cause of "
                       "early spikes", "set warmup_ratio 0.03–0.1 (0.2 if the run was unstable)")
    if ratio < 0.03 or ratio > 0.1:
        note = "; up to 0.2 is reasonable for a run that was unstable" if ratio <= 0.2 else ""
        return _advice(Level.INFO, "warmup_ratio", ratio, f"outside the usual 0.03–0.1{note}",
                       "use warmup_ratio 0.03–0.1")
    return []


def _clipping(cfg: _Config) -> list[Advice]:
    value = cfg.get("max_grad_norm")
    norm = cfg.number("max_grad_norm")
    if value is None or not norm:
        return _advice(Level.WARNING, "max_grad_norm", value, "gradient clipping is off: one bad batch can "
                       "take a step large enough to wreck the weights", "set max_grad_norm 0.5–1.0")
    if not 0.5 <= norm <= 1.0:
        return _advice(Level.INFO, "max_grad_norm", norm, "outside the usual 0.5–1.0", "set max_grad_norm 0.5–1.0")
    return []


def _precision(cfg: _Config, device: str | None) -> list[Advice]:
    mixed = [key for key in ("bf16", "fp16") if cfg.flag(key)]
    on_cpu = device == "cpu" or cfg.flag("use_cpu")
    if mixed and on_cpu:
        why = ("fp16 mixed precision does not work on the CPU" if mixed[0] == "fp16" else
               "bf16 on the CPU is slow and behaves unlike the GPU run it stands in for")
        return _advice(Level.ERROR, mixed[0], True, why, f"set {mixed[0]}: false for a CPU run")
    if "fp16" in mixed:
        return _advice(Level.INFO, "fp16", True, "fp16 overflows far more easily than bf16 (a common source of "
                       "NaN losses)", "on Ampere or newer GPUs use bf16 instead")
    return []


def _evaluating(cfg: _Config) -> bool:
    val_size = cfg.number("val_size") or 0.0
    return cfg.text("eval_strategy") not in ("no", "") or val_size > 0 or cfg.flag("do_eval")


def _rules_with(ruleset: RuleSet, *, detector: str | None = None, action: ActionKind | None = None) -> list[str]:
    names = []
    for rule in ruleset.rules:
        actions = [*rule.actions, *(a for e in rule.escalation for a in e.actions)]
        if (detector is None or rule.detector == detector) and (action is None or any(a.kind is action for a in actions)):
            names.append(rule.name)
    return names


def _evaluation(cfg: _Config, ruleset: RuleSet) -> list[Advice]:
    rules = _rules_with(ruleset, detector="overfitting")
    if not rules or _evaluating(cfg):
        return []
    return _advice(Level.WARNING, "eval_strategy", cfg.get("eval_strategy"),
                   f"no evaluation is configured, so the overfitting rule {', '.join(rules)} can never fire",
                   "set eval_strategy: steps with eval_steps (and val_size in LLaMA-Factory)")


def _rollback_source(cfg: _Config, ruleset: RuleSet, snapshots_enabled: bool) -> list[Advice]:
    rules = _rules_with(ruleset, action=ActionKind.ROLLBACK)
    if not rules or snapshots_enabled or cfg.text("save_strategy") != "no":
        return []
    return _advice(Level.WARNING, "save_strategy", "no", f"rules roll back ({', '.join(rules)}) but there are no "
                   "checkpoints and Guardian's snapshots are off: a rollback has nothing to go back to",
                   "save checkpoints (save_strategy: steps) or enable snapshots (snapshot_every_steps > 0)")


def _rotation(cfg: _Config, ruleset: RuleSet, snapshots_enabled: bool) -> list[Advice]:
    limit = cfg.number("save_total_limit")
    if limit is None or limit > 2 or cfg.flag("load_best_model_at_end") or cfg.text("save_strategy") == "no":
        return []
    why = f"save_total_limit {limit:g} rotates away older checkpoints, possibly the last good one before a failure"
    if not snapshots_enabled and _rules_with(ruleset, action=ActionKind.ROLLBACK):
        return _advice(Level.WARNING, "save_total_limit", int(limit), why + "; checkpoints are the only rollback "
                       "source here", "raise save_total_limit to 3 or more; Guardian also keeps good checkpoints in "
                       "output_dir/guardian/good")
    return _advice(Level.INFO, "save_total_limit", int(limit), why, "Guardian hard-links good checkpoints into "
                   "output_dir/guardian/good, so rotation cannot delete the last good one")


def _nan_filter(cfg: _Config) -> list[Advice]:
    if not cfg.flag("logging_nan_inf_filter"):
        return []
    return _advice(Level.INFO, "logging_nan_inf_filter", True, "the logged loss hides NaN/inf steps: Guardian "
                   "reads the per-step loss (and writes its decisions to your report_to as guardian/*), but the loss "
                   "curve in your dashboards will not show those steps",
                   "set logging_nan_inf_filter: false to see them in TensorBoard/W&B too")


def _batch(cfg: _Config, world_size: int) -> list[Advice]:
    per_device = int(cfg.number("per_device_train_batch_size") or 1)
    accumulation = int(cfg.number("gradient_accumulation_steps") or 1)
    effective = per_device * accumulation * world_size
    value = f"{per_device} x {accumulation} x {world_size} = {effective}"
    if 16 <= effective <= 128:
        return _advice(Level.INFO, "effective batch", value, "per_device_train_batch_size x "
                       "gradient_accumulation_steps x processes; within the typical 16–128", "—")
    side = "small: noisy gradients and oscillating loss" if effective < 16 else "large: fewer updates per epoch"
    fix = "raise gradient_accumulation_steps" if effective < 16 else "lower gradient_accumulation_steps or the batch"
    # Graded like the rate: within 2x of the range (Trainer's default 8 on one GPU, many LoRA recipes) is a note.
    level = Level.INFO if 8 <= effective <= 256 else Level.WARNING
    return _advice(level, "effective batch", value, f"{side} (typical 16–128)", fix)


def _lora(cfg: _Config, kind: str | None, peft: Mapping[str, Any] | None) -> list[Advice]:
    if kind not in ("lora", "qlora"):
        return []
    peft = peft or {}
    rank = _first_number(peft.get("r"), cfg.number("lora_r"), 8.0)
    alpha = _first_number(peft.get("lora_alpha"), cfg.number("lora_alpha"), 2 * rank)
    dropout = _first_number(peft.get("lora_dropout"), cfg.number("lora_dropout"), 0.0)
    found: list[Advice] = []
    if not 8 <= rank <= 64:
        found += _advice(Level.INFO, "lora_rank", rank, "outside the usual r 8–64", "use a rank of 8–64")
    # alpha from r/4 (QLoRA's r 64, alpha 16) through r (PEFT's default) and 2r (LLaMA-Factory's) to 4r; with
    # rsLoRA the scale is alpha / sqrt(r), so the ratio to r says nothing
    if not rank / 4 <= alpha <= 4 * rank and not _truthy(peft.get("use_rslora")):
        found += _advice(Level.INFO, "lora_alpha", alpha, f"outside 0.25–4 x the rank ({rank / 4:g}–{4 * rank:g}): "
                         "the adapter's effective step size changes with alpha / r", f"set lora_alpha to {2 * rank:g}")
    if dropout > 0.2:  # 0 is PEFT's and LLaMA-Factory's default
        found += _advice(Level.INFO, "lora_dropout", dropout, "above the usual 0–0.1 (0.2 against overfitting)",
                         "set lora_dropout 0.05–0.1")
    return found


def _lora_init(peft: Mapping[str, Any] | None) -> list[Advice]:
    """`init_lora_weights: false` starts B random: a new adapter changes the model before the first step. A note,
    not a warning: the same flag is harmless (and set on purpose, it loads faster) on an adapter whose trained
    weights are loaded."""
    init = (peft or {}).get("init_lora_weights", True)
    if init is False or (isinstance(init, str) and init.strip().lower() == "false"):
        return _advice(Level.INFO, "init_lora_weights", False, "a new adapter starts from random weights, so the "
                       "model's output is changed before the first step (PEFT meant it for tests); harmless when "
                       "the adapter's trained weights are loaded", "for a new adapter remove init_lora_weights "
                       "(PEFT's default, true, starts the adapter as a no-op)")
    return []


def _first_number(*values: Any) -> float:
    for value in values:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def _weight_decay(cfg: _Config) -> list[Advice]:
    decay = cfg.number("weight_decay") or 0.0
    if decay <= 0.1:  # 0 is the Trainer's default
        return []
    return _advice(Level.INFO, "weight_decay", decay, "above the usual 0–0.1: strong decay pulls fine-tuned weights "
                   "back towards zero", "use 0 (the Trainer's default) to 0.1 (against overfitting)")


def _epochs(cfg: _Config, dataset_size: int | None) -> list[Advice]:
    epochs = cfg.number("num_train_epochs")
    if dataset_size is None or epochs is None or (cfg.number("max_steps") or -1) > 0:
        return []
    low, high = (1, 2) if dataset_size > 100_000 else (2, 3) if dataset_size >= 10_000 else (3, 5)
    if low <= epochs <= high:
        return []
    return _advice(Level.INFO, "num_train_epochs", epochs, f"{dataset_size} samples usually need {low}–{high} "
                   "epochs; more overfit, fewer underfit", f"train {low}–{high} epochs, with early stopping")


def _scheduler(cfg: _Config, ruleset: RuleSet) -> list[Advice]:
    rules = [r.name for r in ruleset.rules if r.detector == "jump" and "learning_rate" in r.watches]
    if cfg.text("lr_scheduler_type") != "cosine_with_restarts" or not rules:
        return []
    return _advice(Level.WARNING, "lr_scheduler_type", "cosine_with_restarts", f"every restart jumps the rate "
                   f"back up, which {', '.join(rules)} reads as a blow-up and skips", "disable that rule for this run, "
                   "or use cosine / linear")


# ---- in the training process --------------------------------------------------------------------------


def preflight(args: Any, model: Any, rules: RuleSet | None, *, strict: bool = False, snapshots_enabled: bool,
              dataset_size: int | None = None, method: str | None = None, quiet: bool = False) -> list[Advice]:
    """Check a live `TrainingArguments` and model; log every finding; with `strict`, refuse a risky run.

    `method`: the training method (`method_of_trainer(trainer)`); None: read from the arguments' class (TRL's
    DPOConfig, GRPOConfig, ...), else supervised fine-tuning. `quiet` (a supervised restart): one summary line
    instead of every finding, which the first start showed. Raises ConfigError (strict only) when there is any
    warning or error."""
    method = method or method_of_trainer(args)
    config = dict(args.to_dict()) if hasattr(args, "to_dict") else dict(vars(args))
    peft = peft_info(model)
    if peft is None and model is not None and not config.get("finetuning_type"):
        config["finetuning_type"] = "full" if _trainable_fraction(model) > 0.5 else "freeze"
    if peft is None and _quantized(model):
        config["quantization_bit"] = config.get("quantization_bit") or 4
    device = "cpu" if config.get("use_cpu") else _device_type(args)
    advice = check_config(config, rules=rules, world_size=int(getattr(args, "world_size", 1) or 1), device=device,
                          peft=peft, snapshots_enabled=snapshots_enabled, dataset_size=dataset_size, method=method)
    if quiet and advice:  # a supervised restart: the findings were shown at the first start
        log.info("Guardian pre-flight: %d findings, shown at the run's first start", len(advice))
    for item in advice if not quiet else []:
        (log.info if item.severity is Level.INFO else log.warning)("Guardian pre-flight: %s", item)
    serious = [a for a in advice if a.severity is not Level.INFO]
    if strict and serious:
        raise ConfigError("Guardian pre-flight found risky settings (strict mode):\n" + "\n".join(map(str, serious)))
    return advice


def _device_type(args: Any) -> str | None:
    try:
        return str(args.device.type)
    except Exception:
        return None


def peft_info(model: Any) -> dict[str, Any] | None:
    """The active adapter of a PEFT model as a plain dict, or None for a model without one."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(active, str) and active in configs else next(iter(configs.values()))
    kind = getattr(config, "peft_type", "LORA")
    return {"type": str(getattr(kind, "value", kind)), "r": getattr(config, "r", None),
            "lora_alpha": getattr(config, "lora_alpha", None), "lora_dropout": getattr(config, "lora_dropout", None),
            "init_lora_weights": getattr(config, "init_lora_weights", True),
            "use_rslora": getattr(config, "use_rslora", False), "quantized": _quantized(model)}


def _quantized(model: Any) -> bool:
    """Loaded in 4 or 8 bits: the flags transformers and PEFT set, or the model config's `quantization_config`."""
    if any(bool(getattr(model, name, False)) for name in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit")):
        return True
    return _quantized_config(getattr(getattr(model, "config", None), "quantization_config", None))


def _trainable_fraction(model: Any) -> float:
    try:
        sizes = [(p.numel(), p.requires_grad) for p in model.parameters()]
    except (AttributeError, TypeError):
        return 1.0
    total = sum(n for n, _ in sizes)
    return sum(n for n, trainable in sizes if trainable) / total if total else 1.0


# ---- showing it ---------------------------------------------------------------------------------------


def render_advice(advice: list[Advice], console: Any, *, title: str = "") -> None:
    """A rich table, most serious first, and a one-line count."""
    from rich.markup import escape
    from rich.table import Table

    colours = {Level.ERROR: "red", Level.WARNING: "yellow", Level.INFO: "cyan"}
    table = Table(title=f"Pre-flight check: {title}" if title else "Pre-flight check", title_justify="left",
                  show_lines=True)
    for column, ratio in (("severity", 1), ("setting", 2), ("value", 2), ("why it matters", 5), ("what to change", 4)):
        table.add_column(column, ratio=ratio, overflow="fold")
    for item in advice:
        table.add_row(f"[{colours[item.severity]}]{item.severity.value}[/]", escape(item.setting), _show(item.value),
                      escape(item.why), escape(item.fix))
    console.print(table)
    counts = {level: sum(a.severity is level for a in advice) for level in Level}
    console.print(", ".join(f"{counts[level]} {name}{'' if counts[level] == 1 else 's'}" for level, name in
                            ((Level.ERROR, "error"), (Level.WARNING, "warning"), (Level.INFO, "note"))), highlight=False)


def _show(value: Any) -> str:
    from rich.markup import escape

    return escape(f"{value:g}" if isinstance(value, float) else str(value))
