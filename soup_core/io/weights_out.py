"""Write weights as safetensors: progressively, atomically, as one file or a folder of shards.

Every weights file the library writes is made here — a soup held in memory
(:func:`save_state_dict`, :func:`save_hf_directory`, :func:`state_dict_bytes`) and a merge
streamed tensor by tensor (:mod:`soup_core.merge`) alike, so both give the same bytes.

A merge of big models never holds its output: :class:`StreamingWriter` lays out every file from
the tensors' dtypes and shapes before a value exists (one ``.safetensors`` file, or a Hugging Face
folder of shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, split
as ``save_pretrained`` splits them), reserves the space (a full disk fails before any work), and
writes each tensor — or each block of one — at its place as soon as it is computed. The files have
no name while they are written (``O_TMPFILE``: a killed merge, SIGKILL included, leaves nothing);
at the end they are linked into a hidden ``.NAME.PID-XXXX.partial`` folder beside the target with
the index and copied files, and renamed into place, so the output appears complete or not at all.
What a writer killed during those last milliseconds (or on a file system without ``O_TMPFILE``)
leaves is swept by the next write to the same target (:func:`soup_core.io.write.sweep_partials`).

Metadata may change at the end (a provenance whose sha256 digests were computed while the inputs
were read) as long as its JSON keeps its length: the header is rewritten in place.

>>> import tempfile, torch, pathlib
>>> from soup_core.io.layout import TensorInfo
>>> out = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
>>> with StreamingWriter(out, {"w": TensorInfo(torch.float32, (4,))}, {"format": "pt"}) as writer:
...     writer.write("w", torch.ones(2), start=0)
...     writer.write("w", torch.zeros(2), start=2)
...     _ = writer.finish()  # without it, nothing appears
>>> from safetensors.torch import load_file
>>> load_file(out)["w"].tolist()
[1.0, 1.0, 0.0, 0.0]
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from soup_core.errors import CheckpointError
from soup_core.io.layout import TensorInfo, build_header, data_order
from soup_core.io.read import PROVENANCE_KEY, TIED_KEY
from soup_core.io.write import PARTIAL_SUFFIX, WEIGHT_FILE_SUFFIXES, no_space, refuse_inputs, sweep_partials
from soup_core.state import tied_aliases

AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000  # linkat(2), Linux
HF_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
INDEX_NAME = "model.safetensors.index.json"


def plan_shards(infos: Mapping[str, TensorInfo], max_shard_bytes: int) -> list[list[str]]:
    """Tensors split into shards in their given order, as ``save_pretrained`` does: a shard is
    closed when the next tensor would take it past ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, info in infos.items():
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += info.nbytes
    return shards


class _File:
    """One output file: its header written, its space reserved, tensors written at their offsets."""

    def __init__(self, name: str, opened: tuple[int, Path | None], infos: Mapping[str, TensorInfo],
                 metadata: Mapping[str, str]) -> None:
        self.name, self.infos = name, infos
        self.fd, self.path = opened
        self.header, self.offsets = build_header(infos, metadata)
        self.written = dict.fromkeys(infos, 0)  # elements written so far, per tensor
        data_bytes = sum(info.nbytes for info in infos.values())
        self.start = 8 + len(self.header)
        _reserve(self.fd, self.start + data_bytes)
        _write_at(self.fd, len(self.header).to_bytes(8, "little") + self.header, 0)

    def write(self, key: str, values: torch.Tensor, start: int) -> None:
        info = self.infos[key]
        if values.dtype != info.dtype or start < 0 or start + values.numel() > info.numel:
            raise ValueError(f"{key}: block of {values.numel()} {values.dtype} at {start} does not fit "
                             f"{list(info.shape)} {info.dtype}")
        data = values.detach().reshape(-1).contiguous().cpu()
        raw = data.view(torch.uint8).numpy() if data.numel() else b""
        _write_at(self.fd, memoryview(raw), self.start + self.offsets[key][0] + start * info.dtype.itemsize)
        self.written[key] += data.numel()

    def finish(self, metadata: Mapping[str, str]) -> None:
        short = [k for k, n in self.written.items() if n != self.infos[k].numel]
        if short:  # a writer's own bug; never a file with zeros where values belong
            raise ValueError(f"{self.name}: {short[0]!r} got {self.written[short[0]]} of "
                             f"{self.infos[short[0]].numel} elements")
        header, _ = build_header(self.infos, metadata)
        if len(header) != len(self.header):
            raise ValueError(f"{self.name}: the final metadata changed the header's length")
        _write_at(self.fd, header, 8)
        os.fsync(self.fd)

    def link(self, folder: Path) -> None:
        """Give the finished file its name in ``folder``: an anonymous file is linked (copied where the
        kernel or a sandbox refuses to link it), a named one moved."""
        if self.path is None:
            try:
                _link_unnamed(self.fd, folder / self.name)
            except OSError:
                _copy_out(self.fd, folder / self.name)
        else:
            os.replace(self.path, folder / self.name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StreamingWriter:
    """A safetensors file (``folder=False``) or a Hugging Face folder of shards, written block by block.

    ``infos`` give the output's tensors in shard order. ``copy_from`` (a Hugging Face folder):
    its files other than weights (config, tokenizer, ...) are copied into the folder;
    ``extra_files`` (name -> text, e.g. a model card) are added at :meth:`finish`. An existing
    target is replaced only when it is a file and ``folder`` is false (as today's single-file
    exports do); a non-empty folder and every one of ``inputs`` are never written over.
    """

    def __init__(self, target: str | os.PathLike[str], infos: Mapping[str, TensorInfo],
                 metadata: Mapping[str, str], *, folder: bool = False, max_shard_bytes: int = HF_SHARD_BYTES,
                 copy_from: str | os.PathLike[str] | None = None, inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
        self.target, self.infos, self.metadata, self.folder = Path(target), dict(infos), dict(metadata), folder
        self.max_shard_bytes, self.copy_from = max_shard_bytes, Path(copy_from) if copy_from else None
        refuse_inputs(self.target, (*inputs, *([self.copy_from] if self.copy_from else [])))
        if folder and self.target.is_dir() and any(self.target.iterdir()):
            raise CheckpointError(f"{self.target}: exists and is a folder that is not empty; choose a new name")
        if folder and self.target.exists() and not self.target.is_dir():
            raise CheckpointError(f"{self.target}: exists and is not a folder; choose a new name")
        if not folder and self.target.exists() and not self.target.is_file():
            raise CheckpointError(f"{self.target}: exists and is not a regular file; choose a new name")
        self._files: list[_File] = []
        self._where: dict[str, _File] = {}
        self._staging: Path | None = None

    def __enter__(self) -> StreamingWriter:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        sweep_partials(self.target)
        try:
            if not self.folder:
                self._open(self.target.name, self.infos)
            else:
                shards = plan_shards(self.infos, self.max_shard_bytes)
                for i, keys in enumerate(shards, 1):
                    name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    self._open(name, {k: self.infos[k] for k in keys})
        except BaseException as exc:
            self._abort()
            _raise_no_space(exc, self.target)
            raise
        return self

    def _open(self, name: str, infos: Mapping[str, TensorInfo]) -> None:
        opened = _unnamed_file(self.target.parent, lambda: self._scratch() / name)
        try:
            handle = _File(name, opened, infos, self.metadata)
        except BaseException:
            os.close(opened[0])  # an unnamed file vanishes with its descriptor
            raise
        self._files.append(handle)
        self._where.update({k: handle for k in infos})

    def _scratch(self) -> Path:
        """The hidden folder beside the target where the output is assembled (made on first use)."""
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.{os.getpid()}-",
                                                  suffix=PARTIAL_SUFFIX, dir=self.target.parent))
        return self._staging

    def write(self, key: str, values: torch.Tensor, start: int = 0) -> None:
        """Write ``values`` (flattened) as elements ``start, start + 1, ...`` of tensor ``key``."""
        self._where[key].write(key, values, start)

    def finish(self, metadata: Mapping[str, str] | None = None, extra_files: Mapping[str, str] | None = None) -> Path:
        """Final metadata (same JSON length), the index, copied and extra files; then the rename.
        ``extra_files`` (name -> text) go into a folder, or beside a single file (its model card,
        whose place the caller has checked: :func:`soup_core.model_card.card_beside`)."""
        for handle in self._files:
            handle.finish(metadata if metadata is not None else self.metadata)
        staging = self._scratch()
        for handle in self._files:
            handle.link(staging)
            handle.close()
        if self.folder:
            if len(self._files) > 1:
                index = {"metadata": {"total_size": sum(i.nbytes for i in self.infos.values())},
                         "weight_map": {k: h.name for k, h in self._where.items()}}
                (staging / INDEX_NAME).write_text(json.dumps(index, indent=2))
            if self.copy_from is not None:
                for item in sorted(self.copy_from.iterdir()):
                    if item.is_file() and not item.name.endswith(WEIGHT_FILE_SUFFIXES) \
                            and item.name not in (extra_files or {}):
                        shutil.copy2(item, staging / item.name)
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text)
            if self.target.exists():
                self.target.rmdir()  # empty, checked when the writer was made
            os.replace(staging, self.target)
        else:  # extra files go beside the file (a model card): a card never describes other weights
            bad = [name for name in (extra_files or {}) if os.sep in name or name in ("", ".", "..", self.target.name)]
            if bad:
                raise ValueError(f"{bad[0]!r}: a file beside {self.target.name} has a plain name of its own")
            beside = [self.target.parent / name for name in (extra_files or {})]
            for path in beside:
                with open(staging / path.name, "w", encoding="utf-8") as handle:
                    handle.write(extra_files[path.name])
                    handle.flush()
                    os.fsync(handle.fileno())
            for path in beside:  # the old card goes first: killed between the renames, no card is stale
                if path.is_file() and not path.is_symlink():
                    path.unlink()
            os.replace(staging / self.target.name, self.target)
            for path in beside:
                os.replace(staging / path.name, path)
            shutil.rmtree(staging, ignore_errors=True)
        self._staging = None
        self._files = []
        return self.target

    def _abort(self) -> None:
        for handle in self._files:
            handle.close()
        self._files = []
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def __exit__(self, kind, exc, tb) -> None:
        self._abort()  # after finish() nothing is left to remove; before it, nothing appears
        _raise_no_space(exc, self.target)


def _raise_no_space(exc: BaseException | None, target: Path) -> None:
    """A full disk, wherever it struck (reserving, writing, syncing), as one clear line."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        raise no_space(target) from None


def _unnamed_file(folder: Path, fallback: Callable[[], Path]) -> tuple[int, Path | None]:
    """A file in ``folder`` that has no name until it is finished (``O_TMPFILE``): if the process is
    killed — even by SIGKILL — it vanishes with it. Where the file system cannot, the named file
    ``fallback()`` (in the hidden staging folder, swept by the next write).

    Nothing is tried by giving a probe file a name: a process killed between naming and removing it
    would leave that name in the user's folder. Whether the kernel lets the finished file be linked
    is learnt at the end (:meth:`_File.link`), where a refusal costs one copy."""
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            return os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o644), None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
    path = fallback()
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), path


def _link_unnamed(fd: int, path: Path) -> None:
    """Name an ``O_TMPFILE`` file: through ``/proc/self/fd`` where the kernel allows it, else with
    ``linkat(fd, "", AT_EMPTY_PATH)`` (some kernels and sandboxes allow only one of the two)."""
    try:
        os.link(f"/proc/self/fd/{fd}", path)
        return
    except OSError as exc:
        first = exc
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", AT_FDCWD, os.fsencode(path), AT_EMPTY_PATH) != 0:
        raise first


def _copy_out(fd: int, path: Path) -> None:
    """A finished anonymous file copied to the new file ``path`` (in the staging folder), synced."""
    size = os.fstat(fd).st_size
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(1 << 24, size - offset), offset)
            if not chunk:
                raise OSError(errno.EIO, f"{path}: the finished file ended at {offset} of {size} bytes")
            _write_at(out, chunk, offset)
            offset += len(chunk)
        os.fsync(out)
    finally:
        os.close(out)


def _reserve(fd: int, size: int) -> None:
    """Take the file's space now, so that a full disk fails before any work (sparse where it cannot)."""
    try:
        os.posix_fallocate(fd, 0, size)  # at least the 8-byte length and a header
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        os.ftruncate(fd, size)  # a file system without fallocate (EOPNOTSUPP, EINVAL)


def _write_at(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def weights_metadata(provenance: Mapping[str, Any] | None,
                     aliases: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata of every weights file we write: format, provenance (JSON, sorted), ties."""
    metadata = {"format": "pt"}
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True, default=str)
    if aliases:
        metadata[TIED_KEY] = json.dumps(dict(aliases), sort_keys=True)
    return metadata


def _tensors_to_write(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each tied group once (safetensors cannot alias), and the aliases to restore on reading."""
    aliases = tied_aliases(state)
    return {k: v.detach() for k, v in state.items() if k not in aliases}, aliases


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *,
                    provenance: Mapping[str, Any] | None = None,
                    inputs: Iterable[str | os.PathLike[str]] = (), beside: Mapping[str, str] | None = None) -> Path:
    """Write ``state`` as one safetensors file atomically, with provenance metadata.

    The file appears complete or not at all, and it is never written over one of ``inputs``
    (the checkpoints the soup was made from). Tied tensors are stored once and re-tied by
    :func:`soup_core.io.load_state_dict`. ``beside`` (name -> text: its model card) is written next
    to it in the same step (:meth:`StreamingWriter.finish`).

    >>> import tempfile, os
    >>> from soup_core.io import load_state_dict
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> _ = save_state_dict({"w": torch.ones(2)}, path, provenance={"recipe": "uniform"})
    >>> load_state_dict(path)["w"].tolist()
    [1.0, 1.0]
    """
    tensors, aliases = _tensors_to_write(state)
    with StreamingWriter(path, {k: TensorInfo.of(t) for k, t in tensors.items()},
                         weights_metadata(provenance, aliases), inputs=inputs) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
        return writer.finish(extra_files=beside)


def state_dict_bytes(state: Mapping[str, torch.Tensor], provenance: Mapping[str, Any] | None = None) -> bytes:
    """The bytes :func:`save_state_dict` would write (for downloads)."""
    tensors, aliases = _tensors_to_write(state)
    infos = {k: TensorInfo.of(t) for k, t in tensors.items()}
    header, _ = build_header(infos, weights_metadata(provenance, aliases))
    parts = [len(header).to_bytes(8, "little"), header]
    for key in data_order(infos):
        data = tensors[key].reshape(-1).contiguous().cpu()
        parts.append(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return b"".join(parts)


def save_hf_directory(state: Mapping[str, torch.Tensor], directory: str | os.PathLike[str], *,
                      source: str | os.PathLike[str], provenance: Mapping[str, Any] | None = None,
                      inputs: Iterable[str | os.PathLike[str]] = (), max_shard_bytes: int = HF_SHARD_BYTES,
                      extra_files: Mapping[str, str] | None = None) -> Path:
    """Write ``state`` as a Hugging Face folder that ``from_pretrained`` loads.

    Everything but the weights is copied from ``source`` (config, tokenizer, generation config);
    the weights go to ``model.safetensors``, or to shards with ``model.safetensors.index.json``
    past ``max_shard_bytes``. Tied tensors are written once, as ``save_pretrained`` does
    (transformers re-ties them from the config). ``extra_files`` (name -> text, e.g. a model
    card) are written last. An existing non-empty target or an input is never written over.

    >>> import tempfile, pathlib
    >>> src = pathlib.Path(tempfile.mkdtemp()); (src / "config.json").write_text("{}")
    2
    >>> out = save_hf_directory({"w": torch.ones(2)}, src.parent / (src.name + "-soup"), source=src)
    >>> sorted(p.name for p in out.iterdir())
    ['config.json', 'model.safetensors']
    """
    tensors, _ = _tensors_to_write(state)
    with StreamingWriter(directory, {k: TensorInfo.of(t) for k, t in tensors.items()},
                         weights_metadata(provenance), folder=True, max_shard_bytes=max_shard_bytes,
                         copy_from=source, inputs=inputs) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
        return writer.finish(extra_files=extra_files)
