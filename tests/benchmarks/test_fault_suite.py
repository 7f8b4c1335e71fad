"""The independent fault suite (benchmarks/faults/): scenarios, split, outcomes, and each injector on a real run."""

from __future__ import annotations

import math
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from repopaths import REPO_ROOT
from transformers import TrainerCallback

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "faults"))
import data
import injectors
import outcomes
import peers
import runner
import scenarios as scen

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]  # one torch thread (tests/conftest.py)

# --- scenarios and the split --------------------------------------------------------------------------------


def test_generate_is_deterministic_and_covers_every_family() -> None:
    a, b = scen.generate(), scen.generate()
    assert a == b
    assert len(a) >= 64 and len({s.id for s in a}) == len(a)
    counts = {f: sum(s.family == f for s in a) for f in scen.FAMILIES}
    assert counts == scen.FAMILY_COUNTS and len(counts) == 12
    assert scen.generate(1) != a  # drawn, not hard-coded


def test_scenarios_are_within_their_ranges() -> None:
    for s in scen.generate():
        assert 150 <= s.max_steps <= 300 and s.trainer in ("trainer", "sft") and s.grad_accum in (1, 2, 3, 4)
        assert scen.HEALTHY_LR[0] <= s.learning_rate <= scen.HEALTHY_LR[1]
        p = s.params
        onset = p.get("start", p.get("step"))
        if onset is not None and s.rescuable:
            assert s.warmup_steps < onset and 0.15 * s.max_steps - 1 <= onset <= 0.85 * s.max_steps + 1, s
        if s.family == "bad_stretch":
            assert 1 <= p["steps"] <= 60 and p["start"] + p["steps"] <= s.max_steps
        if s.family == "grad_spike":
            assert 1e2 <= p["factor"] <= 1e4 and 1 <= p["steps"] <= 5
        if s.family == "nan_microbatch":
            assert 2 <= s.grad_accum <= 4 and 0 <= p["micro_index"] < s.grad_accum
        if s.family == "healthy_large_grad":
            assert s.max_grad_norm == 0 and 1e3 <= s.loss_scale <= 1e6
    grad = [s for s in scen.generate() if s.family == "grad_spike"]
    assert {s.max_grad_norm for s in grad} == {0.0, 1.0}
    masked = [s for s in scen.generate() if s.family == "masked_labels"]
    assert any(not s.rescuable and s.params["steps"] is None for s in masked) and any(s.rescuable for s in masked)


def test_split_is_stratified_and_depends_only_on_the_ids() -> None:
    all_ = scen.generate()
    tune, heldout = scen.split(all_)
    assert len(tune) + len(heldout) == len(all_) and not {s.id for s in tune} & {s.id for s in heldout}
    for family, count in scen.FAMILY_COUNTS.items():
        assert sum(s.family == family for s in tune) == count // 2
        assert sum(s.family == family for s in heldout) == count - count // 2
    shuffled = all_[:]
    random.Random(5).shuffle(shuffled)
    changed = [replace(s, learning_rate=1e-3, max_steps=151) for s in shuffled]  # other draws, same ids
    assert {s.id for s in scen.split(changed)[0]} == {s.id for s in tune}
    # pinned: the split is a hash of the id, so it never moves when code elsewhere changes
    assert sorted(s.id for s in tune if s.family == "bad_stretch") == [
        "bad_stretch-01", "bad_stretch-03", "bad_stretch-05", "bad_stretch-06"]


def test_shared_bases_share_a_clean_key() -> None:
    masked = {s.id: s for s in scen.generate() if s.family == "masked_labels"}
    assert masked["masked_labels-00"].base_key() == masked["masked_labels-01"].base_key()
    assert masked["masked_labels-00"].base_key() != masked["masked_labels-02"].base_key()


# --- outcomes -------------------------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("unguarded, reference, ruined", [
    (2.0, 2.0, False), (2.1, 2.0, False), (2.11, 2.0, True), (NAN, 2.0, True), (INF, 2.0, True), (1.5, 2.0, False)])
def test_ruined(unguarded: float, reference: float, ruined: bool) -> None:
    assert outcomes.is_ruined(unguarded, reference) is ruined


@pytest.mark.parametrize("loss, reference, saved", [
    (2.0, 2.0, True), (2.1, 2.0, True), (2.11, 2.0, False), (NAN, 2.0, False), (1.0, 2.0, True)])
def test_saved(loss: float, reference: float, saved: bool) -> None:
    assert outcomes.is_saved(loss, reference) is saved


@pytest.mark.parametrize("loss, unguarded, harmed", [
    (2.0, 2.0, False), (2.04, 2.0, False), (2.05, 2.0, True), (NAN, 2.0, True), (NAN, NAN, False), (5.0, NAN, False),
    (1.0, 2.0, False)])
def test_harmed(loss: float, unguarded: float, harmed: bool) -> None:
    assert outcomes.is_harmed(loss, unguarded) is harmed


def test_reference_is_the_best_evaluation_only_for_overfitting() -> None:
    evals = [(10, 2.5), (20, 1.9), (30, NAN), (40, 2.2)]
    assert outcomes.reference_loss("overfit_noisy_eval", 2.3, evals) == 1.9
    assert outcomes.reference_loss("bad_stretch", 2.3, evals) == 2.3
    assert outcomes.reference_loss("lr_too_high", 2.3, evals) == 2.3


def test_actions_and_alerts() -> None:
    decisions = [{"actions": ["alert"]}, {"actions": ["skip_update"]}, {"actions": ["alert", "reduce_lr(factor=0.5)"]},
                 {"actions": ["alert", "alert"]}]
    assert outcomes.count_alerts(decisions) == 2
    assert outcomes.count_actions([{"step": 3}, {}, "not a record"]) == 2


def test_classify_a_healthy_unit_with_a_false_action() -> None:
    g = {"interventions": [{"step": 40}], "decisions": [{"actions": ["skip_update"]}, {"actions": ["alert"]}]}
    o = outcomes.classify(family="healthy_noisy", healthy=True, rescuable=True, clean=2.0, unguarded=2.0,
                          variants={"guardian": 2.2, "spike_stop": 2.0}, guardian=g)
    assert not o["ruined"] and o["false_action"] and o["actions"] == 1 and o["alerts"] == 1
    assert o["harmed"] == {"guardian": True, "spike_stop": False}


def test_classify_a_ruined_unit_saved_by_guardian() -> None:
    o = outcomes.classify(family="nan_microbatch", healthy=False, rescuable=True, clean=2.0, unguarded=NAN,
                          variants={"guardian": 2.05, "hf_early_stop": 2.3}, guardian={"interventions": [{}]})
    assert o["ruined"] and o["saved"] == {"guardian": True, "hf_early_stop": False}
    assert o["harmed"] == {"guardian": False, "hf_early_stop": False} and not o["false_action"]


# --- the peers' spike detector ------------------------------------------------------------------------------


@pytest.mark.parametrize("losses, spike_at", [
    ([1 / i for i in range(1, 10)], None),
    ([1 / i if i != 5 else 3.0 for i in range(1, 10)], 4),  # Lightning's own test: the 5th value, index 4
    ([2.0, 2.0, 2.1, 5.9, 6.1], None),  # 6.1 < 3x the mean of (2, 2, 2.1, 5.9) = 3.0 * 3
    ([2.0, 2.0, 2.0, 6.0], 3),
    ([2.0, NAN], 1),
    ([NAN, 2.0], None),  # the first value is never checked (warmup 1); NaN is never added to the window
])
def test_spike_stop_follows_lightning(losses: list[float], spike_at: int | None) -> None:
    cb = peers.SpikeStopCallback()
    hits = [i for i, x in enumerate(losses) if cb.observe(x)]
    assert (hits[0] if hits else None) == spike_at


# --- injectors on real short runs ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch, steps", [
    (range(0, 8), [1, 1, 2, 2, 3, 3, 4, 4]),
])
def test_batch_to_step_mapping(batch: range, steps: list[int]) -> None:
    assert [injectors.optimizer_step_of_batch(b, batches_per_epoch=10, accumulation=2) for b in batch] == steps


def test_batch_to_step_mapping_across_epochs() -> None:
    # 5 batches per epoch, accumulation 2: steps of 2, 2 and 1 batches per epoch
    got = [injectors.optimizer_step_of_batch(b, batches_per_epoch=5, accumulation=2) for b in range(10)]
    assert got == [1, 1, 2, 2, 3, 4, 4, 5, 5, 6]


def short(family: str, **changes: Any) -> scen.Scenario:
    """The first scenario of `family`, cut down to a short run."""
    s = next(s for s in scen.generate() if s.family == family)
    params = dict(s.fault_params, **changes.pop("params", {}))
    base = dict(max_steps=30, warmup_steps=3, eval_steps=100, batch_size=4, train_size=256, trainer="trainer")
    base.update(changes)
    return replace(s, fault_params=tuple(params.items()), **base)


class MicroRecorder(TrainerCallback):
    """Wraps training_step: per micro-batch, the optimizer step, the loss and what the batch looked like."""

    def __init__(self, trainer: Any) -> None:
        self.step = 0
        self.rows: list[dict[str, Any]] = []
        colon = runner.tokenizer().convert_tokens_to_ids(":")
        inner = trainer.training_step

        def step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            loss = inner(model, inputs, *args, **kwargs)
            self.rows.append({"step": self.step, "loss": float(loss),
                              "real": bool((inputs["input_ids"][:, 2] == colon).all()),
                              "labelled": int((inputs["labels"] != -100).sum())})
            return loss

        trainer.training_step = step
        trainer.add_callback(self)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step + 1


class RateRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.rates: dict[int, tuple[float, float]] = {}  # step -> (optimizer's rate, scheduler's rate)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              lr_scheduler: Any = None, **kwargs: Any) -> None:
        self.rates[state.global_step + 1] = (optimizer.param_groups[0]["lr"], lr_scheduler.get_last_lr()[0])


def train(s: scen.Scenario, *, inject: bool = True, seed: int = 0,
          tmp: Path) -> tuple[Any, Any, MicroRecorder, RateRecorder]:
    trainer, _ = runner.build_trainer(s, seed, "unguarded", str(tmp))
    injector = runner.make_injector(s, seed) if inject else None
    if injector is not None:
        injector.attach(trainer)
    micro, rates, log = MicroRecorder(trainer), RateRecorder(), runner.StepLog()
    trainer.add_callback(rates)
    trainer.add_callback(log)
    trainer.train()
    trainer.step_log = log
    return trainer, injector, micro, rates


@pytest.mark.parametrize("trainer_kind", ["trainer", "sft"])
def test_bad_stretch_garbles_exactly_those_steps(tmp_path: Path, trainer_kind: str) -> None:
    s = short("bad_stretch", trainer=trainer_kind, grad_accum=2, params={"start": 12, "steps": 5})
    _, inj, micro, _ = train(s, tmp=tmp_path)
    garbage = sorted({r["step"] for r in micro.rows if not r["real"]})
    assert garbage == [12, 13, 14, 15, 16]
    assert all(not r["real"] for r in micro.rows if 12 <= r["step"] <= 16)  # every micro-batch of those steps
    assert sum(not r["real"] for r in micro.rows) == 10 and inj.report()["corrupted_steps"][:5] == garbage
    mean = lambda rows: sum(r["loss"] for r in rows) / len(rows)  # noqa: E731
    assert mean([r for r in micro.rows if not r["real"]]) > 1.15 * mean([r for r in micro.rows if 8 <= r["step"] < 12])


def test_bad_stretch_across_epochs_with_a_short_last_step(tmp_path: Path) -> None:
    # 40 lines, batch 4: 10 batches per epoch, accumulation 3 -> steps of 3, 3, 3 and 1 batches
    s = short("bad_stretch", grad_accum=3, train_size=40, max_steps=12, params={"start": 4, "steps": 2})
    _, _, micro, _ = train(s, tmp=tmp_path)
    assert sorted({r["step"] for r in micro.rows if not r["real"]}) == [4, 5]
    assert [r["step"] for r in micro.rows if not r["real"]] == [4, 5, 5, 5]


def test_masked_labels_masks_every_label_of_the_stretch(tmp_path: Path) -> None:
    s = short("masked_labels", params={"start": 10, "steps": 3})
    _, inj, micro, _ = train(s, tmp=tmp_path)
    assert sorted({r["step"] for r in micro.rows if r["labelled"] == 0}) == [10, 11, 12]
    assert all(r["labelled"] == 0 for r in micro.rows if 10 <= r["step"] <= 12)
    assert inj.report()["masked_loss"] in ("nan", "zero")


def test_weight_corruption_leaves_the_value_in_that_weight(tmp_path: Path) -> None:
    s = short("weight_corruption", params={"step": 20, "value": 5e4, "pattern": "row"})
    trainer, inj, micro, _ = train(s, tmp=tmp_path)
    done = inj.report()
    weight = dict(trainer.model.named_parameters())[done["param"]]
    assert done["at_step"] == 20 and "lora_" in done["param"]
    assert float(weight.detach().abs().max()) > 1e4  # Adam moves it by ~lr per step: it stays huge
    s = short("weight_corruption", params={"step": 20, "value": math.nan, "pattern": "entries", "entries": 2})
    trainer, inj, micro, _ = train(s, tmp=tmp_path / "nan")
    weight = dict(trainer.model.named_parameters())[inj.report()["param"]]
    assert int(torch.isnan(weight).sum()) >= 2
    assert all(math.isfinite(r["loss"]) for r in micro.rows if r["step"] <= 20)


def test_nan_microbatch_gives_exactly_one_nan_micro_batch(tmp_path: Path) -> None:
    s = short("nan_microbatch", grad_accum=3, max_steps=20, params={"step": 20, "micro_index": 1})
    _, inj, micro, _ = train(s, tmp=tmp_path)
    nan_rows = [(r["step"], i % 3) for i, r in enumerate(micro.rows) if math.isnan(r["loss"])]
    assert nan_rows == [(20, 1)] and inj.report()["hits"] == [(20, 1)]
    assert len(micro.rows) == 60


def test_lr_forced_overrides_the_schedule_at_every_step_from_k(tmp_path: Path) -> None:
    s = short("lr_forced", params={"start": 15, "factor": 20.0})
    _, _, _, rates = train(s, tmp=tmp_path)
    for step, (lr, scheduled) in rates.rates.items():
        assert lr == pytest.approx(scheduled * (20.0 if step >= 15 else 1.0)), step
    assert len(rates.rates) == 30


def test_lr_jump_once_changes_exactly_one_step(tmp_path: Path) -> None:
    s = short("lr_jump_once", params={"step": 15, "factor": 50.0})
    _, _, _, rates = train(s, tmp=tmp_path)
    off = [step for step, (lr, scheduled) in rates.rates.items() if lr != pytest.approx(scheduled)]
    assert off == [15] and rates.rates[15][0] == pytest.approx(50 * rates.rates[15][1])


def test_grad_spike_raises_the_pre_clip_norm_by_the_factor(tmp_path: Path) -> None:
    s = short("grad_spike", max_grad_norm=1.0, params={"start": 15, "steps": 2, "factor": 300.0})
    clean, *_ = train(s, inject=False, tmp=tmp_path / "clean")
    spiked, inj, micro, _ = train(s, tmp=tmp_path / "spiked")
    a, b = clean.step_log.grad_norm, spiked.step_log.grad_norm
    assert all(a[k] == pytest.approx(b[k], rel=1e-5) for k in range(1, 15))
    assert b[15] / a[15] == pytest.approx(300.0, rel=1e-3)  # the same weights up to step 15: exactly the factor
    assert b[16] > 30 * a[16] and inj.report()["spiked_steps"] == [15, 16]
    assert all(math.isfinite(r["loss"]) for r in micro.rows)


def test_lr_too_high_multiplies_the_rate_except_for_clean() -> None:
    s = short("lr_too_high")
    m = s.params["multiplier"]
    assert runner.training_arguments(s, 0, "clean", "/tmp/x").learning_rate == s.learning_rate
    assert runner.training_arguments(s, 0, "unguarded", "/tmp/x").learning_rate == pytest.approx(m * s.learning_rate)


def test_tokenizer_is_a_real_fast_tokenizer_with_specials() -> None:
    from transformers import PreTrainedTokenizerFast

    tok = data.build_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    ids = data.encode_line(tok, "r:abc>cba")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 11
    assert tok.decode(ids, skip_special_tokens=True) == "r:abc>cba"
    assert tok.unk_token_id not in ids


# --- end to end -----------------------------------------------------------------------------------------------


def test_run_unit_clean_and_guardian_smoke() -> None:
    s = short("bad_stretch", eval_steps=10, params={"start": 15, "steps": 3})
    clean = runner.run_unit(s, 0, "clean")
    guarded = runner.run_unit(s, 0, "guardian")
    for r in (clean, guarded):
        assert math.isfinite(r.final_test_loss) and r.error is None and r.steps_completed <= 30
        assert [step for step, _ in r.test_at_eval] == [10, 20, 30][: len(r.test_at_eval)] and r.eval_history
        assert len(r.train_loss) == r.steps_completed
    assert clean.guardian is None and clean.fault == {}
    assert set(guarded.guardian) == {"decisions", "interventions", "counts", "events_lines"}
    assert guarded.guardian["events_lines"] > 0 and guarded.fault["corrupted_steps"][:3] == [15, 16, 17]


# --- the overfitting rule replayed on recorded runs ---------------------------------------------------------


def _recorded(family: str, evals: list[float], tests: list[float], *, train_size: int) -> dict[str, Any]:
    steps = [10 * (i + 1) for i in range(len(evals))]
    return {"key": ["clean", family, 0], "scenario_id": family, "family": family, "seed": 0, "variant": "clean",
            "train_loss": [2.0 - 0.001 * s for s in range(1, steps[-1] + 1)],
            "eval_history": [[s, e] for s, e in zip(steps, evals)],
            "test_at_eval": [[s, t] for s, t in zip(steps, tests)], "final_test_loss": tests[-1],
            "scenario": {"id": family, "batch_size": 4, "grad_accum": 1, "train_size": train_size}}


def test_the_replay_stops_an_overfitting_run_and_leaves_a_first_pass_alone(tmp_path: Path) -> None:
    import json

    import replay_overfitting as ro

    rising = [1.0, 0.9, 0.85, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    runs = [_recorded("overfit_noisy_eval", rising, [x + 0.01 for x in rising], train_size=16),   # epoch 2.5 at 10
            _recorded("healthy_noisy_eval", rising, [1.0 - 0.01 * i for i in range(10)], train_size=4032)]
    doc = {"scenarios": [r.pop("scenario") for r in runs], "runs": runs}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    params = dict(ro.load_rules().by_name("overfitting").params)
    overfit, first_pass = ro.replay_file(tmp_path / "r.json", params)
    assert overfit.stop_step == 70 and overfit.left == pytest.approx(0.86) and overfit.saved and not overfit.harmed
    assert first_pass.stop_step is None and not first_pass.harmed  # epoch 0.1: the train loss is a held-out loss
