"""Freed tensor memory goes back to the operating system (glibc), so a rank's RSS follows its live tensors.

glibc serves an allocation from its heap unless it is at least the mmap threshold, and raises that
threshold (up to 32 MiB) each time a mapped block is freed. After the first freed layer-sized
tensor, gathered parameters, gradients and activations of a few MiB land in the heap, which is
rarely returned: a rank's resident memory then keeps the high-water mark of every transient it ever
had (measured by benchmarks/command_memory.py: about half a model copy per rank under FSDP). A
fixed threshold (which also switches that adjustment off) maps every tensor of MMAP_THRESHOLD or
more on its own and unmaps it on free. The (chunk, V) buffers reused across passes
(head.reused_buffers) keep their pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20  # bytes


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
