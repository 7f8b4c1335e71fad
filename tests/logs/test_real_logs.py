"""The shipped rules over real runs: quiet on the healthy ones, loud on NaN, overfitting and dead runs."""

from __future__ import annotations

import csv

import pytest
from realpaths import REAL_LOGS, needs_fixtures

from guardian.commands.replay import replay
from guardian.rulefile.reader import load_rules

pytestmark = needs_fixtures


def _labels() -> dict[str, str]:
    with (REAL_LOGS / "SOURCES.tsv").open() as f:
        return {row["file"]: row["label"] for row in csv.DictReader(f, delimiter="\t")}


LABELS = _labels() if (REAL_LOGS / "SOURCES.tsv").is_file() else {}
HEALTHY = sorted(name for name, label in LABELS.items() if label == "healthy")

# What the shipped rules say about every real log that is not labelled healthy. The labels come from simple
# thresholds (see the fixtures' README), so where our rules disagree the reason is written down.
EXPECTED = {
    "MemaSp__FT-Llama2-HRChatbot__outputs__trainer_state.json": {"non_finite_loss"},  # grad_norm = inf at step 33
    "kcliu23__CSE234-Project2__adapter_v2__checkpoint-300__trainer_state.json": {"non_finite_eval_loss"},
    "Nicolassalvan__mti881-projet2__ResultsEtape3__trainer_state.json": {"overfitting"},  # textbook
    # Train loss still falls over any 1,000 observations (the flat 400-observation stretches were noise).
    "ANDA-Researchers__MCFED_DRL__trainer_state.json": {"overfitting"},
    "AolinGuo__graduate_agent__trainer_log.jsonl": {"loss_stuck_at_zero"},
    # eval 0.72 -> 1.19, train -> exactly 0; a zero loss is no level to judge spikes against (the "spike" at step
    # 1065 was the first non-zero loss after a run of zeros)
    "lucktran__topnmusic__models__trainer_state.json": {"overfitting"},
    # Its loss still falls over any 1,000 observations (the 400-observation window flagged noise).
    "laminair__mess-plus__data_logs__distillbert__checkpoint-1000__trainer_state.json": {"loss_spike"},
    "10844110__t5-summarization-demo__trainer_state.json": {"grad_explosion"},  # grad norm 35.6 vs median 2.4
    # Eval rises 3.7 % over its best for 3 evaluations at step 1000 while train falls, within its own noise; it
    # recovers later. Judged by the trend in noise units the overfitting rule no longer stops it.
    "jubaerkhan49__bangla_stt__model__trainer_state.json": set(),
    # Grad norms jump between 0.01 and 1600 every log from the first one: no spike stands out of that noise.
    "GulbeycanCagri__IS-584-Term-Project__results__checkpoint-12000__trainer_state.json": set(),
    # Loss flat at 4.68 over only 34 logs: shorter than the plateau rule's 1,000-observation window.
    "jmglendenning__phi3-finetune-synthetic__checkpoints__trainer_state.json": set(),
}


@pytest.fixture(scope="module")
def rules():  # type: ignore[no-untyped-def]
    return load_rules()


def test_every_fixture_is_covered() -> None:
    assert set(LABELS) == set(HEALTHY) | set(EXPECTED)


@pytest.mark.parametrize("name", HEALTHY)
def test_default_rules_are_quiet_on_healthy_runs(name: str, rules) -> None:  # type: ignore[no-untyped-def]
    result = replay(REAL_LOGS / name, rules)
    assert result.observations > 30
    assert [d.message for d in result.decisions] == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_default_rules_fire_where_expected(name: str, rules) -> None:  # type: ignore[no-untyped-def]
    assert set(replay(REAL_LOGS / name, rules).rules_fired()) == EXPECTED[name]


def test_overfitting_is_caught_before_the_end_of_the_textbook_run(rules) -> None:  # type: ignore[no-untyped-def]
    result = replay(REAL_LOGS / "Nicolassalvan__mti881-projet2__ResultsEtape3__trainer_state.json", rules)
    first = result.decisions[0]
    assert (first.rule, first.finding.onset_step) == ("overfitting", 5600)  # the best evaluation
    # the median of evaluations 4-6 (epochs 4-6) against the lowest median of 3 (epochs 1-3, 0.532); the run
    # went on to step 27990, its eval loss from 1.01 to 1.23
    assert first.step == 16800
    assert first.actions[0].kind.value == "stop" and first.actions[0].param("restore") == "best_eval"
