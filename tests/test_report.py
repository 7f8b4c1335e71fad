"""`guardian report`: a real guarded run, replayed real logs and a daemon-stored run, as PNG and Markdown."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from realpaths import REAL_LOGS, needs_fixtures

from guardian import wire
from guardian.daemon import Guardian
from guardian.errors import LogFormatError
from guardian.reload import RuleLibrary
from guardian.report import load_run, render_markdown, verdict, write_report
from guardian.ruleset import load_rules
from guardian.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
GUARDIAN = [sys.executable, "-m", "guardian.cli"]
NICOLAS = "Nicolassalvan__mti881-projet2__ResultsEtape3__trainer_state.json"
MEMASP = "MemaSp__FT-Llama2-HRChatbot__outputs__trainer_state.json"


def guardian(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARDIAN, *args], capture_output=True, text=True, cwd=cwd,
                          env={"COLUMNS": "200", "PATH": ""})


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 60-step LoRA run with Guardian: three NaN steps from the forward pass (skipped: the weights are
    fine), then an inf written into a weight at step 30 (the reference batch says the weights are damaged:
    one rollback, in the same incident)."""
    from trainkit import CorruptWeight

    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.faults import Fault, FaultInjector
    from guardian.tinyrun import TinyRun

    out = tmp_path_factory.mktemp("guarded")
    faults = FaultInjector([Fault("nan", 20, steps=3)])
    TinyRun(str(out), max_steps=60, eval_steps=20).trainer([faults, CorruptWeight(30, math.inf),
                                                             GuardianCallback()]).train()
    return out


def events_of(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "guardian" / "events.jsonl").read_text().splitlines()]


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1320, 1100)  # 12 x 10 in at 110 dpi


def test_an_embedded_run_reports_its_decisions_actions_and_rescues(guarded_run: Path, tmp_path: Path) -> None:
    record = load_run(guarded_run, ruleset=load_rules())
    recorded = [e for e in events_of(guarded_run) if e["kind"] == "decision"]
    assert [(d.step, d.rule) for d in record.decisions] == [(e["step"], e["rule"]) for e in recorded]
    assert [d.step for d in record.decisions if d.rule == "non_finite_loss"] == [20, 21, 22, 31]
    assert [d.step for d in record.decisions if d.rule == "weights_damaged"] == [31]
    png, md = write_report(record, tmp_path / "out")
    assert_png(png)
    text = md.read_text()
    assert text.startswith(f"# Guardian report: {guarded_run.name}\n")
    assert "](report.png)" in text
    assert "**Guardian stepped in: 4 updates skipped, 1 rollback; ended at step 60" in text
    assert "| rollbacks | 1 |" in text and "| LR cuts | 0 (final LR scale 1) |" in text
    assert "| 20 | non_finite_loss | critical | loss is nan at step 20" in text
    assert "| skip_update | skipped this update |" in text
    assert "| rollback | rolled back to step 0 from memory" in text and "rollback incident 1 of 3" in text
    assert "rolled back to step 0 from memory, restored in" in text and "the 31 steps since then were discarded" in text
    assert "Updates with a NaN/inf loss or gradient skipped" in text and "steps 20–22, 31" in text
    assert "### non_finite_loss (4×, steps 20–22, 31)" in text
    # The incident: when, which rules, what was tried, how it ended.
    assert "## Incidents" in text
    assert "| 1 | 20–31 (quiet again by 51) | non_finite_loss ×4, weights_damaged ×1 | 3 updates skipped; " \
           "rolled back at step 31 | recovered: loss" in text
    assert "- Usual fix: lower the learning rate, set max_grad_norm 0.5-1.0" in text
    assert "| NaN loss | — | roll back |" in text


def test_the_cli_writes_both_files_for_a_run_directory(guarded_run: Path, tmp_path: Path) -> None:
    result = guardian("report", str(guarded_run), "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert "Guardian stepped in" in result.stdout
    assert_png(tmp_path / "r" / "report.png")
    assert "## Timeline of decisions" in (tmp_path / "r" / "report.md").read_text()


def test_the_default_output_folder_is_named_after_the_run(guarded_run: Path, tmp_path: Path) -> None:
    events = guarded_run / "guardian" / "events.jsonl"
    result = guardian("report", str(events), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"guardian-report-{guarded_run.name}" / "report.md").is_file()


@needs_fixtures
def test_a_replayed_overfitting_log_says_what_the_rules_would_have_done(tmp_path: Path) -> None:
    record = load_run(REAL_LOGS / NICOLAS, ruleset=load_rules())
    assert record.replayed and not record.actions
    assert verdict(record) == "replayed: the rules would have stopped this run at step 16800 (overfitting)"
    png, md = write_report(record, tmp_path)
    assert_png(png)
    text = md.read_text()
    assert "**Replayed: what the rules would have done.**" in text
    assert "| 16800 | overfitting | warning | eval_loss 1.012 at step 16800 is above its best 0.5089" in text
    assert "| stop(restore=best_eval) | not taken (replay) |" in text
    assert "restored the weights of its best evaluation (step 5600, eval_loss 0.5089)" in text
    assert "ended at eval_loss 1.232" in text
    assert "| overfitting: train loss ↓ while eval loss ↑ | too many epochs, too little data |" in text


@needs_fixtures
def test_a_replayed_nan_log_shows_the_update_that_would_have_been_skipped(tmp_path: Path) -> None:
    record = load_run(REAL_LOGS / MEMASP, ruleset=load_rules())
    assert [(d.step, d.rule) for d in record.decisions] == [(33, "non_finite_loss")]
    assert verdict(record) == "replayed: the rules would have skipped 1 update (non_finite_loss)"
    result = guardian("report", str(REAL_LOGS / MEMASP), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert_png(tmp_path / "report.png")
    text = (tmp_path / "report.md").read_text()
    assert "grad_norm is inf at step 33" in text
    assert "Updates with a NaN/inf loss or gradient would have been skipped" in text and "steps 33." in text
    assert "| NaN loss | — | roll back |" in text


def test_a_daemon_stored_run_is_reported_from_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "state" / "guardian.db")
    core = Guardian(store, RuleLibrary(None))
    events = [{"seq": i, "kind": "metrics", "step": i, "phase": "train", "values": {"loss": 2.0 - 0.001 * i, "grad_norm": 1.0}}
              for i in range(1, 40)]
    events.append({"seq": 40, "kind": "metrics", "step": 40, "phase": "train", "values": {"loss": "inf", "grad_norm": 1.0}})
    core.report(wire.Report("stored-run", "default", {}, events))
    store.close()
    record = load_run(None, run_id="stored-run", state_dir=tmp_path / "state", ruleset=load_rules())
    assert [(d.step, d.rule) for d in record.decisions] == [(40, "non_finite_loss")]
    text = render_markdown(record)
    assert "Source: the daemon's store" in text
    assert "| 40 | non_finite_loss | critical | loss is inf at step 40" in text
    assert "| no action reported by the run |" in text
    result = guardian("report", "stored-run", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert_png(tmp_path / "r" / "report.png")


def test_a_run_streamed_to_the_daemon_lists_each_decision_once(guarded_run: Path, tmp_path: Path) -> None:
    """The run's own decision events and the daemon's decisions about the same steps are one decision each."""
    store = Store(tmp_path / "guardian.db")
    Guardian(store, RuleLibrary(None)).report(wire.Report("streamed", "default", {}, events_of(guarded_run)))
    store.close()
    stored = load_run(None, run_id="streamed", state_dir=tmp_path, ruleset=load_rules())
    embedded = load_run(guarded_run, ruleset=load_rules())
    assert [(d.step, d.rule) for d in stored.decisions] == [(d.step, d.rule) for d in embedded.decisions]
    assert "rolled back to step 0 from memory" in render_markdown(stored)
    assert "| 1 | 20–31" in render_markdown(stored)  # the incidents come from the run's end event


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 0.9, 0.8], "healthy: no rule fired in 3 steps"),
        ([1.0, 0.9, "nan"], "diverged: the training loss is nan at the last step (3)"),
    ],
)
def test_verdict_of_a_quiet_run(tmp_path: Path, values: list[object], expected: str) -> None:
    events = [{"seq": i, "kind": "metrics", "time": 0.0, "step": i, "phase": "train", "values": {"loss": v}}
              for i, v in enumerate(values, start=1)]
    path = tmp_path / "guardian" / "events.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"seq": 9, "kind": "met')  # half-written line
    record = load_run(tmp_path, ruleset=load_rules())
    assert verdict(record) == expected
    assert "1 unreadable lines" in render_markdown(record)


def test_a_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LogFormatError, match="no such file or directory"):
        load_run(tmp_path / "nope", ruleset=load_rules())
    result = guardian("report", str(tmp_path / "nope"), "--state-dir", str(tmp_path / "empty"))
    assert result.returncode == 2
    assert "nope: no such file or directory" in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_stored_run_is_a_clear_error(tmp_path: Path) -> None:
    Store(tmp_path / "guardian.db").close()
    result = guardian("report", "--run", "ghost", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "no run 'ghost' (runs: none)" in result.stderr and "Traceback" not in result.stderr
    result = guardian("report", "ghost", "--state-dir", str(tmp_path))  # a path or a run id: neither
    assert result.returncode == 2
    assert "ghost: no such file or directory, and " in result.stderr and "no run 'ghost'" in result.stderr
    result = guardian("report", "--run", "ghost", "--state-dir", str(tmp_path / "elsewhere"))
    assert result.returncode == 2 and "no daemon store here" in result.stderr


def test_a_healthy_run_with_no_rule_firing_is_reported(tmp_path: Path) -> None:
    """The common case: nothing fired, nothing to mark (once a traceback: a legend of no entries)."""
    history = [{"step": s, "epoch": s / 40, "loss": 2.0 * 0.98**s, "grad_norm": 1.0, "learning_rate": 1e-4}
               for s in range(1, 41)]
    log = tmp_path / "trainer_state.json"
    log.write_text(json.dumps({"global_step": 40, "max_steps": 40, "log_history": history}))
    result = guardian("report", str(log), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert_png(tmp_path / "out" / "report.png")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**replayed: no rule would have fired**" in text and "| decisions | 0 |" in text


@needs_fixtures
def test_every_real_log_is_reported(tmp_path: Path) -> None:
    """Healthy ones included: `guardian report` works on every fixture."""
    logs = sorted(p for p in REAL_LOGS.iterdir() if p.suffix in (".json", ".jsonl"))
    assert len(logs) >= 20
    for log in logs:
        png, md = write_report(load_run(log, ruleset=load_rules()), tmp_path / log.name)
        assert_png(png)
        assert md.read_text().strip(), log.name
