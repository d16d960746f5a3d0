"""What a checkpoint file may hold, checked before and right after it is read.

Reading never runs code (safetensors are parsed; pickles load with ``weights_only=True``), but
data alone can still hurt a shared server or a soup. The checks here refuse, with a message
naming the key:

* **Plain data from trainers, nothing else.** timm's ``train.py`` saves its ``args`` as an
  ``argparse.Namespace``; trainers store metrics and RNG states as numpy scalars and arrays and
  the torch version as ``TorchVersion``. :data:`TRAINER_GLOBALS` admits exactly these (reviewed:
  none can run code) through ``torch.serialization.safe_globals``; every other global is refused.
* **No decompression bombs.** ``torch.save`` stores tensor data uncompressed in its zip; a
  compressed member or more data than the file could hold is refused before anything is
  inflated.
* **No tensors that expand.** A tensor saved as a broadcast view (stride 0) stores one value
  for billions of elements; a soup would materialise them all. Meta, sparse and nested tensors
  hold no plain values to average.
* **dtypes by name.** Soups average float32/float16/bfloat16/float64 exactly (in float64);
  integer and bool tensors are copied. fp8 and complex weights are refused, not silently cast.
* **One value per key.** Duplicate keys in a safetensors header, or keys that collide as
  strings in a pickle (``1`` and ``"1"``), would silently keep one of two tensors.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import zipfile
from collections import Counter
from collections.abc import Mapping
from typing import IO, Any

import numpy as np
import torch
import torch.torch_version
from numpy._core import multiarray

from soup_core.errors import CheckpointError
from soup_core.state import names_list

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
_NUMPY_DTYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                 np.float16, np.float32, np.float64)
TRAINER_GLOBALS = [argparse.Namespace, torch.torch_version.TorchVersion, multiarray.scalar, multiarray._reconstruct,
                   np.ndarray, np.dtype, *(type(np.dtype(t)) for t in _NUMPY_DTYPES)]
# A safetensors header is JSON about the tensors; safetensors itself refuses more than 100 MB.
MAX_HEADER_BYTES = 100_000_000
# Zip members of a torch.save file are stored, not compressed: allow small compressed ones
# (e.g. written by a re-zipping tool) but never let inflation exceed this.
MAX_INFLATED_BYTES = 64 << 20


def check_zip(source: IO[bytes], name: str, file_size: int) -> None:
    """Refuse zip members that would inflate past what the file holds, and tensor records shorter
    than their tensors (checked before ``torch.load`` reads anything; the archive is opened once)."""
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
            inflated = sum(m.file_size for m in members if m.compress_type != zipfile.ZIP_STORED)
            if inflated > MAX_INFLATED_BYTES:
                raise CheckpointError(f"{name}: holds {inflated / 2**20:.0f} MiB of compressed data in a "
                                      f"{file_size / 2**20:.1f} MiB file; torch.save stores tensors uncompressed, "
                                      "so this file is refused (re-save it with torch.save)")
            stored = sum(m.file_size for m in members if m.compress_type == zipfile.ZIP_STORED)
            if stored > file_size:
                raise CheckpointError(f"{name}: its zip directory claims more data ({stored:,} bytes) than the "
                                      f"file holds ({file_size:,} bytes); the file is damaged or crafted")
            pickles = [m for m in members if m.filename.endswith("/data.pkl") and m.filename.count("/") == 1]
            data_pkl = archive.read(pickles[0]) if len(pickles) == 1 else None  # bounded by the checks above
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged archive fails in many ways (BadZipFile, zlib.error, seeks)
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({exc})") from None
    if data_pkl is None:
        return
    prefix, sizes = pickles[0].filename.removesuffix("data.pkl"), {m.filename: m.file_size for m in members}
    for key, needed in storage_bytes(data_pkl).items():
        held = sizes.get(f"{prefix}data/{key}", 0)
        if held < needed:  # memory-mapped, torch would read the next records' bytes as weights
            raise CheckpointError(f"{name}: zip record data/{key} holds {held:,} bytes but its tensor needs "
                                  f"{needed:,}; the file is damaged or crafted")


# The legacy typed storages torch.save names in a pickle, and their element sizes in bytes.
STORAGE_ITEMSIZE = {f"torch.{name}Storage": size for name, size in (
    ("Double", 8), ("Float", 4), ("Half", 2), ("BFloat16", 2), ("Long", 8), ("Int", 4), ("Short", 2), ("Char", 1),
    ("Byte", 1), ("Bool", 1), ("ComplexDouble", 16), ("ComplexFloat", 8))}


class _Placeholder:
    """What every global of a pickle becomes while :func:`storage_bytes` reads it: nothing runs."""

    qualname = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageReader(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.needs: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Placeholder,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> _Placeholder:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            kind, key, numel = getattr(pid[1], "qualname", ""), pid[2], pid[4]
            itemsize = STORAGE_ITEMSIZE.get(kind, 1)  # UntypedStorage (and any other): numel counts bytes
            if isinstance(key, str) and isinstance(numel, int) and not isinstance(numel, bool):
                self.needs[key] = max(self.needs.get(key, 0), numel * itemsize)
        return _Placeholder()


def storage_bytes(data_pkl: bytes) -> dict[str, int]:
    """Bytes each zip record of a ``torch.save`` file must hold, from its ``data.pkl``; read by an
    unpickler whose every global is an inert placeholder (no code runs), so it can be asked before
    ``torch.load``, which memory-maps a record without checking its size."""
    reader = _StorageReader(data_pkl)
    try:
        reader.load()
    except Exception:  # a pickle this reader cannot follow: torch.load's own checks still apply
        pass
    return reader.needs


def check_header(header: bytes, name: str) -> None:
    """Refuse a safetensors header with duplicate keys (the reader would keep only the last)."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        repeated = sorted(k for k, n in Counter(k for k, _ in items).items() if n > 1)  # linear in the keys
        if repeated:
            raise CheckpointError(f"{name}: the header names {names_list(repeated)} more than once; "
                                  "each tensor must appear once")
        return dict(items)
    try:
        json.loads(header, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{name}: not a valid safetensors file (header: {str(exc)[:120]})") from None


# What a file that is not a checkpoint most often is, by its first bytes.
MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
         (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"),
         (b"<!doctype", "an HTML page"), (b"<html", "an HTML page"), (b"{", "JSON text"))


def sniff_format(head: bytes) -> str | None:
    """What the first bytes of a file say it is, when that is a common non-checkpoint format.

    >>> sniff_format(b"\\x89PNG\\r\\n\\x1a\\n"), sniff_format(b"<!DOCTYPE html>")
    ('a PNG image', 'an HTML page')
    """
    start = head.lstrip()[:16].lower()
    return next((kind for magic, kind in MAGIC if start.startswith(magic.lower())), None)


def not_a_checkpoint(head: bytes, name: str) -> CheckpointError | None:
    """The error for a file whose first bytes are another format (a PNG renamed ``.safetensors``)."""
    kind = sniff_format(head)
    if kind is None:
        return None
    return CheckpointError(f"{name}: this is {kind}, not a checkpoint (its first bytes say so); "
                           "choose a .safetensors, .pt, .pth or .bin file of model weights")


def safetensors_header(head: bytes, read_more, name: str) -> bytes:
    """The JSON header of a safetensors file, its length checked before it is read."""
    if len(head) < 8:
        raise not_a_checkpoint(head, name) or CheckpointError(
            f"{name}: not a valid safetensors file (shorter than its 8-byte header length)")
    size = int.from_bytes(head[:8], "little")
    if size > MAX_HEADER_BYTES:
        raise not_a_checkpoint(head, name) or CheckpointError(
            f"{name}: not a valid safetensors file (a {size:,}-byte header)")
    return read_more(size)


def check_keys(obj: Mapping[Any, Any], name: str) -> None:
    """Refuse pickled state dicts whose keys collide once turned into strings."""
    seen: dict[str, Any] = {}
    for key in obj:
        text = str(key)
        if text in seen:
            raise CheckpointError(f"{name}: keys {seen[text]!r} and {key!r} are both {text!r}; "
                                  "a state dict needs one tensor per name")
        seen[text] = key


def check_tensors(state: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse tensors a soup cannot average: unknown dtypes, meta/sparse/nested, expanded views."""
    for key, tensor in state.items():
        if tensor.is_nested:
            raise CheckpointError(f"{name}: tensor {key!r} is a nested tensor; soups need plain tensors — "
                                  "save its components as separate tensors")
        if tensor.layout != torch.strided:
            raise CheckpointError(f"{name}: tensor {key!r} is {str(tensor.layout).removeprefix('torch.')}; soups "
                                  "need plain (strided) tensors — save it with .to_dense()")
        if tensor.is_meta:
            raise CheckpointError(f"{name}: tensor {key!r} is on the meta device and holds no values; "
                                  "save the materialised weights")
        if tensor.dtype not in FLOAT_DTYPES + INTEGER_DTYPES:
            dtype = str(tensor.dtype).removeprefix("torch.")
            advice = ("soups average real weights; save the real part or convert" if tensor.is_complex()
                      else "convert to bfloat16, float16 or float32 before souping")
            raise CheckpointError(f"{name}: tensor {key!r} has dtype {dtype}, which is not supported ({advice})")
        stored = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
        if tensor.numel() > max(stored, 1):
            raise CheckpointError(f"{name}: tensor {key!r} is an expanded view ({tensor.numel():,} elements over "
                                  f"{stored:,} stored); save it with .contiguous() or .clone()")
