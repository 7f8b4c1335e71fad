"""The daemon: its HTTP server and endpoints, the SQLite store of runs, and the mapping of decisions to alerts."""
