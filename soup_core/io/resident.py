"""Checkpoints held in the process's own memory, for servers.

A memory-mapped checkpoint costs no memory, but a file truncated under the process (what
``cp new.safetensors ft-05.safetensors`` does first) turns the next read of a mapped page into
SIGBUS, which kills the process — a whole workshop's server. :func:`load_resident` reads the
file's bytes into memory instead (a file that ends early is a :class:`CheckpointError`), so a
changed file never reaches a running soup; :func:`files_identity` says when a file changed, so
a server can open the zoo again. Hugging Face folders are mapped, then copied (ties kept).

>>> import safetensors.torch, tempfile, torch, os
>>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
>>> safetensors.torch.save_file({"w": torch.ones(2)}, path)
>>> state = load_resident(path)
>>> with open(path, "r+b") as handle:
...     _ = handle.truncate(10)
>>> state["w"].tolist()  # still there: the bytes were read, not mapped
[1.0, 1.0]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from soup_core.errors import CheckpointError
from soup_core.io.read import hashed_files, inside_roots, load_state_dict, load_state_dict_bytes, stamp
from soup_core.state import StateDict


def read_whole(path: Path) -> bytes:
    """Every byte of ``path`` as it was when opened; a file that ends early is a clear error."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        data = handle.read(size)
    if len(data) != size:
        raise CheckpointError(f"{path}: the file ended at byte {len(data):,} of {size:,} while it was read "
                              "(was it being replaced?); open it again when the copy is complete")
    return data


def load_resident(path: str | os.PathLike[str], roots: Sequence[Path] | None = None) -> StateDict:
    """A checkpoint's tensors in this process's memory (see the module)."""
    path = Path(path)
    if roots is not None:
        inside_roots(path, roots)
    if path.is_file():
        return load_state_dict_bytes(read_whole(path), str(path))
    mapped = load_state_dict(path, roots=roots)
    copies: dict[tuple, torch.Tensor] = {}  # one copy per view: tied tensors stay tied
    out = {}
    for key, tensor in mapped.items():
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        out[key] = copies.setdefault(view, tensor.clone())
    return out


def files_identity(paths: Sequence[Path]) -> tuple:
    """The :func:`~soup_core.io.read.stamp` of every file the checkpoints at ``paths`` are read from
    (a missing one as None): it changes when any of them is replaced, rewritten or truncated."""
    out: list = []
    for path in paths:
        try:
            out.extend(stamp(hashed_files(Path(path))))
        except OSError:
            out.append((str(path), None))
    return tuple(out)
