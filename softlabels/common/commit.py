"""Writing a label set: shards, commit markers, the run record and the manifest.

Commit protocol (object stores have no atomic rename):

1. a worker writes ``shards/part-NNNNNN.parquet`` as one whole object,
2. then ``_commits/part-NNNNNN.json`` (rows, tokens, bytes, sha256, input digest),
3. once every unit of a block of :data:`INDEX_UNITS` consecutive units is committed, the
   driver gathers their markers into one index, ``_commits/index/BBBBBB.json``, and then
   deletes those markers (a resume of a large set reads a few hundred indexes, not one
   object per unit),
4. the driver writes ``manifest.json`` last.

A crash at any point loses at most the units in flight: a unit is committed once its marker
or an index holding it exists. A resume verifies units from an index by listing
``shards/`` (each shard present, with the recorded size: whole objects only, so a shard
of the right size is the one written; readers check every shard's sha256 against the
manifest), and units that still have their marker in full (read back, size and sha256).

A run record (``_labeler/run.json`` for the labeler, ``_convert/run.json`` for
``softlabels convert``) records what the run writes (teacher, tokenizer, k,
temperature, corpus, sequence config; or the source set and the encoding) so
that a resume with different settings is refused instead of mixing two label sets.

What a resume reads back and cannot use: a run record that is not a JSON object is refused
in one line naming it (without it the run cannot tell whose set this is). A marker or an
index whose content does not check out only costs its units, which are redone, as for a
shard that does not match its marker; a directory in place of one is refused in one line
(the redo could not write there, and it is not ours to delete).

Used by the labeler (driver and Ray workers) and by ``softlabels convert``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from softlabels.common.crash import crash_point
from softlabels.common.claim import CLAIMS, OutputClaim
from softlabels.common.files import sweep_partial_writes, write_whole
from softlabels.schemas import Manifest, ShardInfo, join_url, resolve_url, retry_io
from softlabels.schemas.storage import is_local
from softlabels.schemas.errors import UserError
from softlabels.schemas.fingerprint import sha256_bytes
from softlabels.schemas.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)
MAX_LOGGED = 20

RUN_RECORD = "_labeler/run.json"
INDEX_DIR = "_commits/index"  # a folder: no unit's marker (_commits/NAME.json) can be taken for an index
INDEX_UNITS = 1000  # units per commit index (``SOFTLABELS_INDEX_UNITS`` overrides it, for tests)
RUN_RECORDS = (RUN_RECORD, "_convert/run.json")  # one per command that writes label sets
COMMITS = "_commits"
SHARDS = "shards"
TOKENIZER = "tokenizer"
# Everything a label set is made of: what --overwrite may delete (the claim is handled apart).
LABEL_SET_PATHS = (MANIFEST_NAME, SHARDS, COMMITS, TOKENIZER, "_labeler", "_convert")


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
        self.claim: OutputClaim | None = None
        self._made_root = False
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = resolve_url(self.url, self.storage_options)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        self._bucket = self.root.split("/", 1)[0] if {"s3", "s3a", "gs", "gcs"} & set(protocols) else None
        self.index_units = int(os.environ.get("SOFTLABELS_INDEX_UNITS") or INDEX_UNITS)
        if self.index_units < 1:
            raise ValueError(f"SOFTLABELS_INDEX_UNITS must be >= 1, not {self.index_units}")
        # Driver side of the commit index (see :meth:`record`).
        self._indexed: dict[int, set[str]] = {}  # block -> names its index holds (found by :meth:`committed`)
        self._markers: set[str] = set()  # units whose own marker may still exist (to delete once indexed)
        self._blocks: dict[int, dict[str, dict[str, Any]]] = {}  # block -> committed units' markers, this run
        self._fresh: set[str] = set()  # units committed by this run

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
            OutputError: bad bucket, credentials or endpoint; a location holding something
                that is not a label set (with or without ``overwrite``); or (without
                ``overwrite``) a label set that another command wrote.
        """
        try:
            if self._bucket and not retry_io(lambda: self.fs.exists(self._bucket), f"stat bucket {self._bucket}"):
                # exists() says False for both "no bucket" and "not allowed": ask again to learn which.
                retry_io(lambda: self.fs.ls(self._bucket, detail=False), f"list bucket {self._bucket}")
                raise OutputError(f"output {self.url}: bucket {self._bucket!r} does not exist")
            self._refuse_other(overwrite)
        except PermissionError as e:
            raise OutputError(f"output {self.url}: {e}") from e
        except FileNotFoundError as e:
            raise OutputError(f"output {self.url}: bucket or path does not exist ({e})") from e
        except OSError as e:
            raise OutputError(f"output {self.url}: not reachable ({e})") from e

    def begin(self, identity: dict[str, Any], overwrite: bool, take_over: bool = False) -> str:
        """Claim the output for this run; returns "new", "resume" or "complete".

        The claim (:mod:`softlabels.common.claim`) is held until :meth:`finish`; a second
        run on the same output is refused while it lives.

        Raises:
            OutputError: the location holds something that is not a label set, or
                a label set made with different settings (the message names them).
            OutputClaimed: another live run holds the output.
        """
        # Other processes (workers, a crashed earlier run) write here: never
        # trust listings fsspec cached in this process.
        self.fs.invalidate_cache()
        if self.claim is None:
            self.acquire(overwrite, take_over)
        try:
            if overwrite:
                self._remove_label_set()
            # Temporary files left under the root are orphans now: their writer's claim is gone.
            sweep_partial_writes(self.fs, self.root)
            if self.exists(self.run_record):
                diffs = _diff(self._stored_identity(), identity)
                if diffs:
                    raise OutputError(
                        f"output {self.url} holds a label set made with different settings ({'; '.join(diffs)}); "
                        "use another --output, or --overwrite to start afresh"
                    )
                return "complete" if self.exists(MANIFEST_NAME) else "resume"
            self._write(self.run_record, (json.dumps(identity, indent=2, sort_keys=True) + "\n").encode())
            return "new"
        except BaseException:
            self.finish()
            raise

    def _stored_identity(self) -> dict[str, Any]:
        """The run record an earlier run left here.

        Raises:
            OutputError: it is not a JSON object (or is a directory); the message names it.
        """
        where = f"output {self.url}: its run record {self._u(self.run_record)}"
        fix = "use --overwrite to start afresh (it deletes only the label set), or another --output"
        try:
            stored = json.loads(self._read(self.run_record))
        except IsADirectoryError:
            raise OutputError(f"{where} is a directory, not a file; {fix}") from None
        except ValueError as e:  # UnicodeDecodeError too
            raise OutputError(f"{where} is not JSON ({e}); {fix}") from None
        if not isinstance(stored, dict):
            raise OutputError(f"{where} holds a JSON {type(stored).__name__}, not an object; {fix}")
        return stored

    def acquire(self, overwrite: bool = False, take_over: bool = False) -> None:
        """Claim the output (before any expensive start-up: a second run is refused at once).

        Raises:
            OutputError: the location is not one this command may write (see :meth:`check_reachable`).
            OutputClaimed: another live run holds the output.
        """
        self.fs.invalidate_cache()
        self._refuse_other(overwrite)
        self._made_root = is_local(self.fs) and not self.exists("")
        self.claim = OutputClaim(self.fs, self.root, self.url, f"softlabels {self.job}")
        self.claim.acquire(take_over)

    def finish(self, forget: bool = False) -> None:
        """Release the claim (after the manifest is published, or when the run ends otherwise).

        A run that wrote nothing into a folder it created removes the folder again (its
        released claim with it); ``forget`` removes the claim record in any case (a run that
        leaves its output as it found it).
        """
        wrote_nothing = self._made_root and set(self._entries()) <= {CLAIMS}
        if self.claim is not None:
            self.claim.release(forget=forget or wrote_nothing)
            self.claim = None
        if wrote_nothing:
            local = self.fs._strip_protocol(self.root)
            for folder in (os.path.join(local, CLAIMS), local):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass  # not empty: someone wrote there meanwhile

    def owner(self) -> tuple[int, str] | None:
        """``(generation, run id)`` of this run's claim, for writers on other processes to check."""
        return None if self.claim is None or self.claim.gen is None else (self.claim.gen, self.claim.holder.run_id)

    def follow(self, owner: tuple[int, str] | None) -> None:
        """On a worker: check before each commit that the driver's claim ``owner`` still holds the output."""
        if owner is not None:
            self.claim = OutputClaim.following(self.fs, self.root, self.url, *owner)

    def abandon(self) -> None:
        """Remove what a new run wrote (run record, tokenizer) when it ends with nothing labeled."""
        self.fs.invalidate_cache()
        if self.exists(COMMITS):  # units were committed: keep them for a resume
            self.finish()
            return
        self._remove_label_set()
        self.finish(forget=True)  # the output is as it was (a folder this run created goes too)

    def _entries(self) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1]
                    for p in retry_io(lambda: self.fs.ls(self.root, detail=False), f"list {self.url}")]
        except FileNotFoundError:
            return []

    def _refuse_other(self, overwrite: bool) -> None:
        """Raise unless the root is missing, empty, this command's label set, or (with ``overwrite``) any label set.

        ``--overwrite`` never applies to a location that is not a label set: it deletes
        only the paths a label set is made of (:data:`LABEL_SET_PATHS`).
        """
        entries = [e for e in self._entries() if e != CLAIMS]
        if not entries or self.exists(self.run_record):
            return
        if not (self.exists(MANIFEST_NAME) or any(self.exists(r) for r in RUN_RECORDS)):
            raise OutputError(
                f"output {self.url} is not empty and is not a softlabels label set "
                f"(found {sorted(entries)[0]!r}); choose an empty location (--overwrite deletes only label sets)"
            )
        if not overwrite:
            raise OutputError(
                f"output {self.url} holds a label set that `softlabels {self.job}` did not write "
                "(another command's, or one without its run record); use another location, or --overwrite to replace it"
            )

    def _remove_label_set(self) -> None:
        """Delete the paths a label set is made of (never anything else under the root)."""
        removed = []
        for rel in LABEL_SET_PATHS:
            if self.exists(rel):
                retry_io(lambda r=rel: self.fs.rm(self._p(r), recursive=True), f"remove {self._u(rel)}")
                removed.append(rel)
        self.fs.invalidate_cache()
        if removed:
            log.info("--overwrite: removed %s under %s", ", ".join(removed), self.url)
        left = [e for e in self._entries() if e not in (CLAIMS, *LABEL_SET_PATHS)]
        if left:
            log.warning("--overwrite: kept %d file(s) under %s that softlabels did not write (%s)", len(left), self.url,
                        ", ".join(sorted(left)[:5]))

    def committed(self, workers: int = 16) -> dict[str, Commit]:
        """Verified commits, by unit name; a unit not returned is (re)done.

        Units known by their own marker (a block not yet indexed when the earlier run stopped,
        or one whose markers were not yet deleted): the shard is read back and its size and
        sha256 compared with the marker, in parallel threads; a marker wins over an index entry
        (it is the later record). Units known only from an index: their shard is listed with the
        recorded size (a listing of ``shards/``).

        Raises:
            OutputError: a directory stands in place of a marker, an index or a shard a marker names.
        """
        from concurrent.futures import ThreadPoolExecutor

        self.fs.invalidate_cache()
        self._indexed, self._markers, self._blocks, self._fresh = {}, set(), {}, set()
        if not self.exists(COMMITS):
            return {}
        names = sorted(
            p.rstrip("/").rsplit("/", 1)[-1]
            for p in retry_io(lambda: self.fs.ls(self._p(COMMITS), detail=False), f"list {self._u(COMMITS)}")
        )
        markers = [n[: -len(".json")] for n in names if n.endswith(".json")]
        indexes = self._index_names() if INDEX_DIR.rsplit("/", 1)[-1] in names else []
        log.info("checking committed units under %s: %d commit index(es), %d marker(s)", self.url, len(indexes),
                 len(markers))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            blocks = [b for b in pool.map(self._read_index, indexes) if b is not None]
        if blocks:
            # The block size the set was indexed with stays (a changed setting must not split a block).
            sizes_used = {size for _, size, _ in blocks}
            if len(sizes_used) > 1:
                raise OutputError(f"output {self.url}: commit indexes of different block sizes {sorted(sizes_used)}; "
                                  "use --overwrite to start afresh")
            self.index_units = sizes_used.pop()
        indexed = {c.name: c for _, _, commits in blocks for c in commits}
        self._indexed = {block: {c.name for c in commits} for block, _, commits in blocks}
        self._markers = set(markers)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            checked = dict(zip(markers, pool.map(self._verify, markers)))
        out = {name: c for name, c in checked.items() if c is not None}
        for name, c in out.items():
            if name in indexed and c != indexed[name]:
                self._fresh.add(name)  # a unit redone after its block was indexed: the index is rewritten
        only_indexed = [c for name, c in indexed.items() if name not in checked]
        if only_indexed:
            sizes = self._shard_sizes([c.info.path[: -len(".parquet")] for c in only_indexed])
            bad = [c for c in only_indexed if sizes.get(c.info.path) != c.info.bytes]
            for c in bad[:MAX_LOGGED]:
                log.warning("shard %s is missing or not the size its index records; its unit will be redone", c.info.path)
            if len(bad) > MAX_LOGGED:
                log.warning("... and %d more such shards", len(bad) - MAX_LOGGED)
            out.update((c.name, c) for c in only_indexed if sizes.get(c.info.path) == c.info.bytes)
        return out

    def _index_names(self) -> list[str]:
        try:
            paths = retry_io(lambda: self.fs.ls(self._p(INDEX_DIR), detail=False), f"list {self._u(INDEX_DIR)}")
        except FileNotFoundError:
            return []
        return sorted(n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in paths) if n.endswith(".json"))

    def _shard_sizes(self, paths: Collection[str] = ()) -> dict[str, int]:
        """Objects under ``shards/``, relative path -> size (listed, not read), covering at least ``paths``.

        On S3 the listing goes in parallel, one request per group of up to 1,000 names that
        share all but their last three characters (``part-012xxx``); elsewhere one listing.
        """
        stems = [p.rsplit("/", 1)[-1] for p in paths]
        groups = sorted({stem[:-3] for stem in stems})
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        where = f"list {self._u(SHARDS)}"
        try:
            if len(groups) > 1 and all(groups) and {"s3", "s3a"} & set(protocols):
                entries = retry_io(lambda: self._list_by_prefix(groups), where)
            else:
                entries = retry_io(lambda: self.fs.ls(self._p(SHARDS), detail=True), where)
        except FileNotFoundError:
            return {}
        return {f"{SHARDS}/{e['name'].rstrip('/').rsplit('/', 1)[-1]}": int(e.get("size") or 0)
                for e in entries if e.get("type") != "directory"}

    def _list_by_prefix(self, prefixes: list[str], parallel: int = 16) -> list[dict[str, Any]]:
        import asyncio

        from fsspec.asyn import sync

        async def everything() -> list[dict[str, Any]]:
            gate = asyncio.Semaphore(parallel)

            async def one(prefix: str) -> list[dict[str, Any]]:
                async with gate:
                    return await self.fs._lsdir(self._p(SHARDS), refresh=True, prefix=prefix)

            return [e for part in await asyncio.gather(*(one(p) for p in prefixes)) for e in part]

        return sync(self.fs.loop, everything)

    def _read_index(self, name: str) -> tuple[int, int, list[Commit]] | None:
        """``(block, block size, commits)`` of one index (None if it is unusable: its units are then redone).

        Raises:
            OutputError: a directory stands in its place.
        """
        try:
            block = int(name[: -len(".json")])
            d = json.loads(self._read_record(f"{INDEX_DIR}/{name}", "commit index"))
            size, first = d["block_units"], d["first"]
            if type(size) is not int or size < 1 or first != block * size or not 0 < len(d["commits"]) <= size:
                raise ValueError(f"block {block} of {size!r} units cannot start at unit {first!r} "
                                 f"and hold {len(d['commits'])}")
            return block, size, [self._commit(dict(m)) for m in d["commits"]]
        except OutputError:
            raise
        except (FileNotFoundError, ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("commit index %s is unusable (%s); its units will be redone unless their markers remain",
                        name, e)
            return None

    @staticmethod
    def _commit(marker: dict[str, Any]) -> Commit:
        name = marker.pop("name")
        inputs = marker.pop("inputs", None)
        info = ShardInfo(**marker)
        if not isinstance(name, str) or info.path != f"{SHARDS}/{name}.parquet":
            raise ValueError(f"unit {name!r} names shard {info.path!r}")
        counts = (info.rows, info.tokens, info.bytes, 0 if info.trained is None else info.trained)
        if not all(type(v) is int and v >= 0 for v in counts) or not isinstance(info.sha256, str):
            raise ValueError(f"unit {name}: bad counts or digest")
        if inputs is not None and not isinstance(inputs, str):
            raise ValueError(f"unit {name}: input digest {inputs!r} is not a string")
        return Commit(name, info, inputs)

    def _read_record(self, rel: str, what: str) -> bytes:
        """A marker's, an index's or a shard's bytes; a directory in its place is refused (a redo could not
        write there)."""
        try:
            return self._read(rel)
        except IsADirectoryError:
            raise OutputError(f"output {self.url}: {what} {self._u(rel)} is a directory, not a file; remove it "
                              "(its units are redone), or use --overwrite to start afresh") from None

    def _verify(self, name: str) -> Commit | None:
        """The unit's commit if its marker and shard check out; None (the unit is redone) if not.

        Raises:
            OutputError: a directory stands in place of the marker or of its shard.
        """
        try:
            marker = json.loads(self._read_record(f"{COMMITS}/{name}.json", "commit marker"))
            if not isinstance(marker, dict):
                raise ValueError("not a JSON object")
            commit = self._commit({**marker, "name": name})
            data = self._read_record(commit.info.path, "shard")
        except OutputError:
            raise
        except (FileNotFoundError, ValueError, TypeError, KeyError) as e:
            log.warning("commit %s is unusable (%s); its unit will be redone", name, e)
            return None
        if len(data) != commit.info.bytes or sha256_bytes(data) != commit.info.sha256:
            log.warning("shard %s does not match its commit marker; its unit will be redone", commit.info.path)
            return None
        return commit

    # -- driver: the commit index ----------------------------------------------
    def record(self, position: int, name: str, info: ShardInfo, inputs: str | None, resumed: bool = False) -> None:
        """Note that unit ``position`` (0-based, in plan order) is committed (by this run, or ``resumed``).

        When every unit of its block is noted, the block's index is written (unless an earlier
        run's index already holds exactly these units) and the units' own markers are deleted.
        Every unit must be noted once, in any order.
        """
        block = position // self.index_units
        entries = self._blocks.setdefault(block, {})
        entries[name] = {**asdict(info), "name": name, **({"inputs": inputs} if inputs else {})}
        if not resumed:
            self._markers.add(name)
            self._fresh.add(name)
        if len(entries) == self.index_units:
            self._close_block(block, self._blocks.pop(block))

    def _close_block(self, block: int, entries: dict[str, dict[str, Any]]) -> None:
        if self._indexed.get(block) != set(entries) or not self._fresh.isdisjoint(entries):
            if self.claim is not None:
                self.claim.check()
            body = {"block_units": self.index_units, "first": block * self.index_units,
                    "commits": [entries[n] for n in sorted(entries)]}
            self._write(f"{INDEX_DIR}/{block:06d}.json", json.dumps(body, sort_keys=True).encode())
            crash_point(f"{self.job}.indexed")
        stale = sorted(n for n in entries if n in self._markers)
        if stale:
            paths = [self._p(f"{COMMITS}/{n}.json") for n in stale]
            what = f"remove {len(paths)} commit marker(s) under {self._u(COMMITS)}"
            try:
                retry_io(lambda: self.fs.rm(paths), what)  # one request per 1,000 objects on S3
            except FileNotFoundError:  # some were gone already: the others one by one
                for path in paths:
                    try:
                        retry_io(lambda p=path: self.fs.rm_file(p), what)
                    except FileNotFoundError:
                        pass
            self._markers.difference_update(stale)

    # -- workers --------------------------------------------------------------
    def commit_unit(self, name: str, shard_bytes: bytes, rows: int, tokens: int, inputs: str | None = None,
                    trained: int | None = None) -> ShardInfo:
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
            trained=trained,
        )
        if self.claim is not None:
            self.claim.check()  # a run that lost its output stops before writing into it
        self._write(info.path, shard_bytes)
        crash_point(f"{self.job}.shard-written")
        marker = {**asdict(info), "inputs": inputs} if inputs else asdict(info)
        self._write(f"{COMMITS}/{name}.json", json.dumps(marker, sort_keys=True).encode())
        return info

    def read_manifest(self) -> Manifest:
        return Manifest.from_json(self._read(MANIFEST_NAME), self._u(MANIFEST_NAME))

    # -- driver: publishing --------------------------------------------------
    def write_tokenizer(self, tokenizer: Any) -> dict[str, str]:
        """Copy the tokenizer files into the set so students can use them without the teacher.

        Returns each file's sha256 (name -> hex), which the manifest records. Idempotent:
        the same tokenizer writes the same bytes, so a resumed run simply writes them again.
        """
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            return self.write_files(TOKENIZER, {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.is_file()})

    def write_files(self, folder: str, files: Mapping[str, bytes]) -> dict[str, str]:
        """Publish ``files`` (name -> bytes) under ``folder``, in name order; returns their sha256."""
        for name in sorted(files):
            self._write(f"{folder}/{name}", files[name])
        return {name: sha256_bytes(files[name]) for name in sorted(files)}

    def write_manifest(self, manifest: Manifest) -> None:
        """The commit of the whole set: written last, once every shard is committed, by the claim's holder."""
        if self.claim is not None:
            self.claim.check()
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
