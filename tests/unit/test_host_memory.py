"""gan.host_memory: with malloc's settings fixed, memory freed in one step is reused by the next
instead of going back to the kernel and being faulted in again.

Each case runs in a process of its own: malloc's settings are process-wide and cannot be undone.
The process starts without malloc's environment variables and with transparent huge pages off,
so that only the settings under test decide, and page counts use the machine's page size.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# Rounds of BLOCKS 1 MiB blocks taken from malloc and written, then freed top first, on the main
# thread or on a thread of its own (where Ray Train runs the training loop); prints the minor
# page faults of each round. By default glibc mmaps the first round's blocks, raises its
# thresholds to their size on free (trim threshold: twice that), then serves them from the heap
# and trims the heap back to the kernel as soon as two of them lie free at its top.
ROUNDS = """
import ctypes, json, resource, sys, threading
from gan.host_memory import keep_freed_memory
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, as on most hosts
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
blocks_per_round, on_thread = int(sys.argv[2]), sys.argv[3] == "thread"
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def rounds():
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        blocks = [libc.malloc(1 << 20) for _ in range(blocks_per_round)]
        for block in blocks:
            ctypes.memset(block, 1, 1 << 20)
        for block in reversed(blocks):
            libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
if on_thread:
    thread = threading.Thread(target=rounds)
    thread.start()
    thread.join()
else:
    rounds()
print(json.dumps({"kept": kept, "faults": faults, "page": resource.getpagesize()}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc malloc's",
)


def _rounds(mode: str, blocks: int, where: str) -> tuple[bool | None, list[int], int]:
    """(whether the settings were taken, faults per round, pages per round)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"
    }
    done = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode, str(blocks), where],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    result = json.loads(done.stdout)
    return result["kept"], result["faults"], blocks * (1 << 20) // result["page"]


@glibc_only
@pytest.mark.parametrize(
    ("blocks", "where"),
    # On a thread, more than one 64 MiB heap: the case the top padding is for.
    [(10, "main"), (150, "thread")],
)
def test_freed_blocks_are_reused_without_page_faults(blocks: int, where: str) -> None:
    kept, faults, pages = _rounds("keep", blocks, where)
    assert kept is True
    # The first round faults its blocks in; every later one reuses them.
    assert faults[0] >= 0.8 * pages, faults
    assert max(faults[1:]) < 0.02 * pages, faults


@glibc_only
def test_by_default_the_same_rounds_fault_their_memory_in_again() -> None:
    """What the settings are for: without them, glibc hands the freed blocks back every round."""
    _, faults, pages = _rounds("default", 10, "main")
    assert min(faults[2:]) >= 0.8 * pages, faults
