"""Shard layout (schema v1): one Parquet row per sequence.

Columns (see README.md for the full specification):

=================  ===================================  =====================
column             Arrow type                           shape per row
=================  ===================================  =====================
``sample_id``      string                               content address
``source``         string                               where the row came from
``input_ids``      list<int32>                          [L]
``topk_ids``       list<fixed_size_list<int32, k>>      [L, k]
``topk_logprobs``  list<fixed_size_list<float16, k>>    [L, k]
``tail_logprob``   list<float32>                        [L]
=================  ===================================  =====================
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.errors import UnsupportedSchemaVersion

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)

_META_VERSION = b"softlabels.schema_version"
_META_TOPK = b"softlabels.top_k"


@dataclass
class Sample:
    """One labeled sequence, decoded to numpy.

    ``topk_logprobs[t]`` and ``tail_logprob[t]`` describe the teacher's
    distribution over the token that follows ``input_ids[t]``.
    """

    sample_id: str
    source: str
    input_ids: np.ndarray  # [L] int32
    topk_ids: np.ndarray  # [L, k] int32, descending by log-prob
    topk_logprobs: np.ndarray  # [L, k] float32 (stored as float16)
    tail_logprob: np.ndarray  # [L] float32, log of the mass outside the top-k

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if self.topk_ids.ndim != 2 or self.topk_ids.shape != self.topk_logprobs.shape:
            raise ValueError(
                f"sample {self.sample_id}: topk_ids {self.topk_ids.shape} and "
                f"topk_logprobs {self.topk_logprobs.shape} must both be [L, k]"
            )
        if self.topk_ids.shape[0] != n or self.tail_logprob.shape != (n,):
            raise ValueError(
                f"sample {self.sample_id}: {n} input ids but labels for "
                f"{self.topk_ids.shape[0]} / {self.tail_logprob.shape} positions"
            )


def shard_schema(top_k: int) -> pa.Schema:
    """The Arrow schema of a v1 shard with ``top_k`` entries per position."""
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
        metadata={_META_VERSION: str(SCHEMA_VERSION).encode(), _META_TOPK: str(top_k).encode()},
    )


def _list_array(flat: pa.Array, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def encode_samples(samples: Sequence[Sample], top_k: int) -> pa.Table:
    """Encode samples into a v1 shard table (column order fixed by the schema)."""
    schema = shard_schema(top_k)
    for s in samples:
        if s.topk_ids.shape[1] != top_k:
            raise ValueError(f"sample {s.sample_id} has k={s.topk_ids.shape[1]}, shard has k={top_k}")
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)

    def cat(name: str, dtype: str) -> np.ndarray:
        parts = [np.asarray(getattr(s, name), dtype=dtype).reshape(-1) for s in samples]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    ids = pa.FixedSizeListArray.from_arrays(pa.array(cat("topk_ids", "int32")), top_k)
    lps = pa.FixedSizeListArray.from_arrays(pa.array(cat("topk_logprobs", "float16")), top_k)
    columns = [
        pa.array([s.sample_id for s in samples], pa.string()),
        pa.array([s.source for s in samples], pa.string()),
        _list_array(pa.array(cat("input_ids", "int32")), lengths),
        _list_array(ids, lengths),
        _list_array(lps, lengths),
        _list_array(pa.array(cat("tail_logprob", "float32")), lengths),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """Serialize a shard table to Parquet bytes.

    Deterministic: the same table gives the same bytes (no timestamps or
    random ids), which is what makes resumed runs byte-identical.
    """
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=max(1, table.num_rows))
    return buf.getvalue()


def _flat(col: pa.ChunkedArray | pa.Array, depth: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    for _ in range(depth):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def decode_table(table: pa.Table) -> Iterator[Sample]:
    """Decode a v1 shard table into samples (numpy arrays, float32 log-probs)."""
    meta = table.schema.metadata or {}
    version = int(meta.get(_META_VERSION, b"1"))
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedSchemaVersion(
            f"shard has schema_version {version}; this reader supports {list(SUPPORTED_VERSIONS)}"
        )
    k = table.schema.field("topk_ids").type.value_type.list_size
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    input_ids = _flat(table.column("input_ids"), 1).astype(np.int32, copy=False)
    topk_ids = _flat(table.column("topk_ids"), 2).astype(np.int32, copy=False).reshape(-1, k)
    topk_lp = _flat(table.column("topk_logprobs"), 2).astype(np.float32).reshape(-1, k)
    tail = _flat(table.column("tail_logprob"), 1).astype(np.float32, copy=False)
    sids = table.column("sample_id").to_pylist()
    sources = table.column("source").to_pylist()
    for i in range(len(lengths)):
        a, b = bounds[i], bounds[i + 1]
        yield Sample(
            sample_id=sids[i],
            source=sources[i],
            input_ids=input_ids[a:b],
            topk_ids=topk_ids[a:b],
            topk_logprobs=topk_lp[a:b],
            tail_logprob=tail[a:b],
        )


def read_parquet_bytes(data: bytes) -> pa.Table:
    """Parse shard bytes into a table."""
    return pq.read_table(pa.BufferReader(data))
