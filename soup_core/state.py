"""The basic vocabulary: state dicts, which tensors are parameters, tied groups, a content digest.

A *state dict* maps names to tensors, as ``nn.Module.state_dict()`` does. Two facts about its
tensors matter everywhere in the library:

* **Float or integer.** Float (and complex) tensors are parameters and running statistics, and
  are averaged; integer tensors (``num_batches_tracked``, ``position_ids``) are counters and
  tables, and never are (see :mod:`soup_core.params`).
* **Tied groups.** Keys whose tensors share storage (an embedding and an output head) are one
  parameter: averaged once, written once, counted once.

>>> import torch
>>> from soup_core.state import tied_aliases
>>> w = torch.ones(2, 2)
>>> tied_aliases({"embed.weight": w, "head.weight": w, "head.bias": torch.zeros(2)})
{'head.weight': 'embed.weight'}
"""

from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections.abc import Callable, Mapping

import torch

StateDict = dict[str, torch.Tensor]

# Long work reports progress as (fraction done, message) and may be asked to stop early.
Progress = Callable[[float, str], None]
ShouldStop = Callable[[], bool]


def is_float(tensor: torch.Tensor) -> bool:
    """Whether a tensor is averaged (float or complex) or copied (integer, bool)."""
    return tensor.is_floating_point() or tensor.is_complex()


# Integer tensors that count or switch (a step counter, an EMA's update count, a quantization
# observer's on/off flag) differ between fine-tunings and are copied from one of them. A table
# (position_ids) or a quantized weight holds many integers: it must be equal in every ingredient,
# since copying one of several different ones would be a silent choice.
COUNTERS = ("num_batches_tracked", "n_averaged")


def is_counter(key: str, numel: int = 1) -> bool:
    """Whether an integer tensor is a counter or a switch (copied though it differs): a known
    counter's name, or a single integer."""
    return key.rsplit(".", 1)[-1] in COUNTERS or numel <= 1


def integer_differs_message(name: str, key: str, dtype: torch.dtype, reference: str) -> str:
    """The one line for an integer tensor that is not the same in every ingredient."""
    return (f"{name}: integer tensor {key!r} ({str(dtype).removeprefix('torch.')}) differs from {reference}'s; "
            "integer tensors (tables, quantized weights) are never averaged, only copied when every ingredient "
            "has the same: dequantize the checkpoints to float first, or leave this one out")


# BatchNorm's running statistics: float buffers that a state dict holds beside the parameters.
STATISTIC_SUFFIXES = ("running_mean", "running_var")


def is_statistic(key: str) -> bool:
    """Whether a key names a BatchNorm running statistic (by its last component, as PyTorch names them)."""
    return key.rsplit(".", 1)[-1] in STATISTIC_SUFFIXES


def _same_view(tensor: torch.Tensor) -> tuple:
    """Equal for two tensors that are the same view of the same storage."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def tied_groups(state: Mapping[str, torch.Tensor]) -> tuple[tuple[str, ...], ...]:
    """Groups of keys whose tensors share storage (tied weights, e.g. embeddings and head)."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in state.items():
        if tensor.numel() == 0:
            continue
        groups.setdefault(_same_view(tensor), []).append(key)
    return tuple(tuple(keys) for keys in groups.values() if len(keys) > 1)


def tied_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Each tied key but the first of its group, mapped to that first key."""
    return {alias: group[0] for group in tied_groups(state) for alias in group[1:]}


# sha256 of each tensor's bytes, by tensor object and its in-place version counter: a checkpoint
# scored again (a greedy step, a page rerun) is not hashed again. Entries leave with their tensors.
_TENSOR_DIGESTS: dict[int, tuple[weakref.ref, int, bytes]] = {}
_DIGESTS_LOCK = threading.Lock()


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    key = id(tensor)
    try:
        version = tensor._version
    except RuntimeError:  # inference-mode tensors keep no version counter: hashed every time
        version = None
    with _DIGESTS_LOCK:
        cached = _TENSOR_DIGESTS.get(key)
    if version is not None and cached is not None and cached[0]() is tensor and cached[1] == version:
        return cached[2]
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().data if data.numel() else b"").digest()
    if version is None:
        return digest
    try:
        ref = weakref.ref(tensor, lambda _, key=key: _TENSOR_DIGESTS.pop(key, None))
    except TypeError:  # a tensor subclass without weak references: hashed every time
        return digest
    with _DIGESTS_LOCK:
        _TENSOR_DIGESTS[key] = (ref, version, digest)
    return digest


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict: keys, dtypes, shapes and values (the metric-cache key).

    Each tensor's bytes are hashed once per process while the tensor lives and is not modified
    in place (``tensor._version``); writes through ``tensor.data`` bypass that counter, so a
    state dict edited that way must be passed as new tensors.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_digest(tensor))
    return digest.hexdigest()


def to_device(state: Mapping[str, torch.Tensor], device: torch.device | str) -> StateDict:
    """``state`` on ``device``, tied tensors still tied (one copy per shared storage)."""
    moved: dict[tuple, torch.Tensor] = {}
    out: StateDict = {}
    for key, tensor in state.items():
        ident = _same_view(tensor)
        if ident not in moved or tensor.numel() == 0:
            moved[ident] = tensor.to(device)
        out[key] = moved[ident]
    return out


def names_list(keys: list[str], limit: int = 8) -> str:
    """``'a', 'b' and 3 more``: key lists in error messages, kept to one line."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


__all__ = ["Progress", "STATISTIC_SUFFIXES", "ShouldStop", "StateDict", "is_float", "is_statistic", "names_list",
           "state_dict_digest", "tied_aliases", "tied_groups", "to_device"]


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """``state`` without ``prefix`` (``module.`` from DataParallel/DDP) when every key has it."""
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


def finite_number(value: object) -> bool:
    """Whether a value read from a manifest, a link or a JSON file is a number with a finite float
    value: not a bool, not NaN or infinity, and not an integer too large for a float (400 digits,
    on which ``math.isfinite`` raises).

    >>> finite_number(3), finite_number(0.5), finite_number(True), finite_number(float("inf")), finite_number(10**400)
    (True, True, False, False, False)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 2 ** 1023 if isinstance(value, int) else math.isfinite(value)
