"""Crash points: named places where a test can SIGKILL the process, for fault-injection tests.

Off unless ``SOFTLABELS_CRASH_AT`` is set, e.g.::

    SOFTLABELS_CRASH_AT=labeler.shard-written@3

kills the process the third time it passes ``crash_point("labeler.shard-written")``.
``name@n`` may be repeated, comma-separated. A crash point in a Ray worker
also kills the labeling driver (``SOFTLABELS_DRIVER_PID``, set by the
labeler CLI when crash points are on), so "the driver was SIGKILLed between
a shard and its marker" can be produced exactly, not by racing a timer.

Two more variables shape a test: ``SOFTLABELS_CRASH_SCOPE=process`` kills
only the process at the crash point (a teacher replica dies, the driver
lives), and ``SOFTLABELS_CRASH_ONCE=PATH`` makes the crash happen once across
all processes (the first to create PATH crashes), so a restarted replica
does not die again.

SIGKILL, not an exception: nothing unwinds, no ``finally`` runs, no buffer is
flushed, exactly as when a node dies or the OOM killer strikes.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "SOFTLABELS_CRASH_AT"
DRIVER_ENV = "SOFTLABELS_DRIVER_PID"
SCOPE_ENV = "SOFTLABELS_CRASH_SCOPE"
ONCE_ENV = "SOFTLABELS_CRASH_ONCE"
_hits: dict[str, int] = {}


def _targets() -> dict[str, int]:
    spec = os.environ.get(ENV, "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition("@")
        out[name] = int(n or 1)
    return out


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def crash_point(name: str) -> None:
    """SIGKILL this process (and the labeling driver, if another process) on the n-th pass, if asked."""
    if not os.environ.get(ENV):
        return
    want = _targets().get(name)
    if want is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != want:
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another process already crashed here
    print(f"crash point {name}@{want}: SIGKILL", file=sys.stderr, flush=True)
    driver = int(os.environ.get(DRIVER_ENV) or 0)
    if driver and driver != os.getpid() and os.environ.get(SCOPE_ENV) != "process":
        try:
            os.kill(driver, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)
