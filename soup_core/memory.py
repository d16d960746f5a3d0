"""Memory a soup needs, chosen rather than implied: what a device has free, and how the running sum
of an evaluated recipe (greedy, pruned) is kept within a budget.

An evaluated recipe holds, beside the evaluator's own model, on the evaluator's device:

* **the running sum** of the soup's ingredients, one entry per float parameter: float64
  (8 bytes, exact to float64 rounding, the default where it fits) or float32 (4 bytes);
* **the candidate soup** it scores next, in the ingredients' own dtype;
* **the candidate ingredient moved to the device**, in its own dtype, when the ingredients
  live elsewhere (checkpoints on the CPU, the evaluator on a GPU).

The ingredients themselves stay where they are (memory-mapped files cost page cache, not
anonymous memory). Everything else is per tensor and freed before the next one.

float32 is the plain sum, not a compensated one: Kahan or Neumaier compensation keeps a second
float32 per parameter, which is exactly float64's 8 bytes and less exact. Its rounding error is
at most k·2⁻²⁴ of the largest of the k ingredients' magnitudes at each entry (a few float32
units; below half a unit of bfloat16 or float16 weights, which round it away except at ties).

>>> plan_bytes(1_000_000_000, 2, "float64")  # a 1B-parameter bf16 model: sum + candidate
10000000000
>>> largest_model(24 * 2**30, 2, "float32")  # on 24 GiB, counting the evaluator's model too
3221225472
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from soup_core.errors import RecipeError

if TYPE_CHECKING:  # the CLI reads sizes without importing torch
    import torch

SUM_BYTES = {"float64": 8, "float32": 4}
BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SUM_PRECISIONS = ("auto", *SUM_BYTES)


def parse_size(text: str | int) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a number of bytes (units as transformers' ``max_shard_size``).

    >>> parse_size("5GB"), parse_size("1.5 GiB"), parse_size("1000")
    (5000000000, 1610612736, 1000)
    """
    text = str(text)
    number = text.strip().upper().rstrip("IBKMGT ")
    unit = text.strip().upper()[len(number):].strip()
    try:
        value = float(number) * BYTE_UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{text!r}: a size must be at least one byte")
    return int(value)


class ByteSize(int):
    """A recipe parameter counted in bytes, written as :func:`parse_size` reads it."""

    def __new__(cls, value: str | int) -> ByteSize:
        try:
            return super().__new__(cls, parse_size(value))
        except ValueError as error:
            raise RecipeError(str(error)) from None

    def __str__(self) -> str:
        return f"{int(self) / 1e9:g}GB"


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: the GPU's free memory, or the machine's available memory
    (``MemAvailable``, which counts reclaimable page cache as free)."""
    if device.type == "cuda":
        import torch
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: assume a modest machine
        return 8 << 30


def plan_bytes(parameters: int, dtype_bytes: int, precision: str, *, staged: bool = False) -> int:
    """Bytes an evaluated recipe holds for a model of ``parameters`` float entries of
    ``dtype_bytes`` each: the running sum, the candidate soup, and the moved candidate when
    ``staged`` (ingredients on another device than the evaluator)."""
    return parameters * (SUM_BYTES[precision] + dtype_bytes * (2 if staged else 1))


def largest_model(memory: int, dtype_bytes: int, precision: str, *, staged: bool = False) -> int:
    """The most parameters an evaluated recipe can handle in ``memory`` bytes, the evaluator's own
    copy of the model included (activations, a few batches, are not)."""
    return memory // (plan_bytes(1, dtype_bytes, precision, staged=staged) + dtype_bytes)


def state_plan(state: Mapping[str, torch.Tensor], keys: list[str], device: torch.device,
               precision: str) -> int:
    """:func:`plan_bytes` for an ingredient ``state`` whose float tensors ``keys`` are summed on
    ``device``, plus the one temporary in the sum's precision that a candidate's tensor is
    computed in; integer buffers, copied into the candidate, count too."""
    floats = sum(state[k].numel() * state[k].element_size() for k in keys)
    summed = sum(state[k].numel() for k in keys) * SUM_BYTES[precision]
    summed += max((state[k].numel() for k in keys), default=0) * SUM_BYTES[precision]  # one tensor's temporary
    others = sum(t.numel() * t.element_size() for k, t in state.items() if k not in keys)
    staged = any(state[k].device != device for k in keys)
    return summed + floats * (2 if staged else 1) + others


def choose_precision(requested: str, state: Mapping[str, torch.Tensor], keys: list[str],
                     device: torch.device, budget: int | None) -> str:
    """The running sum's precision: ``requested``, or with ``"auto"`` float64 where it fits in
    ``budget`` (default: what ``device`` has free) and float32 otherwise. A plan that does not
    fit is a :class:`RecipeError` naming the bytes needed and the bytes there are."""
    available = free_memory(device) if budget is None else budget
    options = SUM_BYTES if requested == "auto" else {requested: SUM_BYTES[requested]}
    for precision in options:
        if state_plan(state, keys, device, precision) <= available:
            return precision
    cheapest = list(options)[-1]
    needed = state_plan(state, keys, device, cheapest)
    where = "the memory budget" if budget is not None else f"free on {device}"
    raise RecipeError(f"the running sum ({cheapest}) and the candidate soup need {needed / 1e9:.2f} GB on {device}, "
                      f"but {available / 1e9:.2f} GB is {where}; free memory, give a larger --memory-budget"
                      + ("" if requested == "auto" else " or --sum-precision auto")
                      + ", or use a device with more memory")
