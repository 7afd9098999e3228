"""How the training process asks the C library for host memory.

PyTorch's CPU allocator is plain `malloc`/`free`, with no cache of its own. glibc serves blocks above its mmap
threshold (128 KiB at start, raised as large blocks are freed, at most 32 MiB) with a fresh `mmap` each time and
unmaps them on `free`; it also hands the top of its heap back to the kernel once more than the trim threshold is
free. A training step allocates and frees the same activations, gradients and optimizer temporaries every step,
so with those defaults many of them arrive as fresh pages: one page fault per 4 KiB touched, which in a virtual
machine costs 1-7 microseconds each (measured here: 64 MiB first touched in 45-125 ms, refilled in 4 ms). A
plait step of the 16M-parameter MiMo benchmark model at 2 x 256 tokens took ~7,000-9,000 such faults and ran
10-17% slower than with the blocks kept; `benchmarks/train_step.py --host-allocator` measures both ways.

`keep_freed_blocks` fixes both thresholds (`mallopt`), so blocks up to 32 MiB come from the heap and the heap is
not trimmed: freed memory is reused by the next step, as a GPU caching allocator does, instead of being faulted in
again. The peak resident memory stays what the step needs (the heap grows to the step's peak and no further);
what changes is that it is not returned between steps. Larger blocks are still mapped per use (glibc has no way
to keep them).

The setting is process-wide, so it is the trainer's call (`train.host_allocator`), not the library's: importing
plait never changes the allocator of the program that imports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD_MAX = 32 * 2**20
# free heap kept before trimming: mallopt takes a C int, so the most it can say (2 GiB), above the working set of
# any step plait trains on a CPU
TRIM_THRESHOLD = 2**31 - 1

ALLOCATOR_MODES = ("keep_freed", "default")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache  # finding the library reads the interpreter's binary: once per process, not per call
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int  # range-checked
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 and newer
        libc.mallinfo2.argtypes, libc.mallinfo2.restype = (), _MallInfo2
    return libc


def keep_freed_blocks() -> bool:
    """Fix glibc's mmap and trim thresholds so freed blocks up to 32 MiB stay in the heap for reuse. True when
    set; False where the C library is not glibc (musl, macOS, Windows), which keeps its own behaviour."""
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success, 0 on a value it rejects; both are set either way
    mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    trim_set = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return mmap_set and trim_set


def heap_in_use_bytes() -> int | None:
    """Bytes the C library has handed out and not had back (glibc's `mallinfo2`: in-use heap chunks of every arena
    plus mapped blocks): the live allocations, whatever the resident set keeps besides. None where the C library
    is not glibc 2.33 or newer."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def configure_host_allocator(mode: str) -> bool:
    """Apply `train.host_allocator`: "keep_freed" (see `keep_freed_blocks`) or "default" (leave the C library as
    it is). Returns whether anything was changed."""
    if mode not in ALLOCATOR_MODES:
        raise ValueError(f"host_allocator: expected one of {ALLOCATOR_MODES}, got {mode!r}")
    return keep_freed_blocks() if mode == "keep_freed" else False
