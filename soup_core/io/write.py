"""Write state dicts and any other output — atomically, never over an input.

Every file the library writes goes through :func:`atomic_path`: the bytes go to a hidden
folder beside the target (``.NAME.PID-XXXX.partial``, where the writer — safetensors too — keeps
any temp files of its own), are flushed to disk, and replace the target in one rename. A crash,
a full disk, Ctrl-C or SIGTERM leaves the previous file as it was, never half a file; what a
killed process (SIGKILL) leaves behind is swept by the next write to the same target, once
that process is gone. A full disk is one clear error.

>>> import torch, tempfile, os
>>> from soup_core.io import save_state_dict, load_state_dict
>>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
>>> _ = save_state_dict({"w": torch.ones(2)}, path, provenance={"recipe": "uniform"})
>>> load_state_dict(path)["w"].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from soup_core.errors import CheckpointError
from soup_core.io.read import PROVENANCE_KEY, TIED_KEY, short
from soup_core.state import tied_aliases

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")
HF_SHARD_BYTES = 5 << 30  # transformers' default max_shard_size


def refuse_inputs(target: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Raise if ``target`` is one of ``inputs``, lies inside an input folder, or holds one."""
    resolved = Path(target).resolve()
    for item in inputs:
        item = Path(item).resolve()
        if resolved == item or item in resolved.parents or (resolved in item.parents):
            raise CheckpointError(f"{target}: refusing to write over an input checkpoint ({item})")


PARTIAL_SUFFIX = ".partial"


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partials(path: Path) -> list[Path]:
    """Remove what killed writers of ``path`` left beside it; returns what went."""
    swept = []
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*{PARTIAL_SUFFIX}"):
        pid = leftover.name[len(path.name) + 2:].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            swept.append(leftover)
    return swept


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path beside ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=PARTIAL_SUFFIX, dir=path.parent))
    tmp = folder / path.name
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CheckpointError(f"{path}: no space left on the device; nothing was written and the previous "
                                  "file is unchanged") from None
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def _tensors_to_write(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors, each tied group once, and the aliases to restore on reading."""
    aliases = tied_aliases(state)
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in aliases}, aliases


def _metadata(provenance: Mapping[str, Any] | None, aliases: Mapping[str, str] | None = None) -> dict[str, str]:
    metadata = {"format": "pt"}
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True, default=str)
    if aliases:
        metadata[TIED_KEY] = json.dumps(aliases, sort_keys=True)
    return metadata


def _sorted_header(header: bytes) -> bytes:
    """The safetensors JSON header with its metadata in key order.

    safetensors keeps metadata in a hash map whose order changes from process to process, so
    the same soup would give different bytes each time. Only the order changes, so the length
    stays the same and the header can be rewritten in place (data offsets are unaffected).
    """
    parsed = json.loads(header)
    metadata = parsed.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata else {}) | parsed
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    padded = text + b" " * (len(header) - len(text))
    return padded if len(padded) == len(header) else header


def _sort_header_in_place(path: Path) -> None:
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = handle.read(size)
        handle.seek(8)
        handle.write(_sorted_header(header))


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    provenance: Mapping[str, Any] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``state`` as safetensors atomically, with provenance metadata.

    The file appears complete or not at all, and it is never written over one of ``inputs``
    (the checkpoints the soup was made from). Tied tensors are stored once and re-tied by
    :func:`soup_core.io.load_state_dict` (safetensors cannot store aliases).
    """
    refuse_inputs(path, inputs)
    tensors, aliases = _tensors_to_write(state)
    with atomic_path(path) as tmp:
        _save_file(tensors, tmp, _metadata(provenance, aliases))
    return Path(path)


def _save_file(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """safetensors' writer, with its errors (a full disk among them) as one clear line."""
    try:
        safetensors.torch.save_file(tensors, path, metadata=dict(metadata))
    except safetensors.SafetensorError as exc:
        if "No space left" in str(exc) or "os error 28" in str(exc):
            raise OSError(errno.ENOSPC, "No space left on device") from None
        raise CheckpointError(f"{path.name}: cannot be written ({short(exc)})") from None
    _sort_header_in_place(path)


def state_dict_bytes(state: Mapping[str, torch.Tensor], provenance: Mapping[str, Any] | None = None) -> bytes:
    """The bytes :func:`save_state_dict` would write (for downloads)."""
    tensors, aliases = _tensors_to_write(state)
    blob = safetensors.torch.save(tensors, metadata=_metadata(provenance, aliases))
    size = int.from_bytes(blob[:8], "little")
    return blob[:8] + _sorted_header(blob[8:8 + size]) + blob[8 + size:]


def _shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_hf_directory(
    state: Mapping[str, torch.Tensor],
    directory: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str],
    provenance: Mapping[str, Any] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    max_shard_bytes: int = HF_SHARD_BYTES,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state`` as a Hugging Face directory that ``from_pretrained`` loads.

    Everything but the weights is copied from ``source`` (config, tokenizer, generation
    config); the weights go to ``model.safetensors``, or to shards
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` when they exceed
    ``max_shard_bytes``. Tied tensors are written once, as ``save_pretrained`` does.
    ``extra_files`` (name -> text, e.g. a model card) are written last. The folder is assembled
    beside the target and renamed into place; an existing non-empty target or an input is never
    written over.

    >>> import tempfile, torch, pathlib
    >>> src = pathlib.Path(tempfile.mkdtemp()); (src / "config.json").write_text("{}")
    2
    >>> out = save_hf_directory({"w": torch.ones(2)}, src.parent / (src.name + "-soup"), source=src)
    >>> sorted(p.name for p in out.iterdir())
    ['config.json', 'model.safetensors']
    """
    directory, source = Path(directory), Path(source)
    refuse_inputs(directory, (*inputs, source))
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory}: exists and is not empty; choose a new folder")
    tensors, _ = _tensors_to_write(state)  # Hugging Face re-ties from the model's config
    shards = _shards(tensors, max_shard_bytes)
    metadata = _metadata(provenance)
    directory.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.{os.getpid()}-", suffix=PARTIAL_SUFFIX,
                                    dir=directory.parent))
    try:
        for item in source.iterdir():
            if item.is_file() and not item.name.endswith(WEIGHT_FILE_SUFFIXES) and item.name not in (extra_files or {}):
                shutil.copy2(item, staging / item.name)
        if len(shards) == 1:
            _save_file(shards[0], staging / "model.safetensors", metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _save_file(shard, staging / name, metadata)
                weight_map.update({k: name for k in shard})
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory

