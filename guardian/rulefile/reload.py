"""Rule sets by name, reloaded when their files change.

The shipped rules are always there as "default" (unless a file `default.yaml` in the rules folder replaces
them). Each `NAME.yaml` directly inside the rules folder is the rule set NAME; only regular files are read
(a symbolic link, FIFO, device or folder is refused and reported), at most `ruleset.MAX_FILE_BYTES` of each.

Files are watched with watchdog. A change queues the file's name; one worker thread reads each queued
name once its changes have been quiet for `debounce_seconds`, validates it, and swaps it in only if the
file still holds what was read (an edit that landed meanwhile is read again, so a slow reload never puts
older rules back over newer ones). An invalid edit keeps the last good rules and is reported through
`on_error` (the daemon logs it and writes it to the store).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from guardian.engine.rules import RuleSet
from guardian.errors import Problem, RuleFileError
from guardian.rulefile.reader import load_rules, parse_rules, read_rule_bytes, rule_text

log = logging.getLogger("guardian.reload")

# A rule set's name is its file name without `.yaml`; it becomes a label and a store key, so keep it plain.
RULE_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_RULE_SETS = 256  # rule files read from one folder; more are refused and logged
_READ_ATTEMPTS = 5  # reads of a file that keeps changing before waiting for its next change event
_STOP_WAIT_SECONDS = 5.0  # how long `stop()` waits for the watcher and the reload worker to end

Parse = Callable[[str, str], RuleSet]


class RuleLibrary:
    """The rule sets a daemon serves, by name."""

    def __init__(self, rules_dir: Path | None, *, on_change: Callable[[str, RuleSet], None] | None = None,
                 on_error: Callable[[str, RuleFileError], None] | None = None, debounce_seconds: float = 0.2,
                 parse: Parse = parse_rules) -> None:
        self.rules_dir = rules_dir
        self.on_change = on_change
        self.on_error = on_error
        self.debounce_seconds = debounce_seconds
        self._parse = parse  # tests slow it down to race an edit against a reload
        self._errors: dict[str, str] = {}
        self._sets: dict[str, RuleSet] = {"default": load_rules()}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._due: dict[str, float] = {}  # queued names -> when their changes have been quiet long enough
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]
        for name in self._names_in_folder():
            self.reload(name)

    def _names_in_folder(self) -> list[str]:
        if self.rules_dir is None or not self.rules_dir.is_dir():
            return []
        try:
            return sorted(path.name[: -len(".yaml")] for path in self.rules_dir.iterdir() if _is_rule_file(path.name))
        except OSError as exc:
            log.error("cannot list the rules folder %s (%s); serving the shipped rules only", self.rules_dir, exc)
            return []

    @property
    def errors(self) -> dict[str, str]:
        """Rule set name -> why its file is not in use (a copy)."""
        with self._lock:
            return dict(self._errors)

    def get(self, name: str) -> RuleSet | None:
        with self._lock:
            return self._sets.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._sets)

    def reload(self, name: str) -> bool:
        """Read, validate and swap in the rule file of `name`; on error keep the old rules. True if swapped."""
        path = self._path_of(name)
        if path is None:
            return False
        for _ in range(_READ_ATTEMPTS):
            try:
                data = read_rule_bytes(path, follow_symlinks=False)
            except FileNotFoundError:
                with self._lock:  # deleted: its last good rules stay in use, its error no longer applies
                    self._errors.pop(name, None)
                return False
            except RuleFileError as exc:
                return self._failed(name, path, exc)
            outcome = self._validate(data, path)
            if self._unchanged(path, data):
                if isinstance(outcome, RuleFileError):
                    return self._failed(name, path, outcome)
                return self._swap(name, path, outcome)
            log.info("rule file %s changed while it was read; reading it again", path)
        log.warning("rule file %s kept changing while it was read; waiting for its next change", path)
        return False

    def _path_of(self, name: str) -> Path | None:
        """The file of rule set `name`, or None (logged) if it may not be one."""
        if self.rules_dir is None:
            return None
        path = self.rules_dir / f"{name}.yaml"
        if not RULE_SET_NAME.fullmatch(name):
            log.error("ignoring %r in the rules folder: a rule file is named NAME.yaml with NAME made of letters, "
                      "digits, '.', '_' and '-' (at most 64, starting with a letter or digit)", path.name)
            return None
        if not self._admits(name):
            log.error("ignoring %s: the rules folder already holds %d rule sets, the most a daemon reads; remove "
                      "rule files you do not use", path, MAX_RULE_SETS)
            return None
        return path

    def _validate(self, data: bytes, path: Path) -> RuleSet | RuleFileError:
        try:
            return self._parse(rule_text(data, str(path)), str(path))
        except RuleFileError as exc:
            return exc
        except Exception as exc:  # a file the validator trips on must not stop the daemon
            log.exception("validating %s failed", path)
            return RuleFileError([Problem(str(path), None, None, (
                f"could not be validated ({type(exc).__name__}); this is a bug in Guardian, please report it"))])

    def _unchanged(self, path: Path, data: bytes) -> bool:
        try:
            return read_rule_bytes(path, follow_symlinks=False) == data
        except (OSError, RuleFileError):
            return False

    def _admits(self, name: str) -> bool:
        """Whether `name` is known or there is room for one more rule set (loaded or failed)."""
        with self._lock:
            return name in self._sets or name in self._errors or len(self._sets) + len(self._errors) <= MAX_RULE_SETS

    def _swap(self, name: str, path: Path, ruleset: RuleSet) -> bool:
        with self._lock:
            self._sets[name] = ruleset
            self._errors.pop(name, None)
        log.info("rules '%s' loaded from %s (%d rules)", name, path, len(ruleset.rules))
        if self.on_change:
            self.on_change(name, ruleset)
        return True

    def _failed(self, name: str, path: Path, exc: RuleFileError) -> bool:
        with self._lock:
            self._errors[name] = str(exc)
        log.error("rule file %s is invalid; keeping the last good rules for '%s':\n%s", path, name, exc)
        if self.on_error:
            self.on_error(name, exc)
        return False

    # ---- watching ----------------------------------------------------------------------------------

    def watch(self) -> None:
        """Start watching the rules folder (an observer thread and one reload worker, both daemon threads)."""
        if self.rules_dir is None or self._observer is not None:
            return
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._stopping = False
        self._worker = threading.Thread(target=self._work, daemon=True, name="guardian-rules-reload")
        self._worker.start()
        observer = Observer()
        observer.schedule(_Handler(self._changed), str(self.rules_dir), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=_STOP_WAIT_SECONDS)
            self._observer = None
        with self._lock:
            self._stopping = True
            self._due.clear()
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=_STOP_WAIT_SECONDS)
            self._worker = None

    def _changed(self, path: Path) -> None:
        """A watchdog event for `path`: queue its name, due once it has been quiet for the debounce time."""
        if self.rules_dir is None or not _is_rule_file(path.name):
            return  # by name only: it is read back as rules_dir/NAME.yaml (watchdog may spell the folder otherwise)
        with self._lock:
            self._due[path.name[: -len(".yaml")]] = time.monotonic() + self.debounce_seconds
            self._wake.notify()

    def _work(self) -> None:
        while (name := self._next_due()) is not None:
            try:
                self.reload(name)
            except Exception:  # one bad reload (or callback) must not end all reloads
                log.exception("reloading rules '%s' failed; the last good rules stay in use", name)

    def _next_due(self) -> str | None:
        """Wait for the queued name that is due first and take it off the queue; None when stopping."""
        with self._lock:
            while not self._stopping:
                now = time.monotonic()
                name = min(self._due, key=self._due.__getitem__, default=None)
                if name is not None and self._due[name] <= now:
                    del self._due[name]
                    return name
                self._wake.wait(None if name is None else self._due[name] - now)
            return None


def _is_rule_file(file_name: str) -> bool:
    return file_name.endswith(".yaml") and not file_name.startswith(".")


class _Handler(FileSystemEventHandler):
    def __init__(self, changed: Callable[[Path], None]) -> None:
        self.changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "modified", "moved", "closed"):
            return
        target = getattr(event, "dest_path", "") or event.src_path
        self.changed(Path(str(target)))

