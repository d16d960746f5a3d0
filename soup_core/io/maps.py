"""Why a checkpoint could not be memory-mapped, said as the kernel's numbers say it.

Each open checkpoint costs the process one memory map, and the kernel allows a process
``vm.max_map_count`` of them (65,530 by default). A zoo of more files than that fails on the file
past the limit with ``ENOMEM``, which the readers report as "Cannot allocate memory" -- true, but it
sends the user looking for RAM. :func:`mapping_error` names the limit instead, when it is the cause.

>>> mapping_error("ft-00.safetensors", ValueError("header too large")) is None  # not a mapping failure
True
>>> str(mapping_error("ft-00.safetensors", MemoryError(12, "Cannot allocate memory")))[:45]  # a few maps held
'ft-00.safetensors: cannot be read: out of mem'
"""

from __future__ import annotations

from pathlib import Path

from soup_core.errors import CheckpointError

MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")
OWN_MAPS = Path("/proc/self/maps")
NEAR_THE_LIMIT = 0.95  # maps held, as a share of the limit, from which ENOMEM means the limit


def mapping_error(name: str, exc: BaseException) -> CheckpointError | None:
    """The one-line error for a checkpoint whose mapping failed with ENOMEM; None for other failures."""
    text = str(exc)
    if "Cannot allocate memory" not in text and "os error 12" not in text and getattr(exc, "errno", None) != 12:
        return None
    held, limit = maps_held(), map_limit()
    if held is None or limit is None or held < NEAR_THE_LIMIT * limit:  # memory itself, not the map limit
        return CheckpointError(f"{name}: cannot be read: out of memory ({text.strip()[:200]})")
    return CheckpointError(
        f"{name}: cannot be memory-mapped: this process holds {held:,} memory maps and the kernel allows "
        f"{limit:,} (vm.max_map_count), one per open checkpoint; open fewer checkpoints at once (split the "
        "folder), or raise the limit (sysctl -w vm.max_map_count=262144)")


def maps_held() -> int | None:
    """How many memory maps this process holds (None where /proc does not say)."""
    try:
        with OWN_MAPS.open("rb") as maps:
            return sum(1 for line in maps if not line.rstrip().endswith(b"[vsyscall]"))  # not a map of ours
    except OSError:
        return None


def map_limit() -> int | None:
    """The kernel's limit on a process's memory maps (None where /proc does not say)."""
    try:
        return int(MAX_MAP_COUNT.read_text())
    except (OSError, ValueError):
        return None
