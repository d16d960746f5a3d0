"""Precision of forward passes: exact float32, TF32 tensor cores, or bfloat16 autocast.

* ``"fp32"`` (the default) is exact float32 arithmetic everywhere, including cuDNN
  convolutions, which PyTorch otherwise lets run in TF32 on Ampere and later GPUs. Landscapes
  and soups agree with the peers' float32 code to the last digit only here.
* ``"tf32"`` lets CUDA matmuls and convolutions use TF32 tensor cores (10-bit mantissa inputs,
  float32 accumulation). TF32 is a GPU format: on a CPU it runs as ``"fp32"``.
* ``"bf16"`` runs the forward pass under ``torch.autocast`` in bfloat16 (8-bit mantissa).
  Losses are still summed in float64 from float32 logits, but each point's loss moves: the
  landscape engine measures that move on a probe and reports it (``precision_deviation``).

The cuDNN and matmul switches are process-wide in PyTorch, so :func:`precision` sets them for
the duration of a call under a lock, and restores them after.

>>> import torch
>>> with precision("bf16", torch.device("cpu")):
...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
torch.bfloat16
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from soup_core.errors import UsageError
from soup_core.policies import PRECISIONS

_SWITCHES = threading.RLock()


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise UsageError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    return name


@contextlib.contextmanager
def precision(name: str, device: torch.device) -> Iterator[None]:
    """Run the body's forward passes on ``device`` in precision ``name`` (one of PRECISIONS)."""
    check_precision(name)
    if name == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if device.type != "cuda":  # fp32, and tf32 on a CPU: plain float32 arithmetic
        yield
        return
    tf32 = name == "tf32"
    with _SWITCHES:
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
