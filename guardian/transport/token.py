"""The daemon's token (needed for every write) and runs' keys (binding a run id to the process that reports it).

The daemon creates `<state dir>/token` on first start (atomically: a 0600 temporary file, fsync, then a link
into place, so a crash or a full disk never leaves a half-written or empty token behind) and refuses a token
file it cannot trust. Every process that writes to the daemon (the callback, `guardian push`, `attach`,
`ctl`) reads the token from `GUARDIAN_TOKEN`, else from `$GUARDIAN_HOME/token` (default `~/.guardian/token`).

A run's key travels in the `X-Guardian-Run-Key` header of every report. The first report of a run id binds the
run to the key it carries (or to one the daemon makes and returns as `run_key` in the reply); after that only
reports with that key are taken, until the run has ended. The sender keeps its key next to the run's own files
(`<output_dir>/guardian/run_key`, mode 0600), so a restarted or resumed process continues the same run.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from pathlib import Path

from guardian.errors import ConfigError
from guardian.logs.atomic import write_atomic

log = logging.getLogger("guardian.token")
TOKEN_ENV = "GUARDIAN_TOKEN"
HOME_ENV = "GUARDIAN_HOME"
MIN_TOKEN_CHARS = 32
RUN_KEY_HEADER = "X-Guardian-Run-Key"
RUN_KEY_FILE = "run_key"
_TOKEN = re.compile(r"[!-~]+")  # printable ASCII without spaces: it travels in an HTTP header


def default_state_dir() -> Path:
    """The daemon's state folder: `$GUARDIAN_HOME`, else `~/.guardian`."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".guardian")


def token_path(state_dir: Path) -> Path:
    return state_dir / "token"


def load_or_create_token(state_dir: Path) -> str:
    """The daemon's token from `state_dir/token`, created there on first start (or when the file is empty).

    A file holding a short or malformed token is refused (ConfigError): deleting it has a new one made. An
    empty file (left by a first start on a full disk) is replaced, since no client can hold an empty token."""
    _make_private_dir(state_dir)
    path = token_path(state_dir)
    if path.exists():
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            _check(text, path)
            _warn_if_readable(path)
            return text
        log.warning("%s is empty (a first start that could not write it?); writing a new token", path)
    token = secrets.token_urlsafe(32)
    if not _write_atomically(path, token + "\n", replace=path.exists()):
        return load_or_create_token(state_dir)  # another daemon starting at the same time wrote one first
    return token


def find_token() -> tuple[str | None, str]:
    """A writer's token: `$GUARDIAN_TOKEN`, else the daemon's token file; (None, why) when there is none."""
    given = os.environ.get(TOKEN_ENV, "").strip()
    if given:
        return given, TOKEN_ENV
    path = token_path(default_state_dir())
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as exc:
        return None, f"{TOKEN_ENV} is not set and {path} cannot be read ({exc.strerror or exc})"
    if not text:
        return None, f"{TOKEN_ENV} is not set and {path} is empty"
    return text, str(path)


def new_run_key() -> str:
    return secrets.token_urlsafe(32)


def valid_run_key(key: str) -> bool:
    return MIN_TOKEN_CHARS <= len(key) <= 200 and _TOKEN.fullmatch(key) is not None


def load_or_create_run_key(folder: Path) -> str:
    """The run key kept in `folder/run_key` (a run's `<output_dir>/guardian`), made there (0600) if missing
    or unusable."""
    path = folder / RUN_KEY_FILE
    try:
        key = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        key = ""
    if valid_run_key(key):
        return key
    folder.mkdir(parents=True, exist_ok=True)
    key = new_run_key()
    if not _write_atomically(path, key + "\n", replace=path.exists()):
        return load_or_create_run_key(folder)
    return key


def _check(token: str, path: Path) -> None:
    if not _TOKEN.fullmatch(token):
        raise ConfigError(f"{path}: the token there holds spaces or characters that are not printable ASCII; "
                          "delete the file and start the daemon again to have a new one generated")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{path}: the token there is {len(token)} characters, fewer than the {MIN_TOKEN_CHARS} "
                          "needed; delete the file and start the daemon again to have a new one generated "
                          f"(clients read it from there or from {TOKEN_ENV})")


def _make_private_dir(state_dir: Path) -> None:
    """Create the state folder with mode 0700, or make an existing one of ours so (one made by an older version
    has the umask's 0755); warn when it is someone else's and open to others."""
    if not state_dir.exists():
        state_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    info = state_dir.stat()
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return
    if info.st_uid == os.getuid():
        os.chmod(state_dir, 0o700)  # mkdir's mode is filtered by the umask
    else:
        log.warning("%s (the daemon's state: token and store) has mode %04o, open to other users; run chmod 700 %s",
                    state_dir, mode, state_dir)


def _warn_if_readable(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s has mode %04o: other users can read the daemon's token and write to every run; "
                    "run chmod 600 %s", path, mode, path)


def _write_atomically(path: Path, text: str, *, replace: bool) -> bool:
    """Write `path` with mode 0600 so that it holds either nothing or all of `text`, never a part; False when
    (not `replace`) the file appeared meanwhile and was left as it is."""
    try:
        write_atomic(path, text, mode=0o600, overwrite=replace)  # no overwrite: never clobbers another daemon's
    except FileExistsError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}; free some space or fix the folder's "
                          "permissions, then start again") from None
    return True
