"""Keep freed heap memory inside the process on glibc Linux, for training on the CPU.

A training step allocates and frees the same activation and gradient buffers (a few MiB each) every step.
By default glibc serves such blocks with fresh mmap or hands them back to the kernel once freed (heap
trimming), so the next step faults every page in again, zero-filled; in a VM each fault costs
microseconds. On the 2-core benchmark machine that measured 10 to 25% of a training step, in element-wise
kernels that otherwise take a fraction of a millisecond. PyTorch's CUDA caching allocator keeps freed
blocks for reuse on the GPU; this does the same on the CPU heap: blocks up to 32 MiB (glibc's largest
mmap threshold) come from the heap, and the heap is never trimmed, so the process keeps its high-water
mark of heap memory (which it reached anyway) instead of returning it between steps.

Users' own settings win: nothing changes when MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or
GLIBC_TUNABLES is set, or when the C library is not glibc (macOS, musl), or when
`train.keep_freed_memory` is false.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc malloc to reuse freed memory instead of returning it; True when the settings were applied
    (now or by an earlier call)."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(key in os.environ for key in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; a fixed mmap threshold also stops glibc's own dynamic adjustment
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1 and ok
    _applied = ok
    return ok
