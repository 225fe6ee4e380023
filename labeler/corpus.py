"""Corpus readers: the built-in ``pydoc`` corpus and local/remote files.

Files: ``.txt`` (one document per file), ``.jsonl`` (one document per line,
text in ``--text-field``) and ``.parquet`` (one document per row), given as a
path, a URL or a glob, through the same fsspec helper as everything else.
Everything that can be checked without reading the text (format, glob
matches, reachability) is checked when the corpus is opened.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas import resolve_url, retry_io

FORMATS = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Document:
    doc_id: str  # "pydoc:<topic>", "<path>" or "<path>:<row>"
    text: str


@dataclass
class CorpusStats:
    """Filled while documents are read."""

    documents: int = 0
    empty: int = 0
    sha: Any = field(default_factory=hashlib.sha256)

    @property
    def fingerprint(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class Corpus:
    """An opened corpus: ``iter_documents()`` yields non-empty documents in a fixed order."""

    def __init__(self, spec: str, text_field: str = "text", storage_options: Mapping[str, Any] | None = None) -> None:
        self.source = spec
        self.text_field = text_field
        self.stats = CorpusStats()
        self.files: list[str] = []
        if spec == "pydoc":
            return
        self.fs, path = resolve_url(spec, storage_options)
        try:
            if any(c in path for c in "*?["):
                self.files = sorted(retry_io(lambda: self.fs.glob(path), f"list {spec}"))
                if not self.files:
                    raise ValueError(f"corpus glob {spec!r} matches no files")
            elif retry_io(lambda: self.fs.isdir(path), f"stat {spec}"):
                self.files = sorted(
                    f for f in retry_io(lambda: self.fs.find(path), f"list {spec}") if f.endswith(FORMATS)
                )
                if not self.files:
                    raise ValueError(f"corpus folder {spec!r} holds no {'/'.join(FORMATS)} files")
            elif retry_io(lambda: self.fs.exists(path), f"stat {spec}"):
                self.files = [path]
            else:
                raise ValueError(f"corpus {spec!r} does not exist (not a built-in corpus, file, folder or glob)")
        except PermissionError as e:
            raise ValueError(f"corpus {spec!r}: access denied ({e})") from e
        bad = [f for f in self.files if not f.endswith(FORMATS)]
        if bad:
            raise ValueError(f"corpus file {bad[0]!r} has an unknown format; expected one of {', '.join(FORMATS)}")

    def _raw_documents(self) -> Iterator[Document]:
        if self.source == "pydoc":
            from pydoc_data.topics import topics

            for name in sorted(topics):
                yield Document(f"pydoc:{name}", topics[name])
            return
        for path in self.files:
            data = retry_io(lambda p=path: self.fs.cat_file(p), f"read {path}")
            if path.endswith(".txt"):
                yield Document(path, _decode(data, path))
            elif path.endswith(".jsonl"):
                for row, line in enumerate(_decode(data, path).splitlines()):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{row + 1}: not valid JSON ({e.msg})") from e
                    yield Document(f"{path}:{row + 1}", self._field(obj, path, row + 1))
            else:
                import pyarrow.parquet as pq

                table = pq.read_table(io.BytesIO(data))
                if self.text_field not in table.column_names:
                    raise ValueError(
                        f"{path}: no column {self.text_field!r} (columns: {table.column_names}); use --text-field"
                    )
                for row, text in enumerate(table.column(self.text_field).to_pylist()):
                    yield Document(f"{path}:{row}", text if isinstance(text, str) else "")

    def _field(self, obj: Any, path: str, row: int) -> str:
        if not isinstance(obj, dict) or self.text_field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}:{row}: no field {self.text_field!r} (found {keys}); use --text-field")
        text = obj[self.text_field]
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{path}:{row}: field {self.text_field!r} is {type(text).__name__}, not text")
        return text or ""

    def iter_documents(self) -> Iterator[Document]:
        """Non-empty documents; every document (empty too) feeds the fingerprint and stats."""
        for doc in self._raw_documents():
            self.stats.documents += 1
            self.stats.sha.update(doc.doc_id.encode("utf-8") + b"\x00" + doc.text.encode("utf-8") + b"\x00")
            if not doc.text.strip():
                self.stats.empty += 1
                continue
            yield doc


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
