"""The one helper that turns a URL (+ options) into a filesystem and a path.

Local paths, ``file://``, ``s3://``, ``memory://`` and any other fsspec
protocol go through :func:`resolve_url`, so every reader and writer shares a
single code path. ``fsspec`` is imported here, lazily, so ``import softlabels.schemas``
stays stdlib + pyarrow + numpy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from softlabels.schemas.errors import StorageAccessDenied, StorageError, UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that say "this will not get better by waiting": never retried.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# Network failures some fsspec backends raise outside the OSError family
# (botocore's EndpointConnectionError, aiohttp's client errors), by class name
# so that no backend needs importing here.
_NETWORK = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
            "ServerDisconnectedError", "ClientOSError")


def _is_network_error(e: BaseException) -> bool:
    return any(c.__name__ in _NETWORK for c in type(e).__mro__)


def resolve_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """Return ``(fsspec filesystem, path)`` for ``url``.

    For ``s3://`` the standard AWS credential chain applies; ``AWS_ENDPOINT_URL``
    (or ``AWS_ENDPOINT_URL_S3``) selects a non-AWS endpoint unless
    ``storage_options`` sets ``endpoint_url`` itself.

    Raises:
        UserError: the protocol is unknown or its fsspec backend is not installed.
    """
    import fsspec
    from fsspec.core import split_protocol

    opts = dict(storage_options or {})
    protocol, _ = split_protocol(url)
    protocol = protocol or "file"
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in opts.get("client_kwargs", {}):
            opts["endpoint_url"] = endpoint
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except ImportError as e:
        extra = " (pip install 'softlabels[s3]')" if protocol in ("s3", "s3a") else ""
        raise UserError(f"cannot open {url!r}: no filesystem for protocol {protocol!r}{extra}: {e}") from e
    except ValueError as e:
        raise UserError(f"cannot open {url!r}: {e}") from e
    return fs, path.rstrip("/") if len(path) > 1 else path


def join_url(root: str, *parts: str) -> str:
    """Join path parts onto a path or URL with ``/`` (object-store style)."""
    out = root.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def is_local(fs: Any) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def retry_io(fn: Callable[[], T], what: str, attempts: int = 7, base_delay: float = 0.5) -> T:
    """Call ``fn`` retrying transient ``OSError``s and network errors with bounded exponential backoff.

    ``what`` names the operation and object for logs and the final error,
    e.g. ``"write s3://bucket/set/shards/part-000001.parquet"``. Permanent
    errors (not found, permission denied, ...) are raised at once. The
    default waits 0.5 + 1 + ... + 16 s, about 30 s in all, so a storage
    server that restarts (a few seconds down) is ridden out.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError:
            raise  # already named by an inner retry
        except PermissionError as e:
            # Backends say only "Forbidden" or "Access Denied": name the operation and object.
            raise StorageAccessDenied(f"{what}: access denied ({e}); check credentials") from e
        except _PERMANENT:
            raise
        except Exception as e:
            network = not isinstance(e, OSError)
            if network and not _is_network_error(e):
                raise
            if attempt >= attempts:
                raise StorageError(f"{what}: failed after {attempt} attempts: {e}") from e
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("%s: %s (attempt %d/%d, retrying in %.1fs)", what, e, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
