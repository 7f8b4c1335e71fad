"""Logs on disk: the trainer's own logs, Guardian's event file, bad-sample records and a run's on-disk state;
the one JSON-lines tail and the one atomic write."""
