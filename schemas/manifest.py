"""The manifest: ``manifest.json`` at a label set's root, written last.

A label set without a manifest is "still being written" and readers refuse
it. The manifest never holds credentials or storage options.

A label set from a shared bucket is untrusted input, so the reader checks the
manifest before anything else is fetched or allocated: its size and nesting, the
type of every field, non-negative counts that add up, a vocabulary and ``top_k``
within bounds, and every path it names confined to the set.
"""

from __future__ import annotations

import contextlib
import gc
import json
import operator
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from softlabels.schemas.encodings import MAX_TOP_K, MAX_VOCAB, Encoding
from softlabels.schemas.errors import ManifestError, UnsupportedSchemaVersion
from softlabels.schemas.format import SCHEMA_VERSION, SUPPORTED_VERSIONS

MANIFEST_NAME = "manifest.json"
# Bounds a hostile manifest must not get past (a real one is far inside them).
MAX_MANIFEST_BYTES = 512 * 2**20  # ~2.5M shards; SOFTLABELS_MAX_MANIFEST_BYTES raises it


@dataclass(frozen=True)
class TeacherInfo:
    """Which teacher produced the labels."""

    id: str  # alias, HF id or the path the user gave
    revision: str | None  # hub commit, or None for a local directory
    weights_sha256: str | None  # hash of the weight files for local directories
    dtype: str  # compute dtype of the forward pass, e.g. "float32"


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer; students must match ``fingerprint``."""

    name: str
    vocab_size: int  # number of distinct ids (len(tokenizer)), the label id range
    fingerprint: str  # schemas.tokenizer_fingerprint(tokenizer)
    files: str | None = "tokenizer"  # folder (relative) holding the tokenizer files, if copied
    # sha256 of each file in `files` (name -> hex); readers fetch exactly these and verify them
    # (sets written before 0.4.0 have none: their folder is listed and read as it is)
    checksums: dict[str, str] | None = None
    # Every stored id is below it: the teacher's LM-head rows where they exceed the tokenizer's length
    # (padded heads: Qwen2.5's 151,936 rows for 151,665 tokens). None (sets before 0.5.0): vocab_size,
    # though ids up to a padded head's rows may occur.
    id_space: int | None = None


@dataclass(frozen=True)
class CorpusInfo:
    """Where the text came from."""

    source: str  # "pydoc" or the URL/glob the user gave
    fingerprint: str  # sha256 over the documents' texts, in reading order
    documents: int  # documents read (empty ones included)
    empty_documents: int = 0  # skipped because they had no text
    skipped_documents: int = 0  # undecodable rows skipped under --on-error skip


@dataclass(frozen=True)
class SequenceConfig:
    """How token sequences were cut from documents."""

    max_length: int
    packing: bool = False
    add_eos: bool = False  # EOS appended to each document before chunking
    limit: int | None = None  # at most this many sequences (None: all)
    shard_tokens: int = 32768  # a unit (= shard) closes once it holds this many tokens


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard."""

    path: str  # relative to the label set root, e.g. "shards/part-000000.parquet"
    rows: int
    tokens: int
    bytes: int
    sha256: str
    trained: int | None = None  # positions holding labels (v4; None before: every token)


@dataclass(frozen=True)
class Totals:
    sequences: int
    tokens: int
    bytes: int
    trained: int | None = None  # positions holding labels (v4; None before: every token)


def _check_inside(path: str, what: str = "shard path") -> None:
    # Paths a manifest names (shards, the tokenizer folder) must stay inside the label set:
    # no schemes, no absolute paths, no "..": a hand-edited manifest must not make a reader
    # fetch objects from elsewhere.
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{what} must be a non-empty string, got {path!r}")
    norm = posixpath.normpath(path)
    if "://" in path or path.startswith("/") or "\\" in path or norm.startswith("..") or norm != path:
        raise ManifestError(f"{what} {path!r} is not a plain relative path inside the label set")


# A shard path _check_inside accepts, written so that a whole column is checked in C: names of word
# characters, dots and dashes, not starting with a dot, joined by single slashes. Others get the full check.
_PLAIN_PATH = re.compile(r"[\w-][\w.-]*(?:/[\w-][\w.-]*)*")


def _check_shards(shards: tuple[ShardInfo, ...], totals: Totals) -> None:
    """Each shard path inside the set and listed once, counts that hold together and add up to ``totals``.

    A 10B-token set lists ~300,000 shards, so this goes a column at a time; only where a check
    fails are the shards gone through one by one, for the message naming the first bad one.
    """
    paths = [s.path for s in shards]
    rows, tokens, nbytes = ([getattr(s, name) for s in shards] for name in ("rows", "tokens", "bytes"))
    trained = [s.tokens if s.trained is None else s.trained for s in shards]
    if not (set(map(type, paths)) <= {str} and all(map(_PLAIN_PATH.fullmatch, paths)) and len(set(paths)) == len(paths)
            and min(rows, default=1) >= 1 and all(map(operator.ge, tokens, rows)) and min(nbytes, default=1) >= 1
            and all(map(operator.le, trained, tokens))):
        seen = set()
        for s in shards:
            _check_inside(s.path)
            if s.path in seen:
                raise ManifestError(f"shard {s.path!r} is listed twice")
            seen.add(s.path)
            if s.rows < 1 or s.tokens < s.rows or s.bytes < 1:
                raise ManifestError(f"shard {s.path!r}: rows {s.rows}, tokens {s.tokens}, bytes {s.bytes} "
                                    "(a shard holds at least one row of at least one token)")
            if s.trained is not None and s.trained > s.tokens:
                raise ManifestError(f"shard {s.path!r}: {s.trained} trained positions of {s.tokens} tokens")
    for name, value in (("sequences", sum(rows)), ("tokens", sum(tokens)), ("bytes", sum(nbytes))):
        if getattr(totals, name) != value:
            raise ManifestError(f"totals.{name} is {getattr(totals, name)}, the shards add up to {value}")
    if totals.trained is not None and totals.trained != sum(trained):
        raise ManifestError(f"totals.trained is {totals.trained}, the shards add up to {sum(trained)}")


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to trust and interpret a label set."""

    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    top_k: int
    temperature: float
    corpus: CorpusInfo
    sequence: SequenceConfig
    shards: tuple[ShardInfo, ...]
    totals: Totals
    labeler_version: str
    created_at: str  # ISO 8601, UTC
    # Encoding.to_dict() of the label columns; v1 sets hold a column-type record, read as "fp16".
    encoding: dict[str, Any] = field(default_factory=lambda: {"name": "fp16"})
    tail_samples: int = 0  # S: tail draws stored per position (0: none)
    # `softlabels convert`: the set this one was re-encoded from (url, manifest_sha256, encoding, labeler_version)
    converted_from: dict[str, Any] | None = None
    # v4: how the corpus became token sequences and which positions are trained (see schemas/README.md):
    # format, train_on, chat_template_sha256, special_tokens, long_conversations
    rendering: dict[str, Any] | None = None
    spans: bool = False  # v5: every shard has a `spans` column (each position's token's bytes of the text)
    target_logprobs: bool = False  # v6: every shard has a `target_logprob` column (the next token's teacher log-prob)
    # v7 (label --generate-with): who wrote the responses and how (generator id and weights sha256, the sampling
    # settings, seed, stop ids); every shard then has a `sampler_logprob` column
    generation: dict[str, Any] | None = None
    sampler_logprobs: bool = False
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version not in SUPPORTED_VERSIONS:
            raise UnsupportedSchemaVersion(
                f"label set has schema_version {self.schema_version!r}; "
                f"this softlabels supports {list(SUPPORTED_VERSIONS)} (upgrade softlabels to read it)"
            )
        vocab = self.tokenizer.vocab_size
        if not _is_int(vocab) or not 1 <= vocab <= MAX_VOCAB:
            raise ManifestError(f"tokenizer.vocab_size must be an int in 1..{MAX_VOCAB}, got {vocab!r}")
        space = self.tokenizer.id_space
        if space is not None and not vocab <= space <= MAX_VOCAB:
            raise ManifestError(f"tokenizer.id_space must be an int in {vocab}..{MAX_VOCAB} (at least vocab_size), "
                                f"got {space!r}")
        if not _is_int(self.top_k) or not 1 <= self.top_k <= MAX_TOP_K:
            raise ManifestError(f"top_k must be an int in 1..{MAX_TOP_K}, got {self.top_k!r}")
        if self.top_k > vocab:
            raise ManifestError(f"top_k {self.top_k} exceeds vocab_size {vocab}")
        if not (isinstance(self.temperature, float) and 0 < self.temperature < float("inf")):
            raise ManifestError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not _is_int(self.tail_samples) or not 0 <= self.tail_samples <= 255:
            raise ManifestError(f"tail_samples must be an int in 0..255, got {self.tail_samples!r}")
        if not isinstance(self.spans, bool):
            raise ManifestError(f"spans must be true or false, got {self.spans!r:.80}")
        for name in ("target_logprobs", "sampler_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ManifestError(f"{name} must be true or false, got {getattr(self, name)!r:.80}")
        try:
            Encoding.from_dict(self.encoding)
        except (ValueError, TypeError) as e:
            raise ManifestError(f"encoding {self.encoding!r}: {e}") from e
        if self.tokenizer.files is not None:
            _check_inside(self.tokenizer.files, "tokenizer folder")
        for name, digest in (self.tokenizer.checksums or {}).items():
            if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
                raise ManifestError(f"tokenizer file name {name!r} is not a plain file name")
            if not isinstance(digest, str):
                raise ManifestError(f"tokenizer file {name!r}: sha256 must be a string, got {digest!r:.80}")
        if self.tokenizer.checksums is not None and not self.tokenizer.files:
            raise ManifestError("tokenizer.checksums given without a tokenizer folder (tokenizer.files)")
        _check_flat("converted_from", self.converted_from)
        _check_flat("rendering", self.rendering, depth=1)
        _check_flat("encoding", self.encoding)
        _check_flat("generation", self.generation)
        _check_shards(self.shards, self.totals)

    @property
    def id_space(self) -> int:
        """Every stored token id is below it (``tokenizer.id_space``; ``vocab_size`` for sets before 0.5.0)."""
        return self.tokenizer.id_space or self.tokenizer.vocab_size

    @property
    def label_encoding(self) -> Encoding:
        """The shards' label encoding (``fp16`` for v1 sets)."""
        return Encoding.from_dict(self.encoding)

    def to_json(self) -> str:
        """Serialize (stable key order, human-readable)."""
        d = asdict(self)
        for name in ("converted_from", "rendering", "generation"):
            if d[name] is None:
                del d[name]  # nothing to say
        for name in ("spans", "target_logprobs", "sampler_logprobs"):
            if not d[name]:
                del d[name]
        ordered = {"schema_version": d.pop("schema_version"), **d}
        return json.dumps(ordered, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest.json") -> Manifest:
        """Parse and validate. Raises UnsupportedSchemaVersion / ManifestError naming ``where``."""
        if len(text) > max_manifest_bytes():
            raise ManifestError(f"{where}: {len(text):,} bytes, more than a manifest may hold ({max_manifest_bytes():,}; "
                                "SOFTLABELS_MAX_MANIFEST_BYTES raises the limit)")
        try:
            with _gc_paused():  # a dict per shard: see _gc_paused
                d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from e
        except RecursionError as e:
            raise ManifestError(f"{where}: JSON nested too deeply to be a manifest") from e
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        version = d.get("schema_version")
        if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
            raise UnsupportedSchemaVersion(
                f"{where}: schema_version {version!r} is not supported by this softlabels "
                f"(supports {list(SUPPORTED_VERSIONS)})"
            )
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {sorted(unknown)}")
        try:
            return cls(
                schema_version=version,
                teacher=_build(TeacherInfo, d["teacher"]),
                tokenizer=_build(TokenizerInfo, d["tokenizer"]),
                top_k=d["top_k"],
                temperature=_number(d["temperature"], "temperature"),
                corpus=_build(CorpusInfo, d["corpus"]),
                sequence=_build(SequenceConfig, d["sequence"]),
                shards=_shard_infos(d["shards"]),
                totals=_build(Totals, d["totals"]),
                labeler_version=str(d["labeler_version"]),
                created_at=str(d["created_at"]),
                encoding=dict(d.get("encoding") or {}),
                tail_samples=d.get("tail_samples", 0),
                converted_from=d.get("converted_from"),
                rendering=d.get("rendering"),
                spans=d.get("spans", False),
                target_logprobs=d.get("target_logprobs", False),
                generation=d.get("generation"),
                sampler_logprobs=d.get("sampler_logprobs", False),
            )
        except KeyError as e:
            raise ManifestError(f"{where}: missing field {e.args[0]!r}") from e
        except ManifestError as e:
            raise ManifestError(f"{where}: {e}") from e
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{where}: {e}") from e


def max_manifest_bytes() -> int:
    """The largest manifest a reader accepts (``SOFTLABELS_MAX_MANIFEST_BYTES``, default 512 MiB)."""
    return int(os.environ.get("SOFTLABELS_MAX_MANIFEST_BYTES") or MAX_MANIFEST_BYTES)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The JSON types each annotation admits (dataclass annotations are strings here).
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "bool": (bool,), "float": (float, int),
    "dict[str, str]": (dict,), "dict[str, Any]": (dict,),
}


def _build(cls: type, d: Any) -> Any:
    """``cls(**d)`` after checking that ``d`` has only ``cls``'s fields, each of its JSON type."""
    if not isinstance(d, dict):
        raise ManifestError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
    names = {f.name: f.type for f in fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ManifestError(f"{cls.__name__} has unknown field(s) {sorted(unknown)}")
    for key, value in d.items():
        kind = str(names[key])
        optional = kind.endswith(" | None")
        if value is None and optional:
            continue
        allowed = _TYPES[kind.removesuffix(" | None")]
        if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
            raise ManifestError(f"{cls.__name__}.{key} must be {kind.replace(' | None', ' or null')}, got {value!r:.80}")
        if _is_int(value) and value < 0:
            raise ManifestError(f"{cls.__name__}.{key} must not be negative, got {value}")
    return cls(**d)


def _shard_infos(entries: Any) -> tuple[ShardInfo, ...]:
    """``shards[]`` as ShardInfo: ``_build`` for each, with its checks done a column at a time.

    ``_build`` on each of a 10B-token set's ~300,000 entries took most of the manifest's load
    time; an entry the column checks do not pass goes through ``_build`` for the message.
    """
    names = [f.name for f in fields(ShardInfo)]
    if isinstance(entries, list) and set(map(type, entries)) <= {dict} and set().union(*entries) <= set(names):
        cols = {name: [e.get(name) for e in entries] for name in names}
        trained = [t for t in cols["trained"] if t is not None]
        if (all(set(map(type, cols[name])) <= {str} for name in ("path", "sha256"))
                and all(set(map(type, cols[name])) <= {int} and min(cols[name], default=0) >= 0
                        for name in ("rows", "tokens", "bytes"))
                and set(map(type, trained)) <= {int} and min(trained, default=0) >= 0):
            with _gc_paused():
                return tuple(map(ShardInfo, *(cols[name] for name in names)))
    return tuple(_build(ShardInfo, e) for e in entries)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused for the block (not if it was off already).

    A manifest's parsed JSON and its ShardInfo objects hold no cycles, but their number (two per
    shard) sets off collections, and in a process that has imported torch each full one walks
    every object: 0.5-0.8 s of the 2-2.7 s of CPU a manifest of 300,000 shards took. Memory is
    still freed as it is dropped (reference counting).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_flat(name: str, value: Any, depth: int = 2) -> None:
    """An optional mapping of names to plain values, or to such mappings (``depth`` levels at most):
    derived sets echo it, so it stays small and shallow."""
    if value is None:
        return
    if not isinstance(value, dict) or depth < 1:
        raise ManifestError(f"{name} must be a JSON object of plain values, got {str(value)[:80]}")
    for k, v in value.items():
        if not isinstance(k, str):
            raise ManifestError(f"{name} must be a JSON object of plain values, got {str(value)[:80]}")
        if isinstance(v, dict):
            _check_flat(f"{name}.{k}", v, depth - 1)
        elif not (v is None or isinstance(v, (str, int, float, bool))):
            raise ManifestError(f"{name}.{k} must be a plain value, got {str(v)[:80]}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"{name} must be a number, got {value!r:.80}")
    return float(value)
