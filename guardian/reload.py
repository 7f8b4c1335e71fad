"""Rule sets by name, reloaded when their files change.

The shipped rules are always there as "default" (unless a file `default.yaml` in the rules folder replaces
them). Each `NAME.yaml` in the rules folder is the rule set NAME. Files are watched with watchdog; a change
is debounced, validated, and only then swapped in. An invalid edit keeps the last good rules and is
reported through `on_error` (the daemon logs it and writes it to the store).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from guardian.errors import RuleFileError
from guardian.ruleset import RuleSet, load_rules

log = logging.getLogger("guardian.reload")


class RuleLibrary:
    """The rule sets a daemon serves, by name."""

    def __init__(self, rules_dir: Path | None, *, on_change: Callable[[str, RuleSet], None] | None = None,
                 on_error: Callable[[str, RuleFileError], None] | None = None, debounce_seconds: float = 0.2) -> None:
        self.rules_dir = rules_dir
        self.on_change = on_change
        self.on_error = on_error
        self.debounce_seconds = debounce_seconds
        self.errors: dict[str, str] = {}
        self._sets: dict[str, RuleSet] = {"default": load_rules()}
        self._lock = threading.Lock()
        self._timers: dict[Path, threading.Timer] = {}
        self._observer: Observer | None = None  # type: ignore[valid-type]
        if rules_dir is not None and rules_dir.is_dir():
            for path in sorted(rules_dir.glob("*.yaml")):
                self.reload(path)

    def get(self, name: str) -> RuleSet | None:
        with self._lock:
            return self._sets.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._sets)

    def reload(self, path: Path) -> bool:
        """Validate a rule file and swap it in under its name; on error keep the old one."""
        name = path.stem
        if not path.exists():
            return False
        try:
            ruleset = load_rules(path)
        except RuleFileError as exc:
            self.errors[name] = str(exc)
            log.error("rule file %s is invalid; keeping the last good rules for '%s':\n%s", path, name, exc)
            if self.on_error:
                self.on_error(name, exc)
            return False
        with self._lock:
            self._sets[name] = ruleset
        self.errors.pop(name, None)
        log.info("rules '%s' loaded from %s (%d rules)", name, path, len(ruleset.rules))
        if self.on_change:
            self.on_change(name, ruleset)
        return True

    def watch(self) -> None:
        """Start watching the rules folder (a daemon thread)."""
        if self.rules_dir is None or self._observer is not None:
            return
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Handler(self._changed), str(self.rules_dir), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        for timer in self._timers.values():
            timer.cancel()

    def _changed(self, path: Path) -> None:
        if path.suffix != ".yaml" or path.name.startswith("."):
            return
        with self._lock:
            if path in self._timers:
                self._timers[path].cancel()
            timer = threading.Timer(self.debounce_seconds, self.reload, args=(path,))
            timer.daemon = True
            self._timers[path] = timer
        timer.start()


class _Handler(FileSystemEventHandler):
    def __init__(self, changed: Callable[[Path], None]) -> None:
        self.changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "modified", "moved", "closed"):
            return
        target = getattr(event, "dest_path", "") or event.src_path
        self.changed(Path(str(target)))
