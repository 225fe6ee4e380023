"""The one helper that turns a URL (+ options) into a filesystem and a path.

Local paths, ``file://``, ``s3://``, ``memory://`` and any other fsspec
protocol go through :func:`resolve_url`, so every reader and writer shares a
single code path. ``fsspec`` is imported here, lazily, so ``import schemas``
stays stdlib + pyarrow + numpy.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

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
        ValueError: the protocol is unknown or its fsspec backend is not installed.
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
        raise ValueError(f"cannot open {url!r}: no filesystem for protocol {protocol!r}{extra}: {e}") from e
    except ValueError as e:
        raise ValueError(f"cannot open {url!r}: {e}") from e
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


def current_umask() -> int:
    """The process's file-mode creation mask (reading it means setting it, so it is set back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def widen_to_umask(directory: Any) -> None:
    """Give the regular files directly in ``directory`` the mode the umask allows (``0o666 & ~umask``).

    safetensors creates its files 0600 whatever the umask, so a model saved by
    one user on a shared volume (a PVC, a team cache) is unreadable to the
    job that runs under another UID. Only files are touched, and only widened
    to what any ordinary ``open`` in this process would have made.
    """
    allowed = 0o666 & ~current_umask()
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            mode = entry.stat().st_mode & 0o777
            if mode | allowed != mode:
                os.chmod(entry.path, mode | allowed)


def write_whole(fs: Any, path: str, data: bytes, what: str) -> None:
    """Write ``data`` as one object that readers see whole or not at all.

    Object stores publish a PUT atomically. On a local disk the bytes go to a
    temporary file beside ``path``, are flushed and fsynced, and are then
    renamed over it, so a crash mid-write never leaves a truncated file under
    the real name (a half-written ``manifest.json`` or ``latest`` would look
    published). Transient errors are retried (:func:`retry_io`).
    """
    from schemas.crash import crash_point

    name = path.rsplit("/", 1)[-1]
    if not is_local(fs):
        crash_point(f"publish:{name}")  # the PUT never happened
        retry_io(lambda: fs.pipe_file(path, data), what)
        return
    path = fs._strip_protocol(path)
    folder = os.path.dirname(path)

    def write() -> None:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            crash_point(f"publish:{name}")  # written in full under a temporary name only
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    retry_io(write, what)


def sweep_partial_writes(fs: Any, root: str) -> int:
    """Remove the temporary files that writes cut short by a crash left under a local ``root``.

    Only names :func:`write_whole` makes (``.NAME.tmp-PID-HEX``) are touched.
    Object stores need no sweep: an upload that never finished left nothing.
    Returns how many were removed.
    """
    import re

    if not is_local(fs):
        return 0
    pattern = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")
    removed = 0
    for folder, _, files in os.walk(fs._strip_protocol(root)):
        for f in files:
            if pattern.match(f):
                os.unlink(os.path.join(folder, f))
                removed += 1
    if removed:
        log.info("removed %d partial write(s) left by an interrupted run under %s", removed, root)
    return removed


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
        except PermissionError as e:
            # Backends say only "Forbidden" or "Access Denied": name the operation and object.
            raise PermissionError(f"{what}: access denied ({e}); check credentials") from e
        except _PERMANENT:
            raise
        except Exception as e:
            network = not isinstance(e, OSError)
            if network and not _is_network_error(e):
                raise
            if attempt >= attempts:
                raise OSError(f"{what}: failed after {attempt} attempts: {e}") from e
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("%s: %s (attempt %d/%d, retrying in %.1fs)", what, e, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
