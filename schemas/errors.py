"""Exceptions: which errors are the user's to fix, and what is wrong with a label set.

:class:`UserError` marks every error that the user can fix by changing what they
passed: a flag or setting, an input file, a label set, a storage location or its
credentials. The ``softlabels`` command prints such an error as one line and
exits with code 2. Any other exception is a bug (in softlabels or a library it
calls) and keeps its traceback. Library code raises a subclass of UserError only
where it has checked the user's input; an internal ``ValueError`` from numpy or
pyarrow stays a ``ValueError`` and is reported as the bug it is.

``UserError`` derives from ``ValueError`` (and :class:`StorageError` also from
``OSError``), so callers that catch those keep working.
"""


class UserError(ValueError):
    """Bad input that the user can fix (a value, a file, a location); one line, exit code 2 on the command line."""


class StorageError(UserError, OSError):
    """Storage that cannot be used as given: unreachable after retries, or credentials refused."""


class StorageAccessDenied(StorageError, PermissionError):
    """The storage refused the credentials for an operation (named in the message)."""


class LabelSetError(UserError):
    """Base class: something about a label set is wrong or unreadable."""


class MissingManifestError(LabelSetError):
    """The URL holds no manifest.json: not a label set, or still being written."""


class UnsupportedSchemaVersion(LabelSetError):
    """The manifest's schema_version is not one this reader understands."""


class ManifestError(LabelSetError):
    """The manifest is malformed (missing field, wrong type, unsafe path)."""


class ShardChecksumError(LabelSetError):
    """A shard's bytes do not match the size or sha256 the manifest records."""


class ShardFormatError(LabelSetError):
    """A shard's columns or footer do not match what its encoding declares."""
