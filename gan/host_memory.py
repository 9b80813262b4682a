"""Keep freed host memory in the process instead of handing it back to the kernel every step.

A training step on the CPU frees and allocates the same activations and gradients every
iteration. glibc's malloc serves blocks above its mmap threshold with fresh ``mmap`` calls, and
gives free memory at the top of a heap back to the kernel: in the main arena once more than its
trim threshold lies there, and in a thread's arena (Ray Train runs the loop on a thread) a whole
64 MiB heap as soon as it is free. The mmap threshold also moves: each freed mmapped block raises
it to that block's size, up to 32 MiB. So depending on the run, every step gave pages back and
faulted them in again: 135 to 1,000 minor page faults per 1-worker step of the default model,
which cost that step 6 % of its images/s on a 2-core host, and a bare PyTorch loop 13 %
(docs/benchmarks.md, "Twelfth session").

Fixed settings end all three: blocks below 32 MiB come from a heap, up to 1 GiB of free memory
stays at the top of the main heap, and every arena keeps 64 MiB of padding, so a thread's heap
is not unmapped when a step has freed it. Settings only: they reserve no memory, and the
resident size stays at the step's own peak.

Other C libraries (macOS, musl) are left alone; so is an allocator preloaded in glibc's place.
"""

from __future__ import annotations

import ctypes

# mallopt's parameter numbers in glibc's malloc.h, and the values set.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
SETTINGS = {
    # glibc's own ceiling for its moving threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), which
    # is also the most that glibc before 2.26 accepts.
    _M_MMAP_THRESHOLD: 32 * 1024 * 1024,
    _M_TRIM_THRESHOLD: 1024 * 1024 * 1024,
    # A thread arena's heap is 64 MiB: padding that large keeps a freed heap mapped.
    _M_TOP_PAD: 64 * 1024 * 1024,
}


def keep_freed_memory() -> bool:
    """Fix glibc malloc's mmap threshold, trim threshold and top padding for this process;
    whether all three were taken. False where the C library has no ``mallopt`` or refuses a
    value. Process-wide, and harmless to call again."""
    try:
        # The symbols already loaded into this process, the C library's among them.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Each is worth having alone, so all are tried; mallopt answers 1 when it took the value.
    taken = [mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items()]
    return all(taken)


__all__ = ["SETTINGS", "keep_freed_memory"]
