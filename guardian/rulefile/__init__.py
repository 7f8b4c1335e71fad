"""Rule files on disk: the strict YAML reader and the daemon's live reload of a rules directory."""
