"""The daemon: its core (runs, reports, control), its HTTP routes and wiring, the SQLite store of runs, and the
mapping of alerts to actions."""
