"""Errors Guardian raises for a user's mistakes: each names the place and says what to do."""

from __future__ import annotations

from dataclasses import dataclass


class GuardianError(Exception):
    """Root of every error Guardian raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a rule file, with where it is and how to fix it."""

    file: str
    line: int | None
    rule: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        rule = f" rule '{self.rule}':" if self.rule else ""
        return f"{where}:{rule} {self.message}"


class RuleFileError(GuardianError, ValueError):
    """A rule file could not be used; carries one `Problem` per mistake found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class LogFormatError(GuardianError, ValueError):
    """A training log (trainer_state.json, trainer_log.jsonl) could not be read."""


class ConfigError(GuardianError, ValueError):
    """A bad option given to Guardian in code or on the command line."""
