"""softlabels schemas: the one definition of the label-set format.

Everything that reads or writes a label set goes through this package:
the shard Arrow schema and column encoding (``format``), the manifest
(``manifest``), fingerprints and content addresses (``fingerprint``), the
URL-to-filesystem helper (``storage``) and the reader (``reader``).

Imports only the standard library, pyarrow and numpy at module level;
``fsspec`` is imported lazily by the storage helper when a URL is opened.
Nothing here imports the rest of softlabels. See ``schemas/README.md`` for the
format specification.
"""

from softlabels.schemas.encodings import DEFAULT_ENCODING, ENCODINGS, Encoding
from softlabels.schemas.errors import (
    LabelSetError,
    ManifestError,
    MissingManifestError,
    ShardChecksumError,
    ShardFormatError,
    StorageError,
    UnsupportedSchemaVersion,
    UserError,
)
from softlabels.schemas.fingerprint import sample_id, tokenizer_fingerprint
from softlabels.schemas.format import (
    SCHEMA_VERSION,
    SUPPORTED_VERSIONS,
    Sample,
    decode_table,
    decoded_table,
    encode_samples,
    shard_schema,
    table_to_parquet_bytes,
)
from softlabels.schemas.manifest import (
    CorpusInfo,
    Manifest,
    SequenceConfig,
    ShardInfo,
    TeacherInfo,
    TokenizerInfo,
    Totals,
)
from softlabels.schemas.reader import LabelSet, open_label_set
from softlabels.schemas.storage import join_url, resolve_url, retry_io

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
    "ShardFormatError",
    "StorageError",
    "ShardInfo",
    "TeacherInfo",
    "TokenizerInfo",
    "Totals",
    "UnsupportedSchemaVersion",
    "UserError",
    "decode_table",
    "decoded_table",
    "encode_samples",
    "join_url",
    "open_label_set",
    "resolve_url",
    "retry_io",
    "sample_id",
    "shard_schema",
    "table_to_parquet_bytes",
    "tokenizer_fingerprint",
]
