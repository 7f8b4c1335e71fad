"""`guardian report`: a real guarded run, replayed real logs and a daemon-stored run, as PNG and Markdown."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from daemonkit import report_intake
from PIL import Image
from realpaths import REAL_LOGS, needs_fixtures

from guardian.commands.report import EMBEDDED, RunRecord, load_run, render_markdown, verdict, write_report
from guardian.commands.report.record import load_replayed
from guardian.daemon.core import Guardian
from guardian.daemon.store import Store
from guardian.errors import LogFormatError
from guardian.events import DecisionEvent
from guardian.logs.eventlog import read_events
from guardian.rulefile.reader import load_rules
from guardian.rulefile.reload import RuleLibrary

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
    from guardian.testing.tinyrun import TinyRun

    out = tmp_path_factory.mktemp("guarded")
    faults = FaultInjector([Fault("nan", 20, steps=3)])
    TinyRun(str(out), max_steps=60, eval_steps=20).trainer([faults, CorruptWeight(30, math.inf),
                                                             GuardianCallback()]).train()
    return out


def events_of(run: Path) -> list[dict[str, object]]:
    """The run's events as the JSON a daemon receives."""
    return [json.loads(line) for line in (run / "guardian" / "events.jsonl").read_text().splitlines()]


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1320, 1100)  # 12 x 10 in at 110 dpi


def test_an_embedded_run_reports_its_decisions_actions_and_rescues(guarded_run: Path, tmp_path: Path) -> None:
    record = load_run(guarded_run, ruleset=load_rules())
    recorded = [e for e in read_events(guarded_run / "guardian" / "events.jsonl") if isinstance(e, DecisionEvent)]
    assert [(d.step, d.rule) for d in record.decisions] == [(e.step, e.rule) for e in recorded]
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
    events = [{"seq": i, "kind": "metrics", "step": i, "phase": "train",
               "values": {"loss": 2.0 - 0.001 * i, "grad_norm": 1.0}}
              for i in range(1, 40)]
    events.append({"seq": 40, "kind": "metrics", "step": 40, "phase": "train", "values": {"loss": "inf", "grad_norm": 1.0}})
    core.report(report_intake("stored-run", "default", {}, events))
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
    Guardian(store, RuleLibrary(None)).report(report_intake("streamed", "default", {}, events_of(guarded_run)))
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


# ---- who did what, and what is on disk ----------------------------------------------------------------


def _at_step(actions: dict[int, object]) -> object:
    """A callback that runs functions at the end of chosen steps."""
    from transformers import TrainerCallback

    class Caller(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: object, state: object, control: object, **kwargs: object) -> None:
            if state.global_step in actions:  # type: ignore[attr-defined]
                actions[state.global_step]()  # type: ignore[attr-defined, operator]

    return Caller()


@pytest.mark.slow
def test_manual_actions_are_the_operators_not_guardians(tmp_path: Path) -> None:
    """A real run reporting to a real daemon: Guardian skips a NaN step; the operator cuts the LR and stops the run
    (`guardian ctl` / the TUI's keys go through the same control API). Once: "Guardian stepped in" took the credit."""
    from daemonkit import in_process_daemon

    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.faults import Fault, FaultInjector
    from guardian.testing.tinyrun import TinyRun
    from guardian.transport.client import request

    with in_process_daemon(tmp_path / "state") as (_, url, token):
        def command(action: str) -> None:
            request(url, "POST", "/v1/runs/manual/control", {"action": action}, token=token)

        callback = GuardianCallback(url=url, run_id="manual", token=token, deadline_seconds=1.0)
        TinyRun(str(tmp_path / "run"), max_steps=30, eval_steps=0).trainer(
            [FaultInjector([Fault("nan", 3)]), callback,
             _at_step({5: lambda: command("reduce_lr"), 10: lambda: command("stop")})]).train()
    record = load_run(tmp_path / "run", ruleset=load_rules())
    said = verdict(record)
    assert said.startswith("Guardian stepped in: 1 update skipped; ended at step "), said
    assert "; the operator cut the LR x0.5 at step " in said and " and stopped the run at step " in said
    text = render_markdown(record)
    assert "| updates skipped | 1 (1 with a NaN/inf loss or gradient) |" in text  # the stop's skip is not Guardian's
    assert "| stops | 0 |" in text and "| LR cuts | 0 (final LR scale 0.5, the operator's cuts included) |" in text
    assert "## What the operator did" in text
    assert "| reduce_lr | learning rate x0.5" in text and "| stop | skipped this update; stopping training |" in text


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run with rotation (Trainer keeps 2 checkpoints, Guardian 2 protected ones) whose weights turn NaN at
    step 17, watched by alert-only rules: Guardian sees it and, as told, does nothing."""
    from trainkit import CorruptWeight, rules

    from guardian.callbacks import GuardianCallback
    from guardian.testing.tinyrun import TinyRun

    alert_only = rules("version: 1\nrules:\n  - name: nan_alert\n    metric: loss\n    detector: {kind: non_finite}\n"
                       "    severity: critical\n    actions: [alert]\n")
    out = tmp_path_factory.mktemp("nan-run")
    TinyRun(str(out), max_steps=25, eval_steps=0, save_steps=5, save_total_limit=2).trainer(
        [CorruptWeight(17, math.nan), GuardianCallback(alert_only)]).train()
    return out


def test_only_checkpoints_on_disk_are_listed_and_rotated_ones_are_named(nan_run: Path) -> None:
    assert sorted(p.name for p in (nan_run / "guardian" / "good").iterdir()) == ["checkpoint-10", "checkpoint-15"]
    text = render_markdown(load_run(nan_run, ruleset=load_rules()))
    assert "## On disk now" in text
    assert "- `guardian/good/checkpoint-10` (step 10, Guardian's protected copy): weights finite." in text
    assert "- `checkpoint-25` (step 25, Trainer's checkpoint): weights NaN/inf." in text
    assert "`checkpoint-5`" not in text and "`guardian/good/checkpoint-5`" not in text
    assert "- Protected by Guardian at steps 5, removed since by rotation" in text
    assert "protected from rotation (in `guardian/good/`): steps 5" not in text  # the old claim


def test_non_finite_final_weights_are_said_with_where_to_resume(nan_run: Path) -> None:
    record = load_run(nan_run, ruleset=load_rules())
    resume = nan_run / "guardian" / "good" / "checkpoint-15"
    assert verdict(record).endswith(f"; the final weights (checkpoint-25) are NaN/inf: resume from {resume}")
    text = render_markdown(record)
    assert f"- **The final weights (`{nan_run / 'checkpoint-25'}`) are not finite (NaN/inf).**" in text
    assert f'`trainer.train(resume_from_checkpoint="{resume}")`' in text
    result = guardian("report", str(nan_run), "--out", str(nan_run.parent / "nan-report"))
    assert result.returncode == 0, result.stderr
    assert "are NaN/inf: resume from" in result.stdout
    as_json = json.loads(guardian("report", str(nan_run), "--out", str(nan_run.parent / "nan-report"), "--json").stdout)
    assert as_json["on_disk"]["final_weights"] == {"path": str(nan_run / "checkpoint-25"), "finite": False}
    assert as_json["on_disk"]["resume_from"] == str(resume)


def _overfitting_log(path: Path, later: dict[int, float]) -> Path:
    """Eval loss best at step 30, then rising for four evaluations (the rule stops at 70), then `later`."""
    evals = {10: 1.0, 20: 0.8, 30: 0.6, 40: 0.7, 50: 0.75, 60: 0.8, 70: 0.85, **later}
    history: list[dict[str, object]] = []
    for s in range(1, max(evals) + 1):
        history.append({"step": s, "epoch": s / 20, "loss": 2.0 * 0.98**s, "grad_norm": 1.0, "learning_rate": 1e-4})
        if s in evals:
            history.append({"step": s, "epoch": s / 20, "eval_loss": evals[s]})
    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return path / "trainer_state.json"


def test_an_overfitting_stop_is_not_credited_when_the_run_went_on_to_improve(tmp_path: Path) -> None:
    record = load_run(_overfitting_log(tmp_path / "improved", {80: 0.7, 90: 0.55, 100: 0.5}), ruleset=load_rules())
    assert verdict(record) == ("replayed: the rules would have stopped this run at step 70 (overfitting), but the run "
                               "improved later (eval_loss 0.5 at step 100)")
    text = render_markdown(record)
    assert "## What would have been saved" not in text and "## What the rules would have done" in text
    assert "**The run went on to improve:** eval_loss 0.5 at step 100, below 0.6; this stop would have cost that " \
           "improvement." in text
    record = load_run(_overfitting_log(tmp_path / "worse", {80: 0.9, 90: 0.95}), ruleset=load_rules())
    assert "but the run improved later" not in verdict(record)
    assert "The run never did better afterwards (its best later: eval_loss 0.85 at step 70" not in render_markdown(record)
    assert "The run never did better afterwards (its best later: eval_loss 0.9 at step 80), so the stop would " \
           "have kept the better weights." in render_markdown(record)


@pytest.mark.slow
def test_the_demos_three_runs_are_reported(tmp_path: Path) -> None:
    """The demo's runs, made by the demo's own code, are all reported: the guarded one from Guardian's record,
    the unguarded ones from the trainer_state.json the demo keeps for them (the rules replayed)."""
    from guardian.commands.demo import demo_faults, train_once

    steps = 24
    for name, faults, guarded in (("clean", [], False), ("faulted", demo_faults(steps), False),
                                  ("guarded", demo_faults(steps), True)):
        train_once(name, tmp_path, steps, 0, faults, guarded)
    for name in ("clean", "faulted", "guarded"):
        result = guardian("report", str(tmp_path / name), "--out", str(tmp_path / f"report-{name}"))
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 0, result.stderr
        assert_png(tmp_path / f"report-{name}" / "report.png")
    assert (tmp_path / "report-guarded" / "report.md").read_text().startswith("# Guardian report: guarded")


def test_a_learning_rate_put_back_on_its_schedule_is_an_action(tmp_path: Path) -> None:
    """A real run whose rate jumps x30 for three steps: Guardian puts it back each time. Once: "3 alerts, no action
    taken", and nothing on the picture."""
    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.faults import Fault, FaultInjector
    from guardian.commands.report.plot import build_figure
    from guardian.testing.tinyrun import TinyRun

    TinyRun(str(tmp_path / "run"), max_steps=20, eval_steps=0).trainer(
        [FaultInjector([Fault("lr_blowup", 12, steps=3, factor=30.0)]), GuardianCallback()]).train()
    record = load_run(tmp_path / "run", ruleset=load_rules())
    assert verdict(record).startswith("Guardian stepped in: LR put back on its schedule 3 times; ended at step 20")
    text = render_markdown(record)
    assert "| LR put back on its schedule | 3 (steps 12–14) |" in text
    assert "- Learning rate put back on its schedule after it jumped: steps 12–14." in text
    strip = build_figure(record, verdict(record)).axes[-1]
    assert [t.get_text() for t in strip.get_yticklabels()][0] == "Guardian"
    assert any(c.get_segments() and c.get_segments()[0][0][0] == 12 for c in strip.collections
               if hasattr(c, "get_segments"))  # the band of restores on Guardian's row


def test_weights_on_disk_are_read_newest_first_within_a_budget(tmp_path: Path) -> None:
    """Real safetensors files: the newest weights are read first, a hard-linked protected copy is not read again,
    and what the budget left unread is said to be unchecked (never "no checkpoint has finite weights")."""
    import os

    import torch
    from safetensors.torch import save_file

    from guardian.logs.ondisk import read_disk

    for step, value in ((1, 0.5), (2, math.nan)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file({"w": torch.full((256,), value)}, str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    good = tmp_path / "guardian" / "good" / "checkpoint-1"
    good.mkdir(parents=True)
    os.link(tmp_path / "checkpoint-1" / "model.safetensors", good / "model.safetensors")
    size = (tmp_path / "checkpoint-2" / "model.safetensors").stat().st_size

    both = read_disk(tmp_path, budget_bytes=2 * size)
    assert [(c.step, c.protected, c.weights.finite) for c in both.checkpoints] == \
        [(1, False, True), (1, True, True), (2, False, False)]  # the linked copy cost nothing
    assert both.resume_from() is not None and both.resume_from().path == tmp_path / "checkpoint-1"

    newest_only = read_disk(tmp_path, budget_bytes=size)
    assert [(c.step, c.weights.finite) for c in newest_only.checkpoints] == [(1, None), (1, None), (2, False)]
    text = render_markdown(RunRecord(tmp_path.name, EMBEDDED, str(tmp_path), {}, {}, [], disk=newest_only))
    assert "No checked checkpoint has finite weights; these were not checked: `checkpoint-1`, " \
           "`guardian/good/checkpoint-1`." in text
    assert "start again from the base model" not in text


def test_a_stop_on_a_nan_step_is_a_stop_not_divergence(tmp_path: Path) -> None:
    """A real run whose rules stop on NaN, restoring the best evaluation. Once: "diverged: the training loss is nan",
    with the stop's own skipped update counted as a second intervention."""
    from trainkit import rules

    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.faults import Fault, FaultInjector
    from guardian.testing.tinyrun import TinyRun

    stop_rules = rules("version: 1\nrules:\n  - name: non_finite_loss\n    metric: loss\n    detector: {kind: non_finite}\n"
                       "    severity: critical\n    actions: [{stop: {restore: best_eval}}]\n")
    TinyRun(str(tmp_path / "run"), max_steps=20, eval_steps=5).trainer(
        [FaultInjector([Fault("nan", 12)]), GuardianCallback(stop_rules)]).train()
    record = load_run(tmp_path / "run", ruleset=load_rules())
    assert verdict(record) == "stopped at step 12 by non_finite_loss, leaving the weights of step 10 (best " \
                              f"evaluation, eval loss {record.eval['eval_loss'].values[-1]:.4g})"
    text = render_markdown(record)
    assert "| updates skipped | 0 |" in text and "| stops | step 12 |" in text


def test_a_replayed_verdict_says_its_counts_after_the_first_change_are_counterfactual(tmp_path: Path) -> None:
    """A replay judges the log as it ran unguarded: after a first skip, the NaNs that follow would not have
    happened, and the verdict must not present its count as what Guardian would have done."""
    state = {"log_history": [{"step": s, "loss": (2.0 - 0.01 * s) if s < 40 else float("nan"), "grad_norm": 1.0}
                             for s in range(1, 61)]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))  # NaN as Trainer writes it
    record = load_replayed(tmp_path / "trainer_state.json", load_rules())
    line = verdict(record)
    assert line.startswith("replayed: the rules would have")
    assert "from step 40 on, a guarded run would have gone differently" in line
