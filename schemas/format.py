"""Shard layout: one Parquet row per sequence (see README.md for the full specification).

Every shard has ``sample_id`` (string), ``source`` (string) and ``input_ids``
(list<int32>), then the label columns of its encoding (:mod:`schemas.encodings`).
Schema v4 adds two optional columns: ``trained`` (list<bool>, which positions hold
labels; absent: every position) and ``doc_lengths`` (list<int32>, the documents packed
into a sequence; absent: one). Label columns hold one entry per *trained* position.
Schema v5 adds ``spans`` (list<uint16>, optional): how many bytes of the sequence's text
each position's token covers (the deltas of the tokens' end offsets).
Schema v6 adds ``target_logprob`` (list<float32>, one per trained position, optional): the
teacher's log-prob of the token that actually follows (NaN where none of the same document does).
Schema v7 adds ``sampler_logprob`` (list<float32>, one per trained position, optional): in a set whose responses a
model wrote (``label --generate-with``), the generator's log-prob of the token it sampled there.
Schema v1 shards (the columns of today's ``fp16`` encoding: ``topk_ids``,
``topk_logprobs`` as float16, ``tail_logprob``) keep reading.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from softlabels.schemas.encodings import (
    MAX_VOCAB,
    Encoding,
    decode_labels,
    encode_labels,
    flat_list,
    fp16_columns,
    rows_list,
)
from softlabels.schemas.errors import LabelSetError, ShardFormatError, UnsupportedSchemaVersion

# 7: the generator's log-prob of each sampled token (optional); 6: the teacher's log-prob of the token that follows (optional); 5: token spans (optional); 4: trained-position masks (labels only where trained) and packed-document boundaries;
# 3: every footer value is UTF-8 text (compact's vocabulary buckets in base64); 2: encodings; 1: fp16 only.
SCHEMA_VERSION = 7
SUPPORTED_VERSIONS = (1, 2, 3, 4, 5, 6, 7)

_META_VERSION = b"softlabels.schema_version"
_META_TOPK = b"softlabels.top_k"


@dataclass
class Sample:
    """One labeled sequence, decoded to numpy.

    Labels exist at the *trained* positions only: ``trained`` (``[L]`` bool; None means
    every position) marks them, and the label arrays have one row per trained position,
    in order. Row ``j`` of ``topk_logprobs`` and ``tail_logprob`` describes the teacher's
    distribution over the token that follows ``input_ids[label_positions[j]]``.
    """

    sample_id: str
    source: str
    input_ids: np.ndarray  # [L] int32
    topk_ids: np.ndarray  # [L, k] int32, descending by log-prob
    topk_logprobs: np.ndarray  # [L, k] float32 (as decoded from the shard's encoding)
    tail_logprob: np.ndarray  # [L] float32, log of the mass outside the top-k
    # Optional (labeler --tail-samples S): distinct ids drawn from the teacher's distribution
    # outside the top-k, left-aligned, and how often each was drawn (0 = unused slot).
    tail_sample_ids: np.ndarray | None = None  # [L, S] int32
    tail_sample_counts: np.ndarray | None = None  # [L, S] uint8, rows sum to S (0 where no tail)
    trained: np.ndarray | None = None  # [L] bool: positions that hold labels (None: all)
    doc_lengths: np.ndarray | None = None  # [D] int32: lengths of the documents packed here (None: one document)
    # v5 (labeler --store-spans): bytes of the sequence's text each position's token covers ([L]; 0 for a
    # BOS/EOS the labeler added). The text is the tokens' bytes, span by span (softlabels.common.tokenbytes).
    spans: np.ndarray | None = None  # [L] uint16
    # v6: at each trained position, the teacher's log-prob (at the labeling temperature) of the token that follows
    # it in the row, in or out of the top-k; NaN where no token of the same document follows.
    target_logprob: np.ndarray | None = None  # [T] float32
    # v7 (label --generate-with): at each trained position, the generator's log-prob of the token it sampled
    # there (under the distribution it drew from: its sampling temperature and top-p), for importance weights.
    sampler_logprob: np.ndarray | None = None  # [T] float32

    @property
    def label_positions(self) -> np.ndarray:
        """The positions (indices into ``input_ids``) the label rows belong to, ascending."""
        return np.arange(len(self.input_ids)) if self.trained is None else np.flatnonzero(self.trained)

    def __post_init__(self) -> None:
        length = len(self.input_ids)
        if self.trained is not None and self.trained.shape != (length,):
            raise ValueError(f"sample {self.sample_id}: trained mask {self.trained.shape} for {length} input ids")
        if self.doc_lengths is not None and (int(np.sum(self.doc_lengths)) != length or np.any(self.doc_lengths < 1)):
            raise ValueError(f"sample {self.sample_id}: document lengths {list(self.doc_lengths)[:8]} do not add up "
                             f"to its {length} tokens")
        if self.spans is not None and self.spans.shape != (length,):
            raise ValueError(f"sample {self.sample_id}: spans {self.spans.shape} for {length} input ids")
        n = length if self.trained is None else int(np.count_nonzero(self.trained))
        if (self.tail_sample_ids is None) != (self.tail_sample_counts is None) or (
            self.tail_sample_ids is not None
            and (self.tail_sample_ids.shape != self.tail_sample_counts.shape or self.tail_sample_ids.shape[:1] != (n,))
        ):
            raise ValueError(f"sample {self.sample_id}: tail_sample_ids and tail_sample_counts must both be [L, S] or both absent")
        if self.topk_ids.ndim != 2 or self.topk_ids.shape != self.topk_logprobs.shape:
            raise ValueError(
                f"sample {self.sample_id}: topk_ids {self.topk_ids.shape} and "
                f"topk_logprobs {self.topk_logprobs.shape} must both be [L, k]"
            )
        for name in ("target_logprob", "sampler_logprob"):
            v = getattr(self, name)
            if v is not None and v.shape != (n,):
                raise ValueError(f"sample {self.sample_id}: {name} {v.shape} for {n} trained positions")
        if self.topk_ids.shape[0] != n or self.tail_logprob.shape != (n,):
            raise ValueError(
                f"sample {self.sample_id}: {n} trained positions but labels for "
                f"{self.topk_ids.shape[0]} / {self.tail_logprob.shape} positions"
            )


def shard_schema(top_k: int) -> pa.Schema:
    """The Arrow schema of a v1 shard (the columns of the v2 ``fp16`` encoding) with ``top_k`` entries."""
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), top_k)), nullable=False),
            pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16(), top_k)), nullable=False),
            pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False),
        ],
        metadata={_META_VERSION: b"1", _META_TOPK: str(top_k).encode()},
    )


def encode_samples(
    samples: Sequence[Sample], top_k: int, encoding: Encoding | None = None, vocab_size: int | None = None
) -> pa.Table:
    """Encode samples into a v2 shard table.

    Args:
        encoding: how the label columns are stored (default ``fp16``, the v1 columns).
        vocab_size: required by the ``packed*`` and ``compact`` encodings.

    Raises:
        ValueError: a sample with another k, ids outside the vocabulary, or a missing vocab_size.
    """
    enc = encoding or Encoding("fp16")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    for s in samples:
        if s.topk_ids.shape[1] != top_k:
            raise ValueError(f"sample {s.sample_id} has k={s.topk_ids.shape[1]}, shard has k={top_k}")
    if vocab_size is None:
        if enc.name != "fp16":
            raise ValueError(f"encoding {enc.name!r} needs the vocabulary size")
        vocab_size = 1 << 31
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    label_lengths = np.array([len(s.tail_logprob) for s in samples], dtype=np.int64)

    def cat(name: str, dtype: str, width: int = 0) -> np.ndarray:
        parts = [np.asarray(getattr(s, name), dtype=dtype) for s in samples]
        return np.concatenate(parts) if parts else np.zeros((0, width) if width else 0, dtype=dtype)

    label_cols, meta = encode_labels(
        enc, cat("topk_ids", "int64", top_k), cat("topk_logprobs", "float32", top_k), cat("tail_logprob", "float32"),
        label_lengths, vocab_size,
    )
    columns = [
        ("sample_id", pa.array([s.sample_id for s in samples], pa.string())),
        ("source", pa.array([s.source for s in samples], pa.string())),
        ("input_ids", rows_list(cat("input_ids", "int32"), lengths, pa.int32())),
    ]
    if any(s.trained is not None and not s.trained.all() for s in samples):  # absent: every position trained
        mask = [np.ones(len(s.input_ids), bool) if s.trained is None else s.trained.astype(bool) for s in samples]
        columns.append(("trained", rows_list(np.concatenate(mask), lengths, pa.bool_())))
    if any(s.doc_lengths is not None and len(s.doc_lengths) > 1 for s in samples):  # absent: one document per row
        docs = [np.array([len(s.input_ids)]) if s.doc_lengths is None else s.doc_lengths for s in samples]
        columns.append(("doc_lengths", rows_list(np.concatenate(docs).astype(np.int32), np.array([len(d) for d in docs]),
                                                 pa.int32())))
    with_spans = {s.spans is not None for s in samples}
    if with_spans == {True}:
        spans = cat("spans", "int64")
        if spans.size and (spans.min() < 0 or spans.max() > 0xFFFF):
            raise ValueError(f"a token span of {int(spans.max())} bytes: spans are 0..65535")
        columns.append(("spans", rows_list(spans.astype(np.uint16), lengths, pa.uint16())))
    elif len(with_spans) > 1:
        raise ValueError("either every sample of a shard has spans or none has")
    columns += label_cols
    for name in ("target_logprob", "sampler_logprob"):
        present = {getattr(s, name) is not None for s in samples}
        if present == {True}:
            columns.append((name, rows_list(cat(name, "float32"), label_lengths, pa.float32())))
        elif len(present) > 1:
            raise ValueError(f"either every sample of a shard has a {name} column or none has")
    with_tail = {s.tail_sample_ids is not None for s in samples}
    if with_tail == {True}:
        draws = samples[0].tail_sample_ids.shape[1]
        columns += [
            ("tail_sample_ids", rows_list(cat("tail_sample_ids", "int32", draws), label_lengths, pa.int32())),
            ("tail_sample_counts", rows_list(cat("tail_sample_counts", "uint8", draws), label_lengths, pa.uint8())),
        ]
    elif len(with_tail) > 1:
        raise ValueError("either every sample of a shard has tail samples or none has")
    metadata = {_META_VERSION: str(SCHEMA_VERSION).encode(), _META_TOPK: str(top_k).encode(), **meta}
    return pa.Table.from_arrays([c for _, c in columns], names=[n for n, _ in columns]).replace_schema_metadata(metadata)


def table_to_parquet_bytes(table: pa.Table, compression_level: int = 9) -> bytes:
    """Serialize a shard table to Parquet bytes (zstd).

    Deterministic: the same table gives the same bytes (no timestamps or
    random ids), which is what makes resumed runs byte-identical. The shard
    metadata goes into the Parquet footer once (no duplicate Arrow schema).
    """
    buf = io.BytesIO()
    with pq.ParquetWriter(
        buf, table.schema.remove_metadata(), compression="zstd", compression_level=compression_level,
        use_dictionary=["source"], store_schema=False,
    ) as writer:
        writer.write_table(table.replace_schema_metadata(None), row_group_size=max(1, table.num_rows))
        writer.add_key_value_metadata(table.schema.metadata or {})
    return buf.getvalue()


def shard_version(table: pa.Table) -> int:
    """The schema version a shard table declares.

    Raises:
        UnsupportedSchemaVersion: a version this reader does not know (named in the message).
    """
    meta = table.schema.metadata or {}
    raw = meta.get(_META_VERSION, b"1")
    try:
        version = int(raw)
    except ValueError:
        version = -1
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedSchemaVersion(
            f"shard has schema_version {raw.decode(errors='replace')}; this reader supports {list(SUPPORTED_VERSIONS)}"
        )
    return version


def _row_lengths(col: pa.ChunkedArray) -> np.ndarray:
    return pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)


def _row_sums(values: np.ndarray, per_row: np.ndarray) -> np.ndarray:
    """The sum of each row's values (``per_row`` of them each, back to back)."""
    c = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    b = np.concatenate([[0], np.cumsum(per_row)])
    return c[b[1:]] - c[b[:-1]]


def _decode_flat(table: pa.Table) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(flat arrays, per-row lengths)``: each column's values, all rows back to back, whatever the
    encoding, and how many of them each row holds (label columns: the row's trained positions)."""
    version = shard_version(table)
    if version == 1:
        topk_ids, topk_lp, tail = fp16_columns(table, table.schema.field("topk_ids").type.value_type.list_size)
    else:
        topk_ids, topk_lp, tail = decode_labels(table, version)
    input_ids = flat_list(table.column("input_ids")).astype(np.int32, copy=False)
    positions = _row_lengths(table.column("input_ids"))
    # Every encoding keeps tail_logprob as a list per row: its lengths are the label rows' lengths.
    labels = _row_lengths(table.column("tail_logprob"))
    if not len(topk_ids) == len(topk_lp) == len(tail) == int(labels.sum()):
        raise ShardFormatError(f"label columns hold {len(topk_ids)}/{len(topk_lp)}/{len(tail)} positions "
                               f"(ids/log-probs/tail), the rows {int(labels.sum())}")
    flat = {"input_ids": input_ids, "topk_ids": topk_ids, "topk_logprobs": topk_lp, "tail_logprob": tail}
    lengths = {"input_ids": positions, "topk_ids": labels, "topk_logprobs": labels, "tail_logprob": labels}
    if "tail_sample_ids" in table.column_names:
        counts = flat_list(table.column("tail_sample_counts"), 2).astype(np.uint8, copy=False).reshape(len(tail), -1)
        flat["tail_sample_ids"] = flat_list(table.column("tail_sample_ids"), 2).astype(np.int32, copy=False).reshape(counts.shape)
        flat["tail_sample_counts"] = counts
        lengths["tail_sample_ids"] = lengths["tail_sample_counts"] = labels
    for name in ("target_logprob", "sampler_logprob"):  # v6, v7
        if name in table.column_names:
            values = flat_list(table.column(name)).astype(np.float32, copy=False)
            if len(values) != len(tail) or not np.array_equal(_row_lengths(table.column(name)), labels):
                raise ShardFormatError(f"the {name} column does not cover every trained position of its rows")
            flat[name], lengths[name] = values, labels
    if "trained" in table.column_names:  # v4
        trained = flat_list(table.column("trained")).astype(bool, copy=False)
        per_row = _row_lengths(table.column("trained"))
        if len(trained) != len(input_ids) or not np.array_equal(per_row, positions):
            raise ShardFormatError("the trained mask does not cover every position of its rows")
        if not np.array_equal(_row_sums(trained, positions), labels):
            raise ShardFormatError("a row's label count differs from its trained positions")
        flat["trained"], lengths["trained"] = trained, positions
    elif not np.array_equal(labels, positions):
        raise ShardFormatError(f"label columns hold {len(topk_ids)}/{len(topk_lp)}/{len(tail)} positions "
                               f"(ids/log-probs/tail), input_ids {len(input_ids)}, and no trained mask says why")
    if "doc_lengths" in table.column_names:  # v4, packed sequences
        docs = flat_list(table.column("doc_lengths")).astype(np.int32, copy=False)
        per_row = _row_lengths(table.column("doc_lengths"))
        if np.any(per_row < 1) or np.any(docs < 1) or not np.array_equal(_row_sums(docs, per_row), positions):
            raise ShardFormatError("a row's document lengths do not add up to its positions")
        flat["doc_lengths"], lengths["doc_lengths"] = docs, per_row
    if "spans" in table.column_names:  # v5
        spans = flat_list(table.column("spans")).astype(np.uint16, copy=False)
        if len(spans) != len(input_ids) or not np.array_equal(_row_lengths(table.column("spans")), positions):
            raise ShardFormatError("the spans column does not cover every position of its rows")
        flat["spans"], lengths["spans"] = spans, positions
    return flat, lengths


def decode_table(table: pa.Table) -> Iterator[Sample]:
    """Decode a shard table (any supported version and encoding) into samples."""
    return _samples(table, *_decode_flat(table))


def _samples(table: pa.Table, flat: dict[str, np.ndarray], lengths: dict[str, np.ndarray]) -> Iterator[Sample]:
    bounds = {}
    for name, per_row in lengths.items():
        b = np.zeros(len(per_row) + 1, dtype=np.int64)
        np.cumsum(per_row, out=b[1:])
        bounds[name] = b
    sids = table.column("sample_id").to_pylist()
    sources = table.column("source").to_pylist()
    for i in range(table.num_rows):
        rows = {name: values[bounds[name][i] : bounds[name][i + 1]] for name, values in flat.items()}
        yield Sample(sample_id=sids[i], source=sources[i], **rows)


# Arrow types of the decoded columns (DECODED_COLUMNS order); label columns are [L, k] / [L, S] per row.
DECODED_TYPES = {
    "input_ids": pa.int32(),
    "topk_ids": pa.int32(),
    "topk_logprobs": pa.float32(),
    "tail_logprob": pa.float32(),
    "tail_sample_ids": pa.int32(),
    "tail_sample_counts": pa.uint8(),
    "trained": pa.bool_(),
    "doc_lengths": pa.int32(),
    "spans": pa.uint16(),
    "target_logprob": pa.float32(),
    "sampler_logprob": pa.float32(),
}


def decoded_table(table: pa.Table) -> pa.Table:
    """A shard table (any version and encoding) as plain, decoded columns, one row per sequence.

    ``sample_id``, ``source``, ``input_ids`` (list<int32>), ``topk_ids`` (list<fixed_size_list<int32, k>>),
    ``topk_logprobs`` (list<fixed_size_list<float32, k>>), ``tail_logprob`` (list<float32>), and the
    tail-sample columns, ``target_logprob`` and ``spans`` when the set has them, ``trained`` and ``doc_lengths`` when its shards
    have them (label columns then hold one entry per trained position): what :class:`Sample`
    holds, in columns any Arrow tool (pandas, polars, duckdb, HF datasets) understands.
    """
    flat, lengths = _decode_flat(table)
    columns = [table.column("sample_id").combine_chunks(), table.column("source").combine_chunks()]
    columns += [rows_list(values, lengths[name], DECODED_TYPES[name]) for name, values in flat.items()]
    return pa.Table.from_arrays(columns, names=["sample_id", "source", *flat])


def read_parquet_bytes(data: bytes) -> pa.Table:
    """Parse shard bytes into a table."""
    return pq.read_table(pa.BufferReader(data))


# What decoding a malformed shard can raise (pyarrow, numpy, our decoders, a bad footer).
_MALFORMED = (pa.ArrowException, ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError, RecursionError)


def decode_shard(data: bytes, top_k: int, where: str, rows: int | None = None, tokens: int | None = None,
                 tail_samples: int | None = None, trained: int | None = None, spans: bool | None = None,
                 target_logprobs: bool | None = None, sampler_logprobs: bool | None = None) -> list[Sample]:
    """Parse and decode the bytes of a shard of an untrusted label set, checked against its manifest.

    Args:
        top_k, rows, tokens, tail_samples, trained, spans, target_logprobs, sampler_logprobs: what the manifest says
            the shard holds.
        where: the shard's URL, for messages.

    Raises:
        ShardFormatError: anything malformed (not Parquet, a bad footer or column, another k,
            other row or token counts than the manifest's, ids out of range), naming ``where``.
        UnsupportedSchemaVersion: a shard version this reader does not know.
    """
    try:
        table = read_parquet_bytes(data)
        k = (table.schema.metadata or {}).get(_META_TOPK)
        if k is not None and int(k) != top_k:
            raise ShardFormatError(f"holds top_k={int(k)}, the manifest says {top_k}")
        if rows is not None and table.num_rows != rows:
            raise ShardFormatError(f"holds {table.num_rows} rows, the manifest says {rows}")
        flat, lengths = _decode_flat(table)
        n = len(flat["input_ids"])
        if tokens is not None and n != tokens:
            raise ShardFormatError(f"holds {n} tokens, the manifest says {tokens}")
        if trained is not None and len(flat["tail_logprob"]) != trained:
            raise ShardFormatError(f"holds labels at {len(flat['tail_logprob'])} positions, the manifest says {trained}")
        if flat["topk_ids"].shape[1] != top_k:
            raise ShardFormatError(f"has k={flat['topk_ids'].shape[1]}, the manifest says {top_k}")
        if spans is not None and spans != ("spans" in flat):
            raise ShardFormatError(f"{'lacks' if spans else 'has'} a spans column; the manifest says it "
                                   f"{'has' if spans else 'has none'}")
        for name, said in (("target_logprob", target_logprobs), ("sampler_logprob", sampler_logprobs)):
            if said is not None and said != (name in flat):
                raise ShardFormatError(f"{'lacks' if said else 'has'} a {name} column; the manifest says it "
                                       f"{'has' if said else 'has none'}")
            if name in flat and np.any(flat[name] > 0):  # NaN compares false: allowed
                raise ShardFormatError(f"a {name} is above 0 (log-probs are at most 0)")
        draws = flat["tail_sample_ids"].shape[1] if "tail_sample_ids" in flat else 0
        if tail_samples is not None and draws != tail_samples:
            raise ShardFormatError(f"holds {draws} tail samples per position, the manifest says {tail_samples}")
        for name in ("input_ids", "topk_ids", "tail_sample_ids"):  # whole columns: this runs for every shard read
            a = flat.get(name)
            if a is not None and a.size and not (0 <= int(a.min()) and int(a.max()) < MAX_VOCAB):
                raise ShardFormatError(f"{name} lie outside [0, {MAX_VOCAB})")
        ids = table.column("sample_id")
        if ids.null_count or not pc.all(pc.match_substring_regex(ids, "^[0-9a-f]{16,64}$")).as_py():
            raise ShardFormatError("a sample_id is not a hex content address")
        return list(_samples(table, flat, lengths))
    except LabelSetError as e:
        raise type(e)(f"shard {where}: {e}") from e
    except _MALFORMED as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ShardFormatError(f"shard {where} cannot be decoded ({type(e).__name__}: {first})") from e
