"""gan.host_memory: with the thresholds fixed, memory freed in one step is reused by the next
instead of going back to the kernel and being faulted in again.

Each case runs in a process of its own: malloc's settings are process-wide and cannot be undone.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# Ten 1 MiB blocks taken from malloc and written, then freed top first, ten times; prints the
# minor page faults of each round. By default glibc mmaps the first round's blocks, raises its
# thresholds to their size on free (trim threshold: twice that), then serves them from the heap
# and trims the heap back to the kernel as soon as two of them lie free at its top.
ROUNDS = """
import ctypes, json, resource, sys
from gan.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(1 << 20) for _ in range(10)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    for block in reversed(blocks):
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the thresholds are glibc malloc's",
)


def _rounds(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    result = _rounds("keep")
    assert result["kept"] is True
    # The first round faults its 10 MiB in (2,560 pages of 4 KiB); every later one reuses them.
    assert result["faults"][0] >= 2000, result
    assert max(result["faults"][2:]) < 50, result


@glibc_only
def test_by_default_the_same_rounds_fault_their_memory_in_again():
    """What the setting is for: without it, glibc hands the freed blocks back every round."""
    result = _rounds("default")
    assert min(result["faults"][2:]) >= 2000, result
