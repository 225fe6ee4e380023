"""Publishing files whole, and giving them the modes a shared volume needs.

Writers (labeler, convert, trainer checkpoints) publish through :func:`write_whole`;
readers never need this module. Crash points for fault tests sit at the moment
between "written" and "published".
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from typing import Any

from softlabels.common.crash import crash_point
from softlabels.schemas.errors import UserError
from softlabels.schemas.storage import is_local, retry_io

log = logging.getLogger(__name__)


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


def make_dir(path: str | os.PathLike[str], what: str) -> None:
    """``mkdir -p`` for a location the user named; a refusal (permissions, a file in the way) is a UserError."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot create the directory ({e.strerror or e})") from e
