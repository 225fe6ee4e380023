"""Reading label sets: :func:`open_label_set` is the public entry point."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from softlabels.schemas.errors import LabelSetError, MissingManifestError, ShardChecksumError
from softlabels.schemas.fingerprint import sha256_bytes
from softlabels.schemas.format import Sample, decode_shard
from softlabels.schemas.manifest import MANIFEST_NAME, Manifest, ShardInfo, max_manifest_bytes
from softlabels.schemas.storage import is_local, join_url, resolve_url, retry_io


MAX_TOKENIZER_BYTES = 256 * 2**20  # all tokenizer files together (a 256k vocabulary's are ~30 MB)


def _check_no_links(fs: Any, root: str, path: str, where: str) -> None:
    """On a local disk, refuse a path that leads outside the set through a symbolic link."""
    if not is_local(fs):
        return  # object stores have no links
    real_root = os.path.realpath(fs._strip_protocol(root))
    real = os.path.realpath(fs._strip_protocol(path))
    if real != real_root and not real.startswith(real_root + os.sep):
        raise LabelSetError(f"{where} leads outside the label set (a symbolic link to {real}); refused")


def _read_at_most(fs: Any, path: str, limit: int) -> bytes:
    """The first ``limit`` bytes of ``path`` (all of it if smaller).

    A ranged read from an object store returns only what is there, but a local file read
    allocates the whole range up front (512 MiB for a manifest, whatever its size): on local
    disk the range stops at the file's size.
    """
    if is_local(fs):
        limit = min(limit, fs.size(path) + 1)
    return fs.cat_file(path, start=0, end=limit)


class LabelSet:
    """A committed label set: its manifest and its shards.

    Use :func:`open_label_set` to construct one.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._fs, self.root = resolve_url(self.url, self.storage_options)
        self._pid = os.getpid()
        self._fs.invalidate_cache()  # fsspec instances are shared: drop listings cached before the set was written
        where = join_url(self.url, MANIFEST_NAME)
        try:
            # At most one byte past the cap: a hostile 200 MB manifest is refused, not read whole.
            path = join_url(self.root, MANIFEST_NAME)
            raw = retry_io(lambda: _read_at_most(self.fs, path, max_manifest_bytes() + 1), f"read {where}")
        except FileNotFoundError as e:
            if "bucket does not exist" in str(e):  # S3's NoSuchBucket: say so, not "no manifest"
                raise MissingManifestError(f"no label set at {self.url}: the bucket does not exist") from e
            raise MissingManifestError(
                f"no {MANIFEST_NAME} at {self.url}: not a label set, or one still being written "
                "(the labeler writes the manifest last)"
            ) from e
        self.manifest: Manifest = Manifest.from_json(raw, where=where)
        self.manifest_sha256 = sha256_bytes(raw)  # what derived sets and caches record as this set's identity

    @property
    def fs(self) -> Any:
        """The filesystem, opened anew in a forked process (DataLoader workers):
        async clients such as s3fs refuse to be used across a fork."""
        if os.getpid() != self._pid:
            self._fs, _ = resolve_url(self.url, self.storage_options)
            self._pid = os.getpid()
        return self._fs

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return self.manifest.shards

    def read_shard_bytes(self, shard: ShardInfo, verify: bool = True) -> bytes:
        """Fetch one shard; with ``verify`` check its size and sha256 against the manifest.

        Raises:
            ShardChecksumError: the bytes differ from what the manifest records.
            LabelSetError: the shard is listed but missing.
        """
        where = join_url(self.url, shard.path)
        try:
            # One byte past the recorded size at most: an object larger than the manifest says is refused, not read.
            data = retry_io(lambda: self.fs.cat_file(join_url(self.root, shard.path), start=0, end=shard.bytes + 1),
                            f"read {where}")
        except FileNotFoundError as e:
            raise LabelSetError(f"shard {where} is listed in the manifest but missing") from e
        if verify:
            if len(data) != shard.bytes:
                raise ShardChecksumError(f"shard {where}: {len(data)} bytes, manifest says {shard.bytes}")
            digest = sha256_bytes(data)
            if digest != shard.sha256:
                raise ShardChecksumError(f"shard {where}: sha256 {digest} does not match manifest {shard.sha256}")
        return data

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer files the set carries (name -> bytes), each checked against the manifest's sha256.

        Sets written before 0.4.0 record no checksums: their tokenizer folder is listed and
        read as it is.

        Raises:
            LabelSetError: the set carries no tokenizer, or a listed file is missing.
            ShardChecksumError: a file's bytes differ from the manifest's sha256.
        """
        tok = self.manifest.tokenizer
        if not tok.files:
            raise LabelSetError(f"label set {self.url} carries no tokenizer files")
        folder = join_url(self.root, tok.files)
        _check_no_links(self.fs, self.root, folder, join_url(self.url, tok.files))
        if tok.checksums is None:
            try:
                entries = retry_io(lambda: self.fs.ls(folder, detail=True), f"list {join_url(self.url, tok.files)}")
            except FileNotFoundError as e:
                raise LabelSetError(f"label set {self.url}: its tokenizer folder {tok.files!r} is missing") from e
            names = sorted(e["name"].rsplit("/", 1)[-1] for e in entries if e.get("type") != "directory")
        else:
            names = sorted(tok.checksums)
        out: dict[str, bytes] = {}
        for name in names:
            where = join_url(self.url, tok.files, name)
            _check_no_links(self.fs, self.root, join_url(folder, name), where)
            left = MAX_TOKENIZER_BYTES - sum(len(d) for d in out.values())
            try:
                data = retry_io(lambda n=name: _read_at_most(self.fs, join_url(folder, n), left + 1), f"read {where}")
            except (FileNotFoundError, IsADirectoryError) as e:
                raise LabelSetError(f"tokenizer file {where} is listed in the manifest but missing") from e
            if len(data) > left:
                raise LabelSetError(f"label set {self.url}: its tokenizer files hold more than "
                                    f"{MAX_TOKENIZER_BYTES // 2**20} MiB; refused")
            if tok.checksums is not None and sha256_bytes(data) != tok.checksums[name]:
                raise ShardChecksumError(f"tokenizer file {where}: sha256 {sha256_bytes(data)} does not match the "
                                         f"manifest's {tok.checksums[name]}")
            out[name] = data
        return out

    def read_shard(self, shard: ShardInfo, verify: bool = True) -> list[Sample]:
        """Fetch, verify and decode one shard, checked against what the manifest says it holds.

        Raises:
            ShardChecksumError: size or sha256 differ from the manifest (with ``verify``).
            ShardFormatError: the bytes are not a shard of this set (another k, counts, a bad column).
        """
        m = self.manifest
        return decode_shard(self.read_shard_bytes(shard, verify), m.top_k, join_url(self.url, shard.path),
                            shard.rows, shard.tokens, m.tail_samples, shard.trained, m.spans,
                            m.target_logprobs, m.sampler_logprobs)

    def iter_samples(self, shards: Iterable[ShardInfo] | None = None, verify: bool = True) -> Iterator[Sample]:
        """Yield samples shard by shard, in manifest order unless ``shards`` is given."""
        for shard in self.manifest.shards if shards is None else shards:
            yield from self.read_shard(shard, verify)

    def __repr__(self) -> str:
        m = self.manifest
        return f"LabelSet({self.url!r}, k={m.top_k}, shards={len(m.shards)}, tokens={m.totals.tokens})"


def open_label_set(url: str, storage_options: Mapping[str, Any] | None = None) -> LabelSet:
    """Open the label set at ``url`` (local path or any fsspec URL).

    Raises:
        MissingManifestError: there is no manifest.json (not a set, or still being written).
        UnsupportedSchemaVersion: the manifest's version is unknown to this reader.
        ManifestError: the manifest is malformed.
    """
    return LabelSet(url, storage_options)
