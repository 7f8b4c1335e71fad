"""guardian.logs.tail: the one reader of JSON-lines files, whole (training logs) or growing (attach)."""

from __future__ import annotations

import os
from pathlib import Path

from guardian.logs.tail import JsonlTail, TailRead, lines_of
from guardian.logs.training import read_log_with_report


def test_a_half_written_line_waits_for_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == TailRead(False, [])
    path.write_bytes(b'{"a": 1}\n{"b"')
    assert tail.read() == TailRead(False, ['{"a": 1}'])
    with path.open("ab") as f:
        f.write(b': 2}\n')
    assert tail.read() == TailRead(False, ['{"b": 2}'])
    assert tail.read() == TailRead(False, [])
    path.write_bytes(b'{"c": 3}\n')  # shorter than what was read: truncated, read again from the start
    assert tail.read() == TailRead(True, ['{"c": 3}'])


def test_a_replaced_file_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    tail = JsonlTail(path)
    assert tail.read() == TailRead(False, ['{"a": 1}'])
    other = tmp_path / "new.jsonl"
    other.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    os.replace(other, path)  # another inode, and longer: still a new file
    assert tail.read() == TailRead(True, ['{"a": 1}', '{"b": 2}'])


def test_bad_utf8_is_replaced_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    path.write_bytes(b'{"a": "\xff"}\n')
    assert JsonlTail(path).read() == TailRead(False, ['{"a": "\ufffd"}'])


def test_a_whole_file_keeps_its_last_line_without_a_newline(tmp_path: Path) -> None:
    assert lines_of('{"a": 1}\n\n{"b": 2}') == ['{"a": 1}', "", '{"b": 2}']
    path = tmp_path / "trainer_log.jsonl"
    path.write_text('{"current_steps": 1, "loss": 2.0}\n{"current_steps": 2, "loss": 1.5}')
    observations, report = read_log_with_report(path)
    assert [o.step for o in observations] == [1, 2] and report.skipped_lines == 0
