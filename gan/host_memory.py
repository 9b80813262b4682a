"""Keep freed host memory in the process instead of handing it back to the kernel every step.

A training step on the CPU frees and allocates the same activations and gradients every
iteration. glibc's malloc serves blocks above its mmap threshold with fresh ``mmap`` calls and
returns the top of its heap to the kernel once more than its trim threshold lies free there;
both thresholds move with the allocation history (the mmap threshold rises to the largest block
freed so far). So depending on the run, every step gives pages back and faults them in again:
135 to 1,000 minor page faults per 1-worker step of the default model, up to 15 % of its time on a
2-core host (docs/benchmarks.md, "Twelfth session"). Fixed thresholds end both: blocks up to
32 MiB come from the heap, and freed memory stays in the process for the next step.

Other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes

# mallopt's parameter numbers in glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process; whether they were set.

    Blocks below ``mmap_threshold`` bytes come from the heap, and up to ``trim_threshold``
    free bytes at its top stay there. Settings only: no memory is reserved. False where the C
    library is not glibc (no ``mallopt``, or one that refuses the values).
    """
    try:
        # The symbols already loaded into this process, the C library's among them.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 when it took the value.
    return (
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    )


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]
