"""Streaming a label set into training batches, resumably.

:class:`LabelDataset` is a torch ``IterableDataset`` over a label set URL
(local or any fsspec URL).

Order. Each epoch the shard list is permuted from ``(seed, epoch)``. Shards
are dealt to *slots* (one per DDP rank x DataLoader worker) with no overlap
and no gaps. Each slot reads its shards in *windows* of ``shuffle_window``
shards and yields the window's samples in a permutation seeded by
``(seed, epoch, slot, window)``: a bounded shuffle buffer (one window of
rows) whose order can be rebuilt from its position alone.

Resume. Every sample carries its position ``(slot, epoch, window, offset)``.
:class:`StatefulLoader` wraps a ``DataLoader``, records the position of the
last sample consumed per slot, and its ``state_dict()`` restarts every slot
right after it: the window is re-read, re-permuted, and the consumed prefix
skipped. Exact for any ``num_workers``, provided the resumed run uses the
same ``num_workers`` and world size (checked).

Reading. A background thread per slot fetches and decodes the next shards
(``prefetch``) while the current window is consumed. Each shard's sha256 is
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
from collections.abc import Iterator, Mapping
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
from softlabels.schemas.errors import ShardChecksumError, ShardFormatError, UserError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)


def in_eval_split(sample_id: str, eval_fraction: float) -> bool:
    """Deterministic held-out membership from the content address."""
    return int(sample_id[:8], 16) / 2**32 < eval_fraction


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
        split_by_rank: deal shards over DDP ranks (training); False: every rank reads all (eval).
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
        self.split_by_rank = split_by_rank
        self.resume: dict[int, tuple[int, int, int]] = {}  # slot -> (epoch, window, offset) to start at
        self.rotation = 0  # DataLoader worker 0 serves this rank's slot `rotation` (the one due next)
        self.corrupt_skipped = 0
        self.max_id: int | None = None  # the student's embedding rows: every stored id must be below it

    @property
    def manifest(self):
        return self.labels.manifest

    @property
    def k(self) -> int:
        return self.top_k or self.manifest.top_k

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Start each slot where ``state`` (from :meth:`StatefulLoader.state_dict`) says."""
        self.resume = {int(s): tuple(p) for s, p in state.get("positions", {}).items()}  # type: ignore[misc]
        self.rotation = int(state.get("next_worker", 0))

    def _keep(self, s: Sample) -> bool:
        if self.split == "all":
            return True
        return in_eval_split(s.sample_id, self.eval_fraction) == (self.split == "eval")

    def _read(self, index: int) -> list[Sample]:
        shard = self.labels.shards[index]
        try:
            samples = self.labels.read_shard(shard, verify=self.verify)
        except ShardChecksumError as e:
            if not self.skip_corrupt:
                raise ShardChecksumError(f"{e} (softlabels train --skip-corrupt skips such shards)") from e
            self.corrupt_skipped += 1
            log.warning("skipping corrupt shard (%s)", e)
            return []
        if self.max_id is not None and samples:
            top = max(max(int(s.topk_ids.max(initial=0)), int(s.input_ids.max(initial=0))) for s in samples)
            if top >= self.max_id:
                raise ShardFormatError(f"shard {self.labels.url}/{shard.path}: token id {top} is beyond the "
                                       f"student's {self.max_id} embeddings")
        return [s for s in samples if self._keep(s)]

    def _shards_of(self, slot: int, slots: int, epoch: int) -> list[int]:
        n = len(self.labels.shards)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return [int(i) for i in order[slot::slots]]

    def _reader(self, plan: list[tuple[int, int, list[int]]]) -> Iterator[tuple[int, int, list[Sample]]]:
        """Windows of samples ``(epoch, window, rows)`` in plan order; a thread reads ahead."""
        if self.prefetch == 0:
            for epoch, w, shards in plan:
                yield epoch, w, [s for i in shards for s in self._read(i)]
            return
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for epoch, w, shards in plan:
                    rows: list[Sample] = []
                    for i in shards:
                        rows.extend(self._read(i))
                        if stop.is_set():
                            return
                    q.put((epoch, w, rows))
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

    def _plan(self, slot: int, slots: int) -> Iterator[tuple[int, int, list[int]]]:
        start_epoch, start_window, _ = self.resume.get(slot, (0, 0, 0))
        epoch = start_epoch
        while self.epochs is None or epoch < self.epochs:
            mine = self._shards_of(slot, slots, epoch)
            if not mine and self.epochs is None:  # would loop forever without a sample
                raise UserError(
                    f"reader slot {slot} of {slots} (ranks x DataLoader workers) gets none of the label set's "
                    f"{len(self.labels.shards)} shard(s): use fewer ranks or --num-workers"
                )
            windows = [mine[i : i + self.shuffle_window] for i in range(0, len(mine), self.shuffle_window)]
            for w, shards in enumerate(windows):
                if epoch == start_epoch and w < start_window:
                    continue
                yield epoch, w, shards
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = _rank_world() if self.split_by_rank else (0, 1)
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from workers round-robin starting at worker 0;
        # rotating which slot each worker serves makes a resumed run continue the cycle.
        slot, slots = rank * nworkers + (wid + self.rotation) % nworkers, world * nworkers
        if self.resume and len(self.resume) != slots:
            raise UserError(
                f"the data position was saved with {len(self.resume)} reader slot(s) (ranks x workers); "
                f"this run has {slots}: resume with the same world size and --num-workers"
            )
        start = self.resume.get(slot, (0, 0, 0))
        plan = list(self._plan(slot, slots)) if self.epochs is not None else self._plan(slot, slots)
        yielded = {}  # epoch -> samples yielded, to stop an endless pass over a split with no sample
        for epoch, w, rows in self._reader(plan):  # type: ignore[arg-type]
            if self.epochs is None and epoch >= start[0] + 2 and not yielded.get(epoch - 1):
                raise UserError(
                    f"the {self.split} split of {self.labels.url} holds no sample for reader slot {slot} of {slots} "
                    f"({self.manifest.totals.sequences} sequences in all, --eval-fraction {self.eval_fraction}): "
                    "label more data, lower --eval-fraction, or use fewer ranks or --num-workers"
                )
            yielded.setdefault(epoch, 0)
            order = range(len(rows))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, slot, w]).permutation(len(rows))
            skip = start[2] if (epoch, w) == start[:2] else 0
            for offset, r in enumerate(order):
                if offset < skip:
                    continue
                item = sample_to_tensors(rows[r], self.top_k)
                item["position"] = torch.tensor([slot, slots, epoch, w, offset + 1], dtype=torch.long)
                item["sample_key"] = torch.tensor(int(rows[r].sample_id[:15], 16), dtype=torch.long)
                yielded[epoch] += 1
                yield item


class StatefulLoader:
    """A ``DataLoader`` over a :class:`LabelDataset` that knows where it is.

    ``state_dict()`` is the position after the last batch handed out;
    ``load_state_dict()`` (before iterating) makes the next batch the one
    that would have followed.
    """

    def __init__(self, dataset: LabelDataset, batch_size: int, num_workers: int = 0, pack_to: int | None = None,
                 **kw: Any) -> None:
        self.dataset, self.batch_size, self.num_workers, self.kw = dataset, batch_size, num_workers, kw
        self.pack_to = pack_to
        self.positions: dict[int, tuple[int, int, int]] = {}
        self.slots: int | None = None
        self.next_worker = dataset.rotation
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    def __iter__(self) -> StatefulLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self.positions = dict(self.dataset.resume)
            loader = DataLoader(
                self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                collate_fn=collate if self.pack_to is None else functools.partial(collate, pack_to=self.pack_to),
                persistent_workers=False, **self.kw,
            )
            self._it = iter(loader)
        batch = next(self._it)
        last = batch["position"][-1].tolist()  # a batch comes from one slot, in order
        self.slots = last[1]
        self.positions[last[0]] = (last[2], last[3], last[4])
        self.next_worker = (last[0] + 1) % max(1, self.num_workers)
        return batch

    def state_dict(self) -> dict[str, Any]:
        positions = dict(self.positions)
        if self.slots is not None:
            for s in range(self.slots):  # slots that have not produced a batch yet start at 0
                positions.setdefault(s, (0, 0, 0))
        return {
            "positions": {str(s): list(p) for s, p in sorted(positions.items())},
            "next_worker": self.next_worker,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._it is not None:
            raise RuntimeError("load_state_dict must be called before iterating")
        self.dataset.load_state_dict(state)
        self.next_worker = self.dataset.rotation
