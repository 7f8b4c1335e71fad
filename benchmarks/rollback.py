"""Time to roll a LoRA run back: from an in-memory snapshot, and from a checkpoint on disk.

    python benchmarks/rollback.py                          # 1M, 10M and 100M trainable parameters, 5 repeats
    python benchmarks/rollback.py --sizes 1M,10M --repeats 9

For each size a Llama-architecture model is built from a config (`guardian.testing.tinyrun.build_model`, no
downloads) with a LoRA adapter on every linear layer plus `lm_head`/`embed_tokens` as modules_to_save,
the rank picked to reach the target number of trainable parameters (the actual count is printed). The base
stays small; the adapter is large. An AdamW optimizer takes one real step (forward, backward) so it holds
`exp_avg`/`exp_avg_sq`, and a `get_cosine_schedule_with_warmup` scheduler steps once. That state is the
rollback target. Measured, each `--repeats` times (median, min-max):

- snapshot: `all_finite` over the trainable weights plus `snapshots.capture` (what GuardianCallback pays
  every `snapshot_every_steps`), and the snapshot's size;
- checkpoint save: the files a Trainer checkpoint holds for this (`model.save_pretrained` ->
  adapter_model.safetensors, `optimizer.pt`, `scheduler.pt`), written as Trainer writes them;
- rollback from memory: `snapshots.restore`;
- rollback from disk, page cache warm: `checkpoints.load_into` right after the files were read;
- rollback from disk, page cache cold: the same after `posix_fadvise(DONTNEED)` dropped the files' pages
  (no root needed; `fincore` reports what stayed cached).

Before every timed rollback the run is moved away from the target (an AdamW step with random gradients and
a scheduler step), and after it the trainable weights, the optimizer state and the scheduler state are
compared with the target bit for bit (torch.equal); any difference aborts the benchmark. One extra,
untimed-in-the-table rollback per path times the parts of the rollback separately.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import (
    RESULTS_DIR,
    CpuMonitor,
    _from_repo,
    busy_warning,
    describe_machine,
    load_average,
    machine_info,
    summary,
    table,
    write_json,
)

# size name -> (target trainable parameters, hidden size, layers). Rank follows from the target.
SIZES: dict[str, tuple[int, int, int]] = {
    "1M": (1_000_000, 256, 2),
    "10M": (10_000_000, 512, 4),
    "100M": (100_000_000, 1024, 8),
}


class BenchmarkError(RuntimeError):
    pass


# ---- the run being rolled back -----------------------------------------------------------------------

def lora_rank(target: int, hidden: int, layers: int) -> int:
    """Rank giving about `target` LoRA parameters on q,k,v,o (h x h) and gate, up, down (h x 2h)."""
    per_rank = layers * (4 * 2 * hidden + 3 * (hidden + 2 * hidden))  # = 17 h L
    return max(8, round(target / per_rank / 8) * 8)


def build(size: str, seed: int) -> tuple[Any, Any, Any, dict[str, Any]]:
    from transformers import get_cosine_schedule_with_warmup

    from guardian.callbacks import snapshots
    from guardian.testing.tinyrun import VOCAB, build_model

    target, hidden, layers = SIZES[size]
    rank = lora_rank(target, hidden, layers)
    model = build_model(seed, hidden_size=hidden, layers=layers, lora_r=rank)
    model.train()
    trainable = snapshots.trainable_parameters(model)
    params = list(trainable.values())
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=1000)
    # One real step, so the optimizer has its state and the LoRA B matrices move off zero.
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 32), generator=gen)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    total = sum(p.numel() for p in model.parameters())
    desc = {
        "size": size, "target_trainable": target, "hidden_size": hidden, "layers": layers, "lora_r": rank,
        "trainable_params": sum(p.numel() for p in params), "trainable_tensors": len(params),
        "total_params": total, "frozen_params": total - sum(p.numel() for p in params),
    }
    return model, optimizer, scheduler, desc


def move_away(model: Any, optimizer: Any, scheduler: Any, seed: int) -> None:
    """Train on: an AdamW step with random gradients and a scheduler step change weights, moments and LR."""
    from guardian.callbacks import snapshots

    gen = torch.Generator().manual_seed(seed)
    for p in snapshots.trainable_parameters(model).values():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class Target:
    """A deep copy of the state a rollback must bring back, and a bit-for-bit comparison with it."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any) -> None:
        from guardian.callbacks import snapshots

        self.params = {n: p.detach().clone() for n, p in snapshots.trainable_parameters(model).items()}
        self.optimizer = copy.deepcopy(optimizer.state_dict())
        self.scheduler = copy.deepcopy(scheduler.state_dict())

    def differences(self, model: Any, optimizer: Any, scheduler: Any) -> list[str]:
        from guardian.callbacks import snapshots

        now = snapshots.trainable_parameters(model)
        out = [f"parameter set differs: {sorted(set(now) ^ set(self.params))[:3]}"] if set(now) != set(self.params) else []
        out += [f"weights differ: {n}" for n, p in now.items() if n in self.params and not torch.equal(p, self.params[n])]
        out += [f"optimizer: {d}" for d in _diff(self.optimizer, optimizer.state_dict(), "")]
        out += [f"scheduler: {d}" for d in _diff(self.scheduler, scheduler.state_dict(), "")]
        return out

    def check(self, model: Any, optimizer: Any, scheduler: Any, what: str) -> None:
        diffs = self.differences(model, optimizer, scheduler)
        if diffs:
            raise BenchmarkError(f"{what}: restored state is not the saved state ({len(diffs)} differences): "
                                 + "; ".join(diffs[:5]))

    def check_moved(self, model: Any, optimizer: Any, scheduler: Any) -> None:
        from guardian.callbacks import snapshots

        changed = sum(not torch.equal(p, self.params[n]) for n, p in snapshots.trainable_parameters(model).items())
        if changed == 0 or not self.differences(model, optimizer, scheduler):
            raise BenchmarkError("moving the run away from the target changed nothing; the check would be vacuous")


def _diff(a: Any, b: Any, path: str) -> Iterator[str]:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype or not torch.equal(a, b):
            yield f"{path or '/'} differs"
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            yield f"{path or '/'} keys {sorted(map(str, set(a) ^ set(b)))[:3]}"
        for k in a.keys() & b.keys():
            yield from _diff(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            yield f"{path} length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{path}/{i}")
    elif callable(a) and callable(b):
        return  # functions in a scheduler's state (lr_lambdas) are not state
    elif a != b:
        yield f"{path} {a!r} != {b!r}"


# ---- measurements ------------------------------------------------------------------------------------

def tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def save_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any) -> None:
    """The files Trainer._save_checkpoint writes for a PEFT model, written the same way."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")


def drop_page_cache(folder: Path) -> int | None:
    """Flush the folder's files and ask the kernel to drop their cached pages; return bytes still cached."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return cached_bytes(folder)


def cached_bytes(folder: Path) -> int | None:
    if shutil.which("fincore") is None:
        return None
    files = [str(p) for p in folder.rglob("*") if p.is_file()]
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files],
                             capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, OSError):
        return None
    return sum(int(x) for x in out.split())


@contextlib.contextmanager
def patched(obj: Any, name: str, timings: dict[str, float], label: str) -> Iterator[None]:
    """Replace obj.name with a version that adds its wall time to timings[label]."""
    original = getattr(obj, name)
    had_own = name in getattr(obj, "__dict__", {})

    depth = [0]  # count only the outermost call of a recursive function (copy.deepcopy)

    def timed(*args: Any, **kwargs: Any) -> Any:
        depth[0] += 1
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                timings[label] = timings.get(label, 0.0) + time.perf_counter() - t0

    setattr(obj, name, timed)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


def timed_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def bench_size(size: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import peft
    import safetensors.torch

    from guardian.callbacks import checkpoints, snapshots

    t_build, (model, optimizer, scheduler, desc) = timed_call(lambda: build(size, args.seed))
    print(f"\n[{size}] h={desc['hidden_size']} layers={desc['layers']} r={desc['lora_r']}: "
          f"{desc['trainable_params']:,} trainable params in {desc['trainable_tensors']} tensors, "
          f"{desc['frozen_params']:,} frozen (built in {t_build:.1f} s)", flush=True)
    target = Target(model, optimizer, scheduler)
    reps = args.repeats
    res: dict[str, Any] = {"model": desc, "build_s": t_build}

    # Snapshot capture: what GuardianCallback._snapshot does every snapshot_every_steps.
    finite_s, capture_s = [], []
    snap = None
    for _ in range(reps):
        params = list(snapshots.trainable_parameters(model).values())
        t, ok = timed_call(lambda params=params: snapshots.all_finite(params))
        if not ok:
            raise BenchmarkError("weights are not finite")
        finite_s.append(t)
        snap = None
        gc.collect()
        t, snap = timed_call(lambda: snapshots.capture(1, model, optimizer, scheduler, 1.0))
        capture_s.append(t)
    assert snap is not None
    opt_bytes = tensor_bytes(snap.optimizer)
    res["snapshot"] = {
        "all_finite_s": finite_s, "capture_s": capture_s, "all_finite": summary(finite_s), "capture": summary(capture_s),
        "per_snapshot_s": summary([a + b for a, b in zip(finite_s, capture_s)]),
        "nbytes_property": snap.nbytes, "optimizer_state_bytes": opt_bytes,
        "total_bytes": snap.nbytes + opt_bytes + tensor_bytes(snap.scheduler),
        "trainable_nbytes": snapshots.trainable_nbytes(model),
    }

    # Checkpoint files, written as Trainer writes them.
    folder = workdir / f"{size}" / "checkpoint-1"
    save_s = []
    for _rep in range(reps):
        shutil.rmtree(folder, ignore_errors=True)
        t, _ = timed_call(lambda: save_checkpoint(folder, model, optimizer, scheduler))
        save_s.append(t)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    res["checkpoint"] = {"save_s": save_s, "save": summary(save_s), "files": files, "bytes": sum(files.values())}
    drop_page_cache(folder)  # makes the files clean (fsync) before anything reads them

    def rollback_memory() -> None:
        snapshots.restore(snap, model, optimizer, scheduler)

    def rollback_disk() -> None:
        checkpoints.load_into(folder, model, optimizer, scheduler)

    paths: list[tuple[str, Callable[[], None], bool]] = [("memory", rollback_memory, False),
                                                         ("disk-warm", rollback_disk, False)]
    if not args.no_cold:
        paths.append(("disk-cold", rollback_disk, True))
    seed = 1000
    for name, fn, cold in paths:
        times, still_cached = [], []
        if name == "disk-warm":  # read once so the page cache holds the files
            move_away(model, optimizer, scheduler, seed)
            seed += 1
            rollback_disk()
            target.check(model, optimizer, scheduler, "disk (warming read)")
        for _ in range(reps):
            move_away(model, optimizer, scheduler, seed)
            seed += 1
            target.check_moved(model, optimizer, scheduler)
            if cold:
                still_cached.append(drop_page_cache(folder))
            gc.collect()
            t, _ = timed_call(fn)
            times.append(t)
            target.check(model, optimizer, scheduler, f"rollback from {name}")
        # One more rollback with its parts timed (not part of the figures above).
        parts: dict[str, float] = {}
        move_away(model, optimizer, scheduler, seed)
        seed += 1
        if cold:
            drop_page_cache(folder)
        gc.collect()
        with contextlib.ExitStack() as stack:
            stack.enter_context(patched(optimizer, "load_state_dict", parts, "optimizer.load_state_dict"))
            if name == "memory":
                stack.enter_context(patched(snapshots.copy, "deepcopy", parts, "copy.deepcopy (snapshot state)"))
            else:
                stack.enter_context(patched(safetensors.torch, "load_file", parts, "safetensors load_file (adapter)"))
                stack.enter_context(patched(peft, "set_peft_model_state_dict", parts, "set_peft_model_state_dict"))
                stack.enter_context(patched(torch, "load", parts, "torch.load (optimizer.pt, scheduler.pt)"))
            t_all, _ = timed_call(fn)
        target.check(model, optimizer, scheduler, f"rollback from {name} (parts timed)")
        if name == "memory":
            # restore's deepcopy runs inside optimizer.load_state_dict's argument, not inside it.
            parts["weights copy_ + scheduler (rest)"] = t_all - sum(parts.values())
        else:
            parts["rest"] = t_all - sum(parts.values())
        res.setdefault("rollback", {})[name] = {
            "times_s": times, "stats": summary(times), "parts_s": parts, "parts_total_s": t_all,
            **({"bytes_still_cached_after_drop": still_cached} if cold else {}),
        }
        print(f"[{size}] rollback from {name}: median {statistics.median(times) * 1e3:.1f} ms "
              f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); verified bit for bit x{reps}", flush=True)

    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    if not args.keep_files:
        shutil.rmtree(workdir / size, ignore_errors=True)
    del model, optimizer, scheduler, snap, target
    gc.collect()
    return res


def fmt_ms(stats: dict[str, float]) -> tuple[str, str]:
    return f"{stats['median'] * 1e3:.1f}", f"{stats['min'] * 1e3:.1f}-{stats['max'] * 1e3:.1f}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,10M,100M", help=f"comma-separated, from {list(SIZES)} (default all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave torch's choice)")
    parser.add_argument("--workdir", default=None, help="where checkpoint files go (default: a temporary folder)")
    parser.add_argument("--keep-files", action="store_true", help="keep the checkpoint folders")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold page cache measurement")
    parser.add_argument("--out", default=str(RESULTS_DIR / "rollback.json"),
                        help="JSON result file (default benchmarks/results/rollback.json)")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s not in SIZES for s in sizes):
        parser.error(f"--sizes must be from {list(SIZES)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="peft")
    info = machine_info()
    print(f"machine: {describe_machine(info)}")
    if busy_warning(info):
        print(busy_warning(info))
    started = time.perf_counter()

    own_tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        own_tmp = tempfile.mkdtemp(prefix="guardian-rollback-")
        workdir = Path(own_tmp)
    fs = subprocess.run(["df", "-T", str(workdir)], capture_output=True, text=True).stdout.strip().splitlines()
    info["workdir"] = str(workdir)
    info["workdir_filesystem"] = fs[-1] if fs else None
    results: dict[str, Any] = {}
    try:
        for size in sizes:
            monitor = CpuMonitor()
            monitor.start()
            results[size] = bench_size(size, args, workdir)
            results[size]["cpu"] = monitor.stop()
    finally:
        if own_tmp and not args.keep_files:
            shutil.rmtree(own_tmp, ignore_errors=True)

    rows_model, rows_time, rows_parts = [], [], []
    for size, r in results.items():
        m, s, c = r["model"], r["snapshot"], r["checkpoint"]
        rows_model.append([size, f"{m['trainable_params']:,}", f"{m['hidden_size']}x{m['layers']} r={m['lora_r']}",
                           f"{m['frozen_params']:,}", human_bytes(s["nbytes_property"]), human_bytes(s["total_bytes"]),
                           human_bytes(c["bytes"])])
        lines = [("snapshot (all_finite + capture)", s["per_snapshot_s"]), ("  of which capture", s["capture"]),
                 ("checkpoint save (files)", c["save"])]
        lines += [(f"rollback from {k}", v["stats"]) for k, v in r["rollback"].items()]
        for label, st in lines:
            rows_time.append([size, label, *fmt_ms(st)])
        for k, v in r["rollback"].items():
            rows_parts.append([size, k, f"{v['parts_total_s'] * 1e3:.1f}",
                               "; ".join(f"{p} {t * 1e3:.1f}"
                                         for p, t in sorted(v["parts_s"].items(), key=lambda x: -x[1]))])
    text = ["", "models",
            table(["size", "trainable", "hidden x layers, rank", "frozen", "snapshot weights", "snapshot total",
                   "checkpoint files"], rows_model),
            "", f"times, {args.repeats} repeats each (ms)",
            table(["size", "measurement", "median", "min-max"], rows_time),
            "", "parts of one extra rollback (ms)",
            table(["size", "path", "total", "parts"], rows_parts)]
    cold = [(size, r["rollback"]["disk-cold"].get("bytes_still_cached_after_drop")) for size, r in results.items()
            if "disk-cold" in r["rollback"]]
    if cold:
        text.append("bytes still in page cache after the drop, per cold repeat: "
                    + "; ".join(f"{size}: {v}" for size, v in cold))
    text.append(f"peak RSS: {max(r['peak_rss_gb'] for r in results.values()):.2f} GB")
    busy = {size: r["cpu"]["other_cores"] for size, r in results.items() if r["cpu"]["other_cores"] is not None}
    if busy:
        text.append("CPU cores other processes kept busy while each size ran (/proc/stat): "
                    + ", ".join(f"{size} {v:.2f}" for size, v in busy.items())
                    + ("   <- the machine was shared: timings inflated" if max(busy.values()) > 0.15 else ""))
    print("\n".join(text))
    total = time.perf_counter() - started
    info["load_average_at_end"] = load_average()
    print(f"\ntotal runtime {total:.1f} s; load average at end {info['load_average_at_end']}")
    data = {"benchmark": "rollback", "machine": info,
            "settings": {**vars(args), "out": _from_repo(args.out), "sizes": sizes},
            "results": results, "table": "\n".join(text), "total_runtime_s": total}
    print(f"wrote {write_json(args.out, data)}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchmarkError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
