"""The labeler's typed seams: what a teacher replica is given, and what it gives back.

A unit crosses process boundaries twice (driver -> teacher replica -> shard writer).
It travels as these two types, not as positional tuples, so that another teacher
backend (it implements ``label(UnitInput) -> UnitLabels``) or another per-position
column (an entry of :attr:`UnitLabels.extras`) plugs in at one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# The per-position columns a teacher may add, named as :class:`softlabels.schemas.Sample`'s fields.
EXTRAS = ("tail_sample_ids", "tail_sample_counts", "target_logprob")


@dataclass(frozen=True)
class LabelSettings:
    """How a teacher labels one run: what a kept replica takes anew for each run (the model stays loaded)."""

    top_k: int
    temperature: float = 1.0
    batch_tokens: int = 4096  # padded tokens per forward
    head_chunk: int = 1024  # positions per LM-head application (bounds memory, not results)
    tail_samples: int = 0  # draws per position from the tail (0: none)


@dataclass(frozen=True)
class UnitInput:
    """One unit's sequences, in plan order: what a teacher labels."""

    sources: tuple[str, ...]  # each sequence's "<doc_id>#<chunk>" (or "packed:<n>")
    input_ids: tuple[np.ndarray, ...]  # [L_i] int32 token ids per sequence
    # [L_i] bool: the positions to label (the teacher's head runs only there); None: every position
    trained: tuple[np.ndarray | None, ...] | None = None
    # the lengths of the documents packed into each sequence (attention stays inside each); None: one
    doc_lengths: tuple[tuple[int, ...] | None, ...] | None = None
    # [L_i] bytes of the text each token covers (--store-spans); None: not stored
    spans: tuple[np.ndarray, ...] | None = None
    # Label the longest sequence alone before the others (the job's first unit: its first labels, or a teacher that
    # cannot label, show within a second instead of after a whole batch); the batching stays a function of the unit.
    lead: bool = False
    # --generate-with: each sequence is a prompt, and which sample of it (0..N-1) it is to become (the response's
    # noise is seeded by the prompt id, its source before "#", and this index); None: labeled as it is
    samples: tuple[int, ...] | None = None
    # after generation: per sequence, the generator's log-prob of each token it sampled ([T_i], one per label row)
    sampler_logprob: tuple[np.ndarray, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if len(self.sources) != n:
            raise ValueError(f"{len(self.sources)} sources for {n} sequences")
        for name in ("trained", "doc_lengths", "spans", "samples", "sampler_logprob"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"{len(v)} {name} entries for {n} sequences")

    @classmethod
    def of(cls, sequences: Sequence[object], lead: bool = False) -> UnitInput:
        """From the plan's sequences (objects with ``source``, ``input_ids``, ``trained``, ``doc_lengths``, ``spans``)."""
        trained = tuple(getattr(s, "trained", None) for s in sequences)
        docs = tuple(getattr(s, "doc_lengths", None) for s in sequences)
        spans = tuple(getattr(s, "spans", None) for s in sequences)
        samples = tuple(getattr(s, "sample", None) for s in sequences)
        return cls(tuple(s.source for s in sequences), tuple(s.input_ids for s in sequences),  # type: ignore[attr-defined]
                   trained if any(t is not None for t in trained) else None,
                   docs if any(d is not None for d in docs) else None,
                   spans if all(sp is not None for sp in spans) else None, lead,
                   samples if all(x is not None for x in samples) else None)

    def mask(self, i: int) -> np.ndarray | None:
        return None if self.trained is None else self.trained[i]

    def docs(self, i: int) -> tuple[int, ...] | None:
        return None if self.doc_lengths is None else self.doc_lengths[i]

    def span(self, i: int) -> np.ndarray | None:
        return None if self.spans is None else self.spans[i]

    def sampler(self, i: int) -> np.ndarray | None:
        return None if self.sampler_logprob is None else self.sampler_logprob[i]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(ids) for ids in self.input_ids)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class UnitLabels:
    """A teacher's labels for one unit: flat per-position arrays over its sequences, in order.

    One row per *labeled* position (the trained ones: all, without a mask), in position order;
    row ``j`` of a sequence describes the teacher's distribution over the token after its ``j``-th
    labeled position. ``lengths`` says how many rows belong to each sequence.
    """

    lengths: tuple[int, ...]
    topk_ids: np.ndarray  # [N, k], descending by log-prob
    topk_logprobs: np.ndarray  # [N, k] float32
    tail_logprob: np.ndarray  # [N] float32: log of the mass outside the top-k
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)  # optional [N, ...] columns, names in EXTRAS

    def __post_init__(self) -> None:
        n = sum(self.lengths)
        columns = {"topk_ids": self.topk_ids, "topk_logprobs": self.topk_logprobs, "tail_logprob": self.tail_logprob,
                   **self.extras}
        unknown = set(self.extras) - set(EXTRAS)
        if unknown:
            raise ValueError(f"unknown label columns {sorted(unknown)} (known: {EXTRAS})")
        for name, a in columns.items():
            if a.shape[:1] != (n,):
                raise ValueError(f"label column {name} has {a.shape[0] if a.ndim else 0} rows for {n} positions")

    @classmethod
    def concat(cls, per_sequence: Sequence[Mapping[str, np.ndarray]]) -> UnitLabels:
        """From one mapping of columns per sequence (each ``[L_i, ...]``), in order."""
        if not per_sequence:
            raise ValueError("a unit has at least one sequence")
        names = list(per_sequence[0])
        joined = {name: np.concatenate([s[name] for s in per_sequence]) for name in names}
        lengths = tuple(len(s["tail_logprob"]) for s in per_sequence)
        core = {k: joined.pop(k) for k in ("topk_ids", "topk_logprobs", "tail_logprob")}
        return cls(lengths, **core, extras=joined)

    def sequence(self, i: int) -> dict[str, np.ndarray]:
        """Sequence ``i``'s columns (views), named as :class:`softlabels.schemas.Sample`'s fields."""
        start = sum(self.lengths[:i])
        end = start + self.lengths[i]
        out = {"topk_ids": self.topk_ids[start:end], "topk_logprobs": self.topk_logprobs[start:end],
               "tail_logprob": self.tail_logprob[start:end]}
        out.update((k, v[start:end]) for k, v in self.extras.items())
        return out
