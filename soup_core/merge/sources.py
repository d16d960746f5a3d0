"""Checkpoints as tensor sources: names, dtypes and shapes from the header; values a block at a time.

The merge engine asks a source for one block of one tensor at a time. For safetensors files and
Hugging Face folders of them (sharded or not), :class:`SafetensorsSource` reads exactly those
bytes with ``pread`` — no memory map, so a file truncated under a running merge is a clear error,
not a SIGBUS — and feeds the same bytes to the file's sha256 on the way: when the merge reads
tensors in the order they lie on disk (it does: :func:`SafetensorsSource.layout_order`), every
data byte is read once, for the merge and the provenance together (the headers, a few KB, twice:
they are parsed before the data; tested). Other checkpoints (``.bin``, ``.pt``,
training checkpoints) load through the safe reader (:func:`soup_core.io.load_state_dict`,
memory-mapped where the format allows) as a :class:`MappingSource`.

>>> import torch
>>> source = MappingSource({"w": torch.arange(6.0).reshape(2, 3)}, name="toy")
>>> source.infos["w"].shape, source.read("w", 2, 5).tolist()
((2, 3), [2.0, 3.0, 4.0])
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from soup_core.errors import CheckpointError
from soup_core.io.layout import StoredTensor, TensorInfo, parse_header
from soup_core.io.lora import AdapterWeights, is_adapter_folder, read_updates
from soup_core.io.read import (TIED_KEY, check_index_keys, file_sha256, hashed_files, inside_roots,
                               is_safetensors_file, known_sha256, load_state_dict, remember_sha256, shard_index)
from soup_core.io.safety import FLOAT_DTYPES, INTEGER_DTYPES, check_header, safetensors_header
from soup_core.state import tied_aliases

HASH_BLOCK = 1 << 20  # bytes a merge did not read, hashed on the way
MAX_PENDING_HASHES = 8  # blocks read but not yet hashed, per checkpoint


class MappingSource:
    """A state dict already in memory (or memory-mapped) as a source."""

    def __init__(self, state: Mapping[str, torch.Tensor], *, name: str = "state dict",
                 path: Path | None = None) -> None:
        self.name, self.path = name, path
        self._aliases = tied_aliases(state)
        self._state = state
        self.infos = {k: TensorInfo.of(t) for k, t in state.items() if k not in self._aliases}

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements ``start:stop`` of the flattened tensor (the whole tensor, shaped, by default)."""
        tensor = self._state[key]
        if start == 0 and stop is None:
            return tensor
        return tensor.reshape(-1)[start:stop]

    def layout_order(self) -> list[str]:
        return list(self.infos)

    def sha256(self) -> str | None:
        return file_sha256(self.path) if self.path is not None else None

    def close(self) -> None:
        """Nothing to release: the tensors belong to the caller."""


class _HashedStream:
    """A checkpoint's files as one byte stream, in :func:`file_sha256`'s order: read anywhere,
    hashed once — the bytes between the last read and this one are hashed on the way."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)
        self.sizes = [f.stat().st_size for f in self.files]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.files))]
        self._fds: dict[int, int] = {}
        self._digest = hashlib.sha256()
        self._hashed = 0  # bytes of the stream fed to the digest so far
        # sha256 runs on a thread of its own (hashlib releases the GIL), in order, beside the merge
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._pending: deque[Future] = deque()
        self._known = known_sha256(self.files)  # hashed earlier in this process and unchanged: not again

    def _feed(self, data) -> None:
        if self._known is not None:
            return
        self._pending.append(self._hasher.submit(self._digest.update, data))
        while len(self._pending) > MAX_PENDING_HASHES:
            self._pending.popleft().result()

    def _fd(self, index: int) -> int:
        if index not in self._fds:
            self._fds[index] = os.open(self.files[index], os.O_RDONLY)
        return self._fds[index]

    def read_unhashed(self, index: int, begin: int, size: int) -> bytearray:
        """Bytes of one file, not fed to the digest (headers, read before the data)."""
        return self._pread(index, begin, max(0, size))

    def _pread(self, index: int, begin: int, size: int) -> bytearray:
        buffer = bytearray(size)
        view, done = memoryview(buffer), 0
        while done < size:
            count = os.preadv(self._fd(index), [view[done:]], begin + done)
            if count == 0:
                raise CheckpointError(f"{self.files[index]}: the file ended at byte {begin + done:,} while it was "
                                      "being read (was it changed or truncated during the merge?); nothing was "
                                      "written")
            done += count
        return buffer

    def _locate(self, position: int) -> tuple[int, int]:
        """(file index, offset in that file) of a byte of the stream."""
        return next((i, position - start) for i, (start, size) in enumerate(zip(self.starts, self.sizes))
                    if start <= position < start + size)

    def _hash_until(self, position: int) -> None:
        if self._known is not None:  # nothing to hash: skipped bytes need not be read
            return
        while self._hashed < position:
            index, local = self._locate(self._hashed)
            count = min(position - self._hashed, self.sizes[index] - local, HASH_BLOCK)
            self._feed(self._pread(index, local, count))
            self._hashed += count

    def read(self, index: int, begin: int, end: int) -> bytearray:
        data = self._pread(index, begin, end - begin)
        position = self.starts[index] + begin
        if self._hashed >= position:  # already hashed (or a re-read): hash only what is new
            if self._hashed < position + len(data):
                self._feed(memoryview(data)[self._hashed - position:])
                self._hashed = position + len(data)
        else:
            self._hash_until(position)
            self._feed(data)
            self._hashed = position + len(data)
        return data

    def hexdigest(self) -> str:
        if self._known is not None:
            return self._known
        self._hash_until(sum(self.sizes))
        while self._pending:
            self._pending.popleft().result()
        return self._digest.hexdigest()

    def close(self) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class SafetensorsSource:
    """A ``.safetensors`` file or a Hugging Face folder of them, read by byte ranges."""

    def __init__(self, path: Path, weight_files: Sequence[Path], *, name: str | None = None) -> None:
        self.path, self.name = path, name or path.name
        self._stream = _HashedStream(hashed_files(path))
        self._where: dict[str, tuple[int, StoredTensor]] = {}
        self._aliases: dict[str, str] = {}
        position = {f.resolve(): i for i, f in enumerate(self._stream.files)}  # symlinks (a hub cache) too
        for weight_file in weight_files:
            if weight_file.resolve() not in position:
                raise CheckpointError(f"{path}: cannot find {weight_file.name} among its files")
            self._read_header(position[weight_file.resolve()])
        self.infos = {k: stored.info for k, (_, stored) in self._where.items()}

    def _read_header(self, index: int) -> None:
        file = self._stream.files[index]
        size = self._stream.sizes[index]
        # Headers are read apart from the hash: the stream hashes each file in order, data included.
        head = bytes(self._stream.read_unhashed(index, 0, min(8, size)))
        header = safetensors_header(head, lambda n: bytes(self._stream.read_unhashed(index, 8, min(n, size - 8))),
                                    str(file))
        check_header(header, str(file))
        tensors, metadata = parse_header(header, size, str(file))
        for key, stored in tensors.items():
            if stored.info.dtype not in FLOAT_DTYPES + INTEGER_DTYPES:
                raise CheckpointError(f"{file}: tensor {key!r} has dtype {str(stored.info.dtype).removeprefix('torch.')}, "
                                      "which soups do not average; convert to bfloat16, float16 or float32")
            if key in self._where:
                raise CheckpointError(f"{self.path}: tensor {key!r} is in two shards "
                                      f"({self._stream.files[self._where[key][0]].name} and {file.name})")
            self._where[key] = (index, stored)
        if TIED_KEY in metadata:
            try:
                ties = json.loads(metadata[TIED_KEY])
            except ValueError:
                ties = None
            if not isinstance(ties, dict) or not all(isinstance(v, str) and v in tensors for v in ties.values()):
                raise CheckpointError(f"{file}: its {TIED_KEY!r} metadata does not name tensors of the file")
            self._aliases.update({k: v for k, v in ties.items() if k not in tensors})

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def layout_order(self) -> list[str]:
        """Tensor names in the order their bytes lie in the files (reading so hashes each byte once)."""
        return sorted(self._where, key=lambda k: (self._where[k][0], self._where[k][1].begin))

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements ``start:stop`` of the flattened tensor (the whole tensor, shaped, by default)."""
        index, stored = self._where[key]
        info = stored.info
        whole = start == 0 and stop is None
        stop = info.numel if stop is None else stop
        size = info.dtype.itemsize
        data = self._stream.read(index, stored.begin + start * size, stored.begin + stop * size)
        tensor = torch.frombuffer(data, dtype=info.dtype) if data else torch.empty(0, dtype=info.dtype)
        return tensor.reshape(info.shape) if whole else tensor

    def sha256(self) -> str:
        digest = self._stream.hexdigest()
        remember_sha256(self._stream.files, digest)
        return digest

    def close(self) -> None:
        self._stream.close()


class AdapterSource(MappingSource):
    """A PEFT LoRA adapter folder on θ0 (:mod:`soup_core.io.lora`): θ0's tensors, and each updated
    one computed when it is read (held until another tensor is read), never the whole model."""

    def __init__(self, path: Path, base: Mapping[str, torch.Tensor], *, name: str | None = None,
                 roots: Sequence[Path] | None = None) -> None:
        self.name, self.path = name or path.name, path
        self._aliases = tied_aliases(base)
        self._state = AdapterWeights(base, read_updates(path, base, roots=roots))
        self.infos = {k: TensorInfo.of(t) for k, t in base.items() if k not in self._aliases}


Source = MappingSource | SafetensorsSource


def open_source(path: str | os.PathLike[str], *, name: str | None = None, roots: Sequence[Path] | None = None,
                base: Mapping[str, torch.Tensor] | None = None) -> Source:
    """A source for a checkpoint file or Hugging Face folder; safetensors are read by byte ranges.
    A LoRA adapter folder is read on θ0 (``base``, e.g. the zoo's, memory-mapped)."""
    path = Path(path)
    if roots is not None:
        inside_roots(path, roots)
    if is_adapter_folder(path):
        if base is None:
            raise CheckpointError(f"{path}: a LoRA adapter is an update of θ0; give its zoo a base "
                                  "(base = \"...\" in zoo.toml: the model the adapter was trained on)")
        return AdapterSource(path, base, name=name, roots=roots)
    found = _safetensors_files(path)
    if found is None:
        return MappingSource(load_state_dict(path, roots=roots), name=name or path.name, path=path)
    weights, index, weight_map = found
    if roots is not None:
        for file in weights:
            inside_roots(file, roots)
    source = SafetensorsSource(path, weights, name=name)
    if index is not None:
        check_index_keys(index, weight_map, source.infos)
    return source


def _safetensors_files(path: Path) -> tuple[list[Path], Path | None, dict[str, str]] | None:
    """The safetensors files holding a checkpoint's weights, with its shard index and the index's
    ``weight_map`` when it is sharded; None when it is another format."""
    if path.is_file():
        return ([path], None, {}) if is_safetensors_file(path) else None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map, shards = shard_index(index)
        missing = [f.name for f in shards if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard {missing[0]!r} is missing from {path}")
        return shards, index, weight_map
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], None, {}
    return None
