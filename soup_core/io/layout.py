"""The safetensors file layout, read and written without holding the tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and byte range; optional ``__metadata__`` strings), then the tensors' bytes. Since
the header holds everything but the values, a merge can plan its output before computing
anything and write each tensor where it belongs as soon as it exists (:mod:`soup_core.io.weights_out`),
and read one tensor of an input by its byte range (:mod:`soup_core.merge.sources`).

We write exactly what ``safetensors.torch.save`` writes — tensors ordered by dtype (its enum,
descending) then name, the header compact JSON padded with spaces to 8 bytes — except that the
metadata comes first and sorted (``safetensors`` orders it by a per-process hash map, so the
same soup would give other bytes each time). A test holds this against ``safetensors`` itself.

>>> import torch
>>> infos = {"w": TensorInfo(torch.float32, (2,)), "step": TensorInfo(torch.int64, ())}
>>> header, offsets = build_header(infos, {"format": "pt"})
>>> header[:40]
b'{"__metadata__":{"format":"pt"},"step":{'
>>> offsets
{'step': (0, 8), 'w': (8, 16)}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from soup_core.errors import CheckpointError
from soup_core.state import names_list

# safetensors' dtype names, in the order of its Rust enum (files are laid out by it, descending).
DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
               "F64", "I64", "U64")
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "U64": torch.uint64,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: enough to plan a merge without its values."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorInfo:
        return cls(tensor.dtype, tuple(tensor.shape))


def data_order(infos: Mapping[str, TensorInfo]) -> list[str]:
    """The order in which safetensors lays tensors out: dtype (enum order, descending), then name."""
    return sorted(infos, key=lambda k: (-DTYPE_ORDER.index(DTYPE_NAMES[infos[k].dtype]), k))


def build_header(infos: Mapping[str, TensorInfo],
                 metadata: Mapping[str, str] | None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header (padded, without its 8-byte length) and each tensor's byte range in the data."""
    unknown = [k for k, info in infos.items() if info.dtype not in DTYPE_NAMES]
    if unknown:
        raise CheckpointError(f"cannot write {names_list(unknown)}: dtype {infos[unknown[0]].dtype} has no "
                              "safetensors name")
    offsets, position = {}, 0
    entries: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    for key in data_order(infos):
        info = infos[key]
        offsets[key] = (position, position + info.nbytes)
        entries[key] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                        "data_offsets": [position, position + info.nbytes]}
        position += info.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % 8), offsets


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a file (absolute offsets), and what they are."""

    info: TensorInfo
    begin: int
    end: int


def parse_header(header: bytes, file_size: int, name: str) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Tensors (with absolute byte ranges checked against ``file_size``) and metadata of a header."""
    try:
        parsed = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{name}: not a valid safetensors file (header: {str(exc)[:120]})") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{name}: not a valid safetensors file (its header is not a JSON object)")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{name}: not a valid safetensors file (its __metadata__ is not a map of strings)")
    start = 8 + len(header)
    tensors: dict[str, StoredTensor] = {}
    for key, entry in parsed.items():
        try:
            dtype, shape, offsets = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in (*shape, *offsets))):
                raise TypeError
        except (KeyError, TypeError):
            raise CheckpointError(f"{name}: tensor {key!r} has a malformed header entry") from None
        info, (begin, end) = TensorInfo(dtype, tuple(shape)), offsets
        if min(shape, default=0) < 0 or end - begin != info.nbytes or begin < 0 or start + end > file_size:
            raise CheckpointError(f"{name}: tensor {key!r} claims bytes {begin}–{end} for shape {list(shape)} "
                                  f"{entry['dtype']}, which the file ({file_size:,} bytes) does not hold; "
                                  "the file is truncated or damaged")
        tensors[key] = StoredTensor(info, start + begin, start + end)
    # As safetensors requires: the tensors tile the data, no gaps, no overlaps.
    position = start
    for key, stored in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if stored.begin != position:
            raise CheckpointError(f"{name}: tensor {key!r} starts at byte {stored.begin - start} of the data, "
                                  f"not {position - start}: the byte ranges overlap or leave gaps")
        position = stored.end
    return tensors, dict(metadata)
