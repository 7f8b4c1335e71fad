"""Helpers shared by the benchmark scripts: machine description, statistics, JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = RESULTS_DIR.parent.parent


def _from_repo(path: str) -> str:
    """`path` relative to the repository when it is inside it (`.venv/bin/python`), so a results file says
    how to rerun it anywhere rather than where it happened to run."""
    absolute = Path(os.path.abspath(path))
    return str(absolute.relative_to(REPO)) if absolute.is_relative_to(REPO) else path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return getattr(mod, "__version__", None)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work on the machine makes timings noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busy_warning(info: dict[str, Any]) -> str | None:
    """A warning line when the machine was busy when the benchmark started."""
    load = info.get("load_average_1_5_15min")
    if load and load[0] > 0.5:
        return (f"WARNING: load average {load[0]:.2f} at start on {info['cpu_count']} CPUs: other processes are "
                "running; timings will be noisy")
    return None


def code_fingerprint() -> dict[str, Any]:
    """A hash of Guardian's source as it was when the benchmark ran (the tree changes between runs)."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    files = sorted(p for d in ("callbacks", "guardian", "rules") for p in (root / d).rglob("*")
                   if p.is_file() and p.suffix in (".py", ".yaml"))
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"sha256": digest.hexdigest()[:16], "files": len(files)}


def machine_info() -> dict[str, Any]:
    """Where and how a benchmark ran: enough to tell whether two result files are comparable."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([_from_repo(sys.executable), *sys.argv]),
        "cwd": _from_repo(os.getcwd()),
        "uname": platform.uname()._asdict(),
        "processor": platform.processor(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "load_average_1_5_15min": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "safetensors": _version("safetensors"),
        "accelerate": _version("accelerate"),
        "guardian_code": code_fingerprint(),
    }


def describe_machine(info: dict[str, Any]) -> str:
    return (f"{info['cpu_model'] or info['processor'] or info['uname']['machine']}, {info['cpu_count']} CPUs "
            f"({info['torch_threads']} torch threads), {info['memory_gb']} GB; python {info['python']}, "
            f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}; {info['date_utc']}; "
            f"load average {info['load_average_1_5_15min']}")


def summary(values: list[float]) -> dict[str, float]:
    """Median, min, max, quartiles and mean of a list of numbers."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else (ordered[0],) * 3
    return {"n": len(ordered), "median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "q1": q1, "q3": q3, "mean": statistics.fmean(ordered)}


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, out)
    return out


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with right-aligned columns (the first one left-aligned)."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


class CpuMonitor:
    """How much CPU other processes (and the hypervisor, as steal) used while a measurement ran.

    Reads /proc/stat (all CPUs) and /proc/<pid>/stat of this process and of `pids` (the benchmark's own
    workers) at `start()` and `stop()`; `stop()` returns the average number of cores the rest of the
    machine kept busy. Linux only; elsewhere the figures are None.
    """

    def __init__(self, pids: list[int] | None = None) -> None:
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._pids = ["self", *(str(p) for p in pids or [])]
        self._t0: tuple[float, int, int, int] | None = None

    def _read(self) -> tuple[float, int, int, int] | None:
        import time

        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            mine = 0
            for pid in self._pids:
                own = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                mine += int(own[11]) + int(own[12])  # utime, stime (all threads)
        except (OSError, ValueError, IndexError):
            return None
        # user nice system idle iowait irq softirq steal guest guest_nice (guest time is inside user)
        busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
        steal = fields[7] if len(fields) > 7 else 0
        return time.perf_counter(), busy, steal, mine

    def start(self) -> None:
        self._t0 = self._read()

    def stop(self) -> dict[str, float | None]:
        t1 = self._read()
        if self._t0 is None or t1 is None:
            return {"wall_s": None, "self_cores": None, "other_cores": None, "steal_cores": None}
        wall = t1[0] - self._t0[0]
        busy, steal, mine = ((t1[i] - self._t0[i]) / self._tick for i in (1, 2, 3))
        return {"wall_s": wall, "self_cores": mine / wall, "other_cores": max(0.0, busy - mine) / wall,
                "steal_cores": steal / wall}
