"""softlabels schemas: the one definition of the label-set format.

Everything that reads or writes a label set goes through this package:
the shard Arrow schema and column encoding (``format``), the manifest
(``manifest``), fingerprints and content addresses (``fingerprint``), the
URL-to-filesystem helper (``storage``) and the reader (``reader``).

Imports only the standard library, pyarrow and numpy at module level;
``fsspec`` is imported lazily by the storage helper when a URL is opened.
See ``schemas/README.md`` for the format specification.
"""

from schemas.encodings import DEFAULT_ENCODING, ENCODINGS, Encoding
from schemas.errors import (
    LabelSetError,
    ManifestError,
    MissingManifestError,
    ShardChecksumError,
    UnsupportedSchemaVersion,
)
from schemas.fingerprint import sample_id, tokenizer_fingerprint
from schemas.format import (
    SCHEMA_VERSION,
    SUPPORTED_VERSIONS,
    Sample,
    decode_table,
    encode_samples,
    shard_schema,
    table_to_parquet_bytes,
)
from schemas.manifest import (
    CorpusInfo,
    Manifest,
    SequenceConfig,
    ShardInfo,
    TeacherInfo,
    TokenizerInfo,
    Totals,
)
from schemas.reader import LabelSet, open_label_set
from schemas.storage import join_url, resolve_url, retry_io, write_whole

__all__ = [
    "DEFAULT_ENCODING",
    "ENCODINGS",
    "Encoding",
    "SCHEMA_VERSION",
    "SUPPORTED_VERSIONS",
    "CorpusInfo",
    "LabelSet",
    "LabelSetError",
    "Manifest",
    "ManifestError",
    "MissingManifestError",
    "Sample",
    "SequenceConfig",
    "ShardChecksumError",
    "ShardInfo",
    "TeacherInfo",
    "TokenizerInfo",
    "Totals",
    "UnsupportedSchemaVersion",
    "decode_table",
    "encode_samples",
    "join_url",
    "open_label_set",
    "resolve_url",
    "retry_io",
    "write_whole",
    "sample_id",
    "shard_schema",
    "table_to_parquet_bytes",
    "tokenizer_fingerprint",
]
