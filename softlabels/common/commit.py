"""Writing a label set: shards, commit markers, the run record and the manifest.

Commit protocol (object stores have no atomic rename):

1. a worker writes ``shards/part-NNNNNN.parquet`` as one whole object,
2. then ``_commits/part-NNNNNN.json`` (rows, tokens, bytes, sha256),
3. the driver writes ``manifest.json`` last, from the markers.

A run record (``_labeler/run.json`` for the labeler, ``_convert/run.json`` for
``softlabels convert``) records what the run writes (teacher, tokenizer, k,
temperature, corpus, sequence config; or the source set and the encoding) so
that a resume with different settings is refused instead of mixing two label sets.

Used by the labeler (driver and Ray workers) and by ``softlabels convert``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from softlabels.common.crash import crash_point
from softlabels.common.files import sweep_partial_writes, write_whole
from softlabels.schemas import Manifest, ShardInfo, join_url, resolve_url, retry_io
from softlabels.schemas.errors import UserError
from softlabels.schemas.fingerprint import sha256_bytes
from softlabels.schemas.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

RUN_RECORD = "_labeler/run.json"
COMMITS = "_commits"
SHARDS = "shards"
TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class Commit:
    """A verified commit marker: the shard's record and the digest of the unit's input."""

    name: str
    info: ShardInfo
    inputs: str | None


class OutputError(UserError):
    """The output location cannot be used (foreign content, mismatched resume, unreachable)."""


class LabelSetWriter:
    """All writes of one label set go through here (driver and workers alike)."""

    def __init__(
        self, url: str, storage_options: Mapping[str, Any] | None = None, run_record: str = RUN_RECORD, job: str = "labeler"
    ) -> None:
        """``run_record``: where this kind of run records its identity; ``job`` names its crash points."""
        self.run_record, self.job = run_record, job
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = resolve_url(self.url, self.storage_options)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        self._bucket = self.root.split("/", 1)[0] if {"s3", "s3a", "gs", "gcs"} & set(protocols) else None

    # -- small helpers -------------------------------------------------------
    def _p(self, rel: str) -> str:
        return join_url(self.root, rel) if rel else self.root

    def _u(self, rel: str) -> str:
        return join_url(self.url, rel) if rel else self.url

    def _write(self, rel: str, data: bytes) -> None:
        # Whole objects only: on a local disk, temp file + rename. (No makedirs on object
        # stores: there it may even create a missing bucket, which must stay an error.)
        write_whole(self.fs, self._p(rel), data, f"write {self._u(rel)}")

    def _read(self, rel: str) -> bytes:
        return retry_io(lambda: self.fs.cat_file(self._p(rel)), f"read {self._u(rel)}")

    def exists(self, rel: str) -> bool:
        return retry_io(lambda: self.fs.exists(self._p(rel)), f"stat {self._u(rel)}")

    # -- driver: before any work ---------------------------------------------
    def check_reachable(self, overwrite: bool = False) -> None:
        """Fail early (one line), before Ray starts, if the output cannot be used.

        Raises:
            OutputError: bad bucket, credentials or endpoint; or (without
                ``overwrite``) a location holding something that is not a label set.
        """
        try:
            if self._bucket and not retry_io(lambda: self.fs.exists(self._bucket), f"stat bucket {self._bucket}"):
                # exists() says False for both "no bucket" and "not allowed": ask again to learn which.
                retry_io(lambda: self.fs.ls(self._bucket, detail=False), f"list bucket {self._bucket}")
                raise OutputError(f"output {self.url}: bucket {self._bucket!r} does not exist")
            if self.exists("") and not overwrite:
                self._refuse_foreign()
        except PermissionError as e:
            raise OutputError(f"output {self.url}: {e}") from e
        except FileNotFoundError as e:
            raise OutputError(f"output {self.url}: bucket or path does not exist ({e})") from e
        except OSError as e:
            raise OutputError(f"output {self.url}: not reachable ({e})") from e

    def begin(self, identity: dict[str, Any], overwrite: bool) -> str:
        """Claim the output for this run; returns "new", "resume" or "complete".

        Raises:
            OutputError: the location holds something that is not a label set, or
                a label set made with different settings (the message names them).
        """
        # Other processes (workers, a crashed earlier run) write here: never
        # trust listings fsspec cached in this process.
        self.fs.invalidate_cache()
        if overwrite and self.exists(""):
            log.info("--overwrite: removing everything under %s", self.url)
            retry_io(lambda: self.fs.rm(self.root, recursive=True), f"remove {self.url}")
            self.fs.invalidate_cache()
        if self.exists(self.run_record):
            stored = json.loads(self._read(self.run_record))
            diffs = _diff(stored, identity)
            if diffs:
                raise OutputError(
                    f"output {self.url} holds a label set made with different settings ({'; '.join(diffs)}); "
                    "use another --output, or --overwrite to start afresh"
                )
            sweep_partial_writes(self.fs, self.root)
            return "complete" if self.exists(MANIFEST_NAME) else "resume"
        if self.exists(""):
            self._refuse_foreign()
        self._write(self.run_record, (json.dumps(identity, indent=2, sort_keys=True) + "\n").encode())
        return "new"

    def abandon(self) -> None:
        """Remove what a new run wrote (run record, tokenizer) when it ends with nothing labeled."""
        self.fs.invalidate_cache()
        if self.exists(COMMITS):
            return  # units were committed: keep them for a resume
        retry_io(lambda: self.fs.rm(self.root, recursive=True), f"remove {self.url}")

    def _refuse_foreign(self) -> None:
        """Raise unless the (existing) root is empty or holds this tool's run record."""
        if self.exists(self.run_record):
            return
        entries = retry_io(lambda: self.fs.ls(self.root, detail=False), f"list {self.url}")
        if entries:
            raise OutputError(
                f"output {self.url} is not empty and is not a softlabels label set "
                f"(found {entries[0].rsplit('/', 1)[-1]!r}); choose an empty location"
            )

    def committed(self, workers: int = 16) -> dict[str, Commit]:
        """Verified commits: marker present, shard object present with matching size and sha256.

        Shards are read back and hashed in parallel threads (I/O bound), so a
        resume of a large set does not verify one object at a time.
        """
        from concurrent.futures import ThreadPoolExecutor

        self.fs.invalidate_cache()
        if not self.exists(COMMITS):
            return {}
        paths = sorted(
            p
            for p in retry_io(lambda: self.fs.ls(self._p(COMMITS), detail=False), f"list {self._u(COMMITS)}")
            if p.endswith(".json")
        )
        with ThreadPoolExecutor(max_workers=workers) as pool:
            checked = list(pool.map(self._verify, paths))
        return {c.name: c for c in checked if c is not None}

    def _verify(self, marker_path: str) -> Commit | None:
        name = marker_path.rsplit("/", 1)[-1][: -len(".json")]
        try:
            d = json.loads(retry_io(lambda: self.fs.cat_file(marker_path), f"read {marker_path}"))
            inputs = d.pop("inputs", None)
            info = ShardInfo(**d)
            data = self._read(info.path)
        except (FileNotFoundError, ValueError, TypeError) as e:
            log.warning("commit %s is unusable (%s); its unit will be redone", name, e)
            return None
        if len(data) != info.bytes or sha256_bytes(data) != info.sha256:
            log.warning("shard %s does not match its commit marker; its unit will be redone", info.path)
            return None
        return Commit(name, info, inputs)

    # -- workers --------------------------------------------------------------
    def commit_unit(self, name: str, shard_bytes: bytes, rows: int, tokens: int, inputs: str | None = None) -> ShardInfo:
        """Write one unit's shard, then its marker. Idempotent: a redo overwrites both.

        ``inputs`` (the unit's input digest) goes into the marker only: a
        resume compares it with the unit it plans now.
        """
        info = ShardInfo(
            path=f"{SHARDS}/{name}.parquet",
            rows=rows,
            tokens=tokens,
            bytes=len(shard_bytes),
            sha256=sha256_bytes(shard_bytes),
        )
        self._write(info.path, shard_bytes)
        crash_point(f"{self.job}.shard-written")
        marker = {**asdict(info), "inputs": inputs} if inputs else asdict(info)
        self._write(f"{COMMITS}/{name}.json", json.dumps(marker, sort_keys=True).encode())
        return info

    def read_manifest(self) -> Manifest:
        return Manifest.from_json(self._read(MANIFEST_NAME), self._u(MANIFEST_NAME))

    # -- driver: publishing --------------------------------------------------
    def write_tokenizer(self, tokenizer: Any) -> None:
        """Copy the tokenizer files into the set so students can use them without the teacher."""
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for f in sorted(Path(tmp).iterdir()):
                if f.is_file():
                    self._write(f"{TOKENIZER}/{f.name}", f.read_bytes())

    def write_file(self, rel: str, data: bytes) -> None:
        """Publish one whole file at ``rel`` (relative to the root), e.g. a tokenizer file."""
        self._write(rel, data)

    def write_manifest(self, manifest: Manifest) -> None:
        """The commit of the whole set: written last, once every shard is committed."""
        self._write(MANIFEST_NAME, manifest.to_json().encode())


def _diff(stored: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(new)):
        a, b = stored.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return out
