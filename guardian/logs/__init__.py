"""Logs read from disk: the trainer's own logs, Guardian's event file, bad-sample records and a run's on-disk state."""
