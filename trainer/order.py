"""The elastic sample order: one global order per epoch, each reader slot a contiguous share of it.

The order of an epoch depends only on the label set (its shards' row counts), the seed,
the epoch and the shuffle window, never on how many readers there are (the idea of
mosaicml/streaming). Shards are permuted from ``(seed, epoch)`` and grouped in windows
of ``window`` shards; a window's rows are permuted from ``(seed, epoch, window)``. Row
``p`` of the epoch is the ``p``-th of that sequence (every row counts, held-out ones too).

Readers ("slots": DDP ranks x DataLoader workers) each take a contiguous *span* of it,
so a slot reads about ``1/slots`` of the shards (plus a shared window at each end of its
span), never all of them. A slot that finishes its epoch's share goes on to its share of
the next epoch, dealt afresh.

Position. A slot's progress is ``(epoch, consumed)``: how many rows of its share of
that epoch were handed out. :class:`DataState` is every slot's progress plus the deals
that differ from the fresh one. Resuming with the same number of slots continues each
slot exactly where it was (the same batches in the same order). With another number, the
state *collapses*: per epoch, the rows no slot consumed are joined in order and dealt
again in contiguous spans, so over the whole run no row is read twice or skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from softlabels.schemas.errors import UserError

Span = tuple[int, int]  # rows [start, end) of an epoch's order
STATE_FORMAT = 2  # 1 (softlabels < 0.6): per-slot shard windows, not readable across versions


class EpochOrder:
    """The rows of one epoch in their global order, as windows of shards."""

    def __init__(self, rows: np.ndarray, seed: int, epoch: int, window: int, shuffle: bool) -> None:
        self.seed, self.epoch, self.shuffle, self.window = seed, epoch, shuffle, window
        n = len(rows)
        self.shards = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        starts = np.arange(0, n, window)
        sizes = np.add.reduceat(rows[self.shards], starts) if n else np.zeros(0, np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # window w holds rows [b[w], b[w+1])

    @property
    def total(self) -> int:
        return int(self.bounds[-1])

    def window_shards(self, w: int) -> np.ndarray:
        """The shards (manifest indices) of window ``w``, in order."""
        return self.shards[w * self.window:(w + 1) * self.window]

    def permutation(self, w: int) -> np.ndarray:
        n = int(self.bounds[w + 1] - self.bounds[w])
        return np.random.default_rng([self.seed, self.epoch, w]).permutation(n) if self.shuffle else np.arange(n)

    def segments(self, span: Span) -> Iterator[tuple[int, int, int]]:
        """``(window, lo, hi)``: the windows (and their local rows ``[lo, hi)``) span covers, in order."""
        a, b = span
        if a >= b:
            return
        w = int(np.searchsorted(self.bounds, a, side="right")) - 1
        while w + 1 < len(self.bounds) and self.bounds[w] < b:
            lo, hi = max(a, int(self.bounds[w])), min(b, int(self.bounds[w + 1]))
            if hi > lo:
                yield w, lo - int(self.bounds[w]), hi - int(self.bounds[w])
            w += 1


def fresh_share(slot: int, slots: int, total: int) -> list[Span]:
    """Slot ``slot``'s contiguous share of an epoch of ``total`` rows dealt to ``slots`` slots."""
    return [(slot * total // slots, (slot + 1) * total // slots)]


def length(spans: Sequence[Span]) -> int:
    return sum(b - a for a, b in spans)


def drop(spans: Sequence[Span], n: int) -> list[Span]:
    """The spans after their first ``n`` rows."""
    out = []
    for a, b in spans:
        if n >= b - a:
            n -= b - a
            continue
        out.append((a + n, b))
        n = 0
    return out


def split(spans: Sequence[Span], parts: int) -> list[list[Span]]:
    """Cut the rows of ``spans`` (in order) into ``parts`` contiguous shares of near-equal size."""
    total = length(spans)
    out: list[list[Span]] = []
    rest = list(spans)
    taken = 0
    for p in range(parts):
        want = (p + 1) * total // parts - taken
        share, n = [], want
        while n:
            a, b = rest[0]
            k = min(n, b - a)
            share.append((a, a + k))
            rest[0] = (a + k, b)
            if a + k == b:
                rest.pop(0)
            n -= k
        out.append(share)
        taken += want
    return out


@dataclass
class DataState:
    """Where every slot is: ``progress[slot] = (epoch, consumed)``; ``deals[epoch][slot]``: spans dealt
    other than :func:`fresh_share` (after a resume on another number of slots)."""

    slots: int
    progress: list[tuple[int, int]]
    deals: dict[int, list[list[Span]]] = field(default_factory=dict)
    next_worker: list[int] = field(default_factory=list)  # per rank: the DataLoader worker due next
    workers: int = 1  # reader slots per rank

    @classmethod
    def start(cls, slots: int, workers: int = 1) -> DataState:
        return cls(slots, [(0, 0)] * slots, {}, [0] * (slots // max(1, workers)), workers)

    def share(self, slot: int, epoch: int, total: int) -> list[Span]:
        dealt = self.deals.get(epoch)
        return [tuple(s) for s in dealt[slot]] if dealt is not None else fresh_share(slot, self.slots, total)

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "slots": self.slots, "workers": self.workers,
                "progress": [list(p) for p in self.progress], "next_worker": list(self.next_worker),
                "deals": {str(e): [[list(s) for s in share] for share in d] for e, d in sorted(self.deals.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataState:
        if d.get("format") != STATE_FORMAT:
            raise UserError("the checkpoint records its data position in the order of softlabels < 0.6, which this "
                            "version cannot continue exactly: finish that run with softlabels 0.5, or start a new one")
        deals = {int(e): [[(int(a), int(b)) for a, b in share] for share in d_] for e, d_ in d["deals"].items()}
        return cls(int(d["slots"]), [(int(e), int(c)) for e, c in d["progress"]], deals,
                   [int(w) for w in d.get("next_worker", [])], int(d.get("workers", 1)))

    def merge(self, other: DataState, slots: Sequence[int]) -> None:
        """Take ``other``'s progress for ``slots`` (another rank's readers)."""
        for s in slots:
            self.progress[s] = other.progress[s]

    def collapse(self, slots: int, epoch_total: Any, workers: int = 1) -> DataState:
        """The same position dealt to ``slots`` slots: per epoch, what no slot consumed, split evenly.

        ``epoch_total(e)``: the rows in epoch ``e`` (the same for every epoch of a set).
        """
        if slots == self.slots:  # every slot continues its own share; with another ranks x workers split
            if workers == self.workers:  # the DataLoader's worker rotation restarts
                return self
            return DataState(slots, list(self.progress), dict(self.deals), [0] * (slots // max(1, workers)), workers)
        first = min(e for e, _ in self.progress)
        last = max([e for e, _ in self.progress] + list(self.deals))
        deals = {}
        for e in range(first, last + 1):
            total = epoch_total(e)
            left: list[Span] = []
            for s, (at, consumed) in enumerate(self.progress):
                if at < e:
                    left += self.share(s, e, total)
                elif at == e:
                    left += drop(self.share(s, e, total), consumed)
            deals[e] = split(left, slots)
        return DataState(slots, [(first, 0)] * slots, deals, [0] * (slots // max(1, workers)), workers)
