"""Rule files on disk: the strict YAML loader, the rule-file reader, and the daemon's live reload of a rules directory."""
