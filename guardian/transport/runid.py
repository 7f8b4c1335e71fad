"""A run's id at the daemon when the user names none: stable across resumes of the same run."""

from __future__ import annotations

import hashlib
import os
import socket


def default_run_id(output_dir: str | os.PathLike[str], run_name: str | None = None) -> str:
    """The run's name (else its output folder's) and a hash of the host and the folder's full path. The
    callback, `guardian attach` and `guardian push` all use this one."""
    path = os.path.abspath(output_dir)
    digest = hashlib.sha1(f"{socket.gethostname()}:{path}".encode()).hexdigest()[:8]
    return f"{run_name or os.path.basename(path.rstrip('/')) or 'run'}-{digest}"
