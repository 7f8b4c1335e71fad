"""Under DDP (torchrun, 2 processes, gloo on CPU): one decision, every rank, the same step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from daemonkit import DaemonProcess, free_port
from repopaths import SCRIPTS_DIR

from guardian import events
from guardian.events import ActionEvent

SCRIPT = SCRIPTS_DIR / "ddp_train.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def torchrun(out: Path, scenario: str, url: str | None = None, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run the DDP script with 2 ranks (bounded time: a hang fails the test); return each rank's record."""
    args = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT), str(out), scenario]
    if url:
        args.append(url)
    result = subprocess.run(args, capture_output=True, text=True, timeout=420,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    ranks = [out / f"rank-{r}.json" for r in (0, 1)]
    assert all(p.exists() for p in ranks), result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(p.read_text()) for p in ranks]


def interventions(record: dict[str, Any]) -> list[ActionEvent]:
    """A rank's interventions, as its script wrote them (events.to_builtins), typed again."""
    found = [events.from_builtins(i) for i in record["interventions"]]
    assert all(isinstance(i, ActionEvent) for i in found), found
    return [i for i in found if isinstance(i, ActionEvent)]


def assert_ranks_agree(records: list[dict[str, Any]]) -> None:
    first, second = records
    assert first["world_size"] == second["world_size"] == 2
    assert first["global_step"] == second["global_step"]
    assert first["decisions"] == second["decisions"]
    assert first["steps"].keys() == second["steps"].keys()
    for step, state in first["steps"].items():
        assert state == second["steps"][step], f"ranks differ after step {step}"  # weights and learning rates


@pytest.mark.filterwarnings("ignore")
def test_a_fault_on_one_rank_is_skipped_by_every_rank(tmp_path: Path) -> None:
    records = torchrun(tmp_path, "skip")  # NaN at step 10 and a poisoned batch at 20-21, on rank 1 only
    assert_ranks_agree(records)
    assert records[0]["decisions"][0] == [10, "non_finite_loss"]
    assert [10, "non_finite_loss"] in records[0]["decisions"] and records[0]["global_step"] == 30
    assert all(s["finite"] for s in records[0]["steps"].values())
    # Rank 0 wrote the samples of every skipped step, its own and rank 1's, with verified indices.
    skipped = sorted(i.step for i in interventions(records[0]) if i.skipped_update)
    named = [json.loads(line) for line in (tmp_path / "guardian" / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted({(s["step"], s["rank"]) for s in named}) == [(step, r) for step in skipped for r in (0, 1)]
    assert len(named) == 8 * len(skipped) and all(s["index_verified"] for s in named)


@pytest.mark.filterwarnings("ignore")
def test_rollback_and_lr_cut_restore_the_same_state_on_every_rank(tmp_path: Path) -> None:
    records = torchrun(tmp_path, "rollback")  # NaN at step 30 on rank 0 only; rules: rollback + LR x0.5
    assert_ranks_agree(records)
    for record in records:
        [intervention] = interventions(record)
        assert (intervention.rollback, intervention.rollback_to_step) == ("memory", 20)
        assert intervention.lr_factor == 0.5
    steps = records[0]["steps"]
    assert steps["30"]["checksum"] == steps["20"]["checksum"]  # back to the snapshot, on both ranks


@pytest.mark.filterwarnings("ignore")
def test_stop_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    records = torchrun(tmp_path, "stop")
    assert_ranks_agree(records)
    assert records[0]["global_step"] == records[1]["global_step"] == 15


@pytest.mark.filterwarnings("ignore")
def test_all_ranks_agree_on_the_fallback_when_the_daemon_is_down(tmp_path: Path) -> None:
    records = torchrun(tmp_path, "daemon_down", url=f"http://127.0.0.1:{free_port()}")
    assert_ranks_agree(records)
    assert records[0]["decisions"] == [[10, "non_finite_loss"]]


@pytest.mark.filterwarnings("ignore")
def test_a_daemon_command_reaches_every_rank_at_the_same_step(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "state").start()
    try:
        records = torchrun(tmp_path / "run", "ctl", url=daemon.url, env={"GUARDIAN_TOKEN": daemon.token})
    finally:
        daemon.stop()
    assert_ranks_agree(records)
    assert 5 < records[0]["global_step"] < 300
    assert interventions(records[0])[-1].rules == ["manual:stop"]  # rank 0 heard it from the daemon
    assert all(interventions(r)[-1].stopped for r in records)  # rank 1 got it by broadcast
