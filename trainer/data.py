"""Streaming a label set into training batches, resumably and elastically.

:class:`LabelDataset` is a torch ``IterableDataset`` over a label set URL
(local or any fsspec URL).

Order (:mod:`softlabels.trainer.order`). Each epoch has one global order of
rows: shards permuted from ``(seed, epoch)``, their rows shuffled within
windows of ``shuffle_window`` shards (a bounded shuffle buffer). It depends
only on the label set, the seed and the epoch. The readers (*slots*: DDP
ranks x DataLoader workers) each take a contiguous share of it, so any number
of readers works with any number of shards, and each reads only about its
share of the shards.

Resume. Every sample carries its position ``(slot, slots, epoch, consumed)``.
:class:`StatefulLoader` records the position of the last sample handed out per
slot; its ``state_dict()`` (merged over ranks with :func:`merge_states`) is a
:class:`~softlabels.trainer.order.DataState`. Resumed with as many slots, every
slot continues its own share exactly (with the same ranks and workers: the
same batches in the same order, for any ``num_workers``); with another number
of slots, the rows nobody consumed are dealt again, so no sample is read
twice or skipped.

Reading. A background thread per slot fetches and decodes the next windows
(``prefetch``) while the current one is consumed. Each shard's sha256 is
checked against the manifest; a mismatch stops with the shard's name, or is
skipped and counted with ``skip_corrupt``.

Truncation. ``top_k`` < the set's k keeps the first k' entries and folds the
dropped ones into the tail bucket exactly (``logaddexp``), so the (k'+1)
buckets still sum to one.

Held-out split by ``sample_id`` hash, so eval never sees a training sample.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from softlabels.schemas import LabelSet, Sample, open_label_set
from softlabels.trainer.batch import (  # noqa: F401 (the names users import from here)
    collate,
    model_inputs,
    pack,
    sample_to_tensors,
    truncate_topk,
)
from softlabels.hf import split_key
from softlabels.schemas.errors import ShardChecksumError, ShardFormatError, UserError
from softlabels.trainer.order import DataState, EpochOrder, drop
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)


def in_eval_split(sample_id: str, eval_fraction: float) -> bool:
    """Deterministic held-out membership from the content address (or another hex key: :func:`split_key`)."""
    return int(sample_id[:8], 16) / 2**32 < eval_fraction


def held_out(s: Sample, m: Any, eval_fraction: float) -> bool:
    """Whether a row of a set with manifest ``m`` is in its held-out split (by prompt in sets a model wrote)."""
    return in_eval_split(split_key(s, m), eval_fraction)


def split_samples(labels: LabelSet, eval_fraction: float, split: str = "eval") -> Iterator[Sample]:
    """The rows of ``split`` (``eval``, ``train`` or ``all``), in manifest order, read on demand."""
    m = labels.manifest
    return (s for s in labels.iter_samples() if split == "all" or held_out(s, m, eval_fraction) == (split == "eval"))


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LabelDataset(IterableDataset):
    """Samples of a label set as dicts of tensors.

    Args:
        split: "train" (samples outside the held-out fraction), "eval" (inside it) or "all".
        epochs: passes over the data; ``None`` repeats forever (training).
        shuffle: permute shard order per epoch and samples within each window.
        shuffle_window: shards whose rows are shuffled together (the buffer bound).
        prefetch: shards fetched ahead in a background thread (0: none).
        top_k: read-time truncation to k' <= the set's k (tail absorbs the rest).
        verify: check each shard's size and sha256 against the manifest.
        skip_corrupt: skip (and count) a shard that fails the check instead of stopping.
        split_by_rank: share the order over DDP ranks (training); False: every rank reads all (eval).
        rank_world: ``(rank, world size)`` to read as, instead of torch.distributed's (other launchers, tests).
    """

    def __init__(
        self,
        url: str | LabelSet,
        storage_options: Mapping[str, Any] | None = None,
        split: str = "train",
        eval_fraction: float = 0.05,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = 1,
        verify: bool = True,
        shuffle_window: int = 2,
        prefetch: int = 2,
        top_k: int | None = None,
        skip_corrupt: bool = False,
        split_by_rank: bool = True,
        rank_world: tuple[int, int] | None = None,
    ) -> None:
        if split not in ("train", "eval", "all"):
            raise UserError(f"split must be train, eval or all, got {split!r}")
        if not 0 <= eval_fraction < 1:
            raise UserError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
        if shuffle_window < 1 or prefetch < 0:
            raise UserError(f"shuffle_window must be >= 1 and prefetch >= 0, got {shuffle_window}, {prefetch}")
        self.labels = url if isinstance(url, LabelSet) else open_label_set(url, storage_options)
        k = self.labels.manifest.top_k
        if top_k is not None and not 1 <= top_k <= k:
            raise UserError(f"top_k must be in [1, {k}] (the label set's k), got {top_k}")
        self.top_k = None if top_k in (None, k) else top_k
        self.split, self.eval_fraction = split, eval_fraction
        self.seed, self.shuffle, self.epochs, self.verify = seed, shuffle, epochs, verify
        self.shuffle_window, self.prefetch, self.skip_corrupt = shuffle_window, prefetch, skip_corrupt
        self.split_by_rank, self.rank_world = split_by_rank, rank_world
        self.state: DataState | None = None  # where to start (from a checkpoint); None: the beginning
        self.corrupt_skipped = 0
        self.textless = 0  # samples of the split that gave the student nothing (no text), in this process
        self.max_id: int | None = None  # the student's embedding rows: every stored id must be below it
        # A sample -> item function instead of sample_to_tensors (a student with another tokenizer: trainer.crosstok)
        self.transform: Callable[[Sample], dict[str, torch.Tensor] | None] | None = None
        self.byte_lengths: np.ndarray | None = None  # per id, its bytes of text (bits per byte for sets without spans)
        self._rows = np.array([s.rows for s in self.labels.shards], dtype=np.int64)

    @property
    def manifest(self):
        return self.labels.manifest

    @property
    def k(self) -> int:
        return self.top_k or self.manifest.top_k

    def load_state_dict(self, state: Mapping[str, Any] | DataState) -> None:
        """Start where ``state`` (from :meth:`StatefulLoader.state_dict` / :func:`merge_states`) says."""
        self.state = state if isinstance(state, DataState) else DataState.from_dict(state)

    def slots(self, workers: int) -> tuple[int, int]:
        """``(first slot of this rank, slots in all)`` for ``workers`` DataLoader workers per rank."""
        rank, world = (self.rank_world or _rank_world()) if self.split_by_rank else (0, 1)
        return rank * workers, world * workers

    def start_state(self, workers: int) -> DataState:
        """The state this run starts from, dealt to its own number of slots (the same in every rank and worker)."""
        _, slots = self.slots(workers)
        total = int(self._rows.sum())
        if self.state is None:
            return DataState.start(slots, workers)
        state = self.state.collapse(slots, lambda e: total, workers)
        if state is self.state:
            state = DataState.from_dict(state.to_dict())  # a copy: the loader moves its own forward
        else:
            log.info("data position saved with %d reader slot(s), dealt again to %d (ranks x workers): every sample "
                     "nobody consumed is read once", self.state.slots, slots)
        return state

    def _keep(self, s: Sample) -> bool:
        if self.split == "all":
            return True
        return in_eval_split(split_key(s, self.manifest), self.eval_fraction) == (self.split == "eval")

    def _read(self, index: int) -> list[Sample | None]:
        """A shard's rows in file order (``None`` for each row of a corrupt shard skipped)."""
        shard = self.labels.shards[index]
        try:
            samples = self.labels.read_shard(shard, verify=self.verify)
        except ShardChecksumError as e:
            if not self.skip_corrupt:
                raise ShardChecksumError(f"{e} (softlabels train --skip-corrupt skips such shards)") from e
            self.corrupt_skipped += 1
            log.warning("skipping corrupt shard (%s)", e)
            return [None] * shard.rows
        if self.max_id is not None and samples:
            top = max(max(int(s.topk_ids.max(initial=0)), int(s.input_ids.max(initial=0))) for s in samples)
            if top >= self.max_id:
                raise ShardFormatError(f"shard {self.labels.url}/{shard.path}: token id {top} is beyond the "
                                       f"student's {self.max_id} embeddings")
        return samples

    def _plan(self, slot: int, state: DataState) -> Iterator[tuple[EpochOrder, int, int, int, int]]:
        """``(order, window, lo, hi, consumed)``: the window rows this slot reads next (in the epoch's
        ``order``), and how many rows of its epoch's share precede them."""
        epoch, consumed = state.progress[slot]
        while self.epochs is None or epoch < self.epochs:
            order = EpochOrder(self._rows, self.seed, epoch, self.shuffle_window, self.shuffle)
            share = state.share(slot, epoch, order.total)
            done = consumed
            for span in drop(share, consumed):
                for w, lo, hi in order.segments(span):
                    yield order, w, lo, hi, done
                    done += hi - lo
            epoch, consumed = epoch + 1, 0

    def _windows(self, plan: Iterator[tuple[EpochOrder, int, int, int, int]]) -> Iterator[tuple[int, int, list[Sample | None]]]:
        """``(epoch, consumed, rows)`` per planned segment; a thread reads ahead, a window read once per visit."""

        def rows_of() -> Iterator[tuple[int, int, list[Sample | None]]]:
            cached: tuple[tuple[int, int], list[Sample | None]] | None = None
            for order, w, lo, hi, done in plan:
                if cached is None or cached[0] != (order.epoch, w):
                    rows = [r for i in order.window_shards(w) for r in self._read(int(i))]
                    cached = ((order.epoch, w), rows)
                yield order.epoch, done, [cached[1][i] for i in order.permutation(w)[lo:hi]]

        if self.prefetch == 0:
            yield from rows_of()
            return
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for item in rows_of():
                    if stop.is_set():
                        return
                    q.put(item)
                q.put(None)
            except BaseException as e:  # re-raised in the consuming thread
                q.put(e)

        t = threading.Thread(target=work, name="shard-prefetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():  # unblock a put() so the thread can see the stop flag
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        first, slots = self.slots(nworkers)
        state = self.start_state(nworkers)
        total = int(self._rows.sum())
        if self.epochs is None and total < slots:
            raise UserError(f"{self.labels.url} holds {total} sequence(s), fewer than the {slots} reader "
                            "slots (ranks x DataLoader workers) reading it: use fewer ranks or --num-workers")
        # The DataLoader takes batches from workers round-robin starting at worker 0;
        # rotating which slot each worker serves makes a resumed run continue the cycle.
        rotation = state.next_worker[first // nworkers] if state.next_worker else 0
        slot = first + (wid + rotation) % nworkers
        # The epoch of the last item yielded: stops an endless pass over none. An item, not a sample of the split:
        # samples that give this student nothing (no text to align) must not keep the pass going either.
        last = state.progress[slot][0]
        textless = 0  # samples of the split read since the last item, that gave no item
        for epoch, done, rows in self._windows(self._plan(slot, state)):
            if self.epochs is None and epoch - last >= 4:
                if textless:
                    raise UserError(
                        f"the {self.split} split of {self.labels.url} has no text to train on: none of the {textless} "
                        f"sample(s) read in 4 epochs (reader slot {slot} of {slots}) gives any (their token spans "
                        "cover no bytes), and a student with another tokenizer learns from the text: relabel the set, "
                        "or train a student with the set's own tokenizer")
                raise UserError(
                        f"the {self.split} split of {self.labels.url} held no sample for reader slot {slot} of {slots} "
                        f"in 4 epochs ({self.manifest.totals.sequences} sequences in all, --eval-fraction "
                        f"{self.eval_fraction}): label more data, lower --eval-fraction, or use fewer ranks or --num-workers"
                )
            for i, r in enumerate(rows):
                if r is None or not self._keep(r):
                    continue
                item = self.transform(r) if self.transform is not None else sample_to_tensors(r, self.top_k, self.byte_lengths)
                if item is None:  # nothing for this student in it (no text to tokenize)
                    textless += 1
                    self.textless += 1
                    continue
                last, textless = epoch, 0
                item["position"] = torch.tensor([slot, slots, epoch, done + i + 1], dtype=torch.long)
                item["sample_key"] = torch.tensor(int(r.sample_id[:15], 16), dtype=torch.long)
                yield item


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state from every rank's :meth:`StatefulLoader.state_dict` (in rank order): each rank knows its own slots."""
    merged = DataState.from_dict(states[0])
    for rank, st in enumerate(states):
        d = DataState.from_dict(st)
        merged.merge(d, range(rank * d.workers, (rank + 1) * d.workers))
        merged.next_worker[rank] = d.next_worker[rank]
    return merged.to_dict()


class StatefulLoader:
    """A ``DataLoader`` over a :class:`LabelDataset` that knows where it is.

    ``state_dict()`` is the position after the last batch handed out (this rank's
    slots; :func:`merge_states` joins the ranks'); ``load_state_dict()`` (before
    iterating) makes the next batch the one that would have followed.
    """

    def __init__(self, dataset: LabelDataset, batch_size: int, num_workers: int = 0, pack_to: int | None = None,
                 **kw: Any) -> None:
        self.dataset, self.batch_size, self.num_workers, self.kw = dataset, batch_size, num_workers, kw
        self.pack_to = pack_to
        self.workers = max(1, num_workers)
        self.state = dataset.start_state(self.workers)
        self.rank = dataset.slots(self.workers)[0] // self.workers
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    def __iter__(self) -> StatefulLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self.state = self.dataset.start_state(self.workers)
            loader = DataLoader(
                self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                collate_fn=collate if self.pack_to is None else functools.partial(collate, pack_to=self.pack_to),
                persistent_workers=False, **self.kw,
            )
            self._it = iter(loader)
        batch = next(self._it)
        slot, _, epoch, consumed = batch["position"][-1].tolist()  # a batch comes from one slot, in order
        self.state.progress[slot] = (epoch, consumed)
        self.state.next_worker[self.rank] = (slot - self.rank * self.workers + 1) % self.workers
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._it is not None:
            raise RuntimeError("load_state_dict must be called before iterating")
        self.dataset.load_state_dict(state)
        self.state = self.dataset.start_state(self.workers)
