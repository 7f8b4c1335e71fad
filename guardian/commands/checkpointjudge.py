"""`guardian attach`'s checkpoint judge: which checkpoints of a followed run are good, marked on disk and as
events.

A checkpoint is good when every step since the checkpoint before it (and at least `quiet_steps` steps up to its
step) has a train line in the log and no rule fired in them: `checkpoint-N/guardian_good.json` is written and
`<output_dir>/guardian/last_good_checkpoint` holds its path (both atomically).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from guardian.engine.engine import Decision
from guardian.events import CheckpointEvent
from guardian.logs.atomic import write_atomic
from guardian.logs.training import TRAIN, Observation

STATE = "trainer_state.json"
GOOD_MARK = "guardian_good.json"
LAST_GOOD = "last_good_checkpoint"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def write_marker(path: Path, text: str) -> None:
    """Write a mark or pointer file whole (its folder made if needed), with the umask's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text, mode=None)


class CheckpointJudge:
    """The checkpoints of one output directory: found as they appear, judged good or not on the decisions around
    them, and marked; `emit` records each verdict, `say` prints a line."""

    def __init__(self, output_dir: Path, *, quiet_steps: int, rules_source: str,
                 emit: Callable[[CheckpointEvent], None], say: Callable[[str], None]) -> None:
        self.output_dir, self.quiet_steps, self.rules_source = output_dir, quiet_steps, rules_source
        self.emit, self.say = emit, say
        self._known: set[int] = set()  # checkpoint steps seen (judged or pending)
        self._pending: dict[int, Path] = {}
        self._good: list[tuple[int, Path]] = []
        self._judged: list[int] = []  # checkpoint steps judged, good or not

    @property
    def last_good(self) -> Path | None:
        """The newest checkpoint marked good."""
        return self._good[-1][1] if self._good else None

    @property
    def newest_pending_step(self) -> int | None:
        """The step of the newest checkpoint found and not judged yet."""
        return max(self._pending, default=None)

    def resume_point(self, before: int) -> Path | None:
        """The newest checkpoint marked good, still on disk, from before step `before`."""
        for step, folder in reversed(self._good):
            if step < before and folder.is_dir():
                return folder
        return None

    def discover(self) -> None:
        """Find the checkpoints saved since the last look."""
        for state in self.output_dir.glob(f"checkpoint-*/{STATE}"):
            number = state.parent.name.removeprefix("checkpoint-")
            if number.isdigit() and int(number) not in self._known:
                self._known.add(int(number))
                self._pending[int(number)] = state.parent

    def forget_from(self, step: int) -> None:
        """A resume at `step`: the checkpoints from it on belong to the abandoned run."""
        self._known = {n for n in self._known if n < step}
        self._pending = {n: p for n, p in self._pending.items() if n < step}
        self._good = [(n, p) for n, p in self._good if n < step]
        self._judged = [n for n in self._judged if n < step]

    def judge(self, through: int, fed: Sequence[Observation], decisions: Sequence[Decision], *,
              interval_steps: int | None, last_step: int | None) -> None:
        """Mark each pending checkpoint up to step `through` good, or not, on the decisions around it."""
        for step in sorted(n for n in self._pending if n <= through):
            folder = self._pending.pop(step)
            if not folder.is_dir() or not fed or fed[0].step > step:
                continue  # rotated away already, or no log covers it
            start = self._window_start(step)
            self._judged.append(step)
            near = [d for d in decisions if start <= d.step <= step]
            gap = _unlogged(fed, max(start, 1), step, interval_steps)
            if near:
                self._not_good(step, folder, f"{near[-1].rule} fired at step {near[-1].step}", near[-1].rule)
            elif gap is not None:
                self._not_good(step, folder, gap, None)
            else:
                self._mark_good(step, folder, max(start, 1), last_step)

    def unmark(self, late: Sequence[Decision]) -> None:
        """Decisions that came late (with a checkpoint's grad norms): the checkpoints marked good whose steps they
        fall on are not good after all, and last_good_checkpoint goes back to the newest one still good."""
        for step, folder in list(self._good):
            start = self._window_start(step)
            near = [d for d in late if start <= d.step <= step]
            if not near:
                continue
            self._good.remove((step, folder))
            self._not_good(step, folder, f"{near[-1].rule} fired at step {near[-1].step}", near[-1].rule)
            last = self.last_good
            try:
                if last is not None:
                    write_marker(self.output_dir / "guardian" / LAST_GOOD, f"{last}\n")
                else:
                    (self.output_dir / "guardian" / LAST_GOOD).unlink(missing_ok=True)
            except OSError as exc:
                self.say(f"guardian/{LAST_GOOD}: could not update it ({exc})")

    def _window_start(self, step: int) -> int:
        """The first step a checkpoint at `step` is judged on: the quiet window, or since the checkpoint before."""
        earlier = max((n for n in self._judged if n < step), default=0)
        return max(0, min(step - self.quiet_steps, earlier + 1))

    def _mark_good(self, step: int, folder: Path, start: int, last_step: int | None) -> None:
        mark = {"step": step, "path": str(folder), "quiet_steps": self.quiet_steps, "rules": self.rules_source,
                "judged_through_step": last_step, "marked_by": "guardian attach", "time": round(time.time(), 3)}
        try:
            write_marker(folder / GOOD_MARK, json.dumps(mark, indent=2) + "\n")
            write_marker(self.output_dir / "guardian" / LAST_GOOD, f"{folder}\n")
        except OSError as exc:
            self.say(f"{folder.name}: could not mark it good ({exc})")
            return
        self._good.append((step, folder))
        self.say(f"{folder.name} is good (every step {start}-{step} logged, no rule fired): "
                 f"written to guardian/{LAST_GOOD}")
        self.emit(CheckpointEvent(step=step, good=True, path=str(folder)))

    def _not_good(self, step: int, folder: Path, why: str, rule: str | None) -> None:
        (folder / GOOD_MARK).unlink(missing_ok=True)  # a mark left by an abandoned run's checkpoint
        self.say(f"{folder.name} is not marked good: {why}")
        self.emit(CheckpointEvent(step=step, good=False, path=str(folder), why=why, rule=rule))


def _unlogged(fed: Sequence[Observation], first: int, last: int, interval_steps: int | None) -> str | None:
    """Why the log cannot show steps `first`..`last` were healthy (some have no train line), or None.

    A log line every k steps says nothing certain of the steps between (Trainer's logged loss is an
    average, and NaN losses are left out of it), so a checkpoint is judged only on steps the log shows."""
    train = [o.step for o in fed if o.phase == TRAIN]
    first = max(first, train[0]) if train else first  # a log that starts later (a resumed run) from its start
    logged = {n for n in train if first <= n <= last}
    if len(logged) == last - first + 1:
        return None
    steps = sorted(logged)
    gaps = {b - a for a, b in zip(steps, steps[1:])} or {interval_steps or 1}
    if len(gaps) == 1 and min(gaps) > 1:  # a line every k steps, not a few lines lost
        return (f"the log covers only every {_ordinal(min(gaps))} step, so steps {first}-{last} cannot "
                f"all be known healthy (log every step, logging_steps: 1, for good checkpoints)")
    missing = next(n for n in range(first, last + 1) if n not in logged)
    return f"step {missing} is not in the log, so steps {first}-{last} cannot all be known healthy"
