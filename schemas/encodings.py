"""Physical encodings of the label columns (schema v2).

Every encoding turns a shard's labels, ``ids [N, k]``, ``logprobs [N, k]`` (fp32,
descending) and ``tail [N]`` (N positions over all rows), into Parquet columns
with one value per row (sequence), and back. Readers always get the same numpy
arrays whatever the encoding; see ``schemas/README.md`` for the byte layout.

=============  ================================================  ============
name           ids / log-probs / tail                            lossy
=============  ================================================  ============
``fp16``       int32 / float16 / float32 (the v1 columns)        fp16 only
``packed``     bit-packed at ceil(log2 V) bits / float16 / f32   fp16 only
``packed-q8``  bit-packed / 8-bit on a per-position scale / f32  yes
``compact``    frequency-ranked sorted gaps / sqrt-probability   yes, within
               codes sized to an error budget / float16          ``max_kl``
=============  ================================================  ============

``compact`` in brief: the shard stores a coarse frequency bucket per vocabulary
id; ids are ranked by (bucket desc, id) so frequent ids get small ranks; each
position's k ranks are sorted and stored as gaps (byte planes, zstd). Values
are stored in that same order as ``round(sqrt(p) * levels)``: uniform steps in
sqrt(p) give each entry the same expected KL, ``step**2 / 6``, which is the
optimal allocation of error for a given number of bits. ``levels`` is the
smallest that keeps the shard's measured KL(exact k+1 buckets || decoded)
within ``max_kl`` nats per token. Lossy encodings rescale the decoded top-k so
that with the stored tail the k+1 buckets sum to 1.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from softlabels.schemas.bitpack import bit_width, from_planes, pack_bits, planes_for, to_planes, unpack_bits
from softlabels.schemas.errors import ShardFormatError, UserError

ENCODINGS = ("fp16", "packed", "packed-q8", "compact")
# Bounds that untrusted label sets must not get past before anything is allocated for them.
MAX_VOCAB = 1 << 22  # token ids (4.2M); the largest vocabularies in use are ~10^6
MAX_TOP_K = 1 << 16
DEFAULT_ENCODING = "compact"
DEFAULT_MAX_KL = 1e-4  # nats/token; each shard measures its own error and is held within it
META_ENCODING = b"softlabels.encoding"
# compact: per-id frequency buckets, zstd-compressed. Schema v3 stores them base64-encoded (every
# Parquet footer value must be UTF-8: polars refuses a file otherwise); v2 stored the raw bytes.
META_VOCAB = b"softlabels.vocab_buckets"
_ZSTD_LEVEL = 9


@dataclass(frozen=True)
class Encoding:
    """Which encoding a label set uses, with its parameters (recorded in the manifest).

    Raises:
        UserError: unknown name, or a parameter that does not fit the encoding.
    """

    name: str = DEFAULT_ENCODING
    max_kl: float | None = None  # compact only: mean encoding error budget, nats per token

    def __post_init__(self) -> None:
        if self.name not in ENCODINGS:
            raise UserError(f"unknown encoding {self.name!r}; choose one of {', '.join(ENCODINGS)}")
        if self.name == "compact":
            if self.max_kl is None:
                object.__setattr__(self, "max_kl", DEFAULT_MAX_KL)
            elif not (isinstance(self.max_kl, (int, float)) and 0 < self.max_kl < 1):
                raise UserError(f"compact encoding: max_kl must be in (0, 1) nats/token, got {self.max_kl!r}")
        elif self.max_kl is not None:
            raise UserError(f"encoding {self.name!r} takes no max_kl (only 'compact' is error-budgeted)")

    @property
    def lossy(self) -> bool:
        return self.name in ("packed-q8", "compact")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.max_kl is not None:
            d["max_kl"] = float(self.max_kl)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Encoding:
        """From a manifest's ``encoding``; a v1 manifest's column-type record means ``fp16``."""
        if "name" not in d:
            return cls("fp16")
        return cls(str(d["name"]), d.get("max_kl"))

    @classmethod
    def parse(cls, spec: str) -> Encoding:
        """``"compact"`` or ``"compact:max_kl=2e-5"`` (the ``--encoding`` flag)."""
        name, _, rest = spec.partition(":")
        kw: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if key != "max_kl" or not eq:
                raise UserError(f"--encoding {spec!r}: unknown parameter {item!r} (only max_kl=FLOAT)")
            try:
                kw["max_kl"] = float(value)
            except ValueError as e:
                raise UserError(f"--encoding {spec!r}: max_kl must be a number, got {value!r}") from e
        return cls(name.strip(), **kw)


# -- row-aligned column helpers ----------------------------------------------------------


def _offsets(lengths: np.ndarray, per_position: int) -> np.ndarray:
    off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64) * per_position, out=off[1:])
    return off


def rows_list(flat: np.ndarray, lengths: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """``[N]`` or ``[N, m]`` values as one list per row (``list<fixed_size_list<m>>`` for 2-D)."""
    values = pa.array(np.ascontiguousarray(flat).reshape(-1), type=arrow_type)
    if flat.ndim == 2:
        values = pa.FixedSizeListArray.from_arrays(values, flat.shape[1])
    off = _offsets(lengths, 1)
    if off[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"a shard holds at most {np.iinfo(np.int32).max} positions, got {off[-1]}")
    return pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), values)


def rows_binary(mat: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """uint8 ``[N, m]`` as one binary value per row (the row's positions back to back)."""
    data = np.ascontiguousarray(mat, dtype=np.uint8)
    off = _offsets(lengths, data.shape[1])
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(lengths), [None, pa.py_buffer(off), pa.py_buffer(data)])


def flat_list(col: pa.ChunkedArray | pa.Array, depth: int = 1) -> np.ndarray:
    """A list column's values, all rows concatenated (``depth`` list levels removed)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    for _ in range(depth):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def flat_binary(col: pa.ChunkedArray | pa.Array, per_position: int) -> np.ndarray:
    """A :func:`rows_binary` column back to uint8 ``[N, per_position]`` (zero-copy where possible)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, per_position), dtype=np.uint8)
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=off_type)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(-1, per_position)


# -- encode / decode ----------------------------------------------------------------------


def encode_labels(
    enc: Encoding, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, lengths: np.ndarray, vocab_size: int
) -> tuple[list[tuple[str, pa.Array]], dict[bytes, bytes]]:
    """Label columns and shard metadata for ``enc``.

    Args:
        ids, logprobs: ``[N, k]``, descending by log-prob; logprobs in fp32 or better
            (lossy encodings measure their error against them).
        tail: ``[N]`` log of the mass outside the top-k.
        lengths: positions per row (sum N).
        vocab_size: every id is below it (sets the packed width).
    """
    ids = np.asarray(ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    k = ids.shape[1]
    meta: dict[str, Any] = enc.to_dict()
    extra: dict[bytes, bytes] = {}
    if enc.name == "fp16":
        cols = [
            ("topk_ids", rows_list(ids.astype(np.int32), lengths, pa.int32())),
            ("topk_logprobs", rows_list(logprobs.astype(np.float16), lengths, pa.float16())),
            ("tail_logprob", rows_list(tail.astype(np.float32), lengths, pa.float32())),
        ]
    elif enc.name in ("packed", "packed-q8"):
        width = bit_width(vocab_size - 1)
        meta.update(id_bits=width)
        cols = [("topk_ids_packed", rows_binary(pack_bits(ids, width), lengths))]
        if enc.name == "packed":
            cols.append(("topk_logprobs", rows_list(logprobs.astype(np.float16), lengths, pa.float16())))
        else:
            scale, q = _q8_encode(logprobs)
            cols += [("topk_logprobs_q8", rows_binary(q, lengths)), ("logprob_scale", rows_list(scale, lengths, pa.float16()))]
        cols.append(("tail_logprob", rows_list(tail.astype(np.float32), lengths, pa.float32())))
    else:
        cols, levels, kl, buckets = _compact_encode(ids, logprobs, tail, lengths, vocab_size, float(enc.max_kl))
        meta.update(levels=levels, vocab_size=vocab_size, encoding_kl=kl)
        packed = pa.Codec("zstd", compression_level=_ZSTD_LEVEL).compress(buckets.tobytes(), asbytes=True)
        extra[META_VOCAB] = base64.b64encode(packed)
    meta["top_k"] = k
    return cols, {META_ENCODING: json.dumps(meta, sort_keys=True).encode(), **extra}


def decode_labels(table: pa.Table, version: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids int32 [N, k], logprobs float32 [N, k], tail float32 [N])`` of a v2 or v3 shard table.

    Raises:
        ShardFormatError: an encoding this softlabels does not know (named).
    """
    md = table.schema.metadata or {}
    meta = json.loads(md[META_ENCODING])
    name, k = meta["name"], int(meta["top_k"])
    if name == "fp16":
        return fp16_columns(table, k)
    if name in ("packed", "packed-q8"):
        width = int(meta["id_bits"])
        packed = flat_binary(table.column("topk_ids_packed"), (k * width + 7) // 8)
        ids = unpack_bits(packed, k, width).astype(np.int32)
        tail = flat_list(table.column("tail_logprob")).astype(np.float32, copy=False)
        if name == "packed":
            return ids, fp16_columns(table, k, with_ids=False)[1], tail
        q = flat_binary(table.column("topk_logprobs_q8"), k)
        scale = flat_list(table.column("logprob_scale")).astype(np.float64)
        p = np.exp(-q.astype(np.float64) * scale[:, None])
        return ids, _renormalized_log(p, tail), tail
    if name == "compact":
        if not 0 < int(meta["vocab_size"]) <= MAX_VOCAB:
            raise ShardFormatError(f"compact shard declares a vocabulary of {meta['vocab_size']} (at most {MAX_VOCAB})")
        packed = md[META_VOCAB] if version == 2 else base64.b64decode(md[META_VOCAB], validate=True)
        buckets = np.frombuffer(
            pa.Codec("zstd").decompress(packed, decompressed_size=int(meta["vocab_size"]), asbytes=True), dtype=np.uint8
        )
        return _compact_decode(table, k, int(meta["levels"]), buckets)
    raise ShardFormatError(f"shard encoding {name!r} is unknown to this softlabels (knows {', '.join(ENCODINGS)})")


def fp16_columns(table: pa.Table, k: int, with_ids: bool = True) -> tuple[Any, np.ndarray, np.ndarray]:
    """The v1 / ``fp16`` label columns: ``(topk_ids, topk_logprobs, tail_logprob)`` (ids None if not asked)."""
    ids = flat_list(table.column("topk_ids"), 2).astype(np.int32, copy=False).reshape(-1, k) if with_ids else None
    lp = flat_list(table.column("topk_logprobs"), 2).astype(np.float32).reshape(-1, k)
    return ids, lp, flat_list(table.column("tail_logprob")).astype(np.float32, copy=False)


def _renormalized_log(p: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """log of ``p`` rescaled per position so that ``sum(p) + exp(tail) == 1``."""
    mass = -np.expm1(tail.astype(np.float64))  # 1 - tail mass, exact for tiny tails
    total = p.sum(axis=1)
    scale = np.divide(mass, total, out=np.ones_like(mass), where=total > 0)
    with np.errstate(divide="ignore"):
        return np.log(p * scale[:, None]).astype(np.float32)


def _q8_encode(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: ``scale = -min(logprob) / 255`` (fp16) and ``q = round(-logprob / scale)``."""
    lp = np.asarray(logprobs, dtype=np.float64)
    lowest = np.where(np.isfinite(lp), lp, 0.0).min(axis=1)
    scale = np.maximum(-lowest / 255.0, 1e-6).astype(np.float16)
    s = scale.astype(np.float64)[:, None]
    q = np.clip(np.rint(-np.where(np.isfinite(lp), lp, lowest[:, None]) / s), 0, 255).astype(np.uint8)
    return scale, q


def kl_buckets(lp: np.ndarray, tail: np.ndarray, lp_hat: np.ndarray, tail_hat: np.ndarray) -> np.ndarray:
    """KL(exact k+1 buckets || decoded ones) per position, in nats (fp64)."""
    p = np.exp(np.concatenate([lp, tail[:, None]], axis=1).astype(np.float64))
    q = np.exp(np.concatenate([lp_hat, tail_hat[:, None]], axis=1).astype(np.float64))
    q = q / q.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=1)


def _rank_table(buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rank_of_id, id_of_rank)``: ids by frequency bucket (desc), then by id."""
    id_of_rank = np.lexsort((np.arange(len(buckets)), -buckets.astype(np.int64)))
    rank_of_id = np.empty_like(id_of_rank)
    rank_of_id[id_of_rank] = np.arange(len(buckets))
    return rank_of_id, id_of_rank


def _compact_codes(p: np.ndarray, levels: int) -> np.ndarray:
    return np.maximum(1, np.rint(np.sqrt(p) * levels)).astype(np.int64)  # >= 1: no entry decodes to p = 0


def _compact_encode(
    ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, lengths: np.ndarray, vocab_size: int, max_kl: float
) -> tuple[list[tuple[str, pa.Array]], int, float, np.ndarray]:
    n, k = ids.shape
    counts = np.bincount(ids.reshape(-1), minlength=vocab_size)
    buckets = np.floor(np.log2(counts + 1.0)).astype(np.uint8)  # coarse: cheap to store, ranks nearly as well
    rank_of_id, _ = _rank_table(buckets)
    ranks = rank_of_id[ids]
    order = np.argsort(ranks, axis=1, kind="stable")
    ranks = np.take_along_axis(ranks, order, axis=1)
    gaps = np.diff(ranks, axis=1, prepend=-1) - 1
    lp = np.take_along_axis(np.asarray(logprobs, dtype=np.float64), order, axis=1)
    p = np.exp(lp)
    tail16 = tail.astype(np.float16)
    # Each entry costs step**2 / 6 nats in expectation (step = 1/levels in sqrt(p)), so the
    # error falls as 1/levels**2: start from theory, rescale once by what this shard
    # measures, then step up until the shard is within budget.
    def measure(levels: int) -> tuple[np.ndarray, float]:
        codes = _compact_codes(p, levels)
        lp_hat = _renormalized_log((codes / levels) ** 2, tail16)
        return codes, float(kl_buckets(lp, tail, lp_hat, tail16.astype(np.float32)).mean()) if n else 0.0

    levels = max(2, math.ceil(math.sqrt(k / (6.0 * max_kl))))
    codes, kl = measure(levels)
    if kl > 0:
        levels = max(2, math.ceil(levels * math.sqrt(kl / max_kl)))
        codes, kl = measure(levels)
    while kl > max_kl and levels < 1 << 24:
        levels = math.ceil(levels * 1.02) + 1
        codes, kl = measure(levels)
    low = codes.min(axis=1) if n else np.zeros(0, dtype=np.int64)
    shifted = codes - low[:, None]  # codes share a per-position scale: shifting by the smallest halves their entropy
    cols: list[tuple[str, pa.Array]] = []
    for i, plane in enumerate(to_planes(gaps, planes_for(max(vocab_size - 1, 1)))):
        cols.append((f"topk_gaps_b{i}", rows_binary(plane, lengths)))
    code_planes = planes_for(levels)
    for i, plane in enumerate(to_planes(shifted, code_planes)):
        cols.append((f"topk_codes_b{i}", rows_binary(plane, lengths)))
    for i, plane in enumerate(to_planes(low[:, None], code_planes)):
        cols.append((f"code_min_b{i}", rows_binary(plane, lengths)))
    cols.append(("tail_logprob", rows_list(tail16, lengths, pa.float16())))
    return cols, levels, kl, buckets


def _compact_decode(table: pa.Table, k: int, levels: int, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    names = table.column_names

    def planes(prefix: str, width: int) -> np.ndarray:
        found = sorted((n for n in names if n.startswith(prefix)), key=lambda n: int(n[len(prefix):]))
        return from_planes([flat_binary(table.column(n), width) for n in found])

    _, id_of_rank = _rank_table(buckets)
    ranks = np.cumsum(planes("topk_gaps_b", k) + 1, axis=1) - 1
    codes = planes("topk_codes_b", k) + planes("code_min_b", 1)
    tail = flat_list(table.column("tail_logprob")).astype(np.float32)
    lp = _renormalized_log((codes / levels) ** 2, tail)
    # Back to the documented order: descending log-prob (ties: by rank, deterministic).
    order = np.argsort(-lp, axis=1, kind="stable")
    ids = id_of_rank[np.take_along_axis(ranks, order, axis=1)].astype(np.int32)
    return ids, np.take_along_axis(lp, order, axis=1), tail
