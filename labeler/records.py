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
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

from softlabels.schemas.errors import UserError

# Files larger than this are read in pieces, each by its own task: JSON Lines by byte range (a
# line belongs to the piece its first byte lies in), Parquet by row groups, local Arrow files by
# record batches. Compressed JSON Lines and .json arrays cannot be cut and are read whole.
PIECE_BYTES = 64 * 2**20


def piece_bytes() -> int:
    import os

    return int(os.environ.get("SOFTLABELS_PIECE_BYTES") or PIECE_BYTES)


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


def records(path: str, data: bytes) -> Iterator[tuple[str, Any] | RowError]:
    """The records of one file's bytes, in order; a bad row is yielded as a :class:`RowError`
    (the caller skips or raises it), a file that cannot be read at all is raised as one."""
    kind = file_format(path)
    if kind in _CODECS:
        import pyarrow as pa

        try:
            data = pa.CompressedInputStream(pa.BufferReader(data), _CODECS[kind]).read()
        except (OSError, pa.ArrowException) as e:
            raise RowError(path, f"not a readable {_CODECS[kind]} file ({str(e).splitlines()[0][:120]})") from e
        kind = ".jsonl"
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
            raise RowError(path, "not a JSON array of rows")
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
        yield from _table_rows(path, data, kind)


def _json_lines(path: str, data: bytes) -> Iterator[tuple[str, Any] | RowError]:
    for row, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{row}", json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield RowError(f"{path}:{row}", f"not UTF-8 (byte {e.start}: {e.reason})")
        except json.JSONDecodeError as e:
            yield RowError(f"{path}:{row}", f"not valid JSON ({e.msg})")


def _table_rows(path: str, data: bytes, kind: str | None) -> Iterator[tuple[str, Any]]:
    """Parquet (a row group at a time) and Arrow IPC rows, as dicts."""
    import pyarrow as pa

    try:
        batches = _batches(data, kind)
        row = 0
        for batch in batches:
            for obj in batch.to_pylist():
                yield f"{path}:{row}", obj
                row += 1
    except pa.ArrowException as e:
        name = "Parquet" if kind == ".parquet" else "Arrow"
        raise RowError(path, f"not a readable {name} file ({str(e).splitlines()[0][:120]})") from e


def _batches(data: Any, kind: str | None) -> Iterator[Any]:
    """Record batches (Parquet: row groups) of a file's bytes, or of a memory-mapped file."""
    import pyarrow as pa

    if kind == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(io.BytesIO(data))
        for g in range(pf.num_row_groups):
            yield pf.read_row_group(g)
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


def pieces(path: str, size: int, fs: Any) -> list[tuple[int, int, int]]:
    """``(start, stop, weight)`` pieces of a file larger than :func:`piece_bytes` (``[(0, 0, size)]``: whole).

    JSON Lines: byte ranges. Parquet: row-group ranges. A local Arrow file: record-batch ranges.
    """
    step = piece_bytes()
    kind = file_format(path)
    if size <= step or kind not in (".jsonl", ".parquet", ".arrow"):
        return [(0, 0, size)]
    if kind == ".jsonl":
        return [(a, min(size, a + step), min(size, a + step) - a) for a in range(0, size, step)]
    if kind == ".parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as fh:
            meta = pq.read_metadata(fh)
        sizes = [sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
                 for g in range(meta.num_row_groups)]  # bytes in the file, as the other formats' weights
    else:
        import pyarrow as pa

        from softlabels.schemas.storage import is_local

        if not is_local(fs):
            return [(0, 0, size)]
        sizes = [b.nbytes for b in _batches(pa.memory_map(fs._strip_protocol(path)), ".arrow")]
    out, start, acc = [], 0, 0
    for g, n in enumerate(sizes):
        acc += n
        if acc >= step or g == len(sizes) - 1:
            out.append((start, g + 1, acc))
            start, acc = g + 1, 0
    return out or [(0, 0, size)]


def piece_records(path: str, start: int, stop: int, fs: Any) -> Iterator[tuple[str, Any] | RowError]:
    """The records of one piece (see :func:`pieces`). Rows of a JSON Lines piece are named by the byte
    offset of their line (``data.jsonl@1048576``); Parquet and Arrow rows by their row number."""
    kind = file_format(path)
    if kind == ".jsonl":
        base = max(0, start - 1)
        data = fs.cat_file(path, start=base, end=stop)
        head = 0
        if start > 0:  # the line crossing `start` belongs to the piece before
            head = data.find(b"\n") + 1
            if head == 0:
                return
        while data and not data.endswith(b"\n"):  # finish the last line, which may run past `stop`
            more = fs.cat_file(path, start=base + len(data), end=base + len(data) + (1 << 20))
            if not more:
                break
            cut = more.find(b"\n")
            data += more if cut < 0 else more[: cut + 1]
        if start == 0 and data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
            head = 3
        offset = base + head
        for line in data[head:].split(b"\n"):
            where = f"{path}@{offset}"
            offset += len(line) + 1
            if not line.strip():
                continue
            try:
                yield where, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield RowError(where, f"not UTF-8 (byte {e.start}: {e.reason})")
            except json.JSONDecodeError as e:
                yield RowError(where, f"not valid JSON ({e.msg})")
        return
    import pyarrow as pa

    if kind == ".parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            row = sum(pf.metadata.row_group(g).num_rows for g in range(start))
            for g in range(start, stop):
                for obj in pf.read_row_group(g).to_pylist():
                    yield f"{path}:{row}", obj
                    row += 1
        return
    row = 0
    for b, batch in enumerate(_batches(pa.memory_map(fs._strip_protocol(path)), ".arrow")):
        if start <= b < stop:
            for obj in batch.to_pylist():
                yield f"{path}:{row}", obj
                row += 1
        else:
            row += batch.num_rows
