"""Corpus files as records: the file formats the labeler reads, one place.

A record is ``(where, value)``: ``where`` names the file and row (``data.jsonl:12``) for
messages and document ids; ``value`` is the text of a ``.txt`` file, or a row (a dict of
fields) of every other format. Which fields a row must have is decided by the corpus
format (:mod:`labeler.chat`), not here.

=================  ====================================================================
``.txt``           the whole file is one document
``.jsonl``         one JSON object per line; ``.jsonl.gz`` / ``.jsonl.zst`` compressed
``.json``          a JSON array of objects (or ``{"data": [...]}``, or one object per line)
``.parquet``       one row per document, read a row group at a time
``.arrow``         Arrow IPC (stream or file), as HF ``datasets`` caches and ``save_to_disk`` write
=================  ====================================================================

Bounds: compressed JSON Lines are decompressed as their rows are taken (a reader that stops
early decompresses only what it took), and Parquet is decoded a few rows at a time. What one
read task decompresses or decodes is capped (:func:`max_expand_bytes`): a 2 MB ``.jsonl.gz``
can expand to more than a worker's memory, so past the cap the file is refused in one line.
A file that turns out damaged (a cut-short ``.gz``/``.zst``, a corrupt Parquet page) is
yielded as a :class:`RowError` naming it, after the rows read before the damage.

Files larger than :data:`PIECE_BYTES` are read in pieces, each by its own task (:mod:`labeler.pieces`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from softlabels.schemas.errors import UserError

# Files larger than this are read in pieces, each by its own task: JSON Lines by byte range (a
# line belongs to the piece its first byte lies in), Parquet by row groups, local Arrow files by
# record batches. Compressed JSON Lines and .json arrays cannot be cut and are read whole.
PIECE_BYTES = 64 * 2**20


# What one read task may decompress (compressed JSON Lines, read whole by one task) or decode
# (Parquet) before the file is refused; SOFTLABELS_MAX_EXPAND_BYTES changes it. Reading and
# tokenizing hold several times this in memory (Python strings, token lists), so the default
# is a few uncompressed pieces' worth.
MAX_EXPAND_BYTES = 4 * PIECE_BYTES
MAX_EXPAND_ENV = "SOFTLABELS_MAX_EXPAND_BYTES"


def max_expand_bytes() -> int:
    """The cap on what one read task expands: ``$SOFTLABELS_MAX_EXPAND_BYTES`` (bytes) or :data:`MAX_EXPAND_BYTES`.

    Raises:
        UserError: the variable is not a positive integer.
    """
    import os

    value = os.environ.get(MAX_EXPAND_ENV) or str(MAX_EXPAND_BYTES)
    try:
        cap = int(value)
    except ValueError:
        cap = 0
    if cap <= 0:
        raise UserError(f"{MAX_EXPAND_ENV} must be a positive number of bytes, got {value!r}")
    return cap


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)


# Real text compresses 3-10x; past this many times the bytes read, a file is a bomb, whatever its size.
EXPAND_RATIO = 16


class Expanded:
    """What one read task has decompressed or decoded of a file, against a cap: ``cap`` (:func:`max_expand_bytes`),
    or :data:`EXPAND_RATIO` times the bytes the task reads (``source_bytes``) when that is more, so that a large
    ordinary file (a 64 MiB zstd Parquet piece decodes to about 300 MiB) passes and a small bomb does not."""

    def __init__(self, path: str, cap: int, source_bytes: int = 0) -> None:
        self.path, self.cap, self.bytes = path, max(cap, EXPAND_RATIO * source_bytes), 0

    def add(self, n: int) -> None:
        """Count ``n`` more bytes; raises UserError (one line naming the file and the cap) past the cap."""
        self.bytes += n
        if self.bytes > self.cap:
            raise UserError(f"corpus file {self.path!r} expands to more than {_size(self.cap)} in one read task; "
                            f"raise the cap with --max-expand-bytes N (or {MAX_EXPAND_ENV}), or split the file into smaller ones")


# Matched case-insensitively; compressed JSON Lines first (".jsonl.gz" before ".jsonl").
FORMATS = (".txt", ".jsonl.gz", ".jsonl.zst", ".jsonl", ".json", ".parquet", ".arrow")
_CODECS = {".jsonl.gz": "gzip", ".jsonl.zst": "zstd"}


def file_format(path: str) -> str | None:
    """The corpus format of a file name, whatever its case; None if none."""
    low = path.lower()
    return next((f for f in FORMATS if low.endswith(f)), None)


class RowError(UserError):
    """One row cannot be decoded: ``where`` and ``reason`` (``--on-error skip`` skips and counts it)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def records(path: str, data: Any, expanded: Expanded | None = None) -> Iterator[tuple[str, Any] | RowError]:
    """The records of one file, in order, read as far as they are taken; a bad row is yielded as a
    :class:`RowError` (the caller skips or raises it), and so is a file that cannot be read on (after
    the rows before the damage).

    ``data``: the file's bytes; a compressed file's may also be an open binary file.
    ``expanded``: counts what is decompressed or decoded (raises UserError past its cap)."""
    kind = file_format(path)
    if kind in _CODECS:
        yield from _compressed_lines(path, data, _CODECS[kind], expanded)
        return
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (editors on Windows write one)
        data = data[3:]
    if kind == ".txt":
        try:
            yield path, data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RowError(path, f"not UTF-8 text (byte {e.start}: {e.reason})")
    elif kind == ".jsonl":
        yield from _json_lines(path, data)
    elif kind == ".json":
        stripped = data.lstrip()
        if not stripped.startswith((b"[", b"{")):
            yield RowError(path, "not a JSON array of rows")
            return
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            yield from _json_lines(path, data)  # many ".json" files are JSON Lines
            return
        rows = doc.get("data") if isinstance(doc, dict) and isinstance(doc.get("data"), list) else doc
        if not isinstance(rows, list):
            rows = [rows]
        for row, obj in enumerate(rows, start=1):
            yield f"{path}:{row}", obj
    else:
        yield from _table_rows(path, data, kind, expanded)


class _Watched:
    """A file whose read errors are remembered: pyarrow reports damaged data and a failed read alike (OSError)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.error = fh, None

    def read(self, *args: Any) -> bytes:
        try:
            return self.fh.read(*args)
        except Exception as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)


STREAM_CHUNK = 1 << 16  # bytes decompressed per read (a damaged stream loses the rows of its last read)


def _compressed_lines(path: str, data: Any, codec: str, expanded: Expanded | None) -> Iterator[tuple[str, Any] | RowError]:
    """The rows of compressed JSON Lines, decompressed a chunk at a time as they are taken."""
    import pyarrow as pa

    source = _Watched(data) if not isinstance(data, bytes) else None
    stream = pa.CompressedInputStream(pa.BufferReader(data) if source is None else pa.PythonFile(source, mode="r"), codec)
    row, pending, first = 0, [], True
    while True:
        try:
            chunk = stream.read(STREAM_CHUNK)
        except (OSError, pa.ArrowException) as e:
            if source is not None and source.error is not None:
                raise  # the storage failed, not the data
            reason = str(e).splitlines()[0][:120]
            yield RowError(path, f"not a readable {codec} file ({reason})" if row == 0 and first else
                           f"the {codec} data is cut short or damaged after line {row} ({reason})")
            return
        if expanded is not None:
            expanded.add(len(chunk))
        if not chunk:
            break
        if first and chunk.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
            chunk = chunk[3:]
        first = False
        start = 0
        while (cut := chunk.find(b"\n", start)) >= 0:
            pending.append(chunk[start:cut])
            row += 1
            line, pending = b"".join(pending), []
            if line.strip():
                yield _json_row(f"{path}:{row}", line)
            start = cut + 1
        pending.append(chunk[start:])  # a line that goes on in the next chunk
    line = b"".join(pending)
    if line.strip():
        yield _json_row(f"{path}:{row + 1}", line)


def _json_row(where: str, line: bytes) -> tuple[str, Any] | RowError:
    try:
        return where, json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return RowError(where, f"not UTF-8 (byte {e.start}: {e.reason})")
    except json.JSONDecodeError as e:
        return RowError(where, f"not valid JSON ({e.msg})")


def _json_lines(path: str, data: bytes) -> Iterator[tuple[str, Any] | RowError]:
    for row, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield _json_row(f"{path}:{row}", line)


TABLE_BATCH_ROWS = 128  # Parquet rows decoded at a time: what is held, and how often the cap is checked


def _table_rows(path: str, data: bytes, kind: str | None, expanded: Expanded | None) -> Iterator[tuple[str, Any] | RowError]:
    """Parquet (a few rows at a time) and Arrow IPC rows of a file's bytes, as dicts; a damaged file as a RowError."""
    import pyarrow as pa

    row = 0
    try:
        for batch in _batches(data, kind):
            if expanded is not None and kind == ".parquet":  # Arrow IPC holds its values as they are: no expansion
                expanded.add(dense_nbytes(batch))
            for obj in batch.to_pylist():
                yield f"{path}:{row}", obj
                row += 1
    except (OSError, pa.ArrowException) as e:  # the bytes are in memory: no storage to fail
        yield _damaged(path, kind, row - 1 if row else None, e)


def _damaged(path: str, kind: str | None, last: int | None, e: BaseException) -> RowError:
    """A table file that cannot be read on; ``last``: the last row read before the damage (None: none)."""
    name = "Parquet" if kind == ".parquet" else "Arrow"
    reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
    if last is not None:
        return RowError(path, f"the {name} data is damaged after row {last} ({reason})")
    return RowError(path, f"not a readable {name} file ({reason})")


def parquet_file(source: Any) -> Any:
    """A Parquet file whose top-level text columns are decoded as dictionaries, so that what a batch expands to
    is known (:func:`dense_nbytes`) before its rows are (a value repeated by a dictionary page, a few bytes on
    disk, would otherwise be copied into every row first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(source).schema_arrow
    text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
            or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    source.seek(0)
    return pq.ParquetFile(source, read_dictionary=text or None)


def dense_nbytes(batch: Any) -> int:
    """The bytes a record batch holds once its dictionary columns are expanded (counted, not expanded)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for column in batch.columns:
        if pa.types.is_dictionary(column.type) and (pa.types.is_string(column.type.value_type) or
                                                    pa.types.is_binary(column.type.value_type)):
            lengths = pc.binary_length(column.dictionary).cast(pa.int64())
            total += (pc.sum(pc.take(lengths, column.indices)).as_py() or 0) + column.indices.nbytes
        else:
            total += column.nbytes
    return total


def _batches(data: Any, kind: str | None) -> Iterator[Any]:
    """Record batches (Parquet: row groups) of a file's bytes, or of a memory-mapped file."""
    import pyarrow as pa

    if kind == ".parquet":
        yield from parquet_file(pa.BufferReader(data)).iter_batches(TABLE_BATCH_ROWS, use_threads=False)
        return
    source = data if isinstance(data, pa.NativeFile) else pa.BufferReader(data)
    try:
        reader: Any = pa.ipc.open_stream(source)  # what HF datasets writes
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from reader


def schema_fields(path: str, fs: Any) -> list[str] | None:
    """The field names of a table file (Parquet footer, Arrow schema), without reading its rows; None for others."""
    import pyarrow as pa

    kind = file_format(path)
    try:
        if kind == ".parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as fh:
                return list(pq.read_schema(fh).names)
        if kind == ".arrow":
            with fs.open(path, "rb") as fh:
                data = fh.read()
            try:
                return list(pa.ipc.open_stream(pa.BufferReader(data)).schema.names)
            except pa.ArrowInvalid:
                return list(pa.ipc.open_file(pa.BufferReader(data)).schema.names)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"corpus file {path!r} is not a readable {kind[1:].title()} file ({e})") from e
    return None


def first_row(path: str, fs: Any, cap: int = 64 * 2**20) -> tuple[str, Any] | None:
    """The first readable record of a JSON file (for format detection and field checks), or None.

    JSON Lines: read until the first complete line (however long: a long conversation), skipping
    lines that are not valid JSON (reported with their row when the block is read); at most ``cap``
    bytes. ``.json``: the file parses only whole."""
    kind = file_format(path)
    with fs.open(path, "rb") as fh:
        raw: Any = fh
        if kind in _CODECS:
            import pyarrow as pa

            try:
                raw = pa.CompressedInputStream(pa.PythonFile(fh, mode="r"), _CODECS[kind])
            except (OSError, pa.ArrowException):
                return None
        head = b""
        try:
            while len(head) < cap:
                more = raw.read(1 << 16)
                if not more:
                    break
                head += more
                if kind == ".json":
                    continue
                lines = head.removeprefix(b"\xef\xbb\xbf").split(b"\n")
                if any(_parses(ln) for ln in lines[:-1]):
                    break
        except OSError:
            return None  # a damaged stream: reported when the block is read
    if kind == ".json":
        for rec in records(path, head):
            return None if isinstance(rec, RowError) else rec
        return None
    for rec in _json_lines(path, head.removeprefix(b"\xef\xbb\xbf")):
        if not isinstance(rec, RowError):
            return rec
    return None


def _parses(line: bytes) -> bool:
    if not line.strip():
        return False
    try:
        json.loads(line)
        return True
    except ValueError:
        return False
