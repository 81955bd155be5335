"""Keep the C allocator from holding on to freed memory between decoder layers (glibc only).

glibc's ``malloc`` raises its mmap threshold each time a large mmapped block is freed (up to
32 MB), and its trim threshold to twice that. After the first layer's forward, the forward's
temporaries (a few MB to tens of MB each) come from the heap instead of their own mappings, and
the heap is only given back to the kernel from its top. A tensor that outlives the forward (the
layer's output, the hidden states of the next layer) sits above the freed temporaries and pins
them, so the process's resident memory grows from layer to layer although the live bytes do not
(on the 26B-A4B-shaped stack of ``bench/profile_memory.py`` the streamed peak grew at every one
of its four layers). ``tests/test_allocator.py`` shows the mechanism on one pinned block.

:func:`return_freed_memory` fixes both thresholds (which also turns the adjustment off), so every
block of at least :data:`MMAP_THRESHOLD_BYTES` has its own mapping and goes back to the kernel
when freed, and calls ``malloc_trim(0)``. It is what the layer-streamed replay calls before it
starts and after each layer is freed. The settings are process-wide and stay: a profile runs in
a process of its own (``invoke profile`` or a container). Elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks of at least 1 MiB get their own mapping: the page faults of a fresh mapping are small
# next to a layer's matrix products (the bench's streamed/whole time ratio includes them).
MMAP_THRESHOLD_BYTES = 1 << 20
# Free memory at the top of the heap above this is given back at once.
TRIM_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (present in glibc only)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def _fixed_thresholds() -> ctypes.CDLL | None:
    """glibc with its mmap and trim thresholds fixed (set once per process); None elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return libc


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (once) and trim the heap now; False where it cannot (not glibc)."""
    libc = _fixed_thresholds()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
