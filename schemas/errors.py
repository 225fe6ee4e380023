"""Exceptions raised by readers and validators of the label-set format."""


class LabelSetError(Exception):
    """Base class: something about a label set is wrong or unreadable."""


class MissingManifestError(LabelSetError):
    """The URL holds no manifest.json: not a label set, or still being written."""


class UnsupportedSchemaVersion(LabelSetError):
    """The manifest's schema_version is not one this reader understands."""


class ManifestError(LabelSetError):
    """The manifest is malformed (missing field, wrong type, unsafe path)."""


class ShardChecksumError(LabelSetError):
    """A shard's bytes do not match the size or sha256 the manifest records."""
