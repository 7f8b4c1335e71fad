"""`guardian run -- COMMAND`: run a training command with Guardian injected, and restart it when it dies.

The child gets Guardian through `sitecustomize` (see `guardian.testing.inject`). Its GuardianCallback reports the
run's output folder and its good checkpoints (saved while healthy, with finite weights) to a state file the
supervisor reads. When the child dies (an exception, CUDA OOM, a NaN abort, SIGKILL) or asks for a restart
(rollback of sharded FSDP/DeepSpeed state), the supervisor restarts it resuming from the newest good
checkpoint, within a restart budget and with growing back-off, optionally with a lower learning rate.
Ctrl-C and SIGTERM go to the child, which ends cleanly.

Only a crash mid-training is restarted. A command that fails before its first training step (a tokenizer that
cannot load, a typo in the script, an out-of-memory error at model load) would fail the same way again: the
supervisor says so and stops. The first step is seen in the child's event log (`OUTPUT_DIR/guardian/events.jsonl`:
an event of this attempt with a step past the one it started at, a saved checkpoint included); a child that never
began training (no state file) has surely not reached it. Where it cannot tell (no event log; killed by a signal,
which loses the log's buffered lines) it restarts as before. A restarted run that fails at its own start-up (its
checkpoint will not load, the crashed process still holds the GPU) is restarted within the same budget: the
command is known to work, so the cause may pass; the next attempt resumes from the good checkpoint before the one
that failed to load, if there is one.

Each attempt gets GUARDIAN_RESTART: 0 in the first, N in the Nth restart (the pre-flight advice, for one, is
given once per run).

Exit codes: 0 the run finished; 1 gave up (the command failed before its first step, or a crash loop used up the
restart budget); 130 interrupted (SIGINT); 143 terminated (SIGTERM); 2 bad usage.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardian.errors import ConfigError
from guardian.events import AnyEvent, StartEvent
from guardian.logs.eventlog import decode_line
from guardian.testing.inject import ENV_OPTIONS, ENV_RESUME

log = logging.getLogger("guardian.run")
ENV_STATE = "GUARDIAN_SUPERVISOR_FILE"
ENV_RESTART = "GUARDIAN_RESTART"  # 0 in the first attempt, N in the Nth restart: say once-per-run things at 0
EXIT_GAVE_UP, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 130, 143
EVENTS_TAIL_BYTES = 1 << 20  # the part of the event log read to find this attempt's steps

SITECUSTOMIZE = '''"""Installed by `guardian run`: puts Guardian into every transformers Trainer of this process."""
import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys

try:
    from guardian.testing.inject import install as _install
    _install()
except Exception as _exc:  # never stop the user's program
    print(f"guardian: injection failed ({_exc}); training runs unguarded", file=_sys.stderr)

# Chain to the sitecustomize this one shadows, if any (a module of the spec's own name: a file loader refuses
# to run its file as a module of another name).
_here = _os.path.dirname(_os.path.abspath(__file__))
_spec = _machinery.PathFinder.find_spec("sitecustomize", [p for p in _sys.path if _os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(_util.module_from_spec(_spec))
'''


@dataclass
class Supervisor:
    """Runs `command` until it finishes, restarting it from good checkpoints when it dies."""

    command: list[str]
    max_restarts: int = 3
    backoff_seconds: float = 5.0
    lr_factor_on_restart: float | None = None
    callback_options: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None
    restarts: int = 0
    _child: subprocess.Popen[bytes] | None = None
    _signal: int | None = None

    def run(self) -> int:
        if not self.command:
            raise ConfigError("give the command to run after `--`, e.g. guardian run -- python train.py")
        with tempfile.TemporaryDirectory(prefix="guardian-run-") as tmp:
            inject = Path(tmp) / "inject"
            inject.mkdir()
            (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
            state_file = Path(tmp) / "run.json"
            previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                return self._loop(inject, state_file)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _loop(self, inject: Path, state_file: Path) -> int:
        resume: str | None = None
        failed_from: set[str] = set()  # checkpoints a restarted run failed to start from
        while True:
            started_at = time.time()
            code = self._start(inject, state_file, resume).wait()
            if self._signal is not None:
                return EXIT_INTERRUPTED if self._signal == signal.SIGINT else EXIT_TERMINATED
            state = _read_state(state_file)
            request = state.get("restart_request")
            if code == 0 and not request:
                log.warning("guardian run: the run finished")
                return 0
            why = f"exited with code {code}" if code > 0 else f"was killed by {_signal_name(-code)}"
            if request:
                why = "asked for a restart from its last good checkpoint (sharded state)"
            elif not _made_progress(code, state, started_at):
                if not self.restarts:
                    how = f"exit code {code}" if code > 0 else f"killed by {_signal_name(-code)}"
                    log.error("guardian run: the training command failed before its first step (%s); Guardian "
                              "restarts only runs that crash mid-training — fix the error above and run again", how)
                    return EXIT_GAVE_UP
                why += " before its first step" + (f" (resuming from {resume})" if resume else "")
                if resume:
                    failed_from.add(resume)
            if self.restarts >= self.max_restarts:
                log.error("guardian run: the training process %s; gave up after %d restarts (the restart budget, "
                          "--max-restarts). Read its output above for the cause.", why, self.restarts)
                return EXIT_GAVE_UP
            resume = (request or {}).get("resume_from") or _newest_good(state, failed_from) or resume
            if resume in failed_from:
                resume = _newest_good({"good_checkpoints": _good_before(Path(resume))}, failed_from) or resume
            self.restarts += 1
            wait = self.backoff_seconds * 2 ** (self.restarts - 1)
            start = f"resuming from {resume}" if resume else "from the beginning (no good checkpoint yet)"
            log.warning("guardian run: the training process %s; restart %d of %d in %.0f s, %s",
                        why, self.restarts, self.max_restarts, wait, start)
            time.sleep(wait)
            if self._signal is not None:
                return EXIT_INTERRUPTED if self._signal == signal.SIGINT else EXIT_TERMINATED
            state_file.unlink(missing_ok=True)

    def _start(self, inject: Path, state_file: Path, resume: str | None) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(inject), env.get("PYTHONPATH", "")) if p)
        options = dict(self.callback_options)
        if self.restarts and self.lr_factor_on_restart:
            options["lr_factor_at_start"] = self.lr_factor_on_restart ** self.restarts
        env[ENV_OPTIONS] = json.dumps(options)
        env[ENV_STATE] = str(state_file)
        env[ENV_RESTART] = str(self.restarts)
        env.pop(ENV_RESUME, None)
        if resume:
            env[ENV_RESUME] = resume
        self._child = subprocess.Popen(self.command, env=env, cwd=self.workdir)
        return self._child

    def _forward(self, signum: int, frame: Any) -> None:
        """Ctrl-C and SIGTERM end the child cleanly, and the supervisor with it."""
        self._signal = signum
        child = self._child
        if child is not None and child.poll() is None and signum == signal.SIGTERM:
            child.send_signal(signum)  # Ctrl-C already reached the child through the terminal's process group
        elif child is not None and child.poll() is None and not sys.stdin.isatty():
            child.send_signal(signum)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _newest_good(state: dict[str, Any], skip: Collection[str] = ()) -> str | None:
    good = [p for p in state.get("good_checkpoints", []) if Path(p, "trainer_state.json").exists() and p not in skip]
    return good[-1] if good else None


def _good_before(checkpoint: Path) -> list[str]:
    """The good checkpoints beside `checkpoint` (`.../guardian/good/checkpoint-N`) older than it, oldest first."""
    def step(path: Path) -> int:
        tail = path.name.rpartition("-")[2]
        return int(tail) if tail.isdigit() else -1
    siblings = checkpoint.parent.glob("checkpoint-*") if checkpoint.parent.is_dir() else []
    return [str(p) for p in sorted(siblings, key=step) if -1 < step(p) < step(checkpoint)]


def _made_progress(code: int, state: dict[str, Any], started_at: float) -> bool:
    """Did the attempt started at `started_at` get past its first training step? True where it cannot tell."""
    if not state:
        return False  # it never began training: the callback tells the supervisor at train begin
    if code < 0:
        return True  # a signal loses the event log's buffered lines
    output_dir = state.get("output_dir")
    events = Path(output_dir, "guardian", "events.jsonl") if output_dir else None
    if events is None or not events.is_file():
        return True
    ours = [e for e in _tail_events(events) if e.time >= started_at]
    starts = [i for i, e in enumerate(ours) if isinstance(e, StartEvent)]
    if not starts:
        return True  # no start written (no event log this time), or more than the tail since it
    first = starts[-1]
    begun = ours[first].step or 0
    return any(e.step is not None and e.step > begun for e in ours[first + 1:])


def _tail_events(path: Path) -> list[AnyEvent]:
    """The events in the last EVENTS_TAIL_BYTES of an event log (a line cut by that limit is dropped)."""
    try:
        with path.open("rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - EVENTS_TAIL_BYTES)
            f.seek(start)
            lines = f.read().splitlines()[1 if start else 0:]
    except OSError:
        return []
    return [event for event in map(decode_line, lines) if event is not None]  # None: a half-written last line


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
