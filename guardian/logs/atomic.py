"""One atomic file write: a reader (or a crash) sees the old content or all of the new, never a part."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE_MODE = 0o600


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = PRIVATE_MODE,
                 overwrite: bool = True) -> None:
    """Write `data` (str as UTF-8) to `path` durably: a temporary file in the same folder is written, flushed
    and fsynced, then renamed over `path`, and the folder is fsynced so the rename survives a crash.

    `mode`: the new file's permission bits (None: the umask's default). With `overwrite=False` an existing
    `path` is never replaced: FileExistsError, and the file is left as it is. On any error the temporary file
    is removed and the error raised.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # the umask does not narrow what was asked for
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if `path` appeared meanwhile, and so never clobbers it
        fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a rename or a new name in `folder` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
