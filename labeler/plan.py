"""The work plan: documents -> token sequences -> units (one unit, one shard).

The plan depends only on the corpus, the tokenizer and the sequence config,
never on how many workers run it, so a resumed or rescaled run produces the
same units and the same shard names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from labeler.corpus import Document
from schemas import SequenceConfig


@dataclass(frozen=True)
class Sequence:
    source: str  # "<doc_id>#<chunk>" or "packed:<n>"
    input_ids: np.ndarray  # int32


@dataclass(frozen=True)
class Unit:
    index: int
    sequences: tuple[Sequence, ...]

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}"

    @property
    def tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)


def build_sequences(docs: Iterable[Document], tokenizer, cfg: SequenceConfig) -> Iterator[Sequence]:
    """Tokenize documents and cut them into sequences of at most ``max_length`` tokens.

    Per-document (default): each document is chunked on its own; a short final
    chunk is kept. Packing: documents are joined with EOS between them and the
    stream is cut every ``max_length`` tokens.
    """
    eos = tokenizer.eos_token_id
    if (cfg.packing or cfg.add_eos) and eos is None:
        raise ValueError("packing/add_eos needs a tokenizer with an EOS token")
    count = 0
    buf: list[int] = []
    packed = 0
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if cfg.add_eos or cfg.packing:
            ids = ids + [eos]
        if cfg.packing:
            buf.extend(ids)
            while len(buf) >= cfg.max_length:
                yield Sequence(f"packed:{packed}", np.asarray(buf[: cfg.max_length], dtype=np.int32))
                del buf[: cfg.max_length]
                packed += 1
                count += 1
                if cfg.limit is not None and count >= cfg.limit:
                    return
            continue
        for c, start in enumerate(range(0, len(ids), cfg.max_length)):
            yield Sequence(f"{doc.doc_id}#{c}", np.asarray(ids[start : start + cfg.max_length], dtype=np.int32))
            count += 1
            if cfg.limit is not None and count >= cfg.limit:
                return
    if cfg.packing and buf:
        yield Sequence(f"packed:{packed}", np.asarray(buf, dtype=np.int32))


def make_units(sequences: Iterable[Sequence], shard_tokens: int) -> list[Unit]:
    """Group sequences, in order, into units of about ``shard_tokens`` tokens."""
    units: list[Unit] = []
    cur: list[Sequence] = []
    n = 0
    for s in sequences:
        cur.append(s)
        n += len(s.input_ids)
        if n >= shard_tokens:
            units.append(Unit(len(units), tuple(cur)))
            cur, n = [], 0
    if cur:
        units.append(Unit(len(units), tuple(cur)))
    return units
