"""Hostile rule files: aliases, huge files, FIFOs, devices and symlinks in the rules folder, racing edits.

Anything that could eat the machine's memory or block forever runs in a child process with a 1 GiB address
space limit and a hang guard, so a regression fails the test instead of taking the machine down.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonkit import DaemonProcess, wait_for

from guardian.daemon.core import Guardian
from guardian.daemon.store import Store
from guardian.engine.rules import RuleSet
from guardian.errors import RuleFileError
from guardian.rulefile.reader import MAX_FILE_BYTES, MAX_PROBLEMS, load_rules, parse_rules
from guardian.rulefile.reload import RuleLibrary
from guardian.transport import wire
from guardian.transport.client import request

CHILD_MEMORY_BYTES = 1 << 30
SECRET = "TOPSECRET-c0ffee-do-not-echo"


def rule_file(above: float = 10.0, name: str = "spike") -> str:
    return (f"version: 1\nrules:\n  - name: {name}\n    metric: loss\n"
            f"    detector: {{kind: threshold, above: {above}}}\n    actions: [alert]\n")


def laughs(levels: int) -> str:
    """The billion-laughs file: each level a list of nine aliases of the one before, used as the rules list."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefghi", "bcdefghij"[: levels - 1]):
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    last = "abcdefghij"[levels - 1]
    return "version: 1\n" + "\n".join(f"x{line}" for line in lines) + f"\nrules: [*{last}]\n"


def in_child(code: str, timeout: float = 120.0) -> dict[str, object]:
    """Run `code` in a fresh Python with a 1 GiB address space; it prints one JSON object, which is returned."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def problems_of(text: str) -> list[str]:
    with pytest.raises(RuleFileError) as info:
        parse_rules(text, "hostile.yaml")
    return [str(p) for p in info.value.problems]




# --- the YAML: no aliases, no merge keys, no unbounded nesting, values quoted short ---------------------------

def test_billion_laughs_is_refused_at_the_first_anchor_with_little_memory() -> None:
    text = laughs(9)
    assert len(text.encode()) < 420  # the file was 393 bytes
    result = in_child(f"""
import json, tracemalloc
from guardian.rulefile.reader import parse_rules
from guardian.errors import RuleFileError
tracemalloc.start()
try:
    parse_rules({text!r}, "lol.yaml")
    print(json.dumps({{"loaded": True}}))
except RuleFileError as exc:
    print(json.dumps({{"error": str(exc), "peak": tracemalloc.get_traced_memory()[1]}}))
""")
    assert result["error"] == ("lol.yaml:2: anchors and aliases are not allowed in rule files (&name, *name); "
                               "write each value out in full")
    assert isinstance(result["peak"], int) and result["peak"] < 5_000_000


def test_merge_keys_are_refused() -> None:
    text = rule_file().replace("    actions: [alert]\n", "    actions: [alert]\n    <<: {cooldown_steps: 3}\n")
    assert problems_of(text) == ["hostile.yaml:7: rule 'spike': merge keys ('<<') are not allowed in rule files; "
                                 "write the keys out"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 20_000 + "]" * 20_000, "hostile.yaml:1: the YAML nests deeper than 32 levels"),
        (rule_file().replace("above: 10.0", "above: " + "7" * 5000), "hostile.yaml:5: rule 'spike': cannot read "
                                                                      "this value as int (the number has too many digits)"),
        (rule_file().replace("name: spike", 'name: "bad\\ud800"'), "hostile.yaml:3: rule 'bad\\ud800': text "
                                                                   "'bad\\ud800' holds a lone surrogate"),
        (rule_file().replace("kind: threshold", "kind: robust_zscore, window_steps: 99999999999999999999999"),
         "hostile.yaml:5: rule 'spike': the integer 99999999999999999999999 is out of range; integers in rule files "
         "are at most 2^53"),
        (rule_file().replace("metric: loss", "metric: !!bool loss"), "hostile.yaml:4: rule 'spike': cannot read this "
                                                                    "value as bool ('loss')"),
        (rule_file() + "stamp: !!timestamp 2026-13-40\n",
         "hostile.yaml:7: cannot read this value as timestamp (month must be"),
    ],
    ids=["nesting_20000_deep", "int_of_5000_digits", "int_of_2^76", "lone_surrogate", "bool_of_text", "impossible_date"],
)
def test_yaml_python_cannot_hold_is_one_clear_problem(text: str, message: str) -> None:
    (problem,) = problems_of(text)
    assert problem.startswith(message)


def test_values_quoted_in_problems_are_cut_short() -> None:
    long = "x" * 100_000
    text = rule_file().replace("kind: threshold", f"kind: {long}") + f"    severity: {long}\n"
    problems = problems_of(text)
    assert len(problems) == 2 and all(len(p) < 1000 for p in problems)
    assert "unknown detector kind 'xxxx" in problems[0] and "(100,000 characters in all)'; valid kinds:" in problems[0]
    assert "severity must be one of info, warning, critical, got 'xxxx" in problems[1]
    assert "(100,002 characters in all)" in problems[1]


def test_control_characters_in_quoted_names_are_escaped() -> None:
    text = rule_file().replace("    actions: [alert]\n", '    actions: [alert]\n    "x\\nERROR forged\\e[2J": 1\n')
    (problem,) = problems_of(text)
    assert "unknown key 'x\\nERROR forged\\x1b[2J' in a rule" in problem and "\n" not in problem


def test_the_problems_listed_are_capped_and_the_rest_counted() -> None:
    text = "version: 1\n" + "".join(f"version: {i}\n" for i in range(5000)) + rule_file().split("\n", 1)[1]
    problems = problems_of(text)
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[-1] == f"hostile.yaml: and {5000 + 1 - MAX_PROBLEMS} more problems; fix the ones above first"


# --- the file: bounded, regular, UTF-8 ------------------------------------------------------------------------

def test_a_file_over_the_size_cap_is_refused_and_one_at_the_cap_loads(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    body = rule_file()
    path.write_text(body + "#" * (MAX_FILE_BYTES - len(body) - 1) + "\n")
    assert load_rules(path).rules[0].name == "spike"
    path.write_text(body + "#" * (MAX_FILE_BYTES - len(body)) + "\n")
    with pytest.raises(RuleFileError, match=re.escape(f"{path}: the file is larger than 256 KiB, the most a rule "
                                                      "file may be")):
        load_rules(path)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(rule_file().replace("spike", "sp\xefke").encode("latin-1"))
    with pytest.raises(RuleFileError, match=re.escape(f"{path}:3: the file is not UTF-8 text (byte 30)")):
        load_rules(path)


def test_devices_and_fifos_given_by_path_are_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    result = in_child(f"""
import json
from guardian.rulefile.reader import load_rules
from guardian.errors import RuleFileError
out = {{}}
for path in ("/dev/zero", {str(fifo)!r}, {str(tmp_path)!r}):
    try:
        load_rules(path)
    except RuleFileError as exc:
        out[path] = str(exc)
print(json.dumps(out))
""", timeout=60)
    assert result == {
        "/dev/zero": "/dev/zero: this is a device, not a regular file: rules are read only from regular files; "
                     "use a plain file",
        str(fifo): f"{fifo}: this is a FIFO, not a regular file: rules are read only from regular files; "
                   "use a plain file",
        str(tmp_path): f"{tmp_path}: this is a folder, not a regular file: rules are read only from regular files; "
                       "use a plain file",
    }


# --- the rules folder -----------------------------------------------------------------------------------------

@pytest.fixture
def hostile_folder(tmp_path: Path) -> Path:
    """A rules folder with one good file and a FIFO, a link to /dev/zero, a link to an outside file holding a
    secret, and a link to the good file."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "good.yaml").write_text(rule_file())
    os.mkfifo(rules / "pipe.yaml")
    (rules / "zero.yaml").symlink_to("/dev/zero")
    outside = tmp_path / "outside.yaml"
    outside.write_text(f"version: 1\nrules: [{SECRET}]\n")
    (rules / "secret.yaml").symlink_to(outside)
    (rules / "inside.yaml").symlink_to(rules / "good.yaml")
    return rules


REFUSED = {"inside": "a symbolic link", "pipe": "a FIFO", "secret": "a symbolic link", "zero": "a symbolic link"}


def test_only_regular_files_in_the_folder_are_loaded(hostile_folder: Path) -> None:
    (hostile_folder / "lol.yaml").write_text(laughs(8))  # 9^8 laughs: a 312 MB store row before
    result = in_child(f"""
import json
from pathlib import Path
from guardian.rulefile.reload import RuleLibrary
library = RuleLibrary(Path({str(hostile_folder)!r}))
print(json.dumps({{"names": library.names(), "errors": library.errors}}))
""", timeout=60)
    assert result["names"] == ["default", "good"]
    errors = result["errors"]
    assert isinstance(errors, dict) and sorted(errors) == sorted([*REFUSED, "lol"])
    assert errors.pop("lol") == (f"{hostile_folder}/lol.yaml:2: anchors and aliases are not allowed in rule files "
                                 "(&name, *name); write each value out in full")
    for name, kind in REFUSED.items():
        assert errors[name] == (f"{hostile_folder / name}.yaml: this is {kind}, not a regular file: rules are read "
                                f"only from regular files; " + ("put the rule file itself in the rules folder"
                                                                 if "link" in kind else "use a plain file"))
    assert SECRET not in json.dumps(result)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Guardian, Path]]:
    """A daemon core with a watched, empty rules folder (short debounce)."""
    rules = tmp_path / "rules"
    rules.mkdir()
    core = Guardian(Store(tmp_path / "g.db"), RuleLibrary(rules, debounce_seconds=0.05))
    core.library.watch()
    yield core, rules
    core.library.stop()
    for path in rules.iterdir():  # a reader blocked on a FIFO (a regression) gets its EOF
        if path.is_fifo():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: nobody is reading it, as it should be
                pass


def test_links_and_fifos_that_appear_while_watched_are_refused_and_reloads_go_on(
    watched: tuple[Guardian, Path], tmp_path: Path
) -> None:
    core, rules = watched
    os.mkfifo(rules / "pipe.yaml")
    (tmp_path / "outside.yaml").write_text(f"version: 1\nrules: [{SECRET}]\n")
    (rules / "secret.yaml").symlink_to(tmp_path / "outside.yaml")
    wait_for(lambda: {"pipe", "secret"} <= core.library.errors.keys())
    (rules / "good.yaml").write_text(rule_file())
    wait_for(lambda: core.library.get("good") is not None)
    assert "this is a FIFO, not a regular file" in core.library.errors["pipe"]
    assert "this is a symbolic link, not a regular file" in core.library.errors["secret"]
    assert SECRET not in json.dumps([core.library.errors, core.store.reloads()])


def test_an_alias_bomb_writes_a_short_row_to_the_store(watched: tuple[Guardian, Path]) -> None:
    core, rules = watched
    (rules / "lol.yaml").write_text(laughs(6))  # 9^6 laughs: a 3.7 MB message before aliases were refused
    wait_for(lambda: any(not r["ok"] for r in core.store.reloads()))
    (failed,) = [r for r in core.store.reloads() if not r["ok"]]
    assert "anchors and aliases are not allowed in rule files" in failed["message"]
    assert len(failed["message"]) < 2000 and len(core.library.errors["lol"]) < 2000


def test_errors_are_a_copy_for_readers(watched: tuple[Guardian, Path]) -> None:
    core, rules = watched
    (rules / "bad.yaml").write_text("version: 1\n")
    wait_for(lambda: "bad" in core.library.errors)
    core.library.errors.clear()
    assert "bad" in core.library.errors


def test_a_daemon_with_a_fifo_and_links_in_its_rules_folder_listens(hostile_folder: Path, tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path / "state", rules_dir=hostile_folder)
    try:
        proc.start()  # raises if it never listens
        body = request(proc.url, "GET", "/v1/rules", token=proc.token)
        assert body["rule_sets"] == ["default", "good"]
        assert sorted(body["errors"]) == sorted(REFUSED)
        assert SECRET not in wire.dumps(body).decode() and len(wire.dumps(body)) < 20_000
    finally:
        proc.stop()


# --- reloads: one worker, and only rules the file still holds -------------------------------------------------

def test_a_slow_reload_that_ends_after_a_newer_edit_does_not_put_stale_rules_back(tmp_path: Path) -> None:
    """The reload of edit 2 is slow: edit 3 lands while it parses. Edit 2 must never be swapped in over 3.

    The slow parse writes edit 3 and then waits (up to 2 s) for rules with 3 to arrive: with one reload
    thread per change they would (and then 2 would be put back over them); with one worker they cannot, and
    the worker, seeing the file changed since it was read, reads it again instead of swapping in 2."""
    rules = tmp_path / "rules"
    rules.mkdir()
    path = rules / "mine.yaml"
    path.write_text(rule_file(above=1))
    seen: list[float] = []
    third_loaded = threading.Event()

    def slow_parse(text: str, source: str) -> RuleSet:
        ruleset = parse_rules(text, source)
        if "above: 2" in text and not path.read_text().count("above: 3"):
            path.write_text(rule_file(above=3))
            third_loaded.wait(2.0)
        return ruleset

    def changed(name: str, ruleset: RuleSet) -> None:
        seen.append(ruleset.rules[0].params["above"])
        if seen[-1] == 3.0:
            third_loaded.set()

    library = RuleLibrary(rules, on_change=changed, debounce_seconds=0.05, parse=slow_parse)
    library.watch()
    try:
        path.write_text(rule_file(above=2))
        wait_for(lambda: 3.0 in seen)
        time.sleep(0.5)  # let any straggling reload finish: none may bring 2 back
        ruleset = library.get("mine")
        assert ruleset is not None and ruleset.rules[0].params["above"] == 3.0
        assert 2.0 not in seen
    finally:
        library.stop()


def test_many_quick_edits_are_reloaded_in_turn_and_the_last_one_wins(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    library = RuleLibrary(rules, debounce_seconds=0.01)
    library.watch()
    try:
        for above in range(1, 41):
            (rules / "mine.yaml").write_text(rule_file(above=above))
        wait_for(lambda: (rs := library.get("mine")) is not None and rs.rules[0].params["above"] == 40.0)
    finally:
        library.stop()


def test_files_whose_names_cannot_be_a_rule_set_name_are_ignored(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    for name in (b"\xff.yaml", b"two words.yaml", b"line\nbreak.yaml", b"-dash.yaml", b"good.yaml"):
        with open(os.path.join(os.fsencode(rules), name), "w") as out:
            out.write(rule_file())
    library = RuleLibrary(rules)
    assert library.names() == ["default", "good"] and library.errors == {}
    json.dumps(library.names()).encode("utf-8")  # every name is plain text
