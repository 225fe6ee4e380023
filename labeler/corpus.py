"""Corpus readers: the built-in ``pydoc`` corpus and local/remote files.

Files: ``.txt`` (one document per file), ``.jsonl`` (one document per line,
text in ``--text-field``) and ``.parquet`` (one document per row), given as a
path, a URL, a glob or a folder, through the same fsspec helper as everything
else.

The corpus is cut into *blocks* (one file each; the built-in corpus in fixed
groups of topics), listed in a fixed order. Blocks are read and tokenized in
parallel Ray tasks; the driver consumes them in block order, so the work plan
never depends on how many workers read. Everything that can be checked
without reading all of the text (format, glob matches, readability, the text
field of the first file) is checked when the corpus is opened, before the
teacher loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from softlabels.schemas import resolve_url, retry_io
from softlabels.schemas.errors import UserError
from softlabels.schemas.storage import is_local

log = logging.getLogger(__name__)

FORMATS = (".txt", ".jsonl", ".parquet")  # matched case-insensitively (.TXT, .JSONL too)


def file_format(path: str) -> str | None:
    """The corpus format of a file name (``.txt``, ``.jsonl``, ``.parquet``), whatever its case; None if none."""
    low = path.lower()
    return next((f for f in FORMATS if low.endswith(f)), None)
ON_ERROR = ("fail", "skip")
PYDOC_BLOCK = 32  # topics per block of the built-in corpus


@dataclass(frozen=True)
class Document:
    doc_id: str  # "pydoc:<topic>", "<path>" or "<path>:<row>"
    text: str


@dataclass(frozen=True)
class Block:
    """A piece of the corpus read by one task: a file, or a range of pydoc topics."""

    index: int
    path: str  # filesystem path of the file, or "pydoc"
    start: int = 0  # pydoc only: topic range [start, stop)
    stop: int = 0


@dataclass
class BlockStats:
    """What reading one block saw; the driver adds them up in block order."""

    documents: int = 0  # rows read, empty and skipped ones included
    empty: int = 0
    skipped: list[str] = field(default_factory=list)  # "<file>:<row>: <reason>", --on-error skip
    sha256: str = ""  # over (doc_id, text) of every document, in order


@dataclass
class CorpusTotals:
    """Stats of the whole corpus, accumulated from blocks in order."""

    documents: int = 0
    empty: int = 0
    skipped: int = 0
    sha: Any = field(default_factory=hashlib.sha256)

    def add(self, s: BlockStats) -> None:
        self.documents += s.documents
        self.empty += s.empty
        self.skipped += len(s.skipped)
        self.sha.update(bytes.fromhex(s.sha256))

    @property
    def fingerprint(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class BadRow(UserError):
    """One row cannot be decoded; ``--on-error skip`` skips it, ``fail`` stops the job."""


class BlockReader:
    """Reads blocks; picklable, so Ray tasks on any node can use it."""

    def __init__(self, spec: str, text_field: str, storage_options: Mapping[str, Any] | None, on_error: str) -> None:
        if on_error not in ON_ERROR:
            raise UserError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.spec, self.text_field, self.on_error = spec, text_field, on_error
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}  # filesystems are rebuilt where the task runs

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = resolve_url(self.spec, self.storage_options)[0]
        return self._fs

    def read(self, block: Block) -> tuple[list[Document], BlockStats]:
        """The block's non-empty documents, and its stats (``BadRow`` if a row is bad and on_error=fail)."""
        stats = BlockStats()
        sha = hashlib.sha256()
        docs: list[Document] = []
        for doc in self._rows(block, stats):
            stats.documents += 1
            sha.update(doc.doc_id.encode("utf-8") + b"\x00" + doc.text.encode("utf-8") + b"\x00")
            if not doc.text.strip():
                stats.empty += 1
                continue
            docs.append(doc)
        stats.sha256 = sha.hexdigest()
        return docs, stats

    def _bad(self, stats: BlockStats, where: str, reason: str) -> None:
        if self.on_error == "fail":
            raise BadRow(f"{where}: {reason} (--on-error skip skips such rows)")
        stats.documents += 1
        stats.skipped.append(f"{where}: {reason}")

    def _rows(self, block: Block, stats: BlockStats) -> Iterator[Document]:
        if block.path == "pydoc":
            from pydoc_data.topics import topics

            for name in sorted(topics)[block.start : block.stop]:
                yield Document(f"pydoc:{name}", topics[name])
            return
        path = block.path
        data = retry_io(lambda: self.fs.cat_file(path), f"read {path}")
        kind = file_format(path)
        if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (editors on Windows write one)
            data = data[3:]
        if kind == ".txt":
            try:
                yield Document(path, data.decode("utf-8"))
            except UnicodeDecodeError as e:
                self._bad(stats, path, f"not UTF-8 text (byte {e.start}: {e.reason})")
        elif kind == ".jsonl":
            for row, line in enumerate(data.split(b"\n"), start=1):
                if not line.strip():
                    continue
                try:
                    yield Document(f"{path}:{row}", self._field(json.loads(line.decode("utf-8"))))
                except UnicodeDecodeError as e:
                    self._bad(stats, f"{path}:{row}", f"not UTF-8 (byte {e.start}: {e.reason})")
                except json.JSONDecodeError as e:
                    self._bad(stats, f"{path}:{row}", f"not valid JSON ({e.msg})")
                except BadRow as e:
                    self._bad(stats, f"{path}:{row}", str(e))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(io.BytesIO(data))
            except pa.ArrowException as e:
                self._bad(stats, path, f"not a readable Parquet file ({e})")
                return
            column = self._column(table.schema, path)
            for row, text in enumerate(table.column(column).to_pylist()):
                yield Document(f"{path}:{row}", text if isinstance(text, str) else "")

    def _field(self, obj: Any) -> str:
        if not isinstance(obj, dict) or self.text_field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise BadRow(f"no field {self.text_field!r} (found {keys}); use --text-field")
        text = obj[self.text_field]
        if text is not None and not isinstance(text, str):
            raise BadRow(f"field {self.text_field!r} is {type(text).__name__}, not text")
        return text or ""

    def _column(self, schema: Any, path: str) -> str:
        import pyarrow as pa

        if self.text_field not in schema.names:
            raise UserError(f"{path}: no column {self.text_field!r} (columns: {schema.names}); use --text-field")
        kind = schema.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{path}: column {self.text_field!r} is {kind}, not text")
        return self.text_field


class Corpus:
    """An opened corpus: its files (checked), its blocks, and a reader for them."""

    def __init__(
        self,
        spec: str,
        text_field: str = "text",
        storage_options: Mapping[str, Any] | None = None,
        on_error: str = "fail",
        exclude: str | None = None,
    ) -> None:
        """``exclude``: a location (the run's output) whose files are never corpus, even inside a corpus folder."""
        self.source = spec
        self.reader = BlockReader(spec, text_field, storage_options, on_error)
        self.files: list[str] = []
        self.sizes: dict[str, int] = {}
        if spec == "pydoc":
            return
        fs, path = resolve_url(spec, storage_options)
        try:
            # A path that exists is taken as it is (`data[1].txt` is a file, not a glob).
            if retry_io(lambda: fs.isdir(path), f"stat {spec}"):
                found = {
                    f: info
                    for f, info in retry_io(lambda: fs.find(path, detail=True), f"list {spec}").items()
                    if file_format(f)
                }
                if not found:
                    raise UserError(f"corpus folder {spec!r} holds no {'/'.join(FORMATS)} files")
            elif retry_io(lambda: fs.exists(path), f"stat {spec}"):
                found = {path: retry_io(lambda: fs.info(path), f"stat {spec}")}
            elif any(c in path for c in "*?["):
                found = retry_io(lambda: fs.glob(path, detail=True), f"list {spec}")
                if not found:
                    raise UserError(f"corpus glob {spec!r} matches no files")
            else:
                raise UserError(f"corpus {spec!r} does not exist (not a built-in corpus, file, folder or glob)")
        except PermissionError as e:
            raise UserError(f"corpus {spec!r}: {e}") from e
        if exclude:
            found = self._without(found, fs, exclude, storage_options)
            if not found:
                raise UserError(f"corpus {spec!r} holds only the run's own output {exclude!r}")
        self.files = sorted(f for f, info in found.items() if info.get("type") != "directory")
        self.sizes = {f: int(found[f].get("size") or 0) for f in self.files}
        bad = [f for f in self.files if not file_format(f)]
        if bad:
            raise UserError(f"corpus file {bad[0]!r} has an unknown format; expected one of {', '.join(FORMATS)}")
        self._check_files(fs)
        if not any(self.sizes.values()):
            raise UserError(f"corpus {spec!r} is empty ({len(self.files)} file(s), 0 bytes)")

    @staticmethod
    def _without(found: dict[str, Any], fs: Any, exclude: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
        """``found`` minus the files under ``exclude`` (on the same filesystem), with a log line if any."""
        out_fs, out_path = resolve_url(exclude, storage_options)
        if type(out_fs) is not type(fs):
            return found
        out_path = out_path.rstrip("/")
        kept = {f: i for f, i in found.items() if f != out_path and not f.startswith(out_path + "/")}
        if len(kept) < len(found):
            log.info("corpus: left out %d file(s) under the output %s", len(found) - len(kept), exclude)
        return kept

    def _check_files(self, fs: Any) -> None:
        """Local files readable; the first .jsonl / .parquet file has the text field.

        Remote files are not opened one by one (that would be a request per
        file before any work): listing them already proved the credentials.
        """
        local = is_local(fs)
        jsonl = [f for f in self.files if file_format(f) == ".jsonl"]
        for f in self.files if local else jsonl[:1]:
            try:
                with fs.open(f, "rb") as fh:
                    head = fh.read(1 << 16)
            except OSError as e:
                raise UserError(f"corpus file {f!r} cannot be read ({e})") from e
            if jsonl and f == jsonl[0]:
                lines = head.removeprefix(b"\xef\xbb\xbf").split(b"\n")
                complete = lines if len(head) < 1 << 16 else lines[:-1]
                row, first = next(((i, ln) for i, ln in enumerate(complete, 1) if ln.strip()), (0, b""))
                try:
                    if first:
                        self.reader._field(json.loads(first))
                except BadRow as e:
                    raise UserError(f"{f}:{row}: {e}") from e
                except (json.JSONDecodeError, UnicodeDecodeError):
                    pass  # reported with its row (and --on-error) when the block is read
        parquet = [f for f in self.files if file_format(f) == ".parquet"]
        if parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                with fs.open(parquet[0], "rb") as fh:
                    schema = pq.read_schema(fh)
            except (OSError, pa.ArrowException) as e:
                raise UserError(f"corpus file {parquet[0]!r} is not a readable Parquet file ({e})") from e
            self.reader._column(schema, parquet[0])

    def blocks(self) -> list[Block]:
        if self.source == "pydoc":
            from pydoc_data.topics import topics

            n = len(topics)
            return [Block(i, "pydoc", s, min(n, s + PYDOC_BLOCK)) for i, s in enumerate(range(0, n, PYDOC_BLOCK))]
        return [Block(i, f) for i, f in enumerate(self.files)]

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def listing_fingerprint(self) -> str:
        """Cheap identity of the input, checked before a resume: file names and sizes.

        Content changes inside committed units are caught exactly by each
        unit's input digest (see :mod:`labeler.job`); this catches added,
        removed and resized files before any work starts.
        """
        h = hashlib.sha256()
        if self.source == "pydoc":
            from pydoc_data.topics import topics

            for name in sorted(topics):
                h.update(name.encode() + b"\x00" + topics[name].encode() + b"\x00")
        for f in self.files:
            h.update(f"{f}\x00{self.sizes[f]}\x00".encode())
        return "sha256:" + h.hexdigest()
