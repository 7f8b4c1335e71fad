"""Which samples each optimizer step trained on; naming them when its update is skipped; masking them later.

Recording, every step, at no measurable cost: the train loader's batch sampler instance gets a subclass of
its own class (so `isinstance` checks and the data order are exactly as without Guardian) whose `__iter__`
also queues each index list it yields. The probe's `training_step` wrapper hands every micro-batch to
`SampleTracker.see`, which takes the next index list off the queue and keeps references to the batch's
`input_ids` and `attention_mask` until the step ends. No host sync, no copy.

The queue is only trusted where its order is known to be the order training sees: one pass of a DataLoader
over the sampler, or accelerate's `SkipBatchSampler` on resume (its skipped batches are not queued). A loader
without a batch sampler (an IterableDataset), accelerate's batch dispatching, an unknown wrapper, a queue that
overflows or runs dry: the indices are recorded as null, never guessed.

Flagging, on skipped steps only: `flag()` copies the step's token ids to the host, fingerprints each row's
non-padding tokens, checks each index against the dataset item, decodes an excerpt, and (rank 0, after
gathering every rank's rows) appends one line per sample to `<output_dir>/guardian/bad_samples.jsonl`.

Masking, in later runs in the same output folder: `see()` sets `labels[row] = -100` for every row whose
fingerprint the file lists, before the forward pass. The data order does not change.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import IO, Any, NamedTuple

import torch

from guardian.logs.badsample import EXCERPT_CHARS, BadSample, bad_samples_path, fingerprint, read_bad_samples

log = logging.getLogger("guardian")
QUEUE_MAX = 4096  # index lists loaded ahead of training (prefetch depth); beyond this the order is lost
BATCHES_KEPT_MAX = 1024  # micro-batches of one step; a step that never ends does not grow without bound
MAX_RECORDS = 10_000  # lines in the bad-sample file, over all runs in the folder
# Metrics no batch can move: a skip these alone asked for (a learning-rate jump) names no samples.
NOT_ABOUT_THE_DATA = frozenset({"learning_rate", "scheduled_lr", "epoch", "probe_loss"})


# ---- recording the loader's order -----------------------------------------------------------------


class IndexQueue:
    """Index lists the batch sampler has yielded and training has not yet used, oldest first.

    `restart()` begins each pass over the sampler; `pop()` gives None once the order cannot be trusted."""

    def __init__(self, max_len: int = QUEUE_MAX) -> None:
        self._items: deque[Any] = deque()
        self.max_len = max_len
        self.generation = 0
        self.trusted = False
        self.why_not = "no pass over a recorded batch sampler has begun"

    def restart(self, why_not: str | None) -> int:
        """A new pass: forget the old one; trust it unless `why_not` says otherwise. Returns its number."""
        if why_not and why_not != self.why_not:
            log.info("Guardian: the dataset indices of skipped samples will be null: %s", why_not)
        self.generation += 1
        self._items.clear()
        self.trusted = why_not is None
        self.why_not = why_not or ""
        return self.generation

    def distrust(self, why: str) -> None:
        if self.trusted:
            log.warning("Guardian: sample indices are recorded as null from here on: %s", why)
        self.trusted, self.why_not = False, why
        self._items.clear()

    def push(self, indices: Any) -> None:
        if not self.trusted:
            return
        if len(self._items) >= self.max_len:
            self.distrust(f"over {self.max_len} batches were loaded ahead of training (is something else "
                          "iterating the train loader, or is training_step not called for each batch?)")
            return
        self._items.append(indices)

    def pop(self) -> Any:
        if not self.trusted:
            return None
        if not self._items:
            self.distrust("training used a batch the recorded batch sampler did not yield")
            return None
        return self._items.popleft()


_RECORDING_CLASSES: dict[type, type] = {}


def record_order(loader: Any, queue: IndexQueue) -> str | None:
    """Make `loader`'s batch sampler queue the index lists it yields; None if it does, else why not."""
    why_not = _unrecordable(loader)
    if why_not:
        return why_not
    sampler = loader.batch_sampler
    base = getattr(type(sampler), "_guardian_base", type(sampler))
    try:
        sampler._guardian_queue = queue
        sampler.__class__ = _recording_class(base)
    except (TypeError, AttributeError) as exc:
        getattr(sampler, "__dict__", {}).pop("_guardian_queue", None)
        return f"its batch sampler ({base.__name__}) cannot be observed ({exc})"
    return None


def stop_recording(loader: Any) -> None:
    """Give the loader's batch sampler its own class back."""
    sampler = getattr(loader, "batch_sampler", None)
    base = getattr(type(sampler), "_guardian_base", None)
    if sampler is not None and base is not None:
        sampler.__class__ = base
        vars(sampler).pop("_guardian_queue", None)


def _unrecordable(loader: Any) -> str | None:
    if loader is None:
        return "Trainer passed no train dataloader"
    if isinstance(getattr(loader, "dataset", None), torch.utils.data.IterableDataset):
        return "an IterableDataset has no indices"
    real = type(loader)  # accelerate's loaders pretend to be their base DataLoader through __class__
    if real.__name__ == "DataLoaderDispatcher":
        return "accelerate dispatches slices of rank 0's batches (dispatch_batches)"
    if getattr(loader, "in_order", True) is False:
        return "the loader may yield batches out of order (in_order=False)"
    if getattr(loader, "skip_batches", 0):
        return "the loader skips batches itself"
    if getattr(loader, "batch_sampler", None) is None:
        return "the loader has no batch sampler"
    return None


def _recording_class(base: type) -> type:
    cls = _RECORDING_CLASSES.get(base)
    if cls is None:
        cls = type(f"Recording{base.__name__}", (base,), {
            "__slots__": (), "__iter__": _recording_iter, "__reduce_ex__": _plain_reduce,
            "_guardian_base": base, "__module__": __name__,
        })
        _RECORDING_CLASSES[base] = cls
    return cls


def _recording_iter(self: Any) -> Iterator[Any]:
    """The sampler's own iteration, each index list also queued for the training step that will use it."""
    queue: IndexQueue = self._guardian_queue
    skip, why_not = _who_iterates(self, sys._getframe(1))
    generation = queue.restart(why_not)
    return _queued(self._guardian_base.__iter__(self), queue, generation, skip)


def _queued(inner: Iterable[Any], queue: IndexQueue, generation: int, skip: int) -> Iterator[Any]:
    for n, indices in enumerate(inner):
        if n >= skip and queue.generation == generation:
            queue.push(indices)
        yield indices


def _who_iterates(sampler: Any, frame: FrameType | None) -> tuple[int, str | None]:
    """(batches the caller drops before training sees any, why the order cannot be trusted or None).

    Checked once per pass: a DataLoader's own iterator is trusted; so is accelerate's `SkipBatchSampler`
    (resume), whose skipped batches are left out of the queue."""
    try:
        caller = frame.f_locals.get("self") if frame is not None else None
    finally:
        del frame
    loader_iterator = getattr(torch.utils.data.dataloader, "_BaseDataLoaderIter", ())
    if loader_iterator and isinstance(caller, loader_iterator):
        return 0, None
    skip = getattr(caller, "skip_batches", None)
    if getattr(caller, "batch_sampler", None) is sampler and isinstance(skip, int):
        return skip, None
    return 0, f"the batch sampler is iterated by {type(caller).__name__}, not by a DataLoader"


def _plain_reduce(self: Any, protocol: Any) -> Any:
    """Pickled and copied as the sampler's own class (the recording class cannot be imported)."""
    state = {k: v for k, v in vars(self).items() if k != "_guardian_queue"}
    return _rebuild, (self._guardian_base, state)


def _rebuild(cls: Any, state: dict[str, Any]) -> Any:
    obj = cls.__new__(cls)
    vars(obj).update(state)
    return obj


# ---- the bad-sample file ----------------------------------------------------------------------------


class BadSampleFile:
    """Appends bad-sample records, flushed at once (a crash loses none); stops at `max_records` lines."""

    def __init__(self, path: Path, *, existing: int, max_records: int = MAX_RECORDS) -> None:
        self.path = path
        self.written = existing
        self.max_records = max_records
        self._file: IO[str] | None = None
        self._full_logged = False

    def append(self, samples: list[BadSample]) -> int:
        """Write what fits under the cap; return how many were written."""
        take = samples[:max(0, self.max_records - self.written)]
        if len(take) < len(samples) and not self._full_logged:
            self._full_logged = True
            log.warning("Guardian: %s holds %d samples, its limit; samples of later skipped updates are not "
                        "written", self.path, self.max_records)
        if not take:
            return 0
        f = self._open()
        for sample in take:
            f.write(json.dumps(sample.to_dict(), separators=(",", ":")) + "\n")
        f.flush()
        self.written += len(take)
        return len(take)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = self.path.is_file() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
            self._file = self.path.open("a", encoding="utf-8")
            if torn:  # a crash cut the last line short: start on a line of our own
                self._file.write("\n")
        return self._file


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


# ---- the tracker ------------------------------------------------------------------------------------


class _MicroBatch(NamedTuple):
    """References kept from one micro-batch (checked only when a step is flagged or masked)."""

    indices: Any  # the index list the sampler yielded for it, or None
    input_ids: Any
    attention_mask: Any


class SampleTracker:
    """Names the samples of skipped updates, and masks samples that earlier runs named.

    Args:
        output_dir: the run's output folder; the file is `<output_dir>/guardian/bad_samples.jsonl`.
        rank, world_size: this process under DDP; rank 0 writes, after gathering every rank's samples.
        tokenizer: anything with `decode` (the trainer's processing class) for excerpts; None: no excerpts.
        mask_known_bad: mask the samples the file (and `also_read`) lists. This costs one host copy of each
            micro-batch's `input_ids` (and `attention_mask`) while the list is not empty; none otherwise.
        counts: the callback's counters; `masked_samples` counts masked rows.
        also_read: other bad-sample files whose samples are masked too (a supervised restart's origin).

    Masked rows still count in Trainer's `num_items_in_batch`, which it computes before the training step:
    a step with masked rows weighs a little less, as if those tokens had zero loss.
    """

    def __init__(self, output_dir: str | Path, *, rank: int = 0, world_size: int = 1, tokenizer: Any = None,
                 mask_known_bad: bool = True, counts: dict[str, int] | None = None,
                 also_read: Iterable[Path] = (), max_records: int = MAX_RECORDS) -> None:
        self.path = bad_samples_path(output_dir)
        self.rank, self.world_size = rank, world_size
        self.tokenizer = tokenizer if callable(getattr(tokenizer, "decode", None)) else None
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if isinstance(pad, int) else None
        self.counts = counts if counts is not None else {}
        self.counts.setdefault("masked_samples", 0)
        self.queue = IndexQueue()
        self.why_no_indices: str | None = "no train dataloader seen yet"
        self.dataset: Any = None
        self._loader: Any = None
        self._batches: list[_MicroBatch] = []
        own, _ = read_bad_samples(self.path)
        self.known_bad: frozenset[str] = frozenset()
        if mask_known_bad:
            elsewhere = dict.fromkeys(p.resolve() for p in also_read if p.resolve() != self.path.resolve())
            others = [s for p in elsewhere for s in read_bad_samples(p)[0]]
            self.known_bad = frozenset(s.fingerprint for s in own + others)
        self.file = BadSampleFile(self.path, existing=len(own), max_records=max_records)
        self._said: set[str] = set()

    def attach(self, loader: Any) -> None:
        """Start recording the order of the train loader Trainer will iterate."""
        self.why_no_indices = record_order(loader, self.queue)
        self._loader = loader
        self.dataset = getattr(loader, "dataset", None)
        if self.why_no_indices:
            log.info("Guardian: the dataset indices of skipped samples will be null: %s", self.why_no_indices)

    def see(self, inputs: Any) -> None:
        """Before each micro-batch's forward pass: keep its index list and token tensors (references only)
        and mask its known-bad rows. Never raises; after a failure the indices of this run are null."""
        try:
            self._see(inputs)
        except Exception:
            self.queue.distrust("Guardian failed while recording a batch")
            self._say_once("see", "Guardian: recording a batch's samples failed; training continues",
                           exc_info=True)

    def flag(self, step: int, rules: Iterable[str], incident: int | None = None) -> list[BadSample]:
        """Name every sample of `step`, whose update is being skipped; rank 0 appends them to the file.

        Under DDP every rank must call it at the same step (skips are: every rank decides alike)."""
        try:
            samples = self._describe(step, tuple(rules), incident)
        except Exception:
            log.exception("Guardian: could not describe the samples of step %d", step)
            samples = []
        samples = _gather(samples, self.world_size)
        if self.rank == 0 and samples:
            self.file.append(samples)
        return samples

    def end_step(self) -> None:
        """The step is over: let go of its batches."""
        self._batches.clear()

    def close(self) -> None:
        stop_recording(self._loader)
        self._loader = None
        self._batches.clear()
        self.file.close()

    # ---- per micro-batch --------------------------------------------------------------------------

    def _see(self, inputs: Any) -> None:  # the per-micro-batch cost: a few microseconds, nothing checked
        indices = self.queue.pop()
        ids = mask = None
        if isinstance(inputs, (dict, Mapping)):
            ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if len(self._batches) >= BATCHES_KEPT_MAX:
            self._batches.clear()
        self._batches.append(_MicroBatch(indices, ids, mask))
        if self.known_bad:
            self._mask(inputs, *_tensors(ids, mask, rows_only=True))

    def _mask(self, inputs: Any, ids: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        if ids is None:
            return
        rows_ids = ids.tolist()  # the host copy masking costs, once per micro-batch
        rows_mask = mask.tolist() if mask is not None else [None] * len(rows_ids)
        rows = [r for r, (row, m) in enumerate(zip(rows_ids, rows_mask))
                if fingerprint(self._tokens(row, m)) in self.known_bad]
        if not rows:
            return
        labels = inputs.get("labels")
        if not isinstance(labels, torch.Tensor) or labels.dim() == 0 or labels.shape[0] != len(rows_ids):
            self._say_once("labels", "Guardian: a batch holds samples known to be bad but no per-row labels to "
                           "mask; they train as usual")
            return
        masked = labels.clone()  # labels may share storage with input_ids
        masked[rows] = -100
        inputs["labels"] = masked
        self.counts["masked_samples"] += len(rows)

    # ---- flagged steps ----------------------------------------------------------------------------

    def _describe(self, step: int, rules: tuple[str, ...], incident: int | None) -> list[BadSample]:
        out: list[BadSample] = []
        for micro_batch, batch in enumerate(self._batches):
            ids, mask = _tensors(batch.input_ids, batch.attention_mask, rows_only=False)
            if ids is None:
                self._say_once("no_ids", "Guardian: a skipped step's batch has no input_ids tensor; its samples "
                               "cannot be named")
                continue
            rows_ids = ids.detach().reshape(-1, ids.shape[-1]).tolist()  # the host copies, flagged steps only
            rows_mask = mask.reshape(len(rows_ids), -1).tolist() if mask is not None else [None] * len(rows_ids)
            indices = batch.indices if _is_index_list(batch.indices, len(rows_ids)) else None
            for row, (row_ids, row_mask) in enumerate(zip(rows_ids, rows_mask)):
                tokens = self._tokens(row_ids, row_mask)
                index, verified = self._verify(None if indices is None else int(indices[row]), tokens)
                out.append(BadSample(step, rules, micro_batch, row, index, verified, fingerprint(tokens),
                                     len(tokens), self._excerpt(tokens), incident, self.rank))
        return out

    def _tokens(self, row_ids: list[int], row_mask: list[int] | None) -> list[int]:
        """A row's non-padding token ids: where the attention mask is set, else all but the pad token."""
        if row_mask is not None:
            return [t for t, m in zip(row_ids, row_mask) if m]
        if self.pad_token_id is not None:
            return [t for t in row_ids if t != self.pad_token_id]
        return list(row_ids)

    def _verify(self, index: int | None, tokens: list[int]) -> tuple[int | None, bool]:
        """(index, True) when the dataset item there has exactly these tokens; (index, False) when the item
        has no input_ids to compare; (None, False) when it has others: an index we cannot stand behind."""
        if index is None or self.dataset is None:
            return index, False
        try:
            item = self.dataset[index]
            ids = item.get("input_ids") if isinstance(item, Mapping) else None
            if ids is None:
                return index, False
            mask = item.get("attention_mask")
            item_ids, item_mask = _as_list(ids), _as_list(mask) if mask is not None else None
        except Exception:
            return index, False
        same_shape = item_mask is not None and len(item_mask) == len(item_ids)
        if self._tokens(item_ids, item_mask if same_shape else None) == tokens:
            return index, True
        return None, False

    def _excerpt(self, tokens: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        try:
            try:
                text = self.tokenizer.decode(tokens[:EXCERPT_CHARS], skip_special_tokens=True)
            except TypeError:
                text = self.tokenizer.decode(tokens[:EXCERPT_CHARS])
        except Exception:
            self._say_once("decode", "Guardian: the tokenizer could not decode a sample; excerpts are null",
                           exc_info=True)
            return None
        return str(text)[:EXCERPT_CHARS]

    def _say_once(self, key: str, message: str, *, exc_info: bool = False) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message, exc_info=exc_info)


def _tensors(ids: Any, mask: Any, *, rows_only: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A micro-batch's input_ids (a tensor with at least one dimension; with `rows_only`, exactly two) and
    its attention mask when it has their shape; None for what is not."""
    if not isinstance(ids, torch.Tensor) or ids.dim() == 0 or (rows_only and ids.dim() != 2):
        return None, None
    return ids, mask if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else None


def _is_index_list(indices: Any, rows: int) -> bool:
    try:
        return indices is not None and len(indices) == rows and all(int(i) == i for i in indices)
    except (TypeError, ValueError):
        return False


def _as_list(values: Any) -> list[int]:
    return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def _gather(samples: list[BadSample], world_size: int) -> list[BadSample]:
    """Every rank's samples, on every rank (one collective, on flagged steps only)."""
    if world_size <= 1:
        return samples
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return samples
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, samples)
    return [s for part in parts for s in (part or [])]
