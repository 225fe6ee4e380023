"""An output has one owner: an exclusive, expiring claim kept alive by a heartbeat.

A run that writes a label set (``softlabels label``, ``softlabels convert``) first
claims its output: it creates ``_claim/gen-NNNNNN.json`` with a *conditional* write
(``O_EXCL``-style on a local disk, ``If-None-Match: *`` on S3), so of two runs that
race for the same generation exactly one succeeds. The claim names its holder (host,
pid, start time, command) and an expiry; a heartbeat thread renews it. The highest
generation is the owner.

* A second run finds a live claim and refuses in one line naming the holder.
* A claim whose holder died expires (no heartbeat); the next run takes the output over
  by creating the next generation (again conditionally), or at once with ``--take-over``.
* The owner checks that it still holds the highest generation before it commits a
  unit and before it publishes the manifest: a run that lost its claim (paused past
  its expiry, taken over) stops instead of mixing its writes with the new owner's.
* When the run ends the claim is marked released; the record stays, so generation
  numbers only grow and a stale run can never take a later claim for its own.
* A claim record that cannot be read (not JSON, a field of the wrong type, a directory in its
  place) holds the output like a live claim for a TTL from when it was written (its holder, if
  any, finds it lost at its next heartbeat and stops): a run is refused in one line naming the
  file; ``--take-over`` gets past it at once.

Stores without conditional writes (fsspec backends other than local disk and S3)
fall back to write-then-read-back, which narrows the race without closing it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from softlabels.schemas.errors import StorageAccessDenied, UserError
from softlabels.schemas.storage import is_local, join_url, retry_io

log = logging.getLogger(__name__)

CLAIMS = "_claim"
TTL_S = 120.0  # a claim not renewed for this long is dead
HEARTBEAT_S = 20.0


class OutputClaimed(UserError):
    """Another live run holds the output."""


class ClaimLost(UserError):
    """This run's claim was taken over (it was paused past its expiry, or ``--take-over`` was used)."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    started_at: str  # ISO 8601 UTC
    command: str
    expires_at: float  # epoch seconds; 0: released (the record stays, so generations are never reused)
    boot_id: str = ""  # the kernel's boot id and the pid namespace: a pid means something only where both match
    pidns: int = 0
    pid_start: int = 0  # the process's start time (clock ticks since boot): tells a reused pid from the holder
    # Why the record could not be read ("" for a good one): then only expires_at means something. Never written.
    unreadable: str = field(default="", compare=False)

    @property
    def released(self) -> bool:
        return self.expires_at == 0

    def record(self) -> bytes:
        """The claim file's bytes."""
        d = asdict(self)
        del d["unreadable"]
        return json.dumps(d, indent=1).encode()

    @classmethod
    def parse(cls, raw: bytes) -> Holder:
        """A claim file's record, its fields checked (unknown fields, a later version's, are ignored).

        Raises:
            ValueError: not JSON, not an object, a field missing or of the wrong type (the message says which).
        """
        try:
            d = json.loads(raw)
        except ValueError as e:  # UnicodeDecodeError too
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"a JSON {type(d).__name__}, not an object")
        out = {}
        for name, (kind, required) in _FIELDS.items():
            if name not in d:
                if required:
                    raise ValueError(f"no field {name!r}")
                continue
            value = d[name]
            if (isinstance(value, bool) or not isinstance(value, kind)
                    or (isinstance(value, float) and not math.isfinite(value))):
                raise ValueError(f"field {name!r} is {repr(value)[:40]}, not {_KIND_NAMES[kind]}")
            out[name] = value
        return cls(**out)

    def describe(self) -> str:
        if self.unreadable:
            return f"{_clip(self.command)} ({_clip(self.unreadable, 200)})"
        left = self.expires_at - time.time()
        state = ("released" if self.released else f"expires in {left:.0f} s unless renewed" if left > 0
                 else f"expired {-left:.0f} s ago")
        # a claim file is whatever another run (or a hostile writer) put there: clip what it says
        return (f"{_clip(self.command)} on host {_clip(self.host)}, pid {self.pid}, started {_clip(self.started_at)} "
                f"({state})")


def _clip(text: object, n: int = 80) -> str:
    s = str(text).replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


# Holder's fields as a claim file holds them: (types, required).
_TEXT, _INT, _NUMBER = (str,), (int,), (int, float)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "run_id": (_TEXT, True), "host": (_TEXT, True), "pid": (_INT, True), "started_at": (_TEXT, True),
    "command": (_TEXT, True), "expires_at": (_NUMBER, True), "boot_id": (_TEXT, False), "pidns": (_INT, False),
    "pid_start": (_INT, False),
}
_KIND_NAMES = {_TEXT: "a string", _INT: "an integer", _NUMBER: "a number"}


def _machine() -> tuple[str, int]:
    """``(boot id, pid namespace inode)`` of this process: where its pids can be checked."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        return boot, os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return "", 0


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _dead(holder: Holder) -> bool:
    """True if the holder's process is known to be gone: a crashed run's rerun need not wait for expiry.

    Only where pids are comparable: same host, same boot, same pid namespace. A process with
    the holder's pid that started at another time is not the holder (a restarted container
    runs as the same pid 1).
    """
    boot, pidns = _machine()
    if holder.host != socket.gethostname() or not boot or (holder.boot_id, holder.pidns) != (boot, pidns):
        return False
    if holder.pid <= 0 or not holder.pid_start:
        return False
    return _start_ticks(holder.pid) != holder.pid_start


def _gen_name(gen: int) -> str:
    return f"{CLAIMS}/gen-{gen:06d}.json"


class OutputClaim:
    """The claim of one run on one output root; see the module docstring."""

    def __init__(self, fs: Any, root: str, url: str, command: str, ttl: float = TTL_S) -> None:
        self.fs, self.root, self.url, self.ttl = fs, root, url, ttl
        self.command = command
        self.gen: int | None = None
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why, once the heartbeat found the claim gone

    @classmethod
    def following(cls, fs: Any, root: str, url: str, gen: int, run_id: str) -> OutputClaim:
        """A claim held by another process of the same run (the driver): only :meth:`check` is used."""
        claim = cls(fs, root, url, "")
        claim.gen = gen
        claim.holder = Holder(run_id, "", 0, "", "", 0.0)
        return claim

    # -- reading -----------------------------------------------------------------------
    def _path(self, rel: str) -> str:
        return join_url(self.root, rel)

    def generations(self) -> list[int]:
        self.fs.invalidate_cache()
        try:
            names = retry_io(lambda: self.fs.ls(self._path(CLAIMS), detail=False), f"list {self.url}/{CLAIMS}")
        except FileNotFoundError:
            return []
        out = []
        for p in names:
            base = p.rsplit("/", 1)[-1]
            if base.startswith("gen-") and base.endswith(".json") and base[4:-5].isdigit():
                out.append(int(base[4:-5]))
        return sorted(out)

    def read(self, gen: int) -> Holder | None:
        """Generation ``gen``'s record; None if there is none; one with ``unreadable`` set if it cannot be read."""
        path = self._path(_gen_name(gen))
        where = f"{self.url}/{_gen_name(gen)}"
        try:
            return Holder.parse(retry_io(lambda: self.fs.cat_file(path), f"read {where}"))
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            why = "a directory, not a claim file"
        except ValueError as e:
            why = str(e)
        # Half-written (a store without atomic writes) or not ours: live for a TTL from when it was written.
        try:
            info = self.fs.info(path)
            mtime = info.get("mtime") or info.get("LastModified")
            written = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
        except (OSError, TypeError, ValueError):
            written = time.time()
        return Holder("?", "?", 0, "?", f"the unreadable claim {where}", written + self.ttl, unreadable=why)

    def current(self) -> tuple[int, Holder | None] | None:
        gens = self.generations()
        return (gens[-1], self.read(gens[-1])) if gens else None

    # -- writing -----------------------------------------------------------------------
    def _record(self, expires_at: float | None = None) -> Holder:
        assert self.holder is not None
        return Holder(**{**asdict(self.holder), "expires_at": time.time() + self.ttl if expires_at is None else expires_at})

    def _create(self, gen: int, holder: Holder) -> bool:
        """Write ``gen`` only if nobody has: True if this run created it.

        Raises:
            StorageAccessDenied: the store refused the credentials (not "another run").
        """
        data = holder.record()
        path = self._path(_gen_name(gen))
        where = f"claim {self.url}/{_gen_name(gen)}"
        try:
            if is_local(self.fs):
                try:
                    return self._create_local(self.fs._strip_protocol(path), data)
                except (FileExistsError, NotADirectoryError) as e:  # from makedirs: a file where a folder must be
                    raise OutputClaimed(f"output {self.url}: cannot create {where} ({e.strerror}: a file stands where "
                                        f"the claims folder {CLAIMS}/ must be); remove it") from e
            protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
            if {"s3", "s3a"} & set(protocols):
                try:
                    self.fs.pipe_file(path, data, mode="create")  # If-None-Match: *; not retried: a refusal is the answer
                except PermissionError:
                    raise
                except OSError:
                    pass  # s3fs reports a failed conditional write as OSError (EINVAL): decided by reading back
            elif retry_io(lambda: self.fs.exists(path), f"stat {self.url}/{_gen_name(gen)}"):
                return False
            else:
                retry_io(lambda: self.fs.pipe_file(path, data), where)
        except PermissionError as e:
            raise StorageAccessDenied(f"{where}: access denied ({e}); check credentials") from e
        # Always read back: a store that ignored the condition let the last writer win.
        self.fs.invalidate_cache()
        got = self.read(gen)
        return got is not None and got.run_id == holder.run_id

    @staticmethod
    def _create_local(local: str, data: bytes) -> bool:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, local)  # atomic, and fails if the name exists: a whole file or none
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # Filesystems without hard links (some FUSE and SMB mounts): exclusive create, then write.
            try:
                fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        finally:
            os.unlink(tmp)

    def acquire(self, take_over: bool = False) -> None:
        """Claim the output, or raise :class:`OutputClaimed` naming the live holder."""
        boot, pidns = _machine()
        self.holder = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(),
                             datetime.now(timezone.utc).replace(microsecond=0).isoformat(), self.command, 0.0,
                             boot, pidns, _start_ticks(os.getpid()) or 0)
        for _ in range(5):
            cur = self.current()
            if cur is not None:
                gen, holder = cur
                live = holder is not None and holder.expires_at > time.time() and not _dead(holder)
                if live and not take_over and holder.unreadable:
                    raise OutputClaimed(
                        f"output {self.url}: its claim {self.url}/{_gen_name(gen)} cannot be read "
                        f"({holder.unreadable}), so another run may be writing it; pass --take-over if no run is"
                    )
                if live and not take_over:
                    raise OutputClaimed(
                        f"output {self.url} is being written by another run: {holder.describe()}; wait for it, "
                        "or pass --take-over if that run is dead"
                    )
                if holder is not None and not holder.released:
                    log.warning("taking over output %s from %s", self.url, holder.describe())
                nxt = gen + 1  # generations only grow: the last one stays behind as a released record
            else:
                nxt = 0
            if self._create(nxt, self._record()):
                self.gen = nxt
                for old in self.generations():
                    if old < nxt:
                        self._delete(old)
                self._start_heartbeat()
                return
        raise OutputClaimed(f"output {self.url}: another run claimed it at the same moment; try again")

    def check(self) -> None:
        """Raise :class:`ClaimLost` unless this run still holds the highest generation."""
        if self.lost:
            raise ClaimLost(self.lost)
        gens = self.generations()
        holder = self.read(self.gen) if self.gen in gens else None
        if not gens or gens[-1] != self.gen or holder is None or holder.run_id != self.holder.run_id:
            newer = self.read(gens[-1]) if gens else None
            self.lost = (f"output {self.url}: this run no longer holds its claim"
                         + (f"; {newer.describe()} took it over" if newer else "") + "; stopped before writing more")
            raise ClaimLost(self.lost)

    def _write_own(self, holder: Holder, what: str) -> None:
        data = holder.record()
        path = self._path(_gen_name(self.gen))
        if is_local(self.fs):
            from softlabels.common.files import write_whole

            write_whole(self.fs, path, data, f"{what} {self.url}")
        else:
            retry_io(lambda: self.fs.pipe_file(path, data), f"{what} {self.url}")

    def _renew(self) -> None:
        self.check()
        if not self._stop.is_set():  # a release under way must not be undone by a late renewal
            self._write_own(self._record(), "renew claim")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self._renew()
                except ClaimLost as e:
                    log.error("%s", e)
                    return
                except OSError as e:  # storage trouble: the next beat tries again; the claim lives TTL_S
                    log.warning("could not renew the claim on %s: %s", self.url, e)

        self._thread = threading.Thread(target=beat, name="claim-heartbeat", daemon=True)
        self._thread.start()

    def _delete(self, gen: int) -> None:
        path, what = self._path(_gen_name(gen)), f"remove {self.url}/{_gen_name(gen)}"
        try:
            retry_io(lambda: self.fs.rm_file(path), what)
        except FileNotFoundError:
            pass
        except IsADirectoryError:  # a directory in place of an old claim (taken over): the claims folder is ours
            retry_io(lambda: self.fs.rm(path, recursive=True), what)

    def release(self, forget: bool = False) -> None:
        """Stop the heartbeat and mark this run's claim released, if it still holds it.

        The released record stays (generation numbers are never reused, so a stale run can
        never mistake a later claim for its own); ``forget`` deletes it instead, for a run
        that leaves its output as it found it.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # an in-flight renewal finishes first (bounded by retry_io)
        if self.gen is not None and not self.lost:
            held = self.read(self.gen)
            if held is not None and held.run_id == self.holder.run_id:
                if forget:
                    self._delete(self.gen)
                else:
                    self._write_own(self._record(expires_at=0.0), "release claim")
        self.gen = None
