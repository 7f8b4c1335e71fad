"""Which verdict a step acts on in daemon mode: the daemon's, if it answers in time, else the embedded engine's.

Each judged step waits for the daemon's verdict on it (its decisions), at most `deadline_seconds` after the
first step still waiting; the verdicts are settled before the next update. A skip cannot wait for a round trip,
so the embedded engine makes the skips of the update being made now; a verdict that repeats one of them is not
carried out twice. The operator's queued commands come with the daemon's replies and are settled with them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from guardian.engine.actions import ActionKind, ActionSpec, Plan, merge
from guardian.engine.engine import Decision, decision_from_event
from guardian.events import Command
from guardian.transport.client import DaemonLink

DAEMON = "daemon"
LOCAL_FALLBACK = "local_fallback"


@dataclass(frozen=True)
class PendingStep:
    """A judged step waiting for the daemon's verdict: its event's seq and the embedded engine's decisions."""

    seq: int
    step: int
    local: list[Decision]


@dataclass(frozen=True)
class Verdict:
    """What to carry out now: the decisions on earlier steps (and whose they are), the operator's commands, and
    the plan they merge into (None: nothing was decided or commanded)."""

    decisions: list[Decision] = field(default_factory=list)
    source: str = ""
    commands: list[Command] = field(default_factory=list)
    plan: Plan | None = None
    onset_step: int = 0


class VerdictArbiter:
    """Rank 0 in daemon mode: collects the daemon's verdicts (or ours, past the deadline) and its commands.

    `link` is None on the other ranks and without a daemon: nothing is pending and the verdict is empty."""

    def __init__(self, link: DaemonLink | None = None, deadline_seconds: float = 0.5) -> None:
        self.link = link
        self.deadline_seconds = deadline_seconds
        self.counts = {DAEMON: 0, LOCAL_FALLBACK: 0}  # whose verdict each settling used
        self.pending: list[PendingStep] = []
        self._pending_since_seconds = 0.0  # time.monotonic() when the oldest pending step was judged
        self._acted_early: set[tuple[int, str]] = set()  # (step, rule) of skips made before the verdict

    def await_verdict(self, seq: int, step: int, local: list[Decision]) -> None:
        """Step `step` (its event numbered `seq`) was judged here as `local`: wait for the daemon's verdict."""
        if self.link is None:
            return
        if not self.pending:
            self._pending_since_seconds = time.monotonic()
            self.link.want_decisions_from(step)
        self.pending.append(PendingStep(seq, step, local))

    def acted_early(self, decisions: list[Decision]) -> None:
        """These decisions' skips were made at their own step: a verdict repeating them is not acted on again."""
        self._acted_early.update((d.step, d.rule) for d in decisions)

    def settle(self, step: int) -> Verdict:
        """The verdict to carry out before the update of `step`: decisions (without the skips, made already) and
        commands, merged into one plan."""
        decisions, source, commands = self._collect() if self.link is not None else ([], "", [])
        self._acted_early.clear()
        actions = [a for d in decisions for a in d.actions if a.kind is not ActionKind.SKIP_UPDATE]
        actions += [ActionSpec(c.action, dict(c.params)) for c in commands]
        plan = merge(actions) if decisions or commands else None
        onset = min([d.finding.onset_step for d in decisions], default=step)
        return Verdict(decisions, source, commands, plan, onset)

    def _collect(self) -> tuple[list[Decision], str, list[Command]]:
        """The verdicts on the pending steps (the daemon's if in time, else ours) and the queued commands."""
        assert self.link is not None
        decisions: list[Decision] = []
        source = ""
        if self.pending:
            last = self.pending[-1]
            left_seconds = self.deadline_seconds - (time.monotonic() - self._pending_since_seconds)
            if self.link.wait_for(last.seq, max(0.0, left_seconds)):
                decisions = [decision_from_event(d) for d in self.link.take_decisions(last.step)]
                self.counts[DAEMON] += 1
                source = DAEMON
            else:
                self.link.take_decisions(last.step)  # a late answer about these steps is not acted on
                decisions = [d for pending in self.pending for d in pending.local]
                self.counts[LOCAL_FALLBACK] += 1
                source = "local (daemon late)"
            self.pending.clear()
        # The skips were already made when those steps' updates happened.
        decisions = [d for d in decisions if (d.step, d.rule) not in self._acted_early]
        return decisions, source, self.link.take_commands()
