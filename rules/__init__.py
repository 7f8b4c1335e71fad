"""Guardian's shipped rule files (data, not code); installed as `guardian.shipped_rules`."""
