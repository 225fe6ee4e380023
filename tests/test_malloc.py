"""common/malloc.py: a freed large buffer is reused without page faults once the thresholds are raised; a user's
own malloc settings are left alone."""

from __future__ import annotations

import os
import subprocess
import sys

# Allocate 64 MiB (above glibc's largest automatic mmap threshold), touch every page, free it; twice. The second
# round's minor page faults are what a training step pays for its large tensors again and again.
PROBE = """
import ctypes, resource, sys
from softlabels.common.malloc import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)
    libc.free(ctypes.c_void_p(p))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, faults[1])
"""


def probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "SOFTLABELS_SYSTEM_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_freed_buffer_reused_without_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    kept, faults = probe("keep")
    assert kept == "True" and faults < pages // 100  # reused: the pages are already there
    kept, faults = probe("system")
    assert kept == "False" and faults > pages // 2  # glibc's own behaviour: mapped and faulted afresh


def test_user_settings_left_alone():
    for env in ({"MALLOC_MMAP_THRESHOLD_": "131072"}, {"SOFTLABELS_SYSTEM_MALLOC": "1"},
                {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}):
        kept, faults = probe("keep", **env)
        assert kept == "False" and faults > (64 << 20) // os.sysconf("SC_PAGE_SIZE") // 2, env
