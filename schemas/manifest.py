"""The manifest: ``manifest.json`` at a label set's root, written last.

A label set without a manifest is "still being written" and readers refuse
it. The manifest never holds credentials or storage options.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from softlabels.schemas.encodings import Encoding
from softlabels.schemas.errors import ManifestError, UnsupportedSchemaVersion
from softlabels.schemas.format import SCHEMA_VERSION, SUPPORTED_VERSIONS

MANIFEST_NAME = "manifest.json"


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


@dataclass(frozen=True)
class Totals:
    sequences: int
    tokens: int
    bytes: int


def _check_inside(path: str, what: str = "shard path") -> None:
    # Paths a manifest names (shards, the tokenizer folder) must stay inside the label set:
    # no schemes, no absolute paths, no "..": a hand-edited manifest must not make a reader
    # fetch objects from elsewhere.
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{what} must be a non-empty string, got {path!r}")
    norm = posixpath.normpath(path)
    if "://" in path or path.startswith("/") or "\\" in path or norm.startswith("..") or norm != path:
        raise ManifestError(f"{what} {path!r} is not a plain relative path inside the label set")


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
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version not in SUPPORTED_VERSIONS:
            raise UnsupportedSchemaVersion(
                f"label set has schema_version {self.schema_version!r}; "
                f"this softlabels supports {list(SUPPORTED_VERSIONS)} (upgrade softlabels to read it)"
            )
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ManifestError(f"top_k must be a positive int, got {self.top_k!r}")
        if self.top_k > self.tokenizer.vocab_size:
            raise ManifestError(f"top_k {self.top_k} exceeds vocab_size {self.tokenizer.vocab_size}")
        if not self.temperature > 0:
            raise ManifestError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.tail_samples, int) or not 0 <= self.tail_samples <= 255:
            raise ManifestError(f"tail_samples must be an int in 0..255, got {self.tail_samples!r}")
        try:
            Encoding.from_dict(self.encoding)
        except (ValueError, TypeError) as e:
            raise ManifestError(f"encoding {self.encoding!r}: {e}") from e
        if self.tokenizer.files is not None:
            _check_inside(self.tokenizer.files, "tokenizer folder")
        if self.converted_from is not None and not isinstance(self.converted_from, dict):
            raise ManifestError(f"converted_from must be a JSON object, got {self.converted_from!r}")
        seen = set()
        for s in self.shards:
            _check_inside(s.path)
            if s.path in seen:
                raise ManifestError(f"shard {s.path!r} is listed twice")
            seen.add(s.path)
        if sum(s.rows for s in self.shards) != self.totals.sequences:
            raise ManifestError("totals.sequences does not equal the sum of shard rows")
        if sum(s.tokens for s in self.shards) != self.totals.tokens:
            raise ManifestError("totals.tokens does not equal the sum of shard tokens")

    @property
    def label_encoding(self) -> Encoding:
        """The shards' label encoding (``fp16`` for v1 sets)."""
        return Encoding.from_dict(self.encoding)

    def to_json(self) -> str:
        """Serialize (stable key order, human-readable)."""
        d = asdict(self)
        if d["converted_from"] is None:
            del d["converted_from"]  # written by the labeler: nothing to say
        ordered = {"schema_version": d.pop("schema_version"), **d}
        return json.dumps(ordered, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest.json") -> Manifest:
        """Parse and validate. Raises UnsupportedSchemaVersion / ManifestError naming ``where``."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        version = d.get("schema_version")
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedSchemaVersion(
                f"{where}: schema_version {version!r} is not supported by this softlabels "
                f"(supports {list(SUPPORTED_VERSIONS)})"
            )
        try:
            return cls(
                schema_version=version,
                teacher=_build(TeacherInfo, d["teacher"]),
                tokenizer=_build(TokenizerInfo, d["tokenizer"]),
                top_k=d["top_k"],
                temperature=float(d["temperature"]),
                corpus=_build(CorpusInfo, d["corpus"]),
                sequence=_build(SequenceConfig, d["sequence"]),
                shards=tuple(_build(ShardInfo, s) for s in d["shards"]),
                totals=_build(Totals, d["totals"]),
                labeler_version=str(d["labeler_version"]),
                created_at=str(d["created_at"]),
                encoding=dict(d.get("encoding") or {}),
                tail_samples=d.get("tail_samples", 0),
                converted_from=d.get("converted_from"),
            )
        except KeyError as e:
            raise ManifestError(f"{where}: missing field {e.args[0]!r}") from e
        except ManifestError as e:
            raise ManifestError(f"{where}: {e}") from e
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{where}: {e}") from e


def _build(cls: type, d: Any) -> Any:
    if not isinstance(d, dict):
        raise ManifestError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ManifestError(f"{cls.__name__} has unknown field(s) {sorted(unknown)}")
    return cls(**d)
