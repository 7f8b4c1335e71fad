"""Training logs on disk -> a sorted list of observations.

Reads a Hugging Face `trainer_state.json` (its `log_history`) or a LLaMA-Factory `trainer_log.jsonl`,
or a directory holding one of them. Metric keys are HF's own log keys (`loss`, `grad_norm`,
`learning_rate`, `eval_loss`, `epoch`, ...); this module is the one place LLaMA-Factory's `lr` and
`current_steps` are translated. NaN and inf are kept as floats: they are what a monitor looks for.

Real logs are messy, and the reader copes with three kinds of mess:

* unreadable lines (blank, garbage, a half-written last line) are skipped and counted;
* several processes appending to the same file (each rank logging, or two jobs sharing an output
  directory): each record is matched to the writer whose last step is the largest below its own, a
  record repeating another writer's last step is a new writer, and the first record kept at a step
  wins (later ones, identical or not, are counted as duplicates);
* a resumed run, whose steps go back to the checkpoint: a record that no writer can continue (its
  step is below every writer's last step, or LLaMA-Factory's `elapsed_time` went back) starts a new
  segment, which replaces every observation at or after its step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from guardian.errors import LogFormatError
from guardian.events import Phase
from guardian.logs.tail import lines_of

HF_TRAINER_STATE = "hf_trainer_state"
LLAMAFACTORY_JSONL = "llamafactory_jsonl"

TRAIN: Final[Phase] = "train"
EVAL: Final[Phase] = "eval"

_EXPECTED = "expected a Hugging Face trainer_state.json or a LLaMA-Factory trainer_log.jsonl"
_PHASE_ORDER = {TRAIN: 0, EVAL: 1}

# Keys of an HF log entry that describe the run, not the step (the last entry is a run summary).
_HF_BOOKKEEPING_KEYS = frozenset({
    "step", "total_flos", "train_loss", "train_runtime", "train_samples_per_second",
    "train_steps_per_second",
})
# LLaMA-Factory train keys -> HF keys; everything else on a train line is progress bookkeeping.
_LLAMAFACTORY_TRAIN_KEYS = {
    "loss": "loss", "lr": "learning_rate", "learning_rate": "learning_rate",
    "grad_norm": "grad_norm", "epoch": "epoch",
}
_MAX_WRITERS = 16
_CLOCK_SLACK_SECONDS = 2.0


@dataclass(frozen=True)
class Observation:
    """The metrics logged at one step, either by a training log call or by an evaluation."""

    step: int
    metrics: dict[str, float]
    phase: Phase


@dataclass(frozen=True)
class LogReport:
    """How a log file was read: its format and what was skipped, dropped or replaced on the way."""

    format: str  # "hf_trainer_state" or "llamafactory_jsonl"
    path: str
    skipped_lines: int = 0  # unreadable lines (jsonl) or entries (log_history); blank lines not counted
    duplicates_dropped: int = 0  # records at a step already kept by this or another writer
    restarts: int = 0  # step regressions read as a resumed run (not as interleaved writers)


@dataclass(frozen=True)
class Record:
    """One observation as a log line (or log_history entry) gave it, with the writer's clock if it had one."""

    observation: Observation
    clock_seconds: float | None  # time since the writer started, when the log says


@dataclass(frozen=True)
class _Parsed:
    format: str
    records: list[Record]
    skipped: int


def read_log(path: str | os.PathLike[str]) -> list[Observation]:
    """Read a training log (file or run directory) into observations sorted by step, train first."""
    observations, _ = read_log_with_report(path)
    return observations


def read_log_with_report(path: str | os.PathLike[str]) -> tuple[list[Observation], LogReport]:
    """Like `read_log`, and also say which format was read and what was skipped or dropped."""
    file = _resolve(Path(path))
    parsed = _parse(file, _read_text(file))
    assembler = assemble(parsed.records)
    report = LogReport(
        format=parsed.format, path=str(file), skipped_lines=parsed.skipped,
        duplicates_dropped=assembler.duplicates, restarts=assembler.restarts,
    )
    return assembler.observations(), report


# --- finding and reading the file -------------------------------------------------------------


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise LogFormatError(f"{path}: no such file or directory; {_EXPECTED}")
    if not path.is_dir():
        return path
    for name in ("trainer_log.jsonl", "trainer_state.json"):
        if (path / name).is_file():
            return path / name
    checkpoint = _latest_checkpoint_state(path)
    if checkpoint is None:
        raise LogFormatError(
            f"{path}: directory holds no trainer_log.jsonl, trainer_state.json or "
            f"checkpoint-*/trainer_state.json; {_EXPECTED}, or a run directory holding one"
        )
    return checkpoint


def _latest_checkpoint_state(directory: Path) -> Path | None:
    """The trainer_state.json of the highest-numbered checkpoint-N (it holds the whole history)."""
    found: list[tuple[int, Path]] = []
    for state in directory.glob("checkpoint-*/trainer_state.json"):
        number = state.parent.name.removeprefix("checkpoint-")
        if number.isdigit() and state.is_file():
            found.append((int(number), state))
    return max(found)[1] if found else None


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise LogFormatError(f"{path}: cannot be read ({err.strerror or err}); {_EXPECTED}") from err
    if not text.strip():
        raise LogFormatError(f"{path}: file is empty; {_EXPECTED}")
    return text


def _parse(path: Path, text: str) -> _Parsed:
    """Detect the format from the content (not the file name) and parse it."""
    try:
        document: Any = json.loads(text)
    except json.JSONDecodeError as err:
        return _parse_jsonl(path, text, whole_file_error=err)
    if isinstance(document, dict) and "log_history" in document:
        return _parse_trainer_state(path, document["log_history"])
    if isinstance(document, dict) and "current_steps" in document:
        return _parse_jsonl(path, text, whole_file_error=None)  # a one-line trainer_log.jsonl
    what = "object" if isinstance(document, dict) else type(document).__name__
    raise LogFormatError(f"{path}: JSON {what} with no 'log_history' list; {_EXPECTED}")


# --- Hugging Face trainer_state.json ----------------------------------------------------------


def _parse_trainer_state(path: Path, history: object) -> _Parsed:
    if not isinstance(history, list):
        raise LogFormatError(
            f"{path}: 'log_history' is a {type(history).__name__}, not a list; {_EXPECTED}"
        )
    records: list[Record] = []
    skipped = 0
    for entry in history:
        step = _as_step(entry.get("step")) if isinstance(entry, dict) else None
        if step is None:
            skipped += 1
            continue
        records.extend(Record(obs, None) for obs in _hf_observations(step, entry))
    return _Parsed(HF_TRAINER_STATE, records, skipped)


def read_trainer_state(path: Path) -> tuple[list[Observation], dict[str, Any]] | None:
    """One trainer_state.json's history, assembled, and the document; None while it cannot be read (missing,
    or half-written: a follower reads it again later)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        if not isinstance(doc, dict):
            return None
        parsed = _parse_trainer_state(path, doc.get("log_history"))
    except (OSError, json.JSONDecodeError, LogFormatError):
        return None
    return assemble(parsed.records).observations(), doc


def trainer_state_ends_run(doc: dict[str, Any]) -> bool:
    """Whether a trainer_state.json says the run is over: global_step reached max_steps."""
    step, limit = doc.get("global_step"), doc.get("max_steps")
    return isinstance(step, int) and isinstance(limit, int) and limit > 0 and step >= limit


def _hf_observations(step: int, entry: dict[str, Any]) -> list[Observation]:
    """A train observation if the entry has "loss", an eval one if it has eval_* keys; else none."""
    found: list[Observation] = []
    if "loss" in entry:
        train = {k: v for k, v in entry.items() if k not in _HF_BOOKKEEPING_KEYS and not k.startswith("eval_")}
        found.append(Observation(step, _numeric(train), TRAIN))
    evaluation = _eval_observation(step, entry)
    return found if evaluation is None else [*found, evaluation]


def _eval_observation(step: int, entry: dict[str, Any]) -> Observation | None:
    """The entry's numeric eval_* values (and its epoch), or None when it has none."""
    metrics = _numeric({k: v for k, v in entry.items() if k.startswith("eval_") or k == "epoch"})
    if not any(key.startswith("eval_") for key in metrics):
        return None
    return Observation(step, metrics, EVAL)


# --- LLaMA-Factory trainer_log.jsonl ----------------------------------------------------------


def _parse_jsonl(path: Path, text: str, whole_file_error: json.JSONDecodeError | None) -> _Parsed:
    records: list[Record] = []
    skipped = 0
    first_bad: int | None = None
    readable = 0
    for number, line in enumerate(lines_of(text), start=1):
        if not line.strip():
            continue
        parsed = jsonl_records(line)
        if parsed is None:
            skipped += 1
            first_bad = first_bad or number
            continue
        readable += 1
        records.extend(parsed)
    if readable == 0:
        raise LogFormatError(_no_records_message(path, first_bad or 1, whole_file_error))
    return _Parsed(LLAMAFACTORY_JSONL, records, skipped)


def _no_records_message(path: Path, line: int, whole_file_error: json.JSONDecodeError | None) -> str:
    message = f"{path}:{line}: no line is a JSON object with 'current_steps'"
    if whole_file_error is not None:
        err = whole_file_error
        message += f", and the whole file is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    return f"{message}; {_EXPECTED}"


def jsonl_records(line: str) -> list[Record] | None:
    """The records on one line, or None when the line is not a LLaMA-Factory log record."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = _as_step(obj.get("current_steps")) if isinstance(obj, dict) else None
    if step is None:
        return None
    clock = _parse_clock(obj.get("elapsed_time"))
    return [Record(obs, clock) for obs in _llamafactory_observations(step, obj)]


def _llamafactory_observations(step: int, obj: dict[str, Any]) -> list[Observation]:
    """A train observation if the line has "loss", an eval one if it has eval_* keys.

    The last line of a run (progress only, no loss) gives none: like HF's summary entry it is
    about the run, not a step.
    """
    found: list[Observation] = []
    if "loss" in obj:
        train = {_LLAMAFACTORY_TRAIN_KEYS[k]: v for k, v in obj.items() if k in _LLAMAFACTORY_TRAIN_KEYS}
        found.append(Observation(step, _numeric(train), TRAIN))
    evaluation = _eval_observation(step, obj)
    return found if evaluation is None else [*found, evaluation]


def jsonl_ends_run(line: str) -> bool:
    """Whether a trainer_log.jsonl line is LLaMA-Factory's last: current_steps reached total_steps, or
    percentage 100."""
    if '"total_steps"' not in line:
        return False
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    if not isinstance(obj, dict):
        return False
    steps, total, percentage = obj.get("current_steps"), obj.get("total_steps"), obj.get("percentage")
    if isinstance(percentage, (int, float)) and percentage >= 100:
        return True
    return isinstance(steps, int) and isinstance(total, int) and total > 0 and steps >= total


def _parse_clock(value: object) -> float | None:
    """Seconds from LLaMA-Factory's "H:MM:SS" or "N days, H:MM:SS"; None if it is neither."""
    if not isinstance(value, str):
        return None
    days, _, clock = value.rpartition(",")
    try:
        hours, minutes, seconds = (float(part) for part in clock.strip().split(":"))
        day_count = int(days.split()[0]) if days else 0
    except (ValueError, IndexError):
        return None
    return day_count * 86400 + hours * 3600 + minutes * 60 + seconds


# --- values -------------------------------------------------------------------------------------


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    """The values that are numbers (or number strings like "NaN", "Infinity"), as floats."""
    out: dict[str, float] = {}
    for key, value in values.items():
        number = _as_float(value)
        if number is not None:
            out[key] = number
    return out


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
    except (ValueError, OverflowError):
        return None
    return None


def _as_step(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def observation_order(obs: Observation) -> tuple[int, int]:
    """The order of observations in a run: by step, and at a step train before eval."""
    return obs.step, _PHASE_ORDER.get(obs.phase, 2)


# --- writers, duplicates and restarts ---------------------------------------------------------


@dataclass
class _Writer:
    """One process appending to the log: the last step (and clock) it wrote."""

    step: int
    clock_seconds: float | None

    def can_continue_with(self, record: Record) -> bool:
        if record.observation.step <= self.step:
            return False
        if record.clock_seconds is None or self.clock_seconds is None:
            return True
        return record.clock_seconds + _CLOCK_SLACK_SECONDS >= self.clock_seconds


@dataclass(frozen=True)
class Placed:
    """What adding one record did: whether it was kept (the first at its phase and step) and whether it
    started a new segment (a resumed run: what was kept from its step on was dropped first)."""

    kept: bool
    restarted: bool


@dataclass
class Assembler:
    """Turns records in file order into unique observations, handling writers and restarts."""

    duplicates: int = 0
    restarts: int = 0
    _kept: dict[tuple[str, int], Observation] = field(default_factory=dict)
    _writers: dict[str, list[_Writer]] = field(default_factory=dict)

    def add(self, record: Record) -> Placed:
        """Place a record (the next in file order) and keep its observation unless its step has one."""
        restarts = self.restarts
        self._place(record)
        obs = record.observation
        key = (obs.phase, obs.step)
        if key in self._kept:
            self.duplicates += 1
            return Placed(kept=False, restarted=self.restarts > restarts)
        self._kept[key] = obs
        return Placed(kept=True, restarted=self.restarts > restarts)

    def observations(self) -> list[Observation]:
        """The kept observations, by step (train before eval at a step)."""
        return sorted(self._kept.values(), key=observation_order)

    def _place(self, record: Record) -> None:
        """Advance the writer this record continues, or open a writer, or start a new segment."""
        writers = self._writers.setdefault(record.observation.phase, [])
        candidates = [w for w in writers if w.can_continue_with(record)]
        if candidates:
            writer = max(candidates, key=lambda w: w.step)
            writer.step, writer.clock_seconds = record.observation.step, record.clock_seconds
            return
        if writers and not any(w.step == record.observation.step for w in writers):
            self._restart(record.observation.step)
            writers = self._writers.setdefault(record.observation.phase, [])
        if len(writers) < _MAX_WRITERS:
            writers.append(_Writer(record.observation.step, record.clock_seconds))

    def _restart(self, step: int) -> None:
        """A resumed run: what was logged at or after `step` (any kind) belongs to the abandoned run."""
        self.restarts += 1
        self._kept = {key: obs for key, obs in self._kept.items() if key[1] < step}
        self._writers = {}


def assemble(records: Iterable[Record]) -> Assembler:
    """An assembler that took `records` in order (its `observations()` are what they give)."""
    assembler = Assembler()
    for record in records:
        assembler.add(record)
    return assembler
