"""The CLI's commands beyond the daemon: attach, push, replay, report, run (the supervisor), demo and doctor."""
