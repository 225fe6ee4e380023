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

Every UserError pickles as itself (type, message, attributes), whatever arguments its
``__init__`` takes: errors raised in Ray workers travel back to the driver pickled, and
one that did not survive the trip would reach the user as a traceback.
"""

from __future__ import annotations

from typing import Any


def _rebuilt(cls: type[UserError], args: tuple[Any, ...]) -> UserError:
    """An instance of ``cls`` with ``args``, made without calling ``cls.__init__`` (pickle's counterpart
    of :meth:`UserError.__reduce__`; the instance's attributes are restored after it)."""
    # Classes that also derive from OSError have OSError's memory layout: only its __new__ may make them.
    new = OSError.__new__ if issubclass(cls, OSError) else cls.__new__
    err = new(cls, *args)
    err.args = args
    return err


class UserError(ValueError):
    """Bad input that the user can fix (a value, a file, a location); one line, exit code 2 on the command line."""

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException's own reduce rebuilds with cls(*self.args): that fails, or changes the
        # message, for a subclass whose __init__ takes other arguments than the message
        # (RowError(where, reason)). Rebuild without __init__, then restore __dict__.
        return _rebuilt, (type(self), self.args), self.__dict__ or None


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
