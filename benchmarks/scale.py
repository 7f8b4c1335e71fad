"""Daemon scale: ingest throughput and verdict latency at 1 / 100 / 1,000 simulated runs; memory over a soak.

    python benchmarks/scale.py                     # phases 1:max, 100@2/s, 100:max, 1000@1/s,
                                                   # comparison, py-spy profile, 600 s soak (about 17 min)
    python benchmarks/scale.py --soak-seconds 120  # a shorter soak
    python benchmarks/scale.py --phases 1:max:20,100:max:20 --soak-seconds 0
    python benchmarks/scale.py --heap-check 30:900 # the daemon's core in-process under tracemalloc (no HTTP)
    python benchmarks/scale.py --report-only benchmarks/results/scale.json   # rebuild scale.md

A real daemon (`python -m guardian.cli serve --port P --state-dir TMP`, started like tests/daemonkit.py does,
a fresh state directory for each phase) receives reports from N simulated runs. Each simulated run reports
the way `GuardianCallback` + `DaemonLink` do in daemon mode: a `start` event, then one `metrics` event per
optimizer step (loss, grad_norm, learning_rate; an eval event every 100 steps; a rare loss spike so that
rules fire now and then), POSTed to /v1/report as {"v": 1, "run": {"id", "rules", "meta"}, "events": [...],
"decisions_since_step": S} over a persistent `http.client` connection of its own. A run that keeps up sends
one event per report; a run that has fallen behind sends everything due in one report (at most 500
events), as DaemonLink's batching does. Runs step at `rate` steps/s each (staggered start phases), or as fast
as the replies come (`max`). A simulated run paces itself with DaemonLink's own `Pacing`: it gives up on a
reply after `--client-timeout` (5 s), reconnects and resends the same events after a back-off (0.2 s doubling
to 5 s, jittered); after a timeout it waits twice as long for the next reply (up to 60 s) and sends half
the batch; the daemon stores each (run, seq) once.

The load comes from `--procs` worker processes with up to `--threads` threads each; by default every run
has a thread of its own (as every training process has its own DaemonLink sender thread) up to 1,000 runs.
With more runs than threads a thread serves its runs in due order, and a run can wait for its thread: the
"emit->ack" latency includes that wait, "POST->reply" does not. Loopback only; every loop ends by itself
after its phase's duration.

Per phase: events acked per second over the measuring window (after `--warmup` seconds), reports per second,
mean events per report, the POST->reply latency (the time from sending a report to the reply whose ack_seq
covers its events: the verdict latency a training step waits for) and the emit->ack latency (from the
moment a step's event was due to that reply), median/p90/p99/max, how far the runs lag behind at the end,
and the CPU used by the daemon, by the load generator and by the rest of the machine (other people's jobs),
the bytes the daemon wrote to storage (/proc/PID/io), failed requests and the kernel's listen-queue overflows.

Soak: `--soak-runs` runs at `--soak-rate` for `--soak-seconds`, after a prefill: every run starts
`--soak-prefill` steps "behind" (its first reports carry that history, like a run whose daemon comes back),
so the rules' windows are full before the steady state (by default the prefill is the shipped rules' longest
window plus its warm-up, plus 100 steps: 1,200 with the plateau rule's 1,000-observation window); then every
`--sample-seconds` the daemon's VmRSS/VmHWM/Threads (/proc/PID/status), its CPU time and the store's file
sizes are sampled, and the replies of each window are summarised (count, POST->reply p50/p99, failures). The
steady state starts when the events acked are within 10 s (summed over the runs) of the events due. Memory
is called bounded when the mean RSS of the last third of the steady-state samples is within 5 % of the first
third's; the slope of each third is reported too.

`--heap-check RUNS:STEPS` is a separate mode: the daemon's core (`Guardian` + `Store`, no HTTP, one thread)
in this process, fed the same reports; tracemalloc starts half-way (the rules' windows are full by then), so
the traced size is what was allocated since and is still alive: flat when Python's heap is bounded, whatever
the allocator or the threads do to the RSS. Writes results/scale_heapcheck.json.

With `--profile always` (default) the daemon is profiled with py-spy during an extra run of `--profile-phase`
(default 100 runs at max rate: the CPU ceiling): `py-spy record --format raw --nonblocking` for
`--profile-seconds`, then one `py-spy dump`. Samples whose innermost frame is a blocking wait (a keep-alive
connection waiting in recv, a condition wait, select) are left out; the rest are summarised by function in
results/scale_profile.txt. (`pip install py-spy` into the venv first; without it the profile is skipped.)

Writes benchmarks/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
from _common import RESULTS_DIR, CpuMonitor, _from_repo, load_average, machine_info, table, write_json  # noqa: E402

from guardian.transport.client import Pacing  # noqa: E402

MAX_BATCH = 500  # DaemonLink.batch_size
EVAL_EVERY = 100


# ---- a simulated run ----------------------------------------------------------------------------------


class SimRun:
    """One training run's reporting: seq numbers, steps due by the clock, its own persistent connection."""

    def __init__(self, run_id: str, t0: float, rate: float | None, seed: int, decisions_since: bool,
                 timeout: float = 5.0) -> None:
        self.id, self.t0, self.rate = run_id, t0, rate
        self.rng = random.Random(seed)
        self.seq = 0  # last seq acked
        self.step = 0  # last step acked
        self.started = False
        self.conn: http.client.HTTPConnection | None = None
        self.pacing = Pacing(base_timeout=timeout, max_batch=MAX_BATCH)  # DaemonLink's: timeouts, batches, back-off
        self.decisions_since = decisions_since
        meta = {"output_dir": f"/tmp/sim/{run_id}", "max_steps": 100_000, "host": "loadgen", "pid": 0}
        self.prefix = json.dumps({"id": run_id, "rules": "default", "meta": meta}, separators=(",", ":"))
        self.loss_scale = 1.5 + self.rng.random()

    def due_time(self, step: int) -> float:
        """Wall time at which `step` is due (step 1 at t0)."""
        return self.t0 + (step - 1) / self.rate if self.rate else 0.0

    def steps_due(self, now: float) -> int:
        if not self.rate:
            return self.step + 1
        return max(self.step, int((now - self.t0) * self.rate) + 1)

    def metrics(self, step: int) -> dict[str, Any]:
        loss = 0.4 + self.loss_scale * math.exp(-step / 800) + self.rng.gauss(0, 0.02)
        if self.rng.random() < 0.0005:
            loss *= 4  # a rare spike: loss_spike fires, a decision is stored and returned
        lr = 2e-4 * 0.5 * (1 + math.cos(math.pi * min(step, 100_000) / 100_000))
        return {"loss": round(loss, 5), "grad_norm": round(abs(1 + self.rng.gauss(0, 0.1)), 5),
                "learning_rate": lr}

    def batch(self, upto: int, now: float) -> tuple[list[dict[str, Any]], int, list[float]]:
        """Events for steps step+1..upto (at most a batch); returns (events, last step, due times)."""
        events: list[dict[str, Any]] = []
        dues: list[float] = []
        seq = self.seq
        if not self.started:
            seq += 1
            events.append({"seq": seq, "kind": "start", "time": round(now, 3), "step": 0,
                           "rules": ["default"], "max_steps": 100_000})
            dues.append(now if not self.rate else self.t0)
        step = self.step
        while step < upto and len(events) < self.pacing.batch:
            step += 1
            seq += 1
            due = self.due_time(step) if self.rate else now
            events.append({"seq": seq, "kind": "metrics", "time": round(due, 3), "step": step, "phase": "train",
                           "epoch": step / 1000, "lr_scale": 1.0, "values": self.metrics(step)})
            dues.append(due)
            if step % EVAL_EVERY == 0 and len(events) < self.pacing.batch:
                seq += 1
                eval_loss = 0.5 + self.loss_scale * math.exp(-step / 900)
                events.append({"seq": seq, "kind": "metrics", "time": round(due, 3), "step": step,
                               "phase": "eval", "values": {"eval_loss": round(eval_loss, 5)}})
                dues.append(due)
        return events, step, dues

    def body(self, events: list[dict[str, Any]]) -> bytes:
        first_step = next((e["step"] for e in events if e["kind"] == "metrics"), self.step)
        since = f',"decisions_since_step":{first_step}' if self.decisions_since else ""
        return (f'{{"v":1,"run":{self.prefix},"events":{json.dumps(events, separators=(",", ":"))}{since}}}'
                .encode())


class ThreadStats:
    def __init__(self) -> None:
        self.reply_t = array("d")  # wall time of each reply
        self.rtt_ms = array("f")  # POST -> reply
        self.n_events = array("i")
        self.ev_reply_t = array("d")  # per event: reply time
        self.ev_lat_ms = array("f")  # per event: due -> ack
        self.errors: Counter[str] = Counter()
        self.error_t = array("d")  # wall time of each failed request
        self.connect_ms = array("f")
        self.decisions = 0
        self.ack_mismatch = 0


def run_thread(runs: list[SimRun], port: int, end: float, stats: ThreadStats, progress: Any,
               timeout: float = 5.0) -> None:
    heap = [(r.t0 if r.rate else 0.0, i) for i, r in enumerate(runs)]
    heapq.heapify(heap)
    from guardian.transport.client import headers_for
    from guardian.transport.token import find_token

    # writes need the daemon's token (found through GUARDIAN_HOME, set by DaemonProcess) and a run key: one
    # for every simulated run (the first report of each binds it)
    headers = headers_for(find_token()[0], "scale-benchmark-run-key-0123456789")
    while heap:
        due, i = heap[0]
        now = time.time()
        if now >= end:
            break
        if due > now:
            time.sleep(min(due - now, end - now))
            continue
        heapq.heappop(heap)
        run = runs[i]
        events, last_step, dues = run.batch(run.steps_due(now), now)
        body = run.body(events)
        try:
            if run.conn is None:
                c0 = time.perf_counter()
                run.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=run.pacing.timeout)
                run.conn.connect()
                stats.connect_ms.append((time.perf_counter() - c0) * 1000)
            elif run.conn.sock is not None:
                run.conn.sock.settimeout(run.pacing.timeout)
            t0 = time.perf_counter()
            run.conn.request("POST", "/v1/report", body=body, headers=headers)
            response = run.conn.getresponse()
            data = response.read()
            rtt = time.perf_counter() - t0
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
            reply = json.loads(data)
        except Exception as exc:
            stats.errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
            stats.error_t.append(time.time())
            if run.conn is not None:
                run.conn.close()
            run.conn = None
            delay = run.pacing.timed_out() if isinstance(exc, TimeoutError) else run.pacing.failed()
            heapq.heappush(heap, (time.time() + delay, i))
            continue
        run.pacing.replied(rtt)
        t_reply = time.time()
        last_seq = events[-1]["seq"]
        if int(reply.get("ack_seq", 0)) < last_seq:
            stats.ack_mismatch += 1
        stats.decisions += len(reply.get("decisions", []))
        run.started = True
        run.seq, run.step = last_seq, last_step
        stats.reply_t.append(t_reply)
        stats.rtt_ms.append(rtt * 1000)
        stats.n_events.append(len(events))
        for d in dues:
            stats.ev_reply_t.append(t_reply)
            stats.ev_lat_ms.append((t_reply - d) * 1000)
        if progress is not None:
            with progress.get_lock():
                progress.value += len(events)
        heapq.heappush(heap, (run.due_time(run.step + 1) if run.rate else 0.0, i))
    for run in runs:
        if run.conn is not None:
            run.conn.close()


def worker(port: int, run_ids: list[str], rate: float | None, threads: int, start_at: Any, ready: Any,
           go: Any, duration: float, prefill: int, decisions_since: bool, out: Any, progress: Any,
           timeout: float = 5.0) -> None:
    """A load-generator process: `threads` threads share `run_ids`; results go to `out`."""
    ready.set()
    go.wait()
    start = start_at.value
    end = start + duration
    rng = random.Random(hash(tuple(run_ids)) & 0xFFFF)
    runs = []
    for _k, rid in enumerate(run_ids):
        phase = rng.random() / rate if rate else 0.0
        t0 = start + phase - (prefill / rate if rate else 0.0)
        runs.append(SimRun(rid, t0, rate, seed=hash(rid) & 0xFFFFFFF, decisions_since=decisions_since,
                           timeout=timeout))
    threading.stack_size(512 * 1024)
    n = max(1, min(threads, len(runs)))
    groups = [runs[j::n] for j in range(n)]
    stats = [ThreadStats() for _ in groups]
    ts = [threading.Thread(target=run_thread, args=(g, port, end, s, progress, timeout), daemon=True)
          for g, s in zip(groups, stats)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=duration + 120)
    # due vs acked at the end: how far behind the runs are
    lags = [max(0, r.steps_due(end) - r.step) if r.rate else 0 for r in runs]
    merged: dict[str, Any] = {k: b"".join(getattr(s, k).tobytes() for s in stats)
                              for k in ("reply_t", "rtt_ms", "n_events", "ev_reply_t", "ev_lat_ms", "connect_ms",
                                        "error_t")}
    errors: Counter[str] = Counter()
    for s in stats:
        errors.update(s.errors)
    merged.update(errors=dict(errors), decisions=sum(s.decisions for s in stats),
                  ack_mismatch=sum(s.ack_mismatch for s in stats), lags=lags,
                  acked_steps=sum(r.step for r in runs), start=start, end=end)
    out.put(merged)


# ---- the daemon process -------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def proc_write_bytes(pid: int) -> int | None:
    """Bytes the process caused to be written to storage (/proc/PID/io write_bytes)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def tcp_counters() -> dict[str, int]:
    """TcpExt ListenOverflows/ListenDrops (machine-wide): connections the daemon's accept queue had no room for."""
    try:
        lines = [ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines() if ln.startswith("TcpExt")]
        return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:]) if k in ("ListenOverflows", "ListenDrops")}
    except (OSError, IndexError, ValueError):
        return {}


def store_sizes(state_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in state_dir.glob("guardian.db*") if p.is_file()}


def start_daemon(state_dir: Path, src: Path | None = None) -> Any:
    """A real `guardian serve` (tests/daemonkit.py); with `src`, the daemon of another source tree (a checkout
    of an older commit, for a side-by-side run): started from that folder, so its `guardian` package is imported."""
    from daemonkit import DaemonProcess  # tests/daemonkit.py: `python -m guardian.cli serve --port P --state-dir D`

    if src is None:
        return DaemonProcess(state_dir).start()
    here = os.getcwd()
    os.chdir(src)  # `python -m` puts the working folder first on sys.path, ahead of the editable install
    try:
        return DaemonProcess(state_dir).start()
    finally:
        os.chdir(here)


# ---- one load phase -------------------------------------------------------------------------------------


def _scraper(port: int, every: float, stop: threading.Event, out: list[dict[str, float]]) -> None:
    """GET /metrics every `every` seconds, as Prometheus would: when each started, how long, how big."""
    while not stop.wait(every):
        started, t0 = time.time(), time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/metrics")
            size = len(conn.getresponse().read())
            conn.close()
        except OSError:
            continue
        out.append({"t": started, "seconds": time.perf_counter() - t0, "bytes": size})


def report_histogram(port: int) -> dict[float, float]:
    """The daemon's own `guardian_report_duration_seconds` buckets (upper bound -> cumulative count)."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {float(sample.labels["le"]): sample.value
            for family in text_string_to_metric_families(text) if family.name == "guardian_report_duration_seconds"
            for sample in family.samples if sample.name.endswith("_bucket")}


def histogram_ms(before: dict[float, float], after: dict[float, float]) -> dict[str, float | None]:
    """Median, p90 and p99 of the reports between two scrapes, interpolated within buckets as PromQL's
    histogram_quantile does (so they are only as fine as the buckets)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    out: dict[str, float | None] = {"n": total}
    for name, q in (("median", 0.5), ("p90", 0.9), ("p99", 0.99)):
        if total <= 0:
            out[name] = None
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for bound, cum in zip(bounds, counts):
            if cum >= rank:
                upper = bound if math.isfinite(bound) else lower
                out[name] = 1000 * (lower + (upper - lower) * (rank - below) / max(cum - below, 1e-12))
                break
            lower, below = bound, cum
    return out


def percentiles(values: list[float] | array) -> dict[str, float | None]:
    vals = sorted(values)
    if not vals:
        return {"n": 0, "median": None, "p90": None, "p99": None, "max": None, "mean": None}

    def pct(q: float) -> float:
        return float(vals[min(len(vals) - 1, max(0, math.ceil(q * len(vals)) - 1))])

    return {"n": len(vals), "median": round(statistics.median(vals), 3), "p90": round(pct(0.90), 3),
            "p99": round(pct(0.99), 3), "max": round(vals[-1], 3), "mean": round(statistics.fmean(vals), 3)}


def run_load(*, label: str, n_runs: int, rate: float | None, duration: float, warmup: float, procs: int,
             threads: int, workdir: Path, prefill: int = 0, decisions_since: bool = True,
             sample_seconds: float = 0.0, profile: dict[str, Any] | None = None,
             timeout: float = 5.0, scrape_seconds: float = 0.0,
             daemon_src: Path | None = None) -> dict[str, Any]:
    state_dir = workdir / label.replace(" ", "_").replace("/", "_")
    shutil.rmtree(state_dir, ignore_errors=True)
    daemon = start_daemon(state_dir, daemon_src)
    pid = daemon.proc.pid
    ctx = mp.get_context("spawn")
    n_procs = max(1, min(procs, n_runs))
    run_ids = [f"sim-{label.split()[0]}-{k:05d}" for k in range(n_runs)]
    start_at = ctx.Value("d", 0.0)
    go = ctx.Event()
    out = ctx.Queue()
    progress = ctx.Value("q", 0)
    readies = []
    workers = []
    for j in range(n_procs):
        ready = ctx.Event()
        p = ctx.Process(target=worker, args=(daemon.port, run_ids[j::n_procs], rate, max(1, threads), start_at,
                                             ready, go, duration, prefill, decisions_since, out, progress,
                                             timeout),
                        daemon=True)
        p.start()
        readies.append(ready)
        workers.append(p)
    for r in readies:
        r.wait(60)
    monitor = CpuMonitor([pid, *(p.pid for p in workers if p.pid)])
    tcp0 = tcp_counters()
    cpu0 = proc_cpu_seconds(pid) or 0.0
    io0 = proc_write_bytes(pid) or 0
    # read before the load starts: a scrape of a daemon holding many runs stalls its reports for a while
    hist0 = report_histogram(daemon.port)
    start_at.value = time.time() + 0.5
    go.set()
    time.sleep(max(0.0, start_at.value - time.time()))
    monitor.start()
    samples = []
    profile_out: dict[str, Any] = {}
    prof_thread = None
    if profile is not None:
        prof_thread = threading.Thread(target=_profile_daemon, args=(pid, profile, profile_out), daemon=True)
        prof_thread.start()
    scrapes: list[dict[str, float]] = []
    stop_scraping = threading.Event()
    if scrape_seconds:
        threading.Thread(target=_scraper, args=(daemon.port, scrape_seconds, stop_scraping, scrapes),
                         daemon=True).start()
    t_end = start_at.value + duration
    next_sample = start_at.value
    while time.time() < t_end:
        now = time.time()
        if sample_seconds and now >= next_sample:
            st = proc_status(pid)
            samples.append({"t": round(now - start_at.value, 1), "rss_kb": st.get("VmRSS"), "hwm_kb": st.get("VmHWM"),
                            "threads": st.get("Threads"), "cpu_s": round((proc_cpu_seconds(pid) or 0) - cpu0, 2),
                            "written_mb": round(((proc_write_bytes(pid) or 0) - io0) / 1e6, 1),
                            "store": store_sizes(state_dir), "events_acked": progress.value,
                            "load_1min": (load_average() or [None])[0]})
            next_sample += sample_seconds
        time.sleep(max(0.0, min(0.25, t_end - time.time(), next_sample - time.time() if sample_seconds else 0.25)))
    stop_scraping.set()
    hist1 = report_histogram(daemon.port)  # the reports answered in the window (and a few still in flight)
    results = [out.get(timeout=duration + 180) for _ in workers]
    cpu = monitor.stop()
    cpu_daemon = (proc_cpu_seconds(pid) or 0.0) - cpu0
    written = (proc_write_bytes(pid) or 0) - io0
    final_status = proc_status(pid)
    final_store = store_sizes(state_dir)
    if prof_thread is not None:
        prof_thread.join(timeout=profile.get("seconds", 20) + 60 if profile else 0)
    for p in workers:
        p.join(timeout=30)
    daemon.stop()
    daemon_log_tail = daemon.log.read_text(errors="replace")[-2000:] if daemon.log.exists() else ""

    start = start_at.value
    w0, w1 = start + warmup, start + duration
    reply_t = array("d")
    rtt = array("f")
    n_ev = array("i")
    ev_t = array("d")
    ev_lat = array("f")
    connect = array("f")
    error_t = array("d")
    errors: Counter[str] = Counter()
    lags: list[int] = []
    decisions = mismatch = acked_steps = 0
    for r in results:
        reply_t.frombytes(r["reply_t"])
        rtt.frombytes(r["rtt_ms"])
        n_ev.frombytes(r["n_events"])
        ev_t.frombytes(r["ev_reply_t"])
        ev_lat.frombytes(r["ev_lat_ms"])
        connect.frombytes(r["connect_ms"])
        error_t.frombytes(r["error_t"])
        errors.update(r["errors"])
        lags += r["lags"]
        decisions += r["decisions"]
        mismatch += r["ack_mismatch"]
        acked_steps += r["acked_steps"]
    series = []
    if sample_seconds:
        buckets: dict[int, list[int]] = {}
        for k, t in enumerate(reply_t):
            buckets.setdefault(int((t - start) // sample_seconds), []).append(k)
        err_buckets = Counter(int((t - start) // sample_seconds) for t in error_t)
        for b in range(int(duration // sample_seconds) + 1):
            ks = buckets.get(b, [])
            rt = percentiles([rtt[k] for k in ks])
            series.append({"t": b * sample_seconds, "reports": len(ks), "events": int(sum(n_ev[k] for k in ks)),
                           "post_to_reply_p50_ms": rt["median"], "post_to_reply_p99_ms": rt["p99"],
                           "errors": err_buckets.get(b, 0)})
    in_window = [k for k, t in enumerate(reply_t) if w0 <= t <= w1]
    ev_in_window = [k for k, t in enumerate(ev_t) if w0 <= t <= w1]
    span = w1 - w0
    events_window = sum(n_ev[k] for k in in_window)
    offered = n_runs * rate if rate else None
    result = {
        "label": label, "daemon": "baseline" if daemon_src else "stock", "runs": n_runs,
        "rate_steps_per_s_per_run": rate if rate else "max",
        "offered_events_per_s": offered, "duration_s": duration, "warmup_s": warmup, "procs": n_procs,
        "threads_per_proc": threads, "client_threads": sum(min(threads, len(run_ids[j::n_procs])) for j in range(n_procs)),
        "prefill_steps": prefill, "decisions_since_step": decisions_since, "client_timeout_s": timeout,
        "events_acked_total": int(sum(n_ev)), "reports_total": len(n_ev),
        "events_per_s": round(events_window / span, 1) if span > 0 else None,
        "reports_per_s": round(len(in_window) / span, 1) if span > 0 else None,
        "events_per_report": round(events_window / len(in_window), 2) if in_window else None,
        "post_to_reply_ms": percentiles([rtt[k] for k in in_window]),
        "daemon_report_ms": histogram_ms(hist0, hist1),  # every report of the phase, warm-up included
        "scrape_every_s": scrape_seconds or None,
        "scrapes": {"n": len(scrapes), "seconds": percentiles([x["seconds"] for x in scrapes]),
                    "bytes_max": max((x["bytes"] for x in scrapes), default=None)},
        "emit_to_ack_ms": percentiles([ev_lat[k] for k in ev_in_window]),
        # GuardianCallback(deadline_seconds=0.5): a verdict later than this is replaced by the local engine's
        "emit_to_ack_over_500ms_share": round(sum(1 for k in ev_in_window if ev_lat[k] > 500) / len(ev_in_window), 4)
        if ev_in_window else None,
        "connect_ms": percentiles(connect),
        "lag_steps_at_end": {"max": max(lags) if lags else 0, "mean": round(statistics.fmean(lags), 1) if lags else 0,
                             "runs_behind_over_5_steps": sum(1 for x in lags if x > 5)},
        "errors": dict(errors), "errors_in_first_5s": sum(1 for t in error_t if t < start + 5),
        "listen_overflows": (tcp_counters()["ListenOverflows"] - tcp0.get("ListenOverflows", 0))
        if tcp0 else None, "ack_mismatch": mismatch, "decisions_returned": decisions,
        "daemon_cpu_cores": round(cpu_daemon / duration, 2),
        "daemon_written_mb_per_s": round(written / duration / 1e6, 2),
        "daemon_written_bytes_per_event": round(written / max(1, int(sum(n_ev)))),
        "cpu": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in cpu.items()},
        "daemon_status_end": final_status, "store_end_bytes": final_store,
        "samples": samples, "series": series, "profile": profile_out or None,
    }
    if "Traceback" in daemon_log_tail:
        result["daemon_log_tail"] = daemon_log_tail
    shutil.rmtree(state_dir, ignore_errors=True)
    return result


def _profile_daemon(pid: int, cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """py-spy record (collapsed stacks, non-idle threads) + one dump, after `delay` seconds."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        out["error"] = "py-spy not installed (pip install py-spy)"
        return
    time.sleep(cfg.get("delay", 10))
    dump = subprocess.run([spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True)
    out["dump_rc"] = dump.returncode
    out["dump"] = dump.stdout
    out["dump_stderr"] = dump.stderr[-1000:]
    for key, extra in (("collapsed", []), ("gil_collapsed", ["--gil"])):
        raw = Path(cfg["dir"]) / f"daemon-{key}.txt"
        rec = subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(int(cfg.get("seconds", 20))),
                              "--rate", "100", "--format", "raw", "--output", str(raw), "--nonblocking", *extra],
                             capture_output=True, text=True)
        out[f"{key}_rc"] = rec.returncode
        out[f"{key}_stderr"] = rec.stderr[-1000:]
        if raw.exists():
            out[key] = raw.read_text()


IDLE_LEAVES = ("SocketIO.readinto", "Condition.wait", "Event.wait", "_PollLikeSelector.select", "select ",
               "InotifyFD._check_inotify_fd", "sleep", "_recv_into", "accept")


def summarize_profile(collapsed: str, top: int = 30) -> tuple[str, dict[str, Any]]:
    """Inclusive and self sample shares per function from py-spy's collapsed stacks."""
    total = idle = 0
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        leaf = stack.rsplit(";", 1)[-1]
        if any(leaf.startswith(w) for w in IDLE_LEAVES):
            idle += n  # py-spy's idle detection misses these on this VM: a thread blocked in recv/select/wait
            continue
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        for f in set(frames[1:] if frames and frames[0].startswith(("process", "thread")) else frames):
            inclusive[f] += n
        self_[frames[-1]] += n
    lines = [f"py-spy samples of busy threads: {total} (left out: {idle} samples of threads blocked in "
             "recv/select/wait: keep-alive connections waiting for their next request)", "",
             "inclusive %  self %  function (file)   [% of busy samples]"]
    for f, n in inclusive.most_common(top):
        lines.append(f"{100 * n / max(total, 1):10.1f}  {100 * self_.get(f, 0) / max(total, 1):6.1f}  {f}")
    lines += ["", "top self time:"]
    for f, n in self_.most_common(15):
        lines.append(f"{100 * n / max(total, 1):6.1f}  {f}")
    data = {"samples": total, "idle_samples_left_out": idle,
            "inclusive_pct": {f: round(100 * n / max(total, 1), 1) for f, n in inclusive.most_common(top)},
            "self_pct": {f: round(100 * n / max(total, 1), 1) for f, n in self_.most_common(15)}}
    return "\n".join(lines), data


def summarize_dump(dump: str) -> dict[str, int]:
    """How many daemon threads sit in which innermost function (py-spy dump)."""
    where: Counter[str] = Counter()
    block: list[str] = []
    for line in dump.splitlines() + ["Thread end"]:
        if line.startswith("Thread "):
            if block:
                where[block[0].strip().split(" (")[0]] += 1
            block = []
        elif line.startswith("    ") and line.strip():
            block.append(line)
    return dict(where.most_common(20))


# ---- main -------------------------------------------------------------------------------------------------


def parse_phases(text: str) -> list[tuple[int, float | None, float]]:
    phases = []
    for part in (x for x in text.split(",") if x.strip()):
        n, rate, secs = part.split(":")
        phases.append((int(n), None if rate == "max" else float(rate), float(secs)))
    return phases


def fmt_ms(p: dict[str, Any]) -> str:
    return "—" if not p.get("n") else f"{p['median']:.1f} / {p['p90']:.1f} / {p['p99']:.1f}"


def phase_row(r: dict[str, Any]) -> list[str]:
    rate = r["rate_steps_per_s_per_run"]
    offered = "max" if rate == "max" else f"{r['offered_events_per_s']:.0f}"
    return [r.get("daemon", "stock").split(" ")[0], f"{r['runs']}", f"{rate}", offered, f"{r['events_per_s']}",
            f"{r['reports_per_s']}", f"{r['events_per_report']}", fmt_ms(r["post_to_reply_ms"]),
            fmt_ms(r.get("daemon_report_ms", {})), fmt_ms(r["emit_to_ack_ms"]),
            f"{r['emit_to_ack_over_500ms_share']:.1%}" if r["emit_to_ack_over_500ms_share"] is not None else "—",
            f"{r['lag_steps_at_end']['max']}", f"{r['daemon_cpu_cores']}", f"{r['cpu'].get('self_cores')}",
            f"{r['cpu'].get('other_cores')}", f"{sum(r['errors'].values())}", f"{r['listen_overflows']}",
            _scrape_cell(r.get("scrapes"))]


def _scrape_cell(scrapes: dict[str, Any] | None) -> str:
    if not scrapes or not scrapes.get("n"):
        return "—"
    return f"{scrapes['n']} x {scrapes['seconds']['median'] * 1000:.0f} ms, {scrapes['bytes_max'] / 1e6:.1f} MB"


PHASE_HEADERS = ["daemon", "runs", "steps/s/run", "offered ev/s", "acked ev/s", "reports/s", "ev/report",
                 "POST->reply ms p50/p90/p99", "in daemon ms p50/p90/p99", "emit->ack ms p50/p90/p99",
                 "emit->ack > 500 ms",
                 "max lag (steps)", "daemon cores",
                 "bench cores", "others' cores", "errors", "listen overflows", "/metrics scrapes"]


def catch_up_time(samples: list[dict[str, Any]], runs: int, prefill: int, rate: float) -> float | None:
    """First sample at which the events acked are within 10 s of schedule (summed over runs) of those due."""
    per_step = 1 + 1 / EVAL_EVERY  # a metrics event per step and an eval event every EVAL_EVERY steps
    for smp in samples:
        due = runs * ((prefill + smp["t"] * rate) * per_step + 1)
        if smp["t"] > 0 and due - smp["events_acked"] <= 10 * runs * rate:
            return float(smp["t"])
    return None


def soak_analysis(samples: list[dict[str, Any]], catch_up_s: float | None,
                  series: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Memory and store over the steady state (after the prefill's backlog was absorbed)."""
    if catch_up_s is None:
        return {"verdict": "never caught up with the prefill backlog: no steady state to judge",
                "catch_up_s": None}
    steady = [x for x in samples if x["t"] >= catch_up_s]
    if len(steady) < 6:
        return {"verdict": "too few steady-state samples", "steady_samples": len(steady)}
    third = len(steady) // 3
    thirds = [steady[:third], steady[third:2 * third], steady[-third:]]

    def mean_rss(xs: list[dict[str, Any]]) -> float:
        return statistics.fmean(x["rss_kb"] / 1024 for x in xs)

    def slope(xs: list[dict[str, Any]], key: Any) -> float:
        ts = [x["t"] for x in xs]
        return statistics.linear_regression(ts, [key(x) for x in xs]).slope * 60 if len(set(ts)) > 1 else 0.0

    f_mean, l_mean = mean_rss(thirds[0]), mean_rss(thirds[2])
    growth = (l_mean - f_mean) / f_mean
    rss_slopes = [round(slope(t, lambda x: x["rss_kb"] / 1024), 2) for t in thirds]
    store = [sum(x["store"].values()) for x in steady]
    acked = [x["events_acked"] for x in steady]
    span = steady[-1]["t"] - steady[0]["t"]
    out: dict[str, Any] = {
        "catch_up_s": catch_up_s, "steady_from_s": steady[0]["t"], "steady_to_s": steady[-1]["t"],
        "steady_samples": len(steady),
        "rss_first_third_mb": round(f_mean, 1), "rss_last_third_mb": round(l_mean, 1),
        "rss_growth_first_to_last_third": round(growth, 4),
        "rss_slope_mb_per_min_by_third": rss_slopes,
        "rss_max_mb": round(max(x["rss_kb"] for x in samples) / 1024, 1),
        "hwm_end_mb": round((steady[-1]["hwm_kb"] or 0) / 1024, 1),
        "threads_max": max(x["threads"] or 0 for x in samples), "threads_end": steady[-1]["threads"],
        "store_at_steady_start_mb": round(store[0] / 1e6, 1), "store_end_mb": round(store[-1] / 1e6, 1),
        "store_growth_mb_per_min": round(slope(steady, lambda x: sum(x["store"].values()) / 1e6), 2),
        "store_bytes_per_event": round((store[-1] - store[0]) / (acked[-1] - acked[0]), 1)
        if acked[-1] > acked[0] else None,
        "events_per_s_steady": round((acked[-1] - acked[0]) / span, 1) if span > 0 else None,
        "verdict": "bounded (no growth trend)" if abs(growth) <= 0.05 else
                   ("growing" if growth > 0 else "shrinking"),
    }
    if series:
        steady_series = [x for x in series if x["t"] >= catch_up_s and x["reports"]]
        if steady_series:
            out["steady_reports_per_s"] = round(statistics.fmean(x["reports"] for x in steady_series) /
                                                (series[1]["t"] - series[0]["t"] if len(series) > 1 else 1), 1)
            out["steady_post_to_reply_p50_ms_median_of_windows"] = statistics.median(
                x["post_to_reply_p50_ms"] for x in steady_series)
            out["steady_post_to_reply_p99_ms_max_of_windows"] = max(x["post_to_reply_p99_ms"] for x in steady_series)
            out["steady_errors"] = sum(x["errors"] for x in steady_series)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default="1:max:30,100:2:40,100:max:30,1000:1:60",
                        help="RUNS:RATE:SECONDS,... RATE in steps/s per run or 'max' (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds left out of each phase's statistics")
    parser.add_argument("--procs", type=int, default=4, help="load-generator processes (default 4)")
    parser.add_argument("--threads", type=int, default=250,
                        help="threads per load-generator process, at most; the default gives every run a thread of "
                             "its own up to 1,000 runs, like DaemonLink's sender thread (default 250)")
    parser.add_argument("--soak-seconds", type=float, default=600.0, help="0 skips the soak (default 600)")
    parser.add_argument("--soak-runs", type=int, default=1000)
    parser.add_argument("--soak-rate", type=float, default=1.0, help="steps/s per run in the soak (default 1)")
    parser.add_argument("--soak-prefill", type=int, default=None,
                        help="steps of history each soak run starts with (default: enough to fill the shipped "
                             "rules' longest window after its warm-up, plus 100)")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--scrape-seconds", type=float, default=0.0,
                        help="GET /metrics this often during every phase, as Prometheus does (e.g. 15; default 0: "
                             "never, as in the figures of BENCHMARKS.md §7's main table)")
    parser.add_argument("--client-timeout", type=float, default=5.0,
                        help="seconds a simulated run first waits for a reply before it reconnects and resends "
                             "(DaemonLink's timeout_seconds: 5); as in DaemonLink, each timeout doubles it, up to 60 s")
    parser.add_argument("--heap-check", default="",
                        help="RUNS:STEPS: instead of the load test, feed the daemon's core in this process (no HTTP) "
                             "and track Python's heap with tracemalloc; writes results/scale_heapcheck.json")
    parser.add_argument("--no-decisions-since", action="store_true",
                        help="do not send decisions_since_step (the real callback sends it in daemon mode)")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="always",
                        help="py-spy the daemon during an extra run of --profile-phase (auto: only when a stock "
                             "phase acked under 97%% of what it offered)")
    parser.add_argument("--profile-phase", default="100:max", help="RUNS:RATE of the profiled run (default %(default)s)")
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--baseline-src", default=None,
                        help="a checkout of an older commit (e.g. `git worktree add /tmp/base HEAD~3`): run every "
                             "phase on its daemon too, right before this tree's, for a side-by-side table")
    parser.add_argument("--out", default=str(RESULTS_DIR / "scale.json"))
    args = parser.parse_args()
    if args.soak_prefill is None:
        args.soak_prefill = rule_window_fill() + 100

    info = machine_info()
    if args.heap_check:
        n, steps = (int(x) for x in args.heap_check.split(":"))
        result = {"benchmark": "scale-heapcheck", "machine": info, **heap_check(n, steps)}
        out = write_json(RESULTS_DIR / "scale_heapcheck.json", result)
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
        print(f"wrote {out}")
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="guardian-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{info['cpu_model']}, {info['cpu_count']} CPUs, python {info['python']}; load {load_average()}", flush=True)
    costs = per_report_costs()
    print(f"per-report costs in-process (no HTTP, no SQLite): {costs}", flush=True)
    began = time.perf_counter()
    phases = []
    baseline = Path(args.baseline_src).resolve() if args.baseline_src else None
    for n, rate, secs in parse_phases(args.phases):
        # with --baseline-src, each phase runs on the older daemon and then on this tree's, back to back
        for src in ([baseline] if baseline else []) + [None]:
            label = f"{n}runs@{rate or 'max'}" + ("-baseline" if src else "")
            print(f"\nphase {label}: {n} runs at {rate or 'max'} steps/s each for {secs:.0f} s ...", flush=True)
            r = run_load(label=label, n_runs=n, rate=rate, duration=secs, warmup=min(args.warmup, secs / 3),
                         procs=args.procs, threads=args.threads, workdir=workdir,
                         decisions_since=not args.no_decisions_since, sample_seconds=args.sample_seconds,
                         timeout=args.client_timeout, scrape_seconds=args.scrape_seconds, daemon_src=src)
            print(table(PHASE_HEADERS, [phase_row(r)]), flush=True)
            if r["errors"]:
                print(f"  errors: {r['errors']}", flush=True)
            phases.append(r)


    profile_summary = None
    short = [p for p in phases if p["daemon"] == "stock" and p["offered_events_per_s"] and p["events_per_s"] and
             p["events_per_s"] < 0.97 * p["offered_events_per_s"]]
    if args.profile == "always" or (args.profile == "auto" and short):
        n, rate, _ = parse_phases(args.profile_phase + ":0")[0]
        secs = 2 * args.profile_seconds + 25
        print(f"\nprofiling the daemon with py-spy during {n} runs at {rate or 'max'} steps/s ...", flush=True)
        pdir = workdir / "profile"
        pdir.mkdir(exist_ok=True)
        r = run_load(label=f"{n}runs-profiled", n_runs=n, rate=rate, duration=secs, warmup=min(args.warmup, secs / 3),
                     procs=args.procs, threads=args.threads, workdir=workdir,
                     decisions_since=not args.no_decisions_since,
                     profile={"dir": str(pdir), "seconds": args.profile_seconds, "delay": 10},
                     timeout=args.client_timeout)
        prof = r.pop("profile") or {}
        if prof.get("collapsed"):
            text, data = summarize_profile(prof["collapsed"])
            if prof.get("gil_collapsed"):
                gil_text, gil_data = summarize_profile(prof["gil_collapsed"])
                data["gil"] = gil_data
                if gil_data["samples"] >= 100:
                    text += ("\n\n---- py-spy record --gil: only the thread holding the GIL at each sample (where "
                             "the interpreter's single core of Python goes) ----\n" + gil_text)
                else:
                    text += (f"\n\n(py-spy record --gil collected only {gil_data['samples']} samples here: its GIL "
                             "detection does not work on this build/VM, so there is no GIL profile.)")
            dump_summary = summarize_dump(prof.get("dump", ""))
            text += "\n\npy-spy dump: daemon threads by innermost function:\n" + "\n".join(
                f"{v:6d}  {k}" for k, v in dump_summary.items())
            (RESULTS_DIR / "scale_profile.txt").write_text(
                f"# {shutil.which('py-spy') or 'py-spy'} record --pid DAEMON --rate 100 --format raw --nonblocking "
                f"during {n} runs at {rate or 'max'} steps/s\n\n" + text + "\n")
            print(text, flush=True)
            profile_summary = {"phase": {k: r[k] for k in ("runs", "events_per_s", "reports_per_s", "daemon_cpu_cores")},
                               **data, "dump_threads_by_frame": dump_summary}
        else:
            profile_summary = {"error": prof.get("error") or prof.get("collapsed_stderr")}
            print(f"py-spy failed: {profile_summary}", flush=True)

    soak = None
    if args.soak_seconds > 0:
        prefill_s_budget = 0.0
        total = args.soak_seconds
        print(f"\nsoak: {args.soak_runs} runs at {args.soak_rate} steps/s for {total:.0f} s "
              f"(prefill {args.soak_prefill} steps), sampling every {args.sample_seconds:.0f} s ...", flush=True)
        r = run_load(label=f"soak-{args.soak_runs}runs", n_runs=args.soak_runs, rate=args.soak_rate,
                     duration=total + prefill_s_budget, warmup=min(args.warmup, total / 3), procs=args.procs,
                     threads=args.threads, workdir=workdir, prefill=args.soak_prefill,
                     decisions_since=not args.no_decisions_since, sample_seconds=args.sample_seconds,
                     timeout=args.client_timeout, scrape_seconds=args.scrape_seconds)
        catch_up = catch_up_time(r["samples"], args.soak_runs, args.soak_prefill, args.soak_rate)
        r["catch_up_s"] = catch_up
        r["analysis"] = soak_analysis(r["samples"], catch_up, r["series"])
        for s in r["samples"]:
            print(f"  t={s['t']:6.0f}s rss {s['rss_kb'] / 1024 if s['rss_kb'] else 0:7.1f} MB threads {s['threads']} "
                  f"store {sum(s['store'].values()) / 1e6:7.1f} MB acked {s['events_acked']} load {s['load_1min']}",
                  flush=True)
        print(json.dumps(r["analysis"], indent=1), flush=True)
        soak = r

    wall = time.perf_counter() - began
    shutil.rmtree(workdir, ignore_errors=True)
    data = {"benchmark": "scale", "machine": info, "wall_seconds": round(wall, 1), "per_report_costs": costs,
            "settings": {**vars(args), "out": _from_repo(args.out)}, "phases": phases, "profile": profile_summary,
            "soak": soak, "phase_table": table(PHASE_HEADERS, [phase_row(p) for p in phases]),
            "side_by_side": side_by_side(phases)}
    out = write_json(args.out, data)
    md = Path(out).with_suffix(".md")
    md.write_text(markdown(data))
    print(f"\n{data['phase_table']}\n\nwrote {out} and {md} ({wall / 60:.1f} min)")


def side_by_side(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each phase run on both daemons (--baseline-src): this tree's figures, the baseline's and their ratio."""
    out = []
    for base in (p for p in phases if p["daemon"] == "baseline"):
        label = base["label"].removesuffix("-baseline")
        stock = next((p for p in phases if p["daemon"] == "stock" and p["label"] == label), None)
        if stock is None:
            continue
        row: dict[str, Any] = {"phase": label}
        for name, get in (("events_per_s", lambda p: p["events_per_s"]),
                          ("post_to_reply_median_ms", lambda p: p["post_to_reply_ms"].get("median")),
                          ("post_to_reply_p99_ms", lambda p: p["post_to_reply_ms"].get("p99")),
                          ("in_daemon_median_ms", lambda p: (p.get("daemon_report_ms") or {}).get("median")),
                          ("in_daemon_p99_ms", lambda p: (p.get("daemon_report_ms") or {}).get("p99")),
                          ("daemon_cpu_cores", lambda p: p["daemon_cpu_cores"])):
            new, old = get(stock), get(base)
            row[name] = {"this_tree": new, "baseline": old,
                         "ratio": round(new / old, 2) if isinstance(new, (int, float)) and old else None}
        out.append(row)
    return out


def analysis(data: dict[str, Any]) -> list[str]:
    """The reading of this run's numbers against the aims (>= 50,000 events/s; p99 <= 5 ms at 1,000 runs)."""
    out = ["## Analysis", ""]
    for p in data["phases"]:
        lat = p["post_to_reply_ms"]
        out.append(f"- **{p['label']}**: {p['events_per_s']} events/s acked in {p['reports_per_s']} reports/s "
                   f"({p['events_per_report']} events per report); POST->reply p50/p90/p99 {fmt_ms(lat)} ms; "
                   f"{p['emit_to_ack_over_500ms_share']:.0%} of events acknowledged more than 0.5 s after they were "
                   f"due (the callback's default deadline); the daemon used {p['daemon_cpu_cores']} cores, daemon and "
                   f"load generator together {p['cpu'].get('self_cores')}; {sum(p['errors'].values())} failed requests.")
    costs = data.get("per_report_costs") or {}
    if costs:
        out.append(f"- In-process, one report costs about {costs.get('observe_us')} µs in `Engine.observe`; encoding "
                   f"the rule state ({costs.get('state_json_bytes')} bytes of JSON) costs "
                   f"{costs.get('state_json_dumps_us')} µs, which is why the daemon saves it only with decisions, "
                   "at the end of a run and about once a minute otherwise (`STATE_SAVE_SECONDS`), replaying the "
                   "stored events after a crash.")
    soak = data.get("soak") or {}
    a = soak.get("analysis") or {}
    if a:
        out.append(f"- **Soak** ({soak['runs']} runs at {soak['rate_steps_per_s_per_run']} step/s, "
                   f"{soak['duration_s']:.0f} s): memory {a.get('verdict')}"
                   + (f"; steady-state RSS {a['rss_first_third_mb']} -> {a['rss_last_third_mb']} MB from the first "
                      f"to the last third, store +{a['store_growth_mb_per_min']} MB/min" if a.get("steady_from_s")
                      is not None else "") + ".")
    out += ["- **How far to trust the numbers:** one 2-CPU VM; the load generator (Python threads, one HTTP "
            "connection per simulated run) runs on the same two cores as the daemon, so at high rates the two "
            "compete and the figures are a floor for a daemon on a machine of its own. Runs are simulated (real "
            "payload shapes, synthetic values), so the rules rarely fire.", ""]
    return out


def markdown(data: dict[str, Any]) -> str:
    info = data["machine"]
    lines = [
        "# Guardian daemon at scale: ingest, verdict latency, memory", "",
        f"- Machine: {info['cpu_model']}, {info['cpu_count']} CPUs, {info['memory_gb']} GB; "
        f"{info['uname']['system']} {info['uname']['release']}; python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}; {info['date_utc']}; load average at start "
        f"{info['load_average_1_5_15min']} (shared machine: other people's jobs ran alongside)",
        f"- Command: `{info['command']}`",
        f"- Wall time: {data['wall_seconds'] / 60:.1f} min",
        *([f"- Note: {data['note']}"] if data.get("note") else []),
        *([f"- Per-report costs measured {data['per_report_costs']['measured']}"]
          if (data.get("per_report_costs") or {}).get("measured") else []), "",
        "## Phases", "",
        "| " + " | ".join(PHASE_HEADERS) + " |", "|" + " --- |" * len(PHASE_HEADERS),
    ]
    for p in data["phases"]:
        lines.append("| " + " | ".join(phase_row(p)) + " |")
    lines += ["", "POST->reply: time from sending a report to the reply carrying ack_seq for its events (the "
              "verdict a training step waits for). In daemon: the phase's reports (warm-up included) as the "
              "daemon's own guardian_report_duration_seconds histogram saw them (body read to reply: parse, rules, "
              "store; interpolated within its buckets, 0.5 ms to 5 s), i.e. without waiting in the event loop, "
              "the network and the load generator's own scheduling. emit->ack: from the moment the step's event "
              "was due to that "
              "reply (adds waiting in the simulated run's sender when it is behind). Cores: average CPU cores used "
              "by the daemon, by this benchmark's processes (daemon + load generator) and by everything else on "
              "the machine, over the phase.", ""]
    if data.get("profile"):
        prof = data["profile"]
        lines += ["## Profile (py-spy)", ""]
        if "error" in prof:
            lines.append(f"py-spy failed: {prof['error']}")
        else:
            lines.append(f"During {prof['phase']['runs']} runs ({prof['phase']['events_per_s']} ev/s): "
                         f"{prof['samples']} samples of non-idle daemon threads; see scale_profile.txt.")
            lines += ["", "| inclusive % | function |", "| --- | --- |"]
            lines += [f"| {v} | `{k}` |" for k, v in list(prof["inclusive_pct"].items())[:20]]
            if prof.get("gil") and prof["gil"]["samples"] >= 100:
                lines += ["", f"Holding the GIL (`py-spy record --gil`, {prof['gil']['samples']} samples):", "",
                          "| inclusive % | function |", "| --- | --- |"]
                lines += [f"| {v} | `{k}` |" for k, v in list(prof["gil"]["inclusive_pct"].items())[:20]]
            lines += ["", "Daemon threads by innermost frame (py-spy dump): " +
                      ", ".join(f"{k}: {v}" for k, v in prof["dump_threads_by_frame"].items())]
        lines.append("")
    if data.get("soak"):
        s = data["soak"]
        a = s["analysis"]
        start = (f"every run starting {s['prefill_steps']} steps behind (its first reports carry that history, like "
                 "runs whose daemon has just come back); " if s["prefill_steps"] else "every run starting fresh; ")
        settled = (f"the steady state (events acked within 10 s of schedule) began at {s['catch_up_s']} s and is "
                   "judged from there on" if s.get("catch_up_s") is not None else
                   "the runs never caught up with their backlog, so there is no steady state to judge")
        lines += ["## Soak", "", f"{s['runs']} runs at {s['rate_steps_per_s_per_run']} steps/s each for "
                  f"{s['duration_s']:.0f} s, {start}{settled}; client timeout {s.get('client_timeout_s', '?')} s:", "",
                  "```", json.dumps(a, indent=1), "```", "",
                  "| t (s) | RSS MB | threads | store MB | daemon wrote MB | events acked | reports in window | "
                  "POST->reply p50 / p99 ms | failed requests | load (1 min) |",
                  "|" + " --- |" * 10]
        series = {x["t"]: x for x in s.get("series", [])}
        for x in s["samples"]:
            w = series.get(x["t"], {})
            lat = (f"{w['post_to_reply_p50_ms']:.0f} / {w['post_to_reply_p99_ms']:.0f}"
                   if w.get("post_to_reply_p50_ms") is not None else "—")
            lines.append(f"| {x['t']:.0f} | {(x['rss_kb'] or 0) / 1024:.1f} | {x['threads']} | "
                         f"{sum(x['store'].values()) / 1e6:.1f} | {x.get('written_mb', '—')} | {x['events_acked']} | "
                         f"{w.get('reports', '—')} | {lat} | {w.get('errors', '—')} | {x['load_1min']} |")
        lines.append("")
    lines += analysis(data)
    return "\n".join(lines) + "\n"


def heap_check(n_runs: int, steps: int) -> dict[str, Any]:
    """The daemon's core (Guardian + Store, no HTTP, one thread) fed `n_runs` runs round-robin, one event per
    report. tracemalloc starts half-way (the rules' windows are full by then), so its traced size is what was
    allocated since and is still alive: flat when memory is bounded. Also the RSS and store every 50 steps, and
    the allocation sites that grew between 50 steps after tracing began and the end."""
    import tracemalloc

    from guardian.daemon.core import Guardian
    from guardian.daemon.store import Store
    from guardian.rulefile.reload import RuleLibrary
    from guardian.transport.intake import parse_report

    tmp = Path(tempfile.mkdtemp(prefix="guardian-heap-"))
    core = Guardian(Store(tmp / "guardian.db"), RuleLibrary(tmp / "rules"))
    sims = [SimRun(f"heap-{k:04d}", 0.0, None, seed=k, decisions_since=True) for k in range(n_runs)]
    series = []
    middle = None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if step == steps // 2 + 1:  # the rules' windows are full by now: trace only what survives from here on
            tracemalloc.start(5)
        for sim in sims:
            events, last, _ = sim.batch(step, time.time())
            core.report(parse_report(sim.body(events)), run_key="scale-benchmark-run-key-0123456789")
            sim.started, sim.seq, sim.step = True, events[-1]["seq"], last
        if step % 50 == 0:
            current = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
            series.append({"step": step, "traced_since_half_mb": round(current / 1e6, 3) if current is not None
                           else None, "rss_mb": round(proc_status(os.getpid()).get("VmRSS", 0) / 1024, 1),
                           "store_mb": round(sum(store_sizes(tmp).values()) / 1e6, 1),
                           "seconds": round(time.perf_counter() - t0, 1)})
            print(series[-1], flush=True)
        if step == steps // 2 + 50:
            middle = tracemalloc.take_snapshot()
    end = tracemalloc.take_snapshot()
    growth = []
    if middle is not None:
        for stat in end.compare_to(middle, "traceback")[:8]:
            growth.append({"size_diff_kb": round(stat.size_diff / 1024, 1), "count_diff": stat.count_diff,
                           "where": [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stat.traceback]})
    tracemalloc.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    traced = [x for x in series if x["traced_since_half_mb"] is not None]
    per_run_step = ((traced[-1]["traced_since_half_mb"] - traced[0]["traced_since_half_mb"]) * 1e6 /
                    (n_runs * (traced[-1]["step"] - traced[0]["step"]))) if len(traced) > 1 else None
    return {"runs": n_runs, "steps": steps, "traced_from_step": steps // 2 + 1, "series": series,
            "growth_between_snapshots": growth,
            "snapshots_at_steps": [steps // 2 + 50, steps],
            "traced_growth_bytes_per_run_per_step": round(per_run_step, 2) if per_run_step is not None else None}


def rule_window_fill() -> int:
    """Steps until every shipped rule's window is full: its warm-up (a step number) plus its window."""
    from guardian.rulefile.reader import load_rules

    return max(int(r.params.get("window_steps", 0)) + int(r.params.get("warmup_steps", 0)) for r in load_rules(None).rules)


def per_report_costs(steps: int = 1000) -> dict[str, Any]:
    """In this process, without HTTP or SQLite: what every report costs the daemon before touching the store.

    An Engine with the shipped rules fed `steps` synthetic steps (its windows full); then the time of one
    `observe`, the size of `json.dumps(engine.state_dict())` (saved with decisions, at the end of a run and about
    once a minute) and the time to build and encode it (done on the event loop, under the run's lock)."""
    from guardian.engine.engine import Engine
    from guardian.rulefile.reader import load_rules

    engine = Engine(load_rules(None))
    sim = SimRun("cost", 0.0, 1.0, seed=1, decisions_since=True)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        engine.observe(step, sim.metrics(step))
    observe_us = (time.perf_counter() - t0) / steps * 1e6
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        state = engine.state_dict()
    state_us = (time.perf_counter() - t0) / reps * 1e6
    t0 = time.perf_counter()
    for _ in range(reps):
        text = json.dumps(state)
    dumps_us = (time.perf_counter() - t0) / reps * 1e6
    return {"observe_us": round(observe_us, 1), "state_dict_us": round(state_us, 1),
            "state_json_bytes": len(text), "state_json_dumps_us": round(dumps_us, 1), "after_steps": steps,
            "state_growth": state_growth(), "load_average": load_average()}


def state_growth(checkpoints: tuple[int, ...] = (1000, 2000, 4000, 8000)) -> list[dict[str, Any]]:
    """How the engine state grows with a run's length, and which rule holds most."""
    from guardian.engine.engine import Engine
    from guardian.rulefile.reader import load_rules

    engine = Engine(load_rules(None))
    sim = SimRun("growth", 0.0, 1.0, seed=2, decisions_since=True)
    out = []
    for step in range(1, max(checkpoints) + 1):
        engine.observe(step, sim.metrics(step))
        if step in checkpoints:
            state = engine.state_dict()
            timings = []
            for _ in range(5):
                t0 = time.perf_counter()
                text = json.dumps(state)
                timings.append(time.perf_counter() - t0)
            dumps_ms = min(timings) * 1000  # the least disturbed of 5 on a shared machine
            rules = state.get("rules", {}) if isinstance(state, dict) else {}
            largest = max(rules.items(), key=lambda kv: len(json.dumps(kv[1])), default=(None, None))
            out.append({"step": step, "state_json_bytes": len(text), "dumps_ms": round(dumps_ms, 2),
                        "largest_rule": largest[0],
                        "largest_rule_bytes": len(json.dumps(largest[1])) if largest[0] else None})
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report-only":  # rebuild the .md (and fill in missing pieces)
        path = Path(sys.argv[2])
        loaded = json.loads(path.read_text())
        soak = loaded.get("soak")
        if soak:  # derived data: recomputed with this version's criteria
            st = loaded["settings"]
            soak["catch_up_s"] = catch_up_time(soak["samples"], st["soak_runs"], st["soak_prefill"], st["soak_rate"])
            soak["analysis"] = soak_analysis(soak["samples"], soak["catch_up_s"], soak.get("series"))
        if loaded.get("per_report_costs") and "state_growth" not in loaded["per_report_costs"]:
            loaded["per_report_costs"]["state_growth"] = state_growth()
            loaded["per_report_costs"]["state_growth_measured"] = "afterwards, by --report-only"
            write_json(path, loaded)
        if "per_report_costs" not in loaded:
            loaded["per_report_costs"] = {**per_report_costs(), "measured": "afterwards, by --report-only"}
            write_json(path, loaded)
        path.with_suffix(".md").write_text(markdown(loaded))
    else:
        main()
