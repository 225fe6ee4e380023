"""Corpus readers: the built-in corpora and local/remote files.

Files in any of the formats of :mod:`labeler.records` (``.txt``, ``.jsonl`` and its
``.gz``/``.zst`` forms, ``.json``, ``.parquet``, ``.arrow``), given as a path, a URL, a
glob or a folder (an HF ``save_to_disk`` folder too: the files its ``state.json`` lists,
see :mod:`labeler.sources`), through the same fsspec helper as everything else; or an HF
hub dataset, ``hf:NAME`` (a name, never a path) with ``--split``, resolved by ``datasets``
from its local cache. Large files are cut into pieces (:mod:`labeler.pieces`). Rows
are plain text (``--text-field``), chat conversations (``messages`` of ``{role, content}``,
or ShareGPT ``conversations`` of ``{from, value}``) or prompt + completion pairs:
``--format`` says which, or ``auto`` decides from the first row and says so.

The corpus is cut into *blocks* (one file each; the built-in corpora in fixed
groups of topics), listed in a fixed order. Blocks are read (lazily, see
:meth:`BlockReader.documents`) and tokenized in parallel Ray tasks; the driver
consumes them in block order, so the work plan never depends on how many workers
read. Everything that can be checked without reading all of the text (format, glob
matches, readability, the fields of the first file) is checked when the corpus is
opened, before the teacher loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from softlabels.labeler import chat
from softlabels.labeler.pieces import piece_bytes, piece_records, pieces
from softlabels.labeler.records import (FORMATS, Expanded, RowError, file_format, first_row, max_expand_bytes, records,
                                       schema_fields)
from softlabels.labeler.rowformat import ROW_FORMATS, BadRow, RowFormat, default_train_on, text_field  # noqa: F401
from softlabels.labeler.sources import _DATASET_META, _check_hub_name, _saved_datasets
from softlabels.schemas import resolve_url, retry_io
from softlabels.schemas.errors import StorageError, UserError
from softlabels.schemas.storage import is_local

log = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
PYDOC_BLOCK = 32  # topics per block of the built-in corpus
BUILTIN = ("pydoc", "pydoc-chat")  # pydoc-chat: conversations about the same topics (labeler.builtin_chat)


@dataclass(frozen=True)
class Document:
    doc_id: str  # "pydoc:<topic>", "<path>" or "<path>:<row>"
    text: str  # plain text ("" for a conversation)
    messages: list[dict[str, str]] | None = None  # chat and prompt-completion rows: checked turns


@dataclass(frozen=True)
class Block:
    """A piece of the corpus read by one task: a file, or a range of pydoc topics."""

    index: int
    path: str  # filesystem path of the file, or "pydoc"
    start: int = 0  # built-in corpora: topic range [start, stop); a file's piece (labeler.pieces.pieces)
    stop: int = 0  # 0: the whole file
    weight: int = 1  # bytes, for the progress estimate


@dataclass
class BlockStats:
    """What reading one block saw; the driver adds them up in block order."""

    documents: int = 0  # rows read, empty and skipped ones included
    empty: int = 0
    skipped: list[str] = field(default_factory=list)  # "<file>:<row>: <reason>", --on-error skip
    sha256: str = ""  # over (doc_id, text) of every document read, in order
    expanded: int = 0  # bytes decompressed (compressed JSON Lines) or decoded (Parquet) to read them


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


class BlockReader:
    """Reads blocks; picklable, so Ray tasks on any node can use it.

    ``max_expand``: bytes one block may decompress or decode (None: :func:`labeler.records.max_expand_bytes`,
    read where the reader is made, so the driver's setting travels to every task)."""

    def __init__(self, spec: str, rows: RowFormat, storage_options: Mapping[str, Any] | None, on_error: str,
                 max_expand: int | None = None) -> None:
        if on_error not in ON_ERROR:
            raise UserError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if max_expand is not None and max_expand <= 0:
            raise UserError(f"max_expand must be a positive number of bytes, got {max_expand!r}")
        self.spec, self.rows, self.on_error = spec, rows, on_error
        self.text_field = rows.text_field
        self.storage_options = dict(storage_options or {})
        self.max_expand = max_expand or max_expand_bytes()
        self._fs: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}  # filesystems are rebuilt where the task runs

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = resolve_url(self.spec, self.storage_options)[0] if self.spec not in BUILTIN else None
        return self._fs

    def read(self, block: Block) -> tuple[list[Document], BlockStats]:
        """The block's non-empty documents, and its stats (``BadRow`` if a row is bad and on_error=fail)."""
        stats = BlockStats()
        return list(self.documents(block, stats)), stats

    def documents(self, block: Block, stats: BlockStats) -> Iterator[Document]:
        """The block's non-empty documents one at a time, read (and decompressed) only as far as they are
        taken: a caller that has enough stops, and the rest of the file is never expanded. ``stats`` counts
        what has been read so far, as it goes.

        Raises:
            BadRow: a bad row (or a damaged file) and on_error=fail.
            UserError: the block expands past ``max_expand``.
        """
        sha = hashlib.sha256()
        stats.sha256 = sha.hexdigest()
        for doc in self._rows(block, stats):
            stats.documents += 1
            body = doc.text if doc.messages is None else json.dumps(doc.messages, ensure_ascii=False, sort_keys=True)
            sha.update(doc.doc_id.encode("utf-8") + b"\x00" + body.encode("utf-8") + b"\x00")
            stats.sha256 = sha.hexdigest()
            if doc.messages is None and not doc.text.strip() and self.rows.format != "prompt":  # prompts: refused
                stats.empty += 1
                continue
            yield doc

    def _bad(self, stats: BlockStats, message: str) -> None:
        if self.on_error == "fail":
            raise BadRow(f"{message} (--on-error skip skips such rows)")
        stats.documents += 1
        stats.skipped.append(message)

    def _rows(self, block: Block, stats: BlockStats) -> Iterator[Document]:
        if block.path in BUILTIN:
            from softlabels.labeler.builtin_chat import builtin_documents

            yield from builtin_documents(block.path, block.start, block.stop, self.rows.prompts)
            return
        path = block.path
        expanded = Expanded(path, self.max_expand, block.weight)
        with contextlib.ExitStack() as opened:
            if block.stop:
                recs = piece_records(path, block.start, block.stop, self.fs, expanded)
            elif file_format(path) in (".jsonl.gz", ".jsonl.zst") and block.weight > piece_bytes():
                # A large compressed file is streamed, not held: with --limit only its head may be needed.
                recs = opened.enter_context(contextlib.closing(self._streamed(path, expanded)))
            else:
                recs = records(path, retry_io(lambda: self.fs.cat_file(path), f"read {path}"), expanded)
            for rec in recs:
                stats.expanded = expanded.bytes
                if isinstance(rec, RowError):
                    self._bad(stats, str(rec))
                    continue
                where, value = rec
                try:
                    yield self._document(where, value)
                except UserError as e:
                    self._bad(stats, str(e))
            stats.expanded = expanded.bytes

    def _streamed(self, path: str, expanded: Expanded, attempts: int = 7,
                  base_delay: float = 0.5) -> Iterator[tuple[str, Any] | RowError]:
        """The records of a large compressed file, read from storage as they are taken. A storage error midway
        reopens the file and reads on from the start, skipping the records already given (bounded retries with
        backoff, as :func:`~softlabels.schemas.retry_io`): a decompressor cannot resume at an offset."""
        given, attempt = 0, 0
        while True:
            try:
                with self.fs.open(path, "rb") as fh:
                    expanded.bytes = 0  # a fresh pass
                    for i, rec in enumerate(records(path, fh, expanded)):
                        if i >= given:
                            given += 1
                            yield rec
                return
            except (StorageError, FileNotFoundError, PermissionError, IsADirectoryError):
                raise
            except OSError as e:  # records() raises only the storage's errors: damaged data is a RowError
                attempt += 1
                if attempt >= attempts:
                    raise StorageError(f"read {path}: failed after {attempt} attempts: {e}") from e
                delay = base_delay * 2 ** (attempt - 1)
                log.warning("read %s: %s (attempt %d/%d, reading again from the start in %.1fs)", path, e, attempt,
                            attempts, delay)
                time.sleep(delay)

    def _document(self, where: str, value: Any) -> Document:
        if self.rows.format == "prompt":  # plain-text prompts: a .txt line, or a row's prompt (else text) field
            if isinstance(value, str):
                return Document(where, value)
            field = self.rows.prompt_field if isinstance(value, dict) and self.rows.prompt_field in value else self.text_field
            return Document(where, text_field(value, field, where))
        if self.rows.format == "text":
            return Document(where, value if isinstance(value, str) else text_field(value, self.text_field, where))
        if isinstance(value, str):
            raise UserError(f"{where}: a .txt file holds plain text, not {self.rows.format} rows")
        return Document(where, "", self.rows.messages(value, where))


def _prompt_format(rows: RowFormat, fmt: str, where: str) -> None:
    """With --generate-with rows are prompts: plain text only when --format prompt says so."""
    if rows.prompts and fmt == "text":
        raise UserError(f"corpus {where}: text rows; with --generate-with the rows are prompts (chat rows ending with "
                        "a user turn, 'prompt' rows, or plain text with --format prompt)")


def _detect(row: Any, rows: RowFormat) -> str:
    """``--format auto``: the format of a row, the field-name flags counting as the fields they name."""
    if isinstance(row, dict):
        if rows.messages_field and rows.messages_field in row:
            return "chat"
        if rows.prompts and rows.prompt_field in row:  # prompts to generate for: no completion needed
            return "prompt-completion"
        if rows.prompt_field in row and (rows.completion_field in row if rows.completion_field else
                                         any(f in row for f in chat.COMPLETION_FIELDS)):
            return "prompt-completion"
    return chat.detect_format(row, rows.text_field)


class Corpus:
    """An opened corpus: its files (checked), its blocks, its row format, and a reader for them."""

    def __init__(
        self,
        spec: str,
        rows: RowFormat | None = None,
        storage_options: Mapping[str, Any] | None = None,
        on_error: str = "fail",
        exclude: str | None = None,
        split: str = "train",
        max_expand: int | None = None,
    ) -> None:
        """``exclude``: a location (the run's output) whose files are never corpus, even inside a corpus folder.
        ``split``: of an HF hub dataset or a ``save_to_disk`` folder of several splits.
        ``max_expand``: bytes one read task may decompress or decode (see :class:`BlockReader`)."""
        self.source = spec
        rows = rows or RowFormat()
        self.files: list[str] = []
        self.sizes: dict[str, int] = {}
        if spec in BUILTIN:
            fmt = "chat" if spec == "pydoc-chat" else "text"
            if rows.format not in ("auto", fmt):
                raise UserError(f"--format {rows.format}: the built-in corpus {spec!r} holds {fmt} rows")
            if rows.prompts and fmt != "chat":
                raise UserError(f"--generate-with needs prompts; the built-in corpus {spec!r} is plain text (its "
                                "conversations, pydoc-chat, serve as prompts: each one's first question)")
            self.rows = replace(rows, format=fmt, train_on=default_train_on(fmt, rows.train_on))
            self.reader = BlockReader(spec, self.rows, storage_options, on_error, max_expand)
            return
        hub = spec.startswith("hf:")
        if hub:
            from softlabels.labeler.builtin_chat import hub_dataset_files

            _check_hub_name(spec[3:])
            hub_files, storage_options = hub_dataset_files(spec[3:], split), None
        fs, path = resolve_url(hub_files[0] if hub else spec, storage_options)
        try:
            if hub:  # the dataset's Arrow files in the local cache
                found = {f: fs.info(f) for f in hub_files}
            # A path that exists is taken as it is (`data[1].txt` is a file, not a glob).
            elif retry_io(lambda: fs.isdir(path), f"stat {spec}"):
                if retry_io(lambda: fs.exists(f"{path}/dataset_dict.json"), f"stat {spec}"):  # save_to_disk, splits
                    if not retry_io(lambda: fs.isdir(f"{path}/{split}"), f"stat {spec}"):
                        raise UserError(f"corpus {spec!r} (a saved dataset of several splits) has no split {split!r}")
                    path = f"{path}/{split}"
                found = {
                    f: info
                    for f, info in retry_io(lambda: fs.find(path, detail=True), f"list {spec}").items()
                    if file_format(f)
                }
                found = _saved_datasets(fs, found, split, spec)
                if any(f.endswith(".arrow") for f in found):  # an HF cache folder: its JSON files describe it
                    found = {f: i for f, i in found.items() if not os.path.basename(f) in _DATASET_META}
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
        self._check_readable(fs)
        if not any(self.sizes.values()):
            raise UserError(f"corpus {spec!r} is empty ({len(self.files)} file(s), 0 bytes)")
        self.rows = self._check_files(fs, rows)
        self.reader = BlockReader(self.files[0] if hub else spec, self.rows, storage_options, on_error, max_expand)

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

    def _check_readable(self, fs: Any) -> None:
        """Local files can be opened (a dangling link, no permission: one line naming the file)."""
        if not is_local(fs):
            return
        for f in self.files:
            try:
                with fs.open(f, "rb") as fh:
                    fh.read(1)
            except OSError as e:
                raise UserError(f"corpus file {f!r} cannot be read ({e})") from e

    def _check_files(self, fs: Any, rows: RowFormat) -> RowFormat:
        """Local files readable; the first file's first row decides ``--format auto`` and must have the
        fields its format reads. Returns the row format with ``auto`` resolved.

        Remote files are not opened one by one (that would be a request per
        file before any work): listing them already proved the credentials.
        """
        first = self.files[0]
        kind = file_format(first)
        try:
            names = schema_fields(first, fs)
            row = dict.fromkeys(names) if names is not None else (None if kind == ".txt" else first_row(first, fs))
        except OSError as e:
            raise UserError(f"corpus file {first!r} cannot be read ({e})") from e
        if row is None and kind != ".txt" and rows.format == "auto":
            raise UserError(f"corpus file {first!r}: no readable row to tell its format from; give --format "
                            "(text, chat or prompt-completion)")
        if row is None:  # .txt, or a first row that is reported (and counted) when its block is read
            fmt = "text" if rows.format == "auto" else rows.format
            if fmt not in ("text", "prompt") and any(file_format(f) == ".txt" for f in self.files):
                raise UserError(f"--format {fmt}: .txt files hold plain text; {fmt} rows come in .jsonl, .json, "
                                ".parquet or .arrow files")
            _prompt_format(rows, fmt, first)
            return replace(rows, format=fmt, train_on=default_train_on(fmt, rows.train_on))
        where, value = row if names is None else (first, row)
        if rows.format == "auto":
            try:
                fmt = _detect(value, rows)
            except UserError:
                kind = "column" if names is not None else "field"
                found = names if names is not None else (sorted(value) if isinstance(value, dict) else type(value).__name__)
                raise UserError(f"{where}: no {kind} {rows.text_field!r} (found {found}); use --text-field, or give "
                                "chat rows 'messages' (or 'conversations') and prompt-completion rows 'prompt' and "
                                "'completion' (or use --format with the field flags)") from None
            log.info("corpus format: %s (detected from %s; --format says otherwise)", fmt, where)
        else:
            fmt = rows.format
        _prompt_format(rows, fmt, first)
        out = replace(rows, format=fmt, train_on=default_train_on(fmt, rows.train_on))
        if names is not None:  # a table: its columns
            need = [out.text_field] if fmt == "text" else []
            if fmt == "prompt":
                need = [out.prompt_field if out.prompt_field in row else out.text_field]
            if fmt == "prompt-completion" and out.prompts:
                need = [out.prompt_field]
            elif fmt == "prompt-completion":
                need = [out.prompt_field, out.completion_field or next((f for f in chat.COMPLETION_FIELDS if f in row),
                                                                       "completion")]
            if fmt == "chat":
                need = [out.messages_field or next((f for f in ("messages", "conversations") if f in row), "messages")]
            missing = [n for n in need if n not in row]
            if missing:
                raise UserError(f"{first}: no column {missing[0]!r} (columns: {names}); use the field-name flags")
        elif fmt == "text":
            text_field(value, out.text_field, where)
        elif fmt == "prompt":
            if not isinstance(value, str):
                text_field(value, out.prompt_field if isinstance(value, dict) and out.prompt_field in value
                           else out.text_field, where)
        else:
            out.messages(value, where)
        return out

    def blocks(self) -> list[Block]:
        if self.source in BUILTIN:
            from pydoc_data.topics import topics

            n = len(topics)
            return [Block(i, self.source, s, min(n, s + PYDOC_BLOCK)) for i, s in enumerate(range(0, n, PYDOC_BLOCK))]
        fs = self.reader.fs
        out = []
        for f in self.files:
            for start, stop, weight in pieces(f, self.sizes[f], fs):
                out.append(Block(len(out), f, start, stop, max(1, weight)))
        return out

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
        if self.source in BUILTIN:
            from pydoc_data.topics import topics

            for name in sorted(topics):
                h.update(name.encode() + b"\x00" + topics[name].encode() + b"\x00")
        for f in self.files:
            h.update(f"{f}\x00{self.sizes[f]}\x00".encode())
        return "sha256:" + h.hexdigest()
