"""`guardian top`: a live terminal view of the runs (rich for drawing, a tiny raw-terminal key reader).

- `source`: where the data comes from (the daemon, or one run's event file) and the snapshot values.
- `widgets`: pure functions from snapshots to rich renderables.
- `keys`: the key reader; `app`: the loop, the keys' meaning, the confirmation prompt and the actions.
"""
