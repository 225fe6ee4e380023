"""Keep large freed buffers inside the process (glibc), rather than handing each back to the kernel.

glibc serves an allocation above its mmap threshold (32 MiB at most under its own rule) with a fresh ``mmap``
and unmaps it on ``free``. PyTorch on CPU allocates a step's large tensors afresh every step (the logits of one
head chunk of a 49,152-row head are 200 MB, and their gradient as much again), so every step page-faults and
zeroes them anew in the kernel. On the 2-core host, ten steps of the tiny student took 14.2 s with 11.5 s of
system time; with the thresholds raised, 8.3 s and 1.8 s, the same losses to the last digit, peak memory
1.66 -> 2.01 GB (docs/benchmarks.md, "A student's step on the CPU"). This is what a CUDA caching allocator does
on a GPU; on the host it is one ``mallopt`` call per process.

``softlabels`` commands call :func:`keep_freed_memory` first, and so does a teacher replica's process. A library
user calls it once at start-up to get the same. It does nothing where a user already chose (``MALLOC_MMAP_
THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or malloc tunables in ``GLIBC_TUNABLES``), where
``SOFTLABELS_SYSTEM_MALLOC=1`` asks for the system's behaviour, and off glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
LARGEST = 2**31 - 1  # mallopt takes an int; an allocation above it (2 GiB) still gets its own mapping

_done: bool | None = None


def user_chose() -> bool:
    """A malloc setting of the user's own in the environment, which this module leaves alone."""
    env = os.environ
    return (env.get("SOFTLABELS_SYSTEM_MALLOC", "") not in ("", "0") or "MALLOC_MMAP_THRESHOLD_" in env
            or "MALLOC_TRIM_THRESHOLD_" in env or "glibc.malloc" in env.get("GLIBC_TUNABLES", ""))


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 2 GiB in this process, once; True when they are set."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux") and not user_chose():
            try:
                libc = ctypes.CDLL(None)
                libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
                _done = bool(libc.mallopt(M_MMAP_THRESHOLD, LARGEST)) and bool(libc.mallopt(M_TRIM_THRESHOLD, LARGEST))
            except (OSError, AttributeError):
                _done = False
    return _done
