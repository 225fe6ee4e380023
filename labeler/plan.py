"""The work plan: documents -> token sequences -> units (one unit, one shard).

The plan depends only on the corpus, the tokenizer and the sequence config,
never on how many workers run it, so a resumed or rescaled run produces the
same units and the same shard names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from softlabels.labeler.corpus import Block, BlockReader, BlockStats, Document
from softlabels.schemas import SequenceConfig


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


# With --limit, a document far longer than the limit needs is tokenized from a prefix: the
# tokens wanted, then MARGIN_TOKENS more, at CHARS_PER_TOKEN characters per token at most.
# Tokenizers work word by word (a pre-tokenizer, then BPE inside each word), so cutting the
# text changes only the tokens next to the cut, far past the ones kept.
MARGIN_TOKENS = 1024
CHARS_PER_TOKEN = 32


def tokenize(docs: list[Document], tokenizer: Any, max_tokens: int | None = None) -> list[tuple[str, np.ndarray]]:
    """``(doc_id, int32 token ids)`` per document, without special tokens (one batched call).

    ``max_tokens``: no document needs more tokens than this (``--limit`` x ``--max-length``);
    longer documents are tokenized from a prefix and cut to it, so a 50 MB line costs what
    the limit needs, not the memory of tokenizing it whole.
    """
    if not docs:
        return []
    texts = [d.text for d in docs]
    cut = None if max_tokens is None else (max_tokens + MARGIN_TOKENS) * CHARS_PER_TOKEN
    if cut is not None:
        texts = [t[:cut] for t in texts]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for d, t, ids in zip(docs, texts, encoded):
        if cut is not None and len(d.text) > len(t):
            if len(ids) < max_tokens + MARGIN_TOKENS // 2:  # unusually long tokens: the prefix is not enough
                ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
            ids = ids[:max_tokens]
        out.append((d.doc_id, np.asarray(ids, dtype=np.int32)))
    return out


# Text the fast path is checked on before it is used: spaces, tabs, newlines, digits, punctuation,
# accents, CJK, an emoji and a word the vocabulary surely splits.
PROBE_TEXT = "Hello, world!\n\n  def f(x):\treturn x**2  # 1234567\nÜnïcödé naïve café 東京 🙂 floccinaucinihilipilification"


class BackendTokenizer:
    """The Rust tokenizer behind a fast Hugging Face tokenizer, called the way the HF one calls it.

    What the parallel read tasks tokenize with: unpickling it imports ``tokenizers`` only,
    not transformers and torch, which is seconds of CPU per read worker at start-up.
    """

    def __init__(self, tokenizer: Any) -> None:
        import copy

        self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))

    def __call__(self, texts: str | list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self.backend.encode(texts, add_special_tokens=add_special_tokens).ids}
        return {"input_ids": [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]}


def reading_tokenizer(tokenizer: Any) -> Any:
    """What read tasks tokenize with: :class:`BackendTokenizer` when it gives the HF tokenizer's ids on
    :data:`PROBE_TEXT`, else the HF tokenizer itself (a slow tokenizer, or one that adds Python steps)."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return tokenizer
    try:
        light = BackendTokenizer(tokenizer)
        same = light([PROBE_TEXT])["input_ids"] == tokenizer([PROBE_TEXT], add_special_tokens=False)["input_ids"]
    except Exception:  # an unusual backend: the HF tokenizer is always right
        return tokenizer
    return light if same else tokenizer


def read_and_tokenize(
    reader: BlockReader, block: Block, tokenizer: Any, max_tokens: int | None = None
) -> tuple[list[tuple[str, np.ndarray]], BlockStats]:
    """One block, read and tokenized: the body of the parallel reading tasks."""
    docs, stats = reader.read(block)
    return tokenize(docs, tokenizer, max_tokens), stats


def build_sequences(docs: Iterable[tuple[str, np.ndarray]], eos: int | None, cfg: SequenceConfig) -> Iterator[Sequence]:
    """Cut tokenized documents into sequences of at most ``max_length`` tokens.

    Per-document (default): each document is chunked on its own; a short final
    chunk is kept. Packing: documents are joined with EOS between them and the
    stream is cut every ``max_length`` tokens; the short remainder is kept.
    """
    if (cfg.packing or cfg.add_eos) and eos is None:
        raise ValueError("packing/add_eos needs a tokenizer with an EOS token")
    count = 0
    buf: list[np.ndarray] = []
    buffered = 0
    packed = 0
    for doc_id, ids in docs:
        if cfg.add_eos or cfg.packing:
            ids = np.append(ids, np.int32(eos)).astype(np.int32)
        if cfg.packing:
            buf.append(ids)
            buffered += len(ids)
            if buffered < cfg.max_length:
                continue
            stream = np.concatenate(buf)
            cut = len(stream) - len(stream) % cfg.max_length
            for start in range(0, cut, cfg.max_length):
                yield Sequence(f"packed:{packed}", stream[start : start + cfg.max_length])
                packed += 1
                count += 1
                if cfg.limit is not None and count >= cfg.limit:
                    return
            buf, buffered = [stream[cut:]], len(stream) - cut
            continue
        for c, start in enumerate(range(0, len(ids), cfg.max_length)):
            yield Sequence(f"{doc_id}#{c}", ids[start : start + cfg.max_length])
            count += 1
            if cfg.limit is not None and count >= cfg.limit:
                return
    if cfg.packing and buffered:
        yield Sequence(f"packed:{packed}", np.concatenate(buf))


def iter_units(sequences: Iterable[Sequence], shard_tokens: int) -> Iterator[Unit]:
    """Group sequences, in order, into units of about ``shard_tokens`` tokens (streaming)."""
    index = 0
    cur: list[Sequence] = []
    n = 0
    for s in sequences:
        cur.append(s)
        n += len(s.input_ids)
        if n >= shard_tokens:
            yield Unit(index, tuple(cur))
            index, cur, n = index + 1, [], 0
    if cur:
        yield Unit(index, tuple(cur))


def unit_digest(unit: Unit) -> str:
    """sha256 of what a unit labels (sources and token ids): a resume skips a
    committed unit only if the unit planned now has the same digest."""
    h = hashlib.sha256()
    for s in unit.sequences:
        h.update(s.source.encode("utf-8") + b"\x00")
        h.update(np.ascontiguousarray(s.input_ids, dtype="<i4").tobytes())
        h.update(len(s.input_ids).to_bytes(8, "little"))
    return h.hexdigest()
