"""Between a training run and the daemon: the HTTP client, the token and run keys, the wire format, the daemon's
intake of reports and event pages."""
