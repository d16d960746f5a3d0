"""Keep freed memory in the process instead of handing it back to the kernel after every op.

glibc's malloc serves large blocks (above a threshold that adapts up to 32 MiB) with fresh
pages from the kernel, and trims freed memory at the top of the heap back to the kernel. The
folded landscape evaluation allocates and frees the same few activations of several MiB for
every chunk of points, so each chunk pays again for page faults, which are dear in a virtual
machine (``python bench/bench_landscape.py --return-freed-memory`` counts them; figures in
bench/RESULTS.md, "Landscape"). Per-point evaluation allocates small blocks and sees few faults.

:func:`keep_freed_memory` raises both thresholds for the whole process: blocks up to 32 MiB
come from the heap, and freed memory stays for reuse, so a process keeps its peak heap
instead of returning it. That is a process-wide choice, so only entry points that own their
process call it: the ``soup`` command line, the app's server (``app.py``) and the benchmarks.
The library never does; a script of your own can. Elsewhere than glibc it does nothing.

>>> keep_freed_memory() in (True, False)
True
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own upper limit for this setting
TRIM_THRESHOLD = 1 << 30


@functools.cache  # once per process: the app calls it on every rerun
def keep_freed_memory() -> bool:
    """Ask glibc to keep up to 1 GiB of freed heap and to serve blocks up to 32 MiB from it.

    Returns whether the setting took effect (False on other C libraries).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded in this process
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
