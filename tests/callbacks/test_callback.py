"""GuardianCallback on a real transformers.Trainer with a real PEFT LoRA adapter, with injected faults."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from trainkit import Recorder, all_finite, assert_same_state, rules, run_events, train_metrics

from guardian.callbacks import GuardianCallback
from guardian.callbacks.faults import Fault, FaultInjector
from guardian.events import DecisionEvent, MetricsEvent
from guardian.testing.tinyrun import TinyRun, build_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

ROLLBACK_ON_NAN = """
version: 1
rules:
  - name: nan
    metrics: [loss, grad_norm]
    detector: {kind: non_finite}
    severity: critical
    actions: [rollback]
"""


def run(tmp_path: Path, callbacks: list, **settings) -> object:  # type: ignore[type-arg]
    settings.setdefault("max_steps", 60)
    settings.setdefault("eval_steps", 0)
    trainer = TinyRun(str(tmp_path), **settings).trainer(callbacks)
    trainer.train()
    return trainer


def test_nan_kills_the_unguarded_run(tmp_path: Path) -> None:
    """The fault is real: without Guardian one NaN step poisons the weights for good."""
    trainer = run(tmp_path, [FaultInjector([Fault("nan", 20)])], max_steps=25)
    assert not all_finite(trainer.model)


def test_nan_update_is_skipped_and_never_reaches_the_weights(tmp_path: Path) -> None:
    guardian = GuardianCallback()
    trainer = run(tmp_path, [FaultInjector([Fault("nan", 20)]), guardian], logging_steps=5)
    assert all_finite(trainer.model)
    assert [(d.step, d.rule) for d in guardian.decisions] == [(20, "non_finite_loss")]
    assert guardian.counts["skipped_updates"] == 1
    # AdamW counts the steps it took for each parameter: one fewer than the run's steps.
    steps_taken = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps_taken == {59}
    # Trainer's logged loss hides the NaN step (logging_nan_inf_filter); Guardian read the real one.
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in logged)
    nan_metrics = [e for e in run_events(tmp_path) if isinstance(e, MetricsEvent) and e.step == 20]
    assert math.isnan(nan_metrics[0].values["loss"])
    assert '"loss":"nan"' in (tmp_path / "guardian" / "events.jsonl").read_text()  # the wire's spelling


def test_poisoned_batches_are_skipped(tmp_path: Path) -> None:
    guardian = GuardianCallback()
    run(tmp_path, [FaultInjector([Fault("poison", 40, steps=2)]), guardian])
    assert [(d.step, d.rule) for d in guardian.decisions] == [(40, "loss_spike"), (41, "loss_spike")]
    assert "loss" in guardian.decisions[0].message and "step 40" in guardian.decisions[0].message
    recorded = [e for e in run_events(tmp_path) if isinstance(e, DecisionEvent)]
    assert [e.rule for e in recorded] == ["loss_spike", "loss_spike"]
    assert recorded[0].fix and recorded[0].diagnosis


def test_learning_rate_blowup_is_caught_before_its_update(tmp_path: Path) -> None:
    guardian = GuardianCallback()
    run(tmp_path, [FaultInjector([Fault("lr_blowup", 30, steps=3, factor=30)]), guardian])
    assert [(d.step, d.rule) for d in guardian.decisions] == [(30, "lr_blowup"), (31, "lr_blowup"), (32, "lr_blowup")]
    # Put back on its schedule before each of the three updates: nothing skipped, nothing made at 30x.
    assert guardian.counts["lr_restores"] == 3 and guardian.counts["skipped_updates"] == 0


def test_rollback_from_memory_restores_weights_and_optimizer_bit_for_bit(tmp_path: Path) -> None:
    recorder = Recorder(copy_at={25})
    guardian = GuardianCallback(rules(ROLLBACK_ON_NAN), snapshot_every_steps=25)
    run(tmp_path, [FaultInjector([Fault("nan", 40)]), guardian, recorder], max_steps=40)
    [outcome] = guardian.interventions
    assert (outcome.rollback, outcome.rollback_to_step) == ("memory", 25)
    trainer_state = recorder.copies[25]
    model_now = recorder.params_at_end[40]
    for name, value in trainer_state["params"].items():
        assert torch.equal(model_now[name], value), name


def test_rollback_state_matches_including_optimizer(tmp_path: Path) -> None:
    recorder = Recorder(copy_at={25})
    guardian = GuardianCallback(rules(ROLLBACK_ON_NAN), snapshot_every_steps=25)
    trainer = run(tmp_path, [FaultInjector([Fault("nan", 40)]), guardian, recorder], max_steps=40)
    assert_same_state(trainer.model, trainer.optimizer, recorder.copies[25])
    assert trainer.lr_scheduler.last_epoch == 40  # the schedule is not rewound: it stays with the step count


def test_rollback_from_a_protected_checkpoint_on_disk(tmp_path: Path) -> None:
    recorder = Recorder(copy_at={30}, copy_on_save=True)
    guardian = GuardianCallback(rules(ROLLBACK_ON_NAN), snapshot_every_steps=0)
    trainer = run(tmp_path, [FaultInjector([Fault("nan", 38)]), guardian, recorder],
                  max_steps=38, save_steps=10, save_total_limit=1)
    [outcome] = guardian.interventions
    assert outcome.rollback_to_step == 30
    assert outcome.rollback is not None and outcome.rollback.endswith("guardian/good/checkpoint-30")
    assert_same_state(trainer.model, trainer.optimizer, recorder.copies[30])
    # save_total_limit=1 rotated checkpoint-30 away; Guardian's link kept it.
    assert not (tmp_path / "checkpoint-30").exists()
    assert (tmp_path / "guardian" / "good" / "checkpoint-30" / "adapter_model.safetensors").is_file()


def test_no_rollback_target_falls_back_to_skipping(tmp_path: Path) -> None:
    guardian = GuardianCallback(rules(ROLLBACK_ON_NAN), snapshot_every_steps=0)
    trainer = run(tmp_path, [FaultInjector([Fault("nan", 10)]), guardian], max_steps=15)
    [outcome] = guardian.interventions
    assert outcome.rollback == "impossible" and outcome.skipped_update
    assert all_finite(trainer.model)


def test_reduce_lr_through_the_trainer_with_lora_plus_groups(tmp_path: Path) -> None:
    """After a cut at step k every later rate is 0.5 x the clean run's, for each parameter group."""
    cut_rules = rules("""
version: 1
rules:
  - name: nan
    metrics: [loss]
    detector: {kind: non_finite}
    actions: [skip_update, {reduce_lr: {factor: 0.5}}]
""")

    def lora_plus(seed: int) -> tuple[object, torch.optim.Optimizer]:
        model = build_model(seed)
        a = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" not in n]
        b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
        return model, torch.optim.AdamW([{"params": a, "lr": 1e-3}, {"params": b, "lr": 1.6e-2}])

    clean, cut = Recorder(), Recorder()
    for recorder, callbacks in ((clean, []), (cut, [FaultInjector([Fault("nan", 20)]), GuardianCallback(cut_rules)])):
        model, optimizer = lora_plus(0)
        settings = TinyRun(str(tmp_path / str(id(recorder))), max_steps=50, eval_steps=0, lr_scheduler_type="cosine")
        settings.trainer([*callbacks, recorder], model=model, optimizers=(optimizer, None)).train()
    for step in range(1, 20):
        assert cut.rates[step] == clean.rates[step]
    for step in range(20, 51):
        assert cut.rates[step] == pytest.approx([0.5 * r for r in clean.rates[step]], rel=1e-12, abs=1e-20), step


def test_gradient_accumulation_loss_matches_what_trainer_logs(tmp_path: Path) -> None:
    guardian = GuardianCallback()
    trainer = run(tmp_path, [guardian], max_steps=12, logging_steps=1, gradient_accumulation_steps=3, batch_size=4)
    seen = {e.step: e.values["loss"] for e in train_metrics(tmp_path)}
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert logged.keys() == seen.keys()
    for step, loss in logged.items():
        assert seen[step] == pytest.approx(loss, rel=1e-4)


def test_added_after_construction_still_reads_every_step(tmp_path: Path) -> None:
    trainer = TinyRun(str(tmp_path), max_steps=15, eval_steps=0).trainer()
    guardian = GuardianCallback()
    trainer.add_callback(guardian)
    trainer.train()
    assert guardian._probe is not None and guardian._probe.wrapped
    train = train_metrics(tmp_path)
    assert [e.step for e in train] == list(range(1, 16))
    assert all(isinstance(e.values["loss"], float) and isinstance(e.values["grad_norm"], float) for e in train)
    assert [e.seq for e in run_events(tmp_path)] == list(range(1, len(run_events(tmp_path)) + 1))


def test_a_failure_inside_guardian_never_stops_training(tmp_path: Path) -> None:
    guardian = GuardianCallback()

    def broken(*args: object, **kwargs: object) -> list[object]:
        raise RuntimeError("engine bug")

    guardian.engine.observe = broken  # type: ignore[method-assign]
    trainer = run(tmp_path, [guardian], max_steps=10)
    assert trainer.state.global_step == 10
    assert guardian.errors == 10


def test_overfitting_stops_and_restores_the_best_weights(tmp_path: Path) -> None:
    guardian = GuardianCallback(rules("""
version: 1
rules:
  - name: overfitting
    metric: eval_loss
    detector: {kind: overfitting, patience_evals: 3, min_delta: 0.01}
    actions: [{stop: {restore_best: true}}]
"""))
    trainer = run(tmp_path, [guardian], max_steps=400, train_size=16, eval_steps=10, learning_rate=5e-3,
                  warmup_steps=0, lr_scheduler_type="constant")
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert trainer.state.global_step < 400, evals
    [decision] = guardian.decisions
    assert decision.rule == "overfitting"
    assert trainer.evaluate()["eval_loss"] == pytest.approx(min(evals), rel=1e-6)


def test_the_shipped_overfitting_rule_waits_for_the_second_pass_and_restores_the_best(tmp_path: Path) -> None:
    guardian = GuardianCallback()  # the shipped rules
    trainer = run(tmp_path, [guardian], max_steps=400, train_size=16, eval_steps=10, learning_rate=5e-3,
                  warmup_steps=0, lr_scheduler_type="constant")
    evaluations = [e for e in run_events(tmp_path) if isinstance(e, MetricsEvent) and e.phase == "eval"]
    assert evaluations and all(e.values["epoch"] == e.step / 2 for e in evaluations)  # 16 lines, batch 8
    [stop] = [d for d in guardian.decisions if d.rule == "overfitting"]
    assert stop.finding.evidence["epoch"] >= 1.0 and trainer.state.global_step == stop.step < 400
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert trainer.evaluate()["eval_loss"] == pytest.approx(min(evals), rel=1e-6)


def _trainer_can_resume() -> bool:
    """transformers before 4.50-ish loads a checkpoint's RNG state with torch.load's default, which torch 2.6+
    refuses for the numpy values in it (Trainer itself fails to resume, with or without Guardian)."""
    import transformers.trainer

    return hasattr(transformers.trainer, "safe_globals")


@pytest.mark.skipif(not _trainer_can_resume(), reason="this transformers cannot resume a checkpoint on torch>=2.6 "
                                                      "(rng_state.pth: weights_only load), Guardian or not")
def test_guardian_state_survives_a_resume(tmp_path: Path) -> None:
    first = GuardianCallback()
    run(tmp_path, [first], max_steps=30, save_steps=30)
    saved = first.engine.state_dict()
    second = GuardianCallback()
    trainer = TinyRun(str(tmp_path), max_steps=40, eval_steps=0, save_steps=30).trainer([second])
    second_state_at_start = {}

    def capture(*args: object, **kwargs: object) -> None:
        second_state_at_start.update(second.engine.state_dict())

    trainer.add_callback(type("Capture", (Recorder,), {"on_train_begin": lambda self, *a, **k: capture()})())
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-30"))
    assert second_state_at_start == saved


def test_preflight_judges_the_trainers_method_and_speaks_once_per_supervised_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A LoRA rate of 5e-6 is 20x too low for supervised fine-tuning and right for DPO: the callback tells the
    pre-flight which trainer it watches. A supervised restart (GUARDIAN_RESTART > 0) gets one summary line."""
    import logging

    sft = GuardianCallback()
    run(tmp_path / "sft", [sft], max_steps=2, learning_rate=5e-6)
    assert ("learning_rate", "warning") in {(a.setting, a.severity.value) for a in sft.advice}
    dpo = GuardianCallback()
    trainer = TinyRun(str(tmp_path / "dpo"), max_steps=2, learning_rate=5e-6).trainer([dpo])
    trainer.__class__ = type("DPOTrainer", (type(trainer),), {})  # what TRL's DPOTrainer is to the pre-flight
    trainer.train()
    assert "learning_rate" not in {a.setting for a in dpo.advice}

    monkeypatch.setenv("GUARDIAN_RESTART", "1")
    again = GuardianCallback()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="guardian"):
        run(tmp_path / "restart", [again], max_steps=2, learning_rate=5e-6)
    lines = [r.getMessage() for r in caplog.records if "pre-flight" in r.getMessage()]
    assert again.advice and lines == [f"Guardian pre-flight: {len(again.advice)} findings, shown at the run's first start"]


def test_preflight_advice_is_logged_and_strict_mode_refuses_to_start(tmp_path: Path) -> None:
    from guardian.errors import ConfigError

    relaxed = GuardianCallback()
    run(tmp_path / "relaxed", [relaxed], max_steps=2, max_grad_norm=0.0, warmup_steps=0)
    assert {"max_grad_norm", "warmup_ratio / warmup_steps"} <= {a.setting for a in relaxed.advice}
    with pytest.raises(ConfigError, match="max_grad_norm"):
        run(tmp_path / "strict", [GuardianCallback(strict_preflight=True)], max_steps=2, max_grad_norm=0.0)
