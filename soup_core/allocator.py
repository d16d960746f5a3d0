"""Keep freed memory in the process instead of handing it back to the kernel after every op.

glibc's malloc serves large blocks (above a threshold that adapts up to 32 MiB) with fresh
pages from the kernel and trims freed memory at the top of the heap back to the kernel. A
landscape evaluation allocates and frees the same few activation sizes thousands of times, so
each call pays again for page faults: on this project's CPU (a virtual machine, where faults
are dear) a 31×31 BatchNorm-CNN grid took 186,000 minor faults and a third more time, and the
peers in ``bench/bench_landscape.py`` suffered as much (RESULTS.md).

:func:`keep_freed_memory` raises both thresholds for the whole process: blocks up to 32 MiB
come from the heap and freed memory stays for reuse, so a process holds on to its peak heap
instead of returning it. That is a process-wide choice, so only entry points that own their
process call it (the ``soup`` command line and the benchmarks); the library never does.
Elsewhere than glibc it does nothing.

>>> keep_freed_memory() in (True, False)
True
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own upper limit for this setting
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc to keep up to 1 GiB of freed heap and to serve blocks up to 32 MiB from it.

    Returns whether the setting took effect (False on other C libraries).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
