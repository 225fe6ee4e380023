"""Large corpus files cut into pieces, each read by its own task.

A file larger than :func:`piece_bytes` (``$SOFTLABELS_PIECE_BYTES``, default
:data:`labeler.records.PIECE_BYTES`) is cut by :func:`pieces`: JSON Lines by byte range (a line
belongs to the piece its first byte lies in), Parquet by row groups, local Arrow files by record
batches; compressed JSON Lines and ``.json`` arrays cannot be cut and are read whole.
:func:`piece_records` reads one piece's records, as :func:`labeler.records.records` reads a
whole file's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from softlabels.labeler.records import (PIECE_BYTES, TABLE_BATCH_ROWS, Expanded, RowError, _batches, _damaged,
                                       _json_row, _Watched, dense_nbytes, file_format, parquet_file)


def piece_bytes() -> int:
    import os

    return int(os.environ.get("SOFTLABELS_PIECE_BYTES") or PIECE_BYTES)


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


def piece_records(path: str, start: int, stop: int, fs: Any,
                  expanded: Expanded | None = None) -> Iterator[tuple[str, Any] | RowError]:
    """The records of one piece (see :func:`pieces`). Rows of a JSON Lines piece are named by the byte
    offset of their line (``data.jsonl@1048576``); Parquet and Arrow rows by their row number.
    ``expanded``: counts the Parquet bytes decoded (raises UserError past its cap)."""
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
            if line.strip():
                yield _json_row(where, line)
        return
    import pyarrow as pa

    if kind == ".parquet":
        with fs.open(path, "rb") as fh:
            source = _Watched(fh)
            row = first = 0
            try:
                pf = parquet_file(source)
                row = first = sum(pf.metadata.row_group(g).num_rows for g in range(start))
                for batch in pf.iter_batches(TABLE_BATCH_ROWS, row_groups=range(start, stop), use_threads=False):
                    if expanded is not None:
                        expanded.add(dense_nbytes(batch))
                    for obj in batch.to_pylist():
                        yield f"{path}:{row}", obj
                        row += 1
            except (OSError, pa.ArrowException) as e:
                if source.error is not None:
                    raise  # the storage failed, not the data
                yield _damaged(path, kind, row - 1 if row > first else None, e)
        return
    row = 0
    try:
        for b, batch in enumerate(_batches(pa.memory_map(fs._strip_protocol(path)), ".arrow")):
            if start <= b < stop:
                for obj in batch.to_pylist():
                    yield f"{path}:{row}", obj
                    row += 1
            else:
                row += batch.num_rows
    except pa.ArrowException as e:
        yield _damaged(path, kind, None, e)
