"""`guardian report`: what happened in one run, as a picture (report.png) and a summary (report.md).

The record (`record`: one run from its event file, the daemon's store, or a replayed training log), what it
says happened (`summary`), its text (`markdown`) and its picture (`plot`).
"""

from __future__ import annotations

import re
from pathlib import Path

from guardian.commands.report.markdown import (
    BAD_SAMPLE_LINES_MAX,
    BAD_SAMPLE_ROWS_MAX,
    MD_NAME,
    PATHOLOGIES,
    PNG_NAME,
    TIMELINE_ROWS_MAX,
    bad_sample_lines,
    bad_samples_json,
    disk_json,
    pathology_keys,
    render_markdown,
)
from guardian.commands.report.record import (
    EMBEDDED,
    REPLAYED,
    STORED,
    RunRecord,
    Series,
    guardian_events_file,
    load_embedded,
    load_replayed,
    load_run,
    load_stored,
)
from guardian.commands.report.summary import Interventions, interventions, operator_actions, verdict

__all__ = [
    "BAD_SAMPLE_LINES_MAX", "BAD_SAMPLE_ROWS_MAX", "EMBEDDED", "MD_NAME", "PATHOLOGIES", "PNG_NAME", "REPLAYED",
    "STORED", "TIMELINE_ROWS_MAX", "Interventions", "RunRecord", "Series", "bad_sample_lines", "bad_samples_json",
    "default_out_dir", "disk_json", "guardian_events_file", "interventions", "load_embedded", "load_replayed",
    "load_run", "load_stored", "operator_actions", "pathology_keys", "render_markdown", "verdict", "write_report",
]


def default_out_dir(name: str) -> Path:
    """Where a run's report goes when no folder is given: `guardian-report-<name>`."""
    return Path(f"guardian-report-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:80]}")


def write_report(record: RunRecord, out_dir: Path) -> tuple[Path, Path]:
    """Write report.png and report.md into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / PNG_NAME, out_dir / MD_NAME
    from guardian.commands.report.plot import render_png

    render_png(record, png, verdict(record))
    md.write_text(render_markdown(record), encoding="utf-8")
    return png, md
