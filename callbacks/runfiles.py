"""The files a run shares with its supervisor (`guardian run`) and with its own resumes.

- the supervisor file (`GUARDIAN_SUPERVISOR_FILE`): where the run writes, its good checkpoints and any restart
  request, rewritten whenever one of them changes;
- the state file in each checkpoint (`guardian_state.json`): the rules' state, the learning rate's scale and the
  action counts, read back when the run resumes from that checkpoint or rolls back to it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from guardian.callbacks.checkpoints import GoodCheckpoints
from guardian.commands.supervisor import ENV_RESTART, ENV_STATE
from guardian.logs.atomic import write_atomic

log = logging.getLogger("guardian")
STATE_FILE = "guardian_state.json"
RESUME_FROM_ENV = "GUARDIAN_RESUME_FROM"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` atomically (a reader never sees half a file)."""
    write_atomic(path, json.dumps(data), mode=None)


def restart_number() -> int:
    """Which attempt of a supervised run this is (`guardian run` sets GUARDIAN_RESTART: 0 first, N at the Nth
    restart); 0 outside `guardian run`."""
    try:
        return max(0, int(os.environ.get(ENV_RESTART, "0")))
    except ValueError:
        return 0


def resumed_from() -> str | None:
    """The checkpoint `guardian run` restarted this run from (GUARDIAN_RESUME_FROM), if any."""
    return os.environ.get(RESUME_FROM_ENV) or None


def run_dirs_of(checkpoint: str) -> list[Path]:
    """The run folders a checkpoint may belong to: `RUN/checkpoint-N` or `RUN/guardian/good/checkpoint-N`."""
    folder = Path(checkpoint).resolve()
    dirs = [folder.parent]
    if folder.parent.name == "good" and folder.parent.parent.name == "guardian":
        dirs.append(folder.parent.parent.parent)
    return dirs


class SupervisorFile:
    """Under `guardian run`: tells the supervisor where the run writes, its good checkpoints, and any restart
    request. Outside it (no GUARDIAN_SUPERVISOR_FILE) telling does nothing."""

    def __init__(self, path: Path | None = None) -> None:
        env = os.environ.get(ENV_STATE)
        self.path = path if path is not None else (Path(env) if env else None)

    def tell(self, output_dir: str, good: GoodCheckpoints | None, restart_request: Path | None) -> None:
        """Rewrite the file with what the supervisor needs to know now."""
        if self.path is None:
            return
        write_json(self.path, {
            "output_dir": output_dir,
            "good_checkpoints": [str(good.root / f"checkpoint-{s}") for s in good.steps()] if good else [],
            "restart_request": (json.loads(restart_request.read_text())
                                if restart_request and restart_request.is_file() else None),
        })


def save_state(checkpoint: Path, state: dict[str, Any]) -> None:
    """Write Guardian's state beside a checkpoint's weights."""
    write_json(checkpoint / STATE_FILE, state)


def saved_state_for_resume(output_dir: str, global_step: int) -> tuple[Path, dict[str, Any]] | None:
    """The state saved with the checkpoint a run resumes from at `global_step` (the supervisor's choice first,
    then the run's own checkpoint, then Guardian's copy of a good one), or None."""
    candidates = [Path(p) / STATE_FILE for p in (resumed_from(),) if p]
    candidates += [Path(output_dir) / folder / f"checkpoint-{global_step}" / STATE_FILE
                   for folder in (".", "guardian/good")]
    saved = next((c for c in candidates if c.is_file()), None)
    return None if saved is None else (saved, json.loads(saved.read_text()))


def saved_engine_state(checkpoint: str) -> Any:
    """The rules' state saved with a checkpoint, or None when there is none to read."""
    try:
        return json.loads((Path(checkpoint) / STATE_FILE).read_text()).get("engine")
    except (OSError, ValueError):
        return None
