"""Tests for guardian.logs.training: every real log in the shared fixtures, then synthetic messes and errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
from realpaths import NO_FIXTURES, REAL_LOGS, needs_fixtures

from guardian.errors import LogFormatError
from guardian.logs.training import LogReport, Observation, read_log, read_log_with_report


def _sources() -> dict[str, dict[str, str]]:
    if not (REAL_LOGS / "SOURCES.tsv").is_file():
        return {}
    with open(REAL_LOGS / "SOURCES.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return {row["file"]: row for row in rows}


def _features(row: dict[str, str]) -> dict[str, str]:
    return dict(part.split("=", 1) for part in row["features"].split(";") if "=" in part)


def _log_files() -> list[str]:
    if not REAL_LOGS.is_dir():
        return []
    return sorted(p.name for p in REAL_LOGS.iterdir() if p.suffix in {".json", ".jsonl"})


SOURCES = _sources()
LOG_FILES = _log_files() or [pytest.param("missing", marks=pytest.mark.skip(reason=NO_FIXTURES))]

RAMEY = "rameyjm7__SFT-Training-LLM__trainer_log.jsonl"
# Where this reader's count differs from SOURCES.tsv's simple reader, and why.
# rameyjm7: SOURCES counts every step regression as a restart (416). The file is two writers appending
# the same run (each step logged twice, per-writer losses differing in the 4th decimal, one writer up
# to two logs behind the other), and ONE real resume: line 1047 goes from step 5240/5220 back to 5010
# with elapsed_time reset to 0:02:38 (resumed from checkpoint-5000). 1358 train lines = 524 + 522
# (segment 1, steps 10..5240) + 2 x 156 (segment 2, steps 5010..6560); 24 steps of segment 1 are
# replaced; 522 + 156 = 678 second-writer duplicates dropped; 656 train observations remain.
EXPECTED_REPORT = {RAMEY: {"restarts": 1, "duplicates_dropped": 678}}


def _split(observations: list[Observation]) -> tuple[list[Observation], list[Observation]]:
    return [o for o in observations if o.phase == "train"], [o for o in observations if o.phase == "eval"]


def _real(name: str) -> tuple[list[Observation], LogReport]:
    return read_log_with_report(REAL_LOGS / name)


# --- real logs --------------------------------------------------------------------------------


@needs_fixtures
def test_every_log_file_is_listed_in_sources() -> None:
    assert set(_log_files()) == set(SOURCES)


@needs_fixtures
@pytest.mark.parametrize("name", LOG_FILES)
def test_real_log_counts_match_sources(name: str) -> None:
    observations, report = _real(name)
    row = SOURCES[name]
    features = _features(row)
    train, evals = _split(observations)
    assert report.format == row["format"]
    assert report.skipped_lines == 0
    assert len(train) == int(features["n_train"])
    assert len(evals) == int(features["n_eval"])
    expected = EXPECTED_REPORT.get(name, {"restarts": 0, "duplicates_dropped": 0})
    assert (report.restarts, report.duplicates_dropped) == (expected["restarts"], expected["duplicates_dropped"])


@needs_fixtures
@pytest.mark.parametrize("name", LOG_FILES)
def test_real_log_is_sorted_and_unique_per_kind(name: str) -> None:
    observations, _ = _real(name)
    assert [o.step for o in observations] == sorted(o.step for o in observations)
    for group in _split(observations):
        steps = [o.step for o in group]
        assert len(steps) == len(set(steps))
    for obs in observations:
        assert all(isinstance(v, float) for v in obs.metrics.values())
        if obs.phase == "train":
            assert "loss" in obs.metrics
            assert not {"step", "total_flos", "train_runtime", "percentage", "lr"} & set(obs.metrics)
        else:
            assert all(k.startswith("eval_") or k == "epoch" for k in obs.metrics)


@needs_fixtures
@pytest.mark.parametrize("name", LOG_FILES)
def test_real_log_has_grad_norm_and_eval_loss_where_sources_says(name: str) -> None:
    train, evals = _split(read_log(REAL_LOGS / name))
    row = SOURCES[name]
    assert any("grad_norm" in o.metrics for o in train) == (row["has_grad_norm"] == "true")
    assert any("eval_loss" in o.metrics for o in evals) == (row["has_eval_loss"] == "true")


@needs_fixtures
def test_memasp_has_exactly_one_non_finite_grad_norm_and_it_is_inf() -> None:
    train, _ = _split(read_log(REAL_LOGS / "MemaSp__FT-Llama2-HRChatbot__outputs__trainer_state.json"))
    bad = [o for o in train if not math.isfinite(o.metrics["grad_norm"])]
    # The file says `"grad_norm": Infinity` (JSON token), not NaN.
    assert [(o.step, o.metrics["grad_norm"]) for o in bad] == [(bad[0].step, math.inf)]
    assert all(math.isfinite(o.metrics["loss"]) for o in train)


@needs_fixtures
def test_kcliu23_has_six_nan_eval_losses_and_finite_train_losses() -> None:
    name = "kcliu23__CSE234-Project2__adapter_v2__checkpoint-300__trainer_state.json"
    train, evals = _split(read_log(REAL_LOGS / name))
    assert len(evals) == 6
    assert all(math.isnan(o.metrics["eval_loss"]) for o in evals)
    assert all(math.isfinite(v) for o in train for v in o.metrics.values())
    assert [o.step for o in evals] == [50, 100, 150, 200, 250, 300]


@needs_fixtures
def test_aolinguo_loss_is_exactly_zero_after_the_first_log() -> None:
    train, _ = _split(read_log(REAL_LOGS / "AolinGuo__graduate_agent__trainer_log.jsonl"))
    losses = [o.metrics["loss"] for o in train]
    assert losses[0] == pytest.approx(122.1416)
    assert losses[1:] == [0.0] * 36
    assert set(train[0].metrics) == {"loss", "learning_rate", "epoch"}


@needs_fixtures
def test_rameyjm7_resumed_segment_replaces_the_abandoned_one() -> None:
    train, _ = _split(read_log(REAL_LOGS / RAMEY))
    by_step = {o.step: o.metrics["loss"] for o in train}
    assert [o.step for o in train] == list(range(10, 6570, 10))
    assert by_step[5000] == 0.396  # segment 1, first writer (the second logged 0.3951)
    assert by_step[5010] == 0.394  # segment 2 (segment 1 had 0.3939 / 0.393)
    assert by_step[5240] == 0.3603  # segment 2 (segment 1 had 0.3956)
    assert by_step[10] == 0.8548  # first writer wins (the second logged 0.8547)


@needs_fixtures
@pytest.mark.parametrize("run", [
    "agosalvez__tfm-lora-specialized-adapter__results",
    "hsc748NLP__NSLLM",
    "syGOAT__Mistral-v0.2-Translator-bf16",
])
def test_jsonl_and_trainer_state_of_one_run_agree(run: str) -> None:
    jsonl, _ = _split(read_log(REAL_LOGS / f"{run}__trainer_log.jsonl"))
    state, _ = _split(read_log(REAL_LOGS / f"{run}__trainer_state.json"))
    assert [o.step for o in jsonl] == [o.step for o in state]
    for a, b in zip(jsonl, state):
        for key in ("loss", "learning_rate", "epoch"):
            assert a.metrics[key] == pytest.approx(b.metrics[key])


@needs_fixtures
def test_hf_summary_entry_is_not_an_observation() -> None:
    train, _ = _split(read_log(REAL_LOGS / "jmglendenning__phi3-finetune-synthetic__checkpoints__trainer_state.json"))
    assert train[-1].step == 680  # not the summary at 691
    assert set(train[-1].metrics) == {"entropy", "epoch", "grad_norm", "learning_rate", "loss",
                                      "mean_token_accuracy", "num_tokens"}


# --- synthetic: LLaMA-Factory jsonl -------------------------------------------------------------


def _line(step: int, loss: float | None = None, elapsed: str = "0:00:10", **extra: object) -> str:
    record: dict[str, object] = {"current_steps": step, "total_steps": 100}
    if loss is not None:
        record.update(loss=loss, lr=1e-4)
    record.update(epoch=step / 100, percentage=step, elapsed_time=elapsed, remaining_time="0:01:00")
    record.update(extra)
    return json.dumps(record)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _losses(observations: list[Observation]) -> list[tuple[int, float]]:
    return [(o.step, o.metrics["loss"]) for o in observations if o.phase == "train"]


def test_jsonl_keys_are_translated_and_progress_keys_dropped(tmp_path: Path) -> None:
    log = _write(tmp_path / "trainer_log.jsonl", [
        _line(10, 2.0, grad_norm=1.5, throughput="0.00"),
        _line(20, 1.0, elapsed="0:00:20").replace('"lr"', '"learning_rate"'),
        _line(20, None, elapsed="0:00:21", eval_loss=1.25, eval_accuracy="0.5", eval_note="x"),
        _line(20, None, elapsed="0:00:22"),  # the last line of a run: progress only
    ])
    observations, report = read_log_with_report(log)
    assert observations == [
        Observation(10, {"loss": 2.0, "learning_rate": 1e-4, "epoch": 0.1, "grad_norm": 1.5}, "train"),
        Observation(20, {"loss": 1.0, "learning_rate": 1e-4, "epoch": 0.2}, "train"),
        Observation(20, {"epoch": 0.2, "eval_loss": 1.25, "eval_accuracy": 0.5}, "eval"),
    ]
    assert report == LogReport("llamafactory_jsonl", str(log), 0, 0, 0)


def test_truncated_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    lines = [_line(10, 3.0), _line(20, 2.0), _line(30, 1.0)]
    log = tmp_path / "trainer_log.jsonl"
    log.write_text("\n".join(lines) + "\n" + _line(40, 0.5)[:25], encoding="utf-8")
    observations, report = read_log_with_report(log)
    assert _losses(observations) == [(10, 3.0), (20, 2.0), (30, 1.0)]
    assert report.skipped_lines == 1


def test_garbage_and_foreign_lines_are_skipped_blank_lines_ignored(tmp_path: Path) -> None:
    log = _write(tmp_path / "trainer_log.jsonl", [
        _line(10, 3.0), "", "Traceback (most recent call last):", "   ", '{"foo": 1}', "[1, 2]",
        '{"current_steps": "ten", "loss": 1.0}', "\x00\xff\xfe", _line(20, 2.0),
    ])
    observations, report = read_log_with_report(log)
    assert _losses(observations) == [(10, 3.0), (20, 2.0)]
    assert report.skipped_lines == 5


def test_identical_duplicate_lines_are_dropped(tmp_path: Path) -> None:
    log = _write(tmp_path / "trainer_log.jsonl", [_line(10, 3.0), _line(10, 3.0), _line(20, 2.0), _line(20, 2.0)])
    observations, report = read_log_with_report(log)
    assert _losses(observations) == [(10, 3.0), (20, 2.0)]
    assert (report.duplicates_dropped, report.restarts) == (2, 0)


def test_interleaved_writers_are_deduplicated_not_read_as_restarts(tmp_path: Path) -> None:
    # Like rameyjm7: two writers, near-identical values, the second falling two logs behind.
    log = _write(tmp_path / "trainer_log.jsonl", [
        _line(10, 3.0, "0:01:00"), _line(10, 3.01, "0:01:02"),
        _line(20, 2.0, "0:02:00"), _line(30, 1.5, "0:03:00"), _line(20, 2.01, "0:02:59"),
        _line(40, 1.2, "0:04:00"), _line(30, 1.51, "0:04:01"), _line(50, 1.0, "0:05:00"),
        _line(40, 1.21, "0:05:01"), _line(50, 1.01, "0:06:00"),
    ])
    observations, report = read_log_with_report(log)
    assert _losses(observations) == [(10, 3.0), (20, 2.0), (30, 1.5), (40, 1.2), (50, 1.0)]
    assert (report.duplicates_dropped, report.restarts) == (5, 0)


def test_resumed_run_replaces_everything_from_the_resume_step(tmp_path: Path) -> None:
    log = _write(tmp_path / "trainer_log.jsonl", [
        _line(10, 3.0, "0:01:00"), _line(20, 2.0, "0:02:00"), _line(30, 9.0, "0:03:00"),
        _line(30, None, "0:03:10", eval_loss=9.5), _line(40, 9.0, "0:04:00"), _line(50, 9.0, "0:05:00"),
        _line(30, 1.5, "0:00:30"), _line(40, 1.2, "0:01:00"), _line(60, 1.0, "0:01:30"),
    ])
    observations, report = read_log_with_report(log)
    assert _losses(observations) == [(10, 3.0), (20, 2.0), (30, 1.5), (40, 1.2), (60, 1.0)]
    assert [o for o in observations if o.phase == "eval"] == []  # the abandoned run's eval goes too
    assert (report.restarts, report.duplicates_dropped) == (1, 0)


def test_resume_is_detected_by_the_clock_even_when_a_stale_writer_could_continue(tmp_path: Path) -> None:
    # A second writer stopped at step 10; the run resumes at 30 with its clock reset to zero.
    log = _write(tmp_path / "trainer_log.jsonl", [
        _line(10, 3.0, "1:00:00"), _line(10, 3.0, "1:00:00"), _line(20, 2.0, "2:00:00"),
        _line(30, 9.0, "3:00:00"), _line(40, 9.0, "1 day, 4:00:00"),
        _line(30, 1.5, "0:00:30"), _line(30, 1.5, "0:00:30"), _line(40, 1.2, "0:01:00"),
    ])
    observations, report = read_log_with_report(log)
    assert _losses(observations) == [(10, 3.0), (20, 2.0), (30, 1.5), (40, 1.2)]
    assert (report.restarts, report.duplicates_dropped) == (1, 2)


def test_resume_without_clock_is_detected_by_the_step_alone(tmp_path: Path) -> None:
    steps_and_losses = [(1, 5.0), (2, 4.0), (3, 9.0), (2, 3.0), (3, 2.0)]
    lines = [json.dumps({"current_steps": s, "loss": loss}) for s, loss in steps_and_losses]
    observations, report = read_log_with_report(_write(tmp_path / "log.jsonl", lines))
    assert _losses(observations) == [(1, 5.0), (2, 3.0), (3, 2.0)]
    assert report.restarts == 1


def test_non_finite_values_are_kept_as_floats(tmp_path: Path) -> None:
    log = _write(tmp_path / "trainer_log.jsonl", [
        '{"current_steps": 1, "loss": NaN, "lr": 1e-4, "grad_norm": Infinity}',
        '{"current_steps": 2, "loss": "nan", "lr": 1e-4, "grad_norm": "-Infinity"}',
    ])
    first, second = read_log(log)
    assert math.isnan(first.metrics["loss"]) and first.metrics["grad_norm"] == math.inf
    assert math.isnan(second.metrics["loss"]) and second.metrics["grad_norm"] == -math.inf


def test_one_line_jsonl_is_read(tmp_path: Path) -> None:
    log = _write(tmp_path / "trainer_log.jsonl", [_line(5, 1.0)])
    assert _losses(read_log(log)) == [(5, 1.0)]


# --- synthetic: HF trainer_state.json ---------------------------------------------------------


def _state(history: list[object], path: Path) -> Path:
    text = json.dumps({"global_step": 3, "log_history": history}, indent=2)
    path.write_text(text, encoding="utf-8")
    return path


def test_trainer_state_train_eval_and_summary_entries(tmp_path: Path) -> None:
    log = _state([
        {"epoch": 0.5, "grad_norm": "NaN", "learning_rate": 1e-4, "loss": 2.0, "num_tokens": 10.0, "step": 1},
        {"epoch": 0.5, "eval_loss": "Infinity", "eval_runtime": 3.0, "eval_wer": 0.4, "step": 1},
        {"epoch": 1.0, "grad_norm": 1.0, "learning_rate": 5e-5, "loss": 1.0, "step": 2, "flag": True, "note": "x"},
        {"epoch": 1.0, "step": 2, "total_flos": 1e15, "train_loss": 1.5, "train_runtime": 9.0,
         "train_samples_per_second": 1.0, "train_steps_per_second": 0.2},
        {"loss": 0.5},  # no step: unreadable entry
        "not an entry",
    ], tmp_path / "trainer_state.json")
    observations, report = read_log_with_report(log)
    assert [(o.step, o.phase) for o in observations] == [(1, "train"), (1, "eval"), (2, "train")]
    first, evaluation, second = observations
    assert math.isnan(first.metrics["grad_norm"]) and first.metrics["num_tokens"] == 10.0
    assert evaluation.metrics == {"epoch": 0.5, "eval_loss": math.inf, "eval_runtime": 3.0, "eval_wer": 0.4}
    assert second.metrics == {"epoch": 1.0, "grad_norm": 1.0, "learning_rate": 5e-5, "loss": 1.0}
    assert report == LogReport("hf_trainer_state", str(log), skipped_lines=2)


def test_train_is_sorted_before_eval_at_the_same_step(tmp_path: Path) -> None:
    log = _state([
        {"loss": 3.0, "step": 5}, {"eval_loss": 1.0, "step": 10}, {"loss": 2.0, "step": 10},
    ], tmp_path / "trainer_state.json")
    assert [(o.step, o.phase) for o in read_log(log)] == [(5, "train"), (10, "train"), (10, "eval")]


def test_empty_log_history_is_an_empty_run(tmp_path: Path) -> None:
    assert read_log(_state([], tmp_path / "trainer_state.json")) == []


def test_format_is_detected_by_content_not_name(tmp_path: Path) -> None:
    state = _state([{"loss": 1.0, "step": 1}], tmp_path / "log.jsonl")
    jsonl = _write(tmp_path / "trainer_state.json", [_line(10, 3.0), _line(20, 2.0)])
    assert read_log_with_report(state)[1].format == "hf_trainer_state"
    assert read_log_with_report(jsonl)[1].format == "llamafactory_jsonl"


def test_observation_is_frozen() -> None:
    obs = Observation(1, {"loss": 1.0}, "train")
    with pytest.raises(dataclasses.FrozenInstanceError):
        obs.step = 2  # type: ignore[misc]


# --- directories ------------------------------------------------------------------------------


def test_directory_prefers_trainer_log_jsonl(tmp_path: Path) -> None:
    _state([{"loss": 9.0, "step": 1}], tmp_path / "trainer_state.json")
    _write(tmp_path / "trainer_log.jsonl", [_line(10, 3.0)])
    observations, report = read_log_with_report(tmp_path)
    assert _losses(observations) == [(10, 3.0)]
    assert report.path == str(tmp_path / "trainer_log.jsonl")


def test_directory_with_trainer_state(tmp_path: Path) -> None:
    _state([{"loss": 9.0, "step": 1}], tmp_path / "trainer_state.json")
    assert _losses(read_log(str(tmp_path))) == [(1, 9.0)]


def test_directory_of_checkpoints_uses_the_highest_numbered(tmp_path: Path) -> None:
    for number in (500, 900, 1000):
        (tmp_path / f"checkpoint-{number}").mkdir()
        _state([{"loss": float(number), "step": number}], tmp_path / f"checkpoint-{number}/trainer_state.json")
    (tmp_path / "checkpoint-final").mkdir()
    _state([{"loss": 0.0, "step": 99999}], tmp_path / "checkpoint-final/trainer_state.json")
    (tmp_path / "checkpoint-2000").mkdir()  # being written: no trainer_state.json yet
    observations, report = read_log_with_report(tmp_path)
    assert _losses(observations) == [(1000, 1000.0)]
    assert report.path == str(tmp_path / "checkpoint-1000/trainer_state.json")


# --- errors -----------------------------------------------------------------------------------

EXPECTED = "expected a Hugging Face trainer_state.json or a LLaMA-Factory trainer_log.jsonl"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LogFormatError, match=rf"nope\.json: no such file or directory; {EXPECTED}"):
        read_log(tmp_path / "nope.json")


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    (tmp_path / "trainer_log.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(LogFormatError, match=rf"trainer_log\.jsonl: file is empty; {EXPECTED}"):
        read_log(tmp_path / "trainer_log.jsonl")


def test_json_that_is_not_a_trainer_state(tmp_path: Path) -> None:
    (tmp_path / "trainer_state.json").write_text('{"best_metric": 1.0}', encoding="utf-8")
    with pytest.raises(LogFormatError, match=rf"trainer_state\.json: JSON object with no 'log_history' list; {EXPECTED}"):
        read_log(tmp_path / "trainer_state.json")


def test_json_list_is_not_a_trainer_state(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(LogFormatError, match=r"x\.json: JSON list with no 'log_history' list"):
        read_log(tmp_path / "x.json")


def test_log_history_that_is_not_a_list(tmp_path: Path) -> None:
    (tmp_path / "trainer_state.json").write_text('{"log_history": {}}', encoding="utf-8")
    with pytest.raises(LogFormatError, match=r"trainer_state\.json: 'log_history' is a dict, not a list"):
        read_log(tmp_path / "trainer_state.json")


def test_jsonl_where_no_line_is_a_record(tmp_path: Path) -> None:
    _write(tmp_path / "trainer_log.jsonl", ["", "garbage", '{"loss": 1.0}'])
    with pytest.raises(LogFormatError,
                       match=rf"trainer_log\.jsonl:2: no line is a JSON object with 'current_steps'.*; {EXPECTED}"):
        read_log(tmp_path / "trainer_log.jsonl")


def test_truncated_trainer_state_says_where_the_json_breaks(tmp_path: Path) -> None:
    text = json.dumps({"log_history": [{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}]}, indent=2)
    (tmp_path / "trainer_state.json").write_text(text[:60], encoding="utf-8")
    with pytest.raises(LogFormatError,
                       match=r"trainer_state\.json:1: .*whole file is not valid JSON \(.* at line \d+ column \d+\)"):
        read_log(tmp_path / "trainer_state.json")


def test_directory_without_a_log(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(LogFormatError,
                       match=r"no trainer_log\.jsonl, trainer_state\.json or checkpoint-\*/trainer_state\.json"):
        read_log(tmp_path)


def test_errors_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_log(tmp_path / "missing")


def test_the_assembler_says_what_each_record_did() -> None:
    from guardian.logs.training import Assembler, Placed, Record, jsonl_records

    def record(step: int, loss: float) -> Record:
        (found,) = jsonl_records(f'{{"current_steps": {step}, "loss": {loss}}}') or []
        return found

    assembler = Assembler()
    assert assembler.add(record(1, 2.0)) == Placed(kept=True, restarted=False)
    assert assembler.add(record(2, 1.9)) == Placed(kept=True, restarted=False)
    assert assembler.add(record(2, 1.9)) == Placed(kept=False, restarted=False)  # another writer, same step
    assert assembler.add(record(3, 1.8)) == Placed(kept=True, restarted=False)
    assert assembler.add(record(1, 2.1)) == Placed(kept=True, restarted=True)  # below every writer: a resume
    assert [(o.step, o.metrics["loss"]) for o in assembler.observations()] == [(1, 2.1)]
    assert (assembler.duplicates, assembler.restarts) == (1, 1)
    assert jsonl_records("not json") is None
