"""What naming bad samples costs: on a healthy step, with known-bad samples to mask, and on a skipped step.

    python benchmarks/samples_overhead.py                 # micro-timings, then a real 60-step Trainer run
    python benchmarks/samples_overhead.py --seq-len 2048 --repeats 2000

Micro-timings (real tensors and a real torch BatchSampler, no Trainer):
- `sampler`: iterating the train loader's batch sampler, plain vs with Guardian's recording class, per batch;
- `see`: `SampleTracker.see` + `end_step` per micro-batch, nothing known bad (the healthy-step path: a queue
  pop and references to the batch tensors);
- `see+mask`: the same with 100 known-bad fingerprints (a host copy of input_ids and attention_mask and a
  sha1 per row, per micro-batch);
- `flag`: naming the 8 samples of a skipped step (host copy, fingerprints, dataset check, excerpts, one
  flushed write).
Then a real TinyRun (Llama + LoRA, batch 8, CPU) with GuardianCallback, where a timer around the tracker's
`see` and `end_step` gives its time per optimizer step next to the step time. Prints a table and writes
`benchmarks/results/samples_overhead.json`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import RESULTS_DIR, _from_repo, describe_machine, machine_info, table, write_json
from torch.utils.data import BatchSampler, RandomSampler

from guardian.callbacks.samples import IndexQueue, SampleTracker, _recording_class
from guardian.logs.badsample import fingerprint
from guardian.testing.tinyrun import CharTokenizer


def per_call_us(fn: Any, repeats: int) -> list[float]:
    """`repeats` timings of fn() in microseconds (after 50 warm-up calls)."""
    for _ in range(50):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def sampler_us(batch_size: int, batches: int, recorded: bool) -> float:
    """Mean microseconds per batch to iterate a BatchSampler over a RandomSampler (popping as training would)."""
    sampler = BatchSampler(RandomSampler(range(batch_size * batches)), batch_size, False)
    queue = IndexQueue()
    if recorded:
        sampler._guardian_queue = queue  # type: ignore[attr-defined]
        sampler.__class__ = _recording_class(BatchSampler)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in sampler:  # the queue is not trusted here (iterated outside a DataLoader): pop anyway
            queue.pop()
        best = min(best, (time.perf_counter_ns() - start) / 1000 / batches)
    return best


def batch(rows: int, seq_len: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 40, (rows, seq_len))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tracker(out: Path, known_bad: int, dataset: Any = None) -> SampleTracker:
    t = SampleTracker(out, tokenizer=CharTokenizer())
    t.known_bad = frozenset(fingerprint([i, i + 1]) for i in range(known_bad))
    t.dataset = dataset
    return t


def micro(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    inputs = batch(args.rows, args.seq_len)
    healthy, masking = tracker(out / "a", 0), tracker(out / "b", 100)

    def see(t: SampleTracker) -> Any:
        return lambda: (t.see(inputs), t.end_step())

    dataset = [{"input_ids": row} for row in inputs["input_ids"]]
    flagging = tracker(out / "c", 0, dataset)
    flagging.queue.restart(None)

    def flag() -> None:
        flagging.queue.push(list(range(args.rows)))
        flagging.see(inputs)
        flagging.flag(1, ["loss_spike"])
        flagging.end_step()

    return {
        "sampler_plain_us_per_batch": sampler_us(args.rows, 20_000, recorded=False),
        "sampler_recorded_us_per_batch": sampler_us(args.rows, 20_000, recorded=True),
        "see_us": per_call_us(see(healthy), args.repeats),
        "see_mask_us": per_call_us(see(masking), args.repeats),
        "flag_us": per_call_us(flag, max(20, args.repeats // 50)),
    }


def in_a_run(steps: int, out: Path) -> dict[str, Any]:
    """A real Trainer run with Guardian; the tracker's own time per optimizer step, and the step time."""
    from transformers import TrainerCallback

    from guardian.callbacks import GuardianCallback
    from guardian.testing.tinyrun import TinyRun

    spent: list[float] = []
    floor: list[float] = []  # the same timer around a function that does nothing, at the same place

    def nothing(inputs: Any) -> None:
        return None

    class Timed(GuardianCallback):
        def _track_samples(self, *a: Any, **k: Any) -> None:
            super()._track_samples(*a, **k)
            assert self.samples is not None
            see, end = self.samples.see, self.samples.end_step

            def timed_see(inputs: Any) -> None:
                start = time.perf_counter_ns()
                nothing(inputs)
                floor[-1] += (time.perf_counter_ns() - start) / 1000
                start = time.perf_counter_ns()
                see(inputs)
                spent[-1] += (time.perf_counter_ns() - start) / 1000

            def timed_end() -> None:
                start = time.perf_counter_ns()
                end()
                spent[-1] += (time.perf_counter_ns() - start) / 1000

            self.samples.see, self.samples.end_step = timed_see, timed_end  # type: ignore[method-assign]
            if self._probe is not None:
                self._probe.on_inputs = timed_see

    step_ms: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            spent.append(0.0)
            floor.append(0.0)
            self.start = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            step_ms.append((time.perf_counter() - self.start) * 1000)

    guardian = Timed()
    TinyRun(str(out), max_steps=steps, eval_steps=0, tokenizer=True).trainer([Clock(), guardian]).train()
    assert guardian.samples is not None and guardian.samples.queue.trusted
    return {"tracker_us_per_step": spent[10:], "timer_floor_us_per_step": floor[10:], "step_ms": step_ms[10:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row for the micro-timings")
    parser.add_argument("--repeats", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of the real run (0: skip it)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "samples_overhead.json")
    args = parser.parse_args()
    logging.getLogger("guardian").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    info = machine_info()
    print(describe_machine(info))
    with tempfile.TemporaryDirectory() as tmp:
        results = micro(args, Path(tmp))
        run = in_a_run(args.steps, Path(tmp) / "run") if args.steps else {}
    med = statistics.median
    rows = [
        ["batch sampler, plain", f"{results['sampler_plain_us_per_batch']:.2f} us/batch", ""],
        ["batch sampler, recorded", f"{results['sampler_recorded_us_per_batch']:.2f} us/batch",
         f"+{results['sampler_recorded_us_per_batch'] - results['sampler_plain_us_per_batch']:.2f}"],
        ["see + end_step (healthy)", f"{med(results['see_us']):.2f} us/micro-batch", ""],
        [f"see + mask ({args.rows}x{args.seq_len})", f"{med(results['see_mask_us']):.1f} us/micro-batch", ""],
        [f"flag a skipped step ({args.rows} rows)", f"{med(results['flag_us']) / 1000:.2f} ms", ""],
    ]
    if run:
        rows.append(["in a real run: tracker", f"{med(run['tracker_us_per_step']):.2f} us/step",
                     f"of a {med(run['step_ms']):.1f} ms step"])
        rows.append(["in a real run: a no-op, timed alike", f"{med(run['timer_floor_us_per_step']):.2f} us/step", ""])
    text = table(["what", "median", ""], rows)
    print(text)
    path = write_json(args.out, {"machine": info, "settings": vars(args) | {"out": _from_repo(str(args.out))},
                                 "results": results, "run": run, "table": text})
    print(f"wrote {_from_repo(str(path))}")


if __name__ == "__main__":
    main()
