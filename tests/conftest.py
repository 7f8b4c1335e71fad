"""Fixtures shared by several test files.

The test files live in subfolders that mirror the package (tests/engine/, tests/daemon/, ...) and import the
shared kits in tests/ (daemonkit, trainkit, realpaths, repopaths, ...) by their bare names: pytest's default
"prepend" import mode puts this file's folder, tests/, first on sys.path when it loads this conftest, and
each test file's own folder when it loads that file.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as the fault suite runs (a tiny model trains several times slower with two on a busy
    machine). The fault-suite test files use it for every test (`pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
