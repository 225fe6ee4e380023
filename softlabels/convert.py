"""``softlabels convert``: re-encode a whole label set (e.g. ``compact`` -> ``fp16`` for other tools).

The output is a label set like any other, written with the labeler's commit
protocol: each source shard is read (size and sha256 checked), decoded,
re-encoded and written as one whole object, then its commit marker; the
manifest goes last and records what the set was converted from. Re-running the
same command resumes: committed shards are verified and skipped, and the
result is byte-identical to an uninterrupted conversion (encodings are
deterministic). A resume from another source or to another encoding is refused.

Needs only the core install (pyarrow, numpy, fsspec).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import posixpath
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from typing import Any

from softlabels import __version__
from softlabels.common.cli import debug_flag, parse_storage_options
from softlabels.common.commit import LabelSetWriter
from softlabels.schemas import (
    Encoding,
    LabelSet,
    Manifest,
    ShardInfo,
    TokenizerInfo,
    Totals,
    join_url,
    open_label_set,
    retry_io,
)
from softlabels.schemas.errors import UserError
from softlabels.schemas.format import (
    SCHEMA_VERSION,
    encode_samples,
    table_to_parquet_bytes,
)
from softlabels.schemas.storage import is_local, resolve_url

log = logging.getLogger(__name__)

RUN_RECORD = "_convert/run.json"
DEFAULT_ENCODING = "fp16"  # what a conversion is usually for: plain columns every Parquet reader understands


@dataclasses.dataclass
class ConvertSummary:
    source: str
    output: str
    encoding: str
    status: str  # "written" or "already complete"
    shards: int
    resumed: int
    source_bytes: int
    bytes: int
    wall_s: float


def _refuse_overlap(ls: LabelSet, output: str, storage_options: Mapping[str, Any] | None) -> None:
    """The output must be neither the source, nor inside it, nor around it (``--overwrite`` would delete it)."""
    fs, root = resolve_url(output, storage_options)
    if type(fs) is not type(ls.fs):
        return
    a, b = ls.root.rstrip("/"), root.rstrip("/")
    if is_local(fs):
        a, b = os.path.realpath(fs._strip_protocol(a)), os.path.realpath(fs._strip_protocol(b))
    if a == b or b.startswith(a + "/") or a.startswith(b + "/"):
        raise UserError(f"--output {output} overlaps the source {ls.url}; convert into a separate location")


def convert_shard(ls: LabelSet, shard: ShardInfo, encoding: Encoding) -> bytes:
    """Read (verified against the manifest), decode and re-encode one shard; deterministic.

    Ids are encoded against the manifest's vocabulary, or above it where a teacher with a
    padded LM head stored higher ids.
    """
    samples = ls.read_shard(shard)
    vocab = max([ls.manifest.id_space] + [int(s.topk_ids.max()) + 1 for s in samples if s.topk_ids.size])
    return table_to_parquet_bytes(encode_samples(samples, ls.manifest.top_k, encoding, vocab))


def _copy_tokenizer(ls: LabelSet, writer: LabelSetWriter) -> TokenizerInfo:
    """Copy the source's tokenizer files (each checked against its manifest); returns the new tokenizer record."""
    tok = ls.manifest.tokenizer
    if tok.files and tok.checksums is None and not retry_io(lambda: ls.fs.exists(join_url(ls.root, tok.files)),
                                                            f"stat {ls.url}/{tok.files}"):
        log.warning("source %s names tokenizer folder %r but has none (an early set); the copy carries none",
                    ls.url, tok.files)
        return dataclasses.replace(tok, files=None, checksums=None)
    if not tok.files:
        return tok
    return dataclasses.replace(tok, checksums=writer.write_files(tok.files, ls.tokenizer_files()))


def convert(
    source: str,
    output: str,
    encoding: str = DEFAULT_ENCODING,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    workers: int = 4,
    take_over: bool = False,
) -> ConvertSummary:
    """Re-encode the label set at ``source`` into a new one at ``output`` (resumable).

    Raises:
        UserError: a bad encoding or location, ``output`` the same as ``source``, a resume of
            another conversion at ``output``, or a source shard that fails its checksum.
    """
    t0 = time.time()
    enc = Encoding.parse(encoding)
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    ls = open_label_set(source, storage_options)
    _refuse_overlap(ls, output, storage_options)
    origin = {
        "url": ls.url,
        "manifest_sha256": ls.manifest_sha256,
        "encoding": ls.manifest.encoding,
        "labeler_version": ls.manifest.labeler_version,
    }
    writer = LabelSetWriter(output, storage_options, run_record=RUN_RECORD, job="convert")
    writer.check_reachable(overwrite)
    identity = {"source_manifest_sha256": origin["manifest_sha256"], "encoding": enc.to_dict(), "schema_version": SCHEMA_VERSION}
    names = [posixpath.basename(s.path).removesuffix(".parquet") for s in ls.shards]
    if len(set(names)) != len(names):
        raise UserError(f"source {ls.url}: two shards share a file name; cannot convert it shard by shard")
    status = writer.begin(identity, overwrite, take_over)
    try:
        if status == "complete":
            m = writer.read_manifest()
            return ConvertSummary(ls.url, output, enc.name, "already complete", len(m.shards), len(m.shards),
                                  ls.manifest.totals.bytes, m.totals.bytes, time.time() - t0)
        done = writer.committed() if status == "resume" else {}
        tokenizer = _copy_tokenizer(ls, writer)

        out: dict[int, ShardInfo] = {}
        resumed = 0
        todo = []
        for i, (name, shard) in enumerate(zip(names, ls.shards)):
            commit = done.get(name)
            if commit is not None and commit.inputs == shard.sha256:
                out[i] = commit.info
                writer.record(i, name, commit.info, commit.inputs, resumed=True)
                resumed += 1
            else:
                todo.append((i, name, shard))
        if resumed:
            log.info("resuming: %d of %d shard(s) already converted and verified", resumed, len(names))

        def one(name: str, shard: ShardInfo) -> ShardInfo:
            data = convert_shard(ls, shard, enc)
            return writer.commit_unit(name, data, rows=shard.rows, tokens=shard.tokens, inputs=shard.sha256,
                                      trained=shard.trained)

        last_log = time.time()
        pool = ThreadPoolExecutor(max_workers=workers)  # numpy and zstd release the GIL; reads and writes overlap
        try:
            futures = {pool.submit(one, name, shard): i for i, name, shard in todo}
            for f in as_completed(futures):
                i = futures[f]
                out[i] = f.result()
                writer.record(i, names[i], out[i], ls.shards[i].sha256)
                if time.time() - last_log > 10 or len(out) == len(names):
                    log.info("converted %d/%d shards", len(out), len(names))
                    last_log = time.time()
        finally:
            pool.shutdown(cancel_futures=True)

        shards = tuple(out[i] for i in range(len(names)))
        manifest = dataclasses.replace(
            ls.manifest,
            tokenizer=tokenizer,
            shards=shards,
            totals=Totals(sum(s.rows for s in shards), sum(s.tokens for s in shards), sum(s.bytes for s in shards),
                          ls.manifest.totals.trained),
            encoding=enc.to_dict(),
            labeler_version=__version__,
            created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            converted_from=origin,
            schema_version=SCHEMA_VERSION,
        )
        writer.write_manifest(Manifest.from_json(manifest.to_json(), "converted manifest"))
    finally:
        writer.finish()
    return ConvertSummary(ls.url, output, enc.name, "written", len(shards), resumed, ls.manifest.totals.bytes,
                          manifest.totals.bytes, time.time() - t0)


# -- command line -----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convert`` to the ``softlabels`` command."""
    c = sub.add_parser(
        "convert", help="re-encode a label set (e.g. compact -> fp16, readable by any Parquet tool); resumable",
        description="Re-encode every shard of a label set into a new label set. Same commit protocol as the "
        "labeler: re-running the same command resumes, and the result is byte-identical.",
    )
    c.add_argument("url", help="source label set: local path, s3://bucket/prefix or any fsspec URL")
    c.add_argument("--output", required=True, help="where to write the converted set (a new or resumable location)")
    c.add_argument("--encoding", default=DEFAULT_ENCODING, metavar="NAME[:max_kl=X]",
                   help="fp16 (plain nested lists: pyarrow, pandas, polars, duckdb, HF datasets read them), packed, "
                   "packed-q8 or compact (default: %(default)s)")
    c.add_argument("--workers", type=int, default=4, help="shards converted at once (default: %(default)s)")
    c.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec storage option for both sets (repeatable)")
    c.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="delete the label set at --output (only the paths a label set is made of) and start afresh "
                   "(default: off)")
    c.add_argument("--take-over", action=argparse.BooleanOptionalAction, default=False,
                   help="claim --output even though another run's claim has not expired (that run must be dead)")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    debug_flag(c)
    c.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    s = convert(args.url, args.output, args.encoding, parse_storage_options(args.storage_option), args.overwrite,
                args.workers, args.take_over)
    if args.json:
        print(json.dumps(dataclasses.asdict(s)))
        return 0
    rows = [
        ("source", s.source),
        ("output", f"{s.output} ({s.encoding})"),
        ("status", s.status),
        ("shards", f"{s.shards} ({s.resumed} resumed)"),
        ("bytes", f"{s.source_bytes:,} -> {s.bytes:,} ({s.bytes / max(1, s.source_bytes):.2f}x)"),
        ("wall time", f"{s.wall_s:.1f} s"),
    ]
    for k, v in rows:
        print(f"{k:<10} {v}", file=sys.stdout)
    return 0
