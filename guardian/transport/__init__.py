"""Between a training run and the daemon: the HTTP client, the token and run keys, the wire format and event pages."""
