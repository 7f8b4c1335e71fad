"""One-shot GPU check: Guardian's overhead, recovery under mixed precision, NVML facts and NCCL, in one table.

On a lent device machine (one H200, no network, its image's python3 holds torch with CUDA, transformers, peft,
accelerate, nvidia-ml-py), pass this single line as the `run` tool's command, with `timeout_s` 570:

    set -o pipefail; export PYTHONUNBUFFERED=1; S=$(python3 -c 'import sysconfig;print(sysconfig.get_path("purelib"))'); python3 -m venv --without-pip /tmp/gv && V=$(/tmp/gv/bin/python -c 'import sysconfig;print(sysconfig.get_path("purelib"))') && echo "import site; site.addsitedir('$S')" > $V/torch_image.pth && (/tmp/gv/bin/python -m pip install -q --no-index --no-deps --no-build-isolation -e . || echo "pip install failed: gpu_check.py runs the checkout in place") && /tmp/gv/bin/python -c 'import torch,transformers,peft;print("torch",torch.__version__,"cuda",torch.version.cuda,torch.cuda.is_available(),"transformers",transformers.__version__)' && timeout 480 /tmp/gv/bin/python benchmarks/gpu_check.py --device cuda --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

Why that shape: nothing can be downloaded there, so `pip install torch` and `-c constraints.txt` (the offline
CPU build 2.13.0 of this machine) cannot apply; the image's own CUDA torch is used instead. Its python3 is itself
a venv, so `--system-site-packages` would not see its packages: the new venv gets a .pth line that adds the
image's site-packages. The repository then installs editable with `--no-deps` (its dependencies are in the
image, except watchdog, which training never imports); should that fail (an old setuptools), the script maps the
checkout's callbacks/ and rules/ in place itself. The JSON, the markdown table and the log come back in $OUT.

Here, without a GPU: `.venv/bin/python benchmarks/gpu_check.py --device cpu --quick` runs everything the CPU
can in well under a minute (tests/benchmarks/test_gpu_check.py runs it so the script cannot rot).

Checks, each in its own function with a time budget; a failing check is recorded with its error and the others
still run; the exit code is 0 only when none failed (a check that cannot apply here, NVML on a CPU, is "skip"):
- `overhead`: the GPU figure of BENCHMARKS.md section 1: step time with and without GuardianCallback (logging
  every step), paired per round, on a GPT-2-small-size model (124 M parameters, full fine-tune) in bf16 on
  cuda; a tiny GPT-2 in fp32 on the CPU. The step markers, the run bookkeeping and the statistics are
  benchmarks/overhead.py's; on cuda the markers synchronize the device, so a step includes its kernels.
- `recovery-<precision>`: bf16 and fp16 with accelerate's GradScaler on cuda; fp32 and fp16 with torch's CPU
  GradScaler on the CPU. A tiny Llama + LoRA run, the real GuardianCallback and the fault injector of
  callbacks/faults.py: a NaN forward pass at step 10 under the shipped rules must be skipped, and one at step
  16 under a rollback + LR x0.5 rule must roll back to the step-10 snapshot and halve the rate. The weights
  must be finite at the end, every step must have run and Guardian must have had no internal error (a
  GradScaler assertion would be one, or would end the run).
- `nvml`: guardian/gpu.py's facts (memory used and total, utilization, temperature, power) read directly, and
  as exported by a guarded run on cuda on its Prometheus endpoint (`metrics_port`): present and finite.
- `ddp`: tests/scripts/ddp_train.py's rollback scenario under `torchrun --nproc_per_node 1`, backend nccl
  on cuda (gloo on the CPU): rollback to the snapshot on the rank, checksum of the weights back to it, LR x0.5.

    python benchmarks/gpu_check.py [--quick] [--device cuda|cpu] [--checks overhead,ddp] [--out PATH]
"""  # noqa: E501 - the device command above must stay one line (tests/benchmarks/test_gpu_check.py)

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "scripts"))



def _use_the_checkout_in_place() -> None:
    """Without an install (the device machine's offline pip can fail on an old setuptools), map
    `guardian.callbacks` and `guardian.shipped_rules` onto the checkout's callbacks/ and rules/, as
    pyproject.toml's package-dir does. Does nothing when the package is installed."""
    import importlib.util

    try:
        import guardian.callbacks
        return
    except ImportError:
        pass
    sys.path.insert(0, str(REPO))
    import guardian

    for name, folder in (("shipped_rules", "rules"), ("callbacks", "callbacks")):
        spec = importlib.util.spec_from_file_location(f"guardian.{name}", REPO / folder / "__init__.py",
                                                      submodule_search_locations=[str(REPO / folder)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        setattr(guardian, name, module)
        spec.loader.exec_module(module)


_use_the_checkout_in_place()
import overhead  # noqa: E402  (benchmarks/overhead.py: step markers, Run, collect, guardian_for)
import torch  # noqa: E402
from _common import RESULTS_DIR, machine_info, summary, table, write_json  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from guardian import events  # noqa: E402
from guardian.events import ActionEvent, SystemEvent  # noqa: E402
from guardian.logs.eventlog import read_events  # noqa: E402

CHECKS = ("overhead", "recovery", "nvml", "ddp")
GPU_FACTS = ("memory_used_bytes", "memory_total_bytes", "utilization_ratio", "temperature_celsius", "power_watts")
# Seconds per check; the full cuda run stays under 8 minutes even if every check used all of its budget.
BUDGET_S = {"overhead": 200.0, "recovery": 45.0, "nvml": 45.0, "ddp": 120.0}


class OverBudget(BaseException):
    """A check ran past its time budget (a BaseException: Guardian's hooks must not swallow it)."""


@contextlib.contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise OverBudget(f"over its time budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Result:
    check: str
    status: str = "fail"  # pass | fail | skip
    figures: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    seconds: float = 0.0
    error: str | None = None


class CheckFailed(Exception):
    """What a check found wrong, with the figures it had gathered."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.figures = figures or {}


class Skip(Exception):
    """The check cannot apply on this machine (not a failure)."""


def require(condition: bool, message: str, figures: dict[str, Any]) -> None:
    if not condition:
        raise CheckFailed(message, figures)


def need_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device cuda but torch {torch.__version__} sees no CUDA device "
                           f"(torch.version.cuda={torch.version.cuda})")


# ---- trainers ---------------------------------------------------------------------------------------

def make_trainer(out: str, device: str, precision: str, callbacks: list[Any], *, model: Any, dataset: Any,
                 max_steps: int, batch_size: int = 8, learning_rate: float = 2e-3,
                 ddp_backend: str | None = None) -> Trainer:
    """A real Trainer on `device` in `precision` (fp32, bf16 or fp16), logging every step, no eval or saving.

    fp16 on the CPU: accelerate makes no GradScaler there, so it gets torch's CPU one (as
    tests/callbacks/test_recovery.py)."""
    args = TrainingArguments(
        output_dir=out, max_steps=max_steps, seed=0, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, logging_steps=1, lr_scheduler_type="cosine", warmup_steps=5,
        max_grad_norm=1.0, report_to=[], use_cpu=device == "cpu", disable_tqdm=True, dataloader_num_workers=0,
        save_strategy="no", eval_strategy="no", bf16=precision == "bf16", fp16=precision == "fp16",
        ddp_backend=ddp_backend,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    if precision == "fp16" and device == "cpu" and getattr(trainer.accelerator, "scaler", None) is None:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    return trainer


def tiny_llama_trainer(out: str, device: str, precision: str, callbacks: list[Any], max_steps: int,
                       ddp_backend: str | None = None) -> Trainer:
    from guardian.testing.tinyrun import TextDataset, build_model, make_texts

    return make_trainer(out, device, precision, callbacks, model=build_model(0),
                        dataset=TextDataset(make_texts(512, seed=0)), max_steps=max_steps, batch_size=8,
                        ddp_backend=ddp_backend)


class Progressions(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Token sequences that count up in random strides (learnable, so the loss falls as in real training)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def gpt2(size: str) -> tuple[Any, dict[str, int]]:
    """GPT-2 small (124 M parameters) or a tiny one, from a config; random weights, nothing downloaded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = ({"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
             if size == "small" else {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 128})
    torch.manual_seed(0)
    config: Any = GPT2Config(**shape)  # type: ignore[arg-type]
    model = GPT2LMHeadModel(config)
    return model, shape


# ---- overhead -----------------------------------------------------------------------------------------

class _SyncBegin(overhead._Begin):
    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        torch.cuda.synchronize()
        super().on_step_begin(*args, **kwargs)


class _SyncEnd(overhead._End):
    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        torch.cuda.synchronize()
        super().on_step_end(*args, **kwargs)


def check_overhead(device: str, quick: bool, budget_s: float) -> Result:
    need_device(device)
    started = time.perf_counter()
    size, precision = ("small", "bf16") if device == "cuda" else ("tiny", "fp32")
    rounds, steps, warmup = ((2, 60, 15) if device == "cuda" else (2, 30, 5)) if quick else (5, 120, 20)
    seq_len, batch = (512, 8) if size == "small" else (64, 8)
    template, shape = gpt2(size)
    n_params = sum(p.numel() for p in template.parameters())
    dataset = Progressions(512, seq_len, shape["vocab_size"])
    settings = argparse.Namespace(steps=steps, warmup=warmup, interleave=0)
    begin_cls, end_cls = (_SyncBegin, _SyncEnd) if device == "cuda" else (overhead._Begin, overhead._End)

    def one(variant: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-overhead-{variant}-") as out:
            guardian = None if variant == "none" else overhead.guardian_for(variant, {})
            begins: list[float] = []
            ends: list[float] = []
            callbacks = [begin_cls(begins)] + ([guardian] if guardian is not None else [])
            trainer = make_trainer(out, device, precision, callbacks, model=copy.deepcopy(template), dataset=dataset,
                                   max_steps=steps, batch_size=batch, learning_rate=5e-5)
            trainer.add_callback(end_cls(ends))  # last of all, after Guardian
            run = overhead.Run(variant, out, trainer, guardian, begins, ends)
            overhead._train(run)
            result = overhead.collect(run, settings)
            result["mean_step_s"] = statistics.fmean(result["step_s"])
            del trainer, run
            if device == "cuda":
                torch.cuda.empty_cache()
            return result

    per_round: list[dict[str, dict[str, Any]]] = []
    for r in range(rounds):
        order = ["none", "guardian"] if r % 2 == 0 else ["guardian", "none"]
        per_round.append({v: one(v) for v in order})
        spent = time.perf_counter() - started
        if r + 1 >= 2 and spent * (r + 2) / (r + 1) > 0.8 * budget_s:
            break  # another round would risk the budget: report the rounds done
    step_ratios = [rd["guardian"]["median_step_s"] / rd["none"]["median_step_s"] for rd in per_round]
    cycle_ratios = [rd["guardian"]["median_cycle_s"] / rd["none"]["median_cycle_s"] for rd in per_round]
    mean_ratios = [rd["guardian"]["mean_step_s"] / rd["none"]["mean_step_s"] for rd in per_round]
    none_ms = statistics.median(rd["none"]["median_step_s"] for rd in per_round) * 1e3
    guarded_ms = statistics.median(rd["guardian"]["median_step_s"] for rd in per_round) * 1e3
    paired = summary(step_ratios)
    g = per_round[-1]["guardian"]["guardian"]
    figures = {
        "model": f"GPT-2 {size}", "parameters": n_params, "precision": precision, "seq_len": seq_len,
        "batch_size": batch, "rounds": len(per_round), "steps": steps, "warmup_dropped": warmup,
        "none_step_ms": round(none_ms, 3), "guardian_step_ms": round(guarded_ms, 3),
        "paired_step_ratio": round(paired["median"], 4),
        "paired_step_ratio_range": [round(paired["min"], 4), round(paired["max"], 4)],
        "paired_cycle_ratio": round(statistics.median(cycle_ratios), 4),
        "paired_mean_step_ratio": round(statistics.median(mean_ratios), 4),
        "guardian_last_round": {k: g[k] for k in ("errors", "decisions", "rules_fired", "snapshots_in_ring",
                                                  "metric_events")},
        "round_medians_ms": [{v: round(rd[v]["median_step_s"] * 1e3, 3) for v in rd} for rd in per_round],
    }
    for rd in per_round:
        require(all(math.isfinite(rd[v]["median_step_s"]) for v in rd), "a step time is not finite", figures)
    text = (f"GPT-2 {size} {precision}: {none_ms:.2f} -> {guarded_ms:.2f} ms/step, paired ratio "
            f"{paired['median']:.4f} ({paired['min']:.4f}-{paired['max']:.4f}), cycle "
            f"{figures['paired_cycle_ratio']:.4f}, mean {figures['paired_mean_step_ratio']:.4f}")
    return Result("overhead", "pass", figures, text)


# ---- recovery under mixed precision -------------------------------------------------------------------

def _finite(model: Any) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _scaler_facts(trainer: Trainer) -> dict[str, Any]:
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is None:
        return {"grad_scaler": None}
    return {"grad_scaler": f"{type(scaler).__module__}.{type(scaler).__name__}", "final_scale": float(scaler.get_scale())}


def check_recovery(device: str, precision: str) -> Result:
    from ddp_train import ROLLBACK_RULES, Record

    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.faults import Fault, FaultInjector
    from guardian.rulefile.reader import parse_rules

    need_device(device)
    figures: dict[str, Any] = {"precision": precision}
    with tempfile.TemporaryDirectory(prefix="gpu-check-skip-") as out:
        guardian = GuardianCallback(snapshot_every_steps=10)
        trainer = tiny_llama_trainer(out, device, precision, [FaultInjector([Fault("nan", 10)]), guardian], 20)
        trainer.train()
        skipped = [i.step for i in guardian.interventions if i.skipped_update]
        figures["skip"] = {"decisions": [[d.step, d.rule] for d in guardian.decisions], "skipped_steps": skipped,
                           "global_step": trainer.state.global_step, "guardian_errors": guardian.errors,
                           "weights_finite": _finite(trainer.model), **_scaler_facts(trainer)}
        require(precision != "fp16" or figures["skip"]["grad_scaler"] is not None, "fp16 without a GradScaler", figures)
        require(guardian.errors == 0, f"Guardian had {guardian.errors} internal errors (a GradScaler assertion?)",
                figures)
        require(trainer.state.global_step == 20, "the run did not reach step 20", figures)
        require([10, "non_finite_loss"] in figures["skip"]["decisions"] and 10 in skipped,
                "the NaN step 10 was not skipped", figures)
        require(figures["skip"]["weights_finite"], "weights not finite after the skip", figures)
    with tempfile.TemporaryDirectory(prefix="gpu-check-rollback-") as out:
        guardian = GuardianCallback(parse_rules(ROLLBACK_RULES, "gpu-check-rules.yaml"), snapshot_every_steps=10)
        record = Record()
        trainer = tiny_llama_trainer(out, device, precision, [FaultInjector([Fault("nan", 16)]), guardian, record], 20)
        trainer.train()
        acts = [i for i in guardian.interventions if i.rollback is not None]
        figures["rollback"] = {"interventions": [events.to_builtins(a) for a in acts], "counts": dict(guardian.counts),
                               "global_step": trainer.state.global_step, "guardian_errors": guardian.errors,
                               "weights_finite": _finite(trainer.model), **_scaler_facts(trainer)}
        require(guardian.errors == 0, f"Guardian had {guardian.errors} internal errors (a GradScaler assertion?)",
                figures)
        require(trainer.state.global_step == 20, "the run did not reach step 20", figures)
        require(len(acts) == 1 and acts[0].rollback == "memory" and acts[0].rollback_to_step == 10,
                "no single rollback from memory to the step-10 snapshot", figures)
        require(acts[0].lr_factor == 0.5 and guardian.counts["lr_cuts"] == 1, "the LR was not cut x0.5",
                figures)
        require(record.steps[16]["checksum"] == record.steps[10]["checksum"],
                "the weights after the rollback differ from the snapshot's", figures)
        require(figures["rollback"]["weights_finite"], "weights not finite after the rollback", figures)
    scaler = figures["skip"]["grad_scaler"]
    text = (f"{precision}{' + ' + scaler.rsplit('.', 1)[-1] if scaler else ''}: NaN step 10 skipped; "
            f"rollback 16->10 from memory, LR x0.5; weights finite, 0 Guardian errors")
    return Result(f"recovery-{precision}", "pass", figures, text)


# ---- NVML ---------------------------------------------------------------------------------------------

class _Scrape(TrainerCallback):
    """Reads the run's Prometheus endpoint once, at `step`, while Guardian serves it."""

    def __init__(self, port: int, step: int) -> None:
        self.port, self.step = port, step
        self.text = ""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
            with opener.open(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
                self.text = response.read().decode()


def _exported_gpu_facts(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith("guardian_gpu_"):
            name, value = line.split("{", 1)[0][len("guardian_gpu_"):], line.rsplit(" ", 1)[1]
            found[name] = float(value)
    return found


def check_nvml(device: str) -> Result:
    """On the CPU only the run's /metrics endpoint is exercised (no facts to export), then the check is skipped."""
    need_device(device)
    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.trainer_callback import _gpu_reader

    figures: dict[str, Any] = {}
    direct: list[dict[str, float]] = []
    if device == "cuda":
        reader = _gpu_reader()  # the reader GuardianCallback uses: NVML, matched to this process's GPU by bus id
        figures["reader"] = None if reader is None else "guardian.gpu.GpuReader"
        require(reader is not None, "NVML gave no GPU (pynvml missing, or no handle for the CUDA device)", figures)
        assert reader is not None
        direct = reader.read()
        figures["direct"] = direct
        require(len(direct) == 1, f"{len(direct)} GPUs read, expected this process's one", figures)
        missing = [k for k in GPU_FACTS if not (isinstance(direct[0].get(k), float) and math.isfinite(direct[0][k]))]
        require(not missing, f"NVML facts missing or not finite: {missing}", figures)
        require(direct[0]["memory_total_bytes"] > 0, "memory_total_bytes is 0", figures)
    with tempfile.TemporaryDirectory(prefix="gpu-check-nvml-") as out:
        port = free_port()
        guardian = GuardianCallback(metrics_port=port, system_every_seconds=0.0, snapshot_every_steps=0)
        scrape = _Scrape(port, 5)
        trainer = tiny_llama_trainer(out, device, "bf16" if device == "cuda" else "fp32", [guardian, scrape], 8)
        trainer.train()
        systems = [e for e in read_events(Path(out) / "guardian" / "events.jsonl") if isinstance(e, SystemEvent)]
    require("guardian_" in scrape.text, "the run's /metrics endpoint gave no Guardian metrics", figures)
    if device != "cuda":
        raise Skip("no NVML/GPU: skipped")
    exported = _exported_gpu_facts(scrape.text)
    figures["exported"] = exported
    figures["system_events"] = len(systems)
    last = [events.to_builtins(gpu) for gpu in systems[-1].gpus] if systems else []
    figures["event_gpus"] = last
    missing = [k for k in GPU_FACTS if not math.isfinite(exported.get(k, math.nan))]
    require(not missing, f"not exported on /metrics (or not finite): {missing}", figures)
    require(bool(last) and all(k in last[0] for k in GPU_FACTS), "no system event with every GPU fact in events.jsonl",
            figures)
    d = direct[0]
    text = (f"{d['memory_used_bytes'] / 2**30:.1f}/{d['memory_total_bytes'] / 2**30:.0f} GiB, "
            f"util {d['utilization_ratio']:.2f}, {d['temperature_celsius']:.0f} C, {d['power_watts']:.0f} W; "
            f"all 5 on /metrics and in {len(systems)} system events")
    return Result("nvml", "pass", figures, text)


# ---- DDP ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_ddp(device: str, budget_s: float) -> Result:
    need_device(device)
    backend = "nccl" if device == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="gpu-check-ddp-") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(free_port()), str(Path(__file__).resolve()), "--ddp-worker", out, "--device", device]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, budget_s - 5),
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=str(REPO))
        except subprocess.TimeoutExpired as exc:
            raise CheckFailed(f"torchrun did not finish in {exc.timeout:g} s") from exc
        path = Path(out) / "rank-0.json"
        figures: dict[str, Any] = {"backend_wanted": backend, "torchrun_rc": proc.returncode}
        if proc.returncode != 0 or not path.exists():
            figures["output_tail"] = (proc.stdout[-2000:] + proc.stderr[-4000:])
            raise CheckFailed(f"torchrun exited {proc.returncode}" + ("" if path.exists() else ", no rank record"),
                              figures)
        rec = json.loads(path.read_text())
    figures.update({k: rec[k] for k in ("backend", "world_size", "global_step", "model_wrapper", "device",
                                        "decisions", "interventions")})
    require(rec["backend"] == backend, f"process group backend {rec['backend']}, wanted {backend}", figures)
    require(rec["world_size"] == 1 and rec["global_step"] == 40, "not one rank to step 40", figures)
    acts = [events.from_builtins(i) for i in rec["interventions"]]
    rollbacks = [(a.rollback, a.rollback_to_step, a.lr_factor) for a in acts
                 if isinstance(a, ActionEvent) and a.rollback is not None]
    require(rollbacks == [("memory", 20, 0.5)],
            "no rollback from memory to step 20 with LR x0.5", figures)
    steps = rec["steps"]
    require(steps["30"]["checksum"] == steps["20"]["checksum"], "weights after the rollback differ", figures)
    require(all(s["finite"] for s in steps.values()), "weights not finite", figures)
    return Result("ddp", "pass", figures, f"torchrun 1 rank, {backend}, {rec['model_wrapper']} on {rec['device']}: "
                                          "NaN at 30 rolled back to 20, LR x0.5, weights finite")


def ddp_worker(out: str, device: str) -> None:
    """Runs under torchrun: ddp_train.py's rollback scenario (NaN at step 30 on this rank) on `device`."""
    import torch.distributed as dist
    from ddp_train import ROLLBACK_RULES, Record

    from guardian.callbacks import GuardianCallback
    from guardian.callbacks.faults import Fault, FaultInjector
    from guardian.rulefile.reader import parse_rules

    _quiet()
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    guardian = GuardianCallback(parse_rules(ROLLBACK_RULES, "ddp-rules.yaml"), snapshot_every_steps=10)
    record = Record()
    trainer = tiny_llama_trainer(out, device, "bf16" if device == "cuda" else "fp32",
                                 [FaultInjector([Fault("nan", 30)]), guardian, record], 40, ddp_backend=backend)
    trainer.train()
    with open(os.path.join(out, f"rank-{dist.get_rank()}.json"), "w") as f:
        json.dump({
            "backend": dist.get_backend(), "world_size": dist.get_world_size(),
            "global_step": trainer.state.global_step, "steps": record.steps,
            "model_wrapper": type(trainer.model_wrapped).__name__,
            "device": str(next(trainer.model.parameters()).device),  # type: ignore[union-attr]
            "decisions": [[d.step, d.rule] for d in guardian.decisions],
            "interventions": [events.to_builtins(i) for i in guardian.interventions],
        }, f)
    dist.barrier()
    dist.destroy_process_group()


# ---- the table ----------------------------------------------------------------------------------------

def run_check(name: str, fn: Callable[[], Result], budget_s: float) -> Result:
    started = time.perf_counter()
    try:
        with time_budget(budget_s):
            result = fn()
    except Skip as exc:
        result = Result(name, "skip", {}, str(exc))
    except CheckFailed as exc:
        result = Result(name, "fail", exc.figures, str(exc), error=traceback.format_exc(limit=3))
    except (Exception, OverBudget) as exc:
        result = Result(name, "fail", {}, f"{type(exc).__name__}: {exc}", error=traceback.format_exc())
    result.check = name
    result.seconds = round(time.perf_counter() - started, 1)
    if result.status == "fail":
        print(f"[{name}] FAILED: {result.summary}\n{result.error}", file=sys.stderr, flush=True)
    else:
        print(f"[{name}] {result.status}: {result.summary} ({result.seconds} s)", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def gpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
        with contextlib.suppress(Exception):
            info["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
    return info


def render(results: list[Result], info: dict[str, Any], gpu: dict[str, Any]) -> tuple[str, str]:
    rows = [[r.check, r.status.upper(), r.summary, f"{r.seconds:.1f}"] for r in results]
    headers = ["check", "result", "figures", "seconds"]
    where = (f"{gpu.get('name', 'no GPU')}, torch {info['torch']} (CUDA {gpu['cuda']}), transformers "
             f"{info['transformers']}, {info['cpu_count']} CPUs; {info['date_utc']}")
    text = f"{where}\n{table(headers, rows)}"
    md = "\n".join([f"# GPU check\n\n{where}\n", "| " + " | ".join(headers) + " |",
                    "| --- | --- | --- | ---: |",
                    *("| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows)])
    return text, md + "\n"


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    logging.getLogger("guardian").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (the CPU smoke run)")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, from {', '.join(CHECKS)}")
    parser.add_argument("--out", default=str(RESULTS_DIR / "gpu_check.json"),
                        help="JSON result file; the markdown table goes beside it as .md")
    parser.add_argument("--ddp-worker", metavar="OUT_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.device)
        return 0
    chosen = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown:
        parser.error(f"--checks: unknown {unknown}; choose from {list(CHECKS)}")
    _quiet()
    if args.device == "cpu":
        torch.set_num_threads(1)  # small ops on a shared CPU: one thread avoids OpenMP teams spinning against others
    started = time.perf_counter()
    info, gpu = machine_info(), gpu_info()
    print(f"gpu_check on {args.device}{' (quick)' if args.quick else ''}: {json.dumps(gpu)}", flush=True)
    precisions = ("bf16", "fp16") if args.device == "cuda" else ("fp32", "fp16")
    plan: list[tuple[str, Callable[[], Result], float]] = []
    if "overhead" in chosen:
        plan.append(("overhead", lambda: check_overhead(args.device, args.quick, BUDGET_S["overhead"]),
                     BUDGET_S["overhead"]))
    if "recovery" in chosen:
        for p in precisions:
            plan.append((f"recovery-{p}", functools.partial(check_recovery, args.device, p), BUDGET_S["recovery"]))
    if "nvml" in chosen:
        plan.append(("nvml", lambda: check_nvml(args.device), BUDGET_S["nvml"]))
    if "ddp" in chosen:
        plan.append(("ddp", lambda: check_ddp(args.device, BUDGET_S["ddp"]), BUDGET_S["ddp"]))
    results = [run_check(name, fn, budget) for name, fn, budget in plan]
    text, md = render(results, info, gpu)
    print("\n" + text, flush=True)
    out = Path(args.out)
    ok = all(r.status != "fail" for r in results)
    write_json(out, {"benchmark": "gpu_check", "passed": ok, "device": args.device, "quick": args.quick,
                     "machine": info, "gpu": gpu, "checks": [vars(r) for r in results], "table": text,
                     "total_runtime_s": round(time.perf_counter() - started, 1)})
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out} and {out.with_suffix('.md')}; {'all passed' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
