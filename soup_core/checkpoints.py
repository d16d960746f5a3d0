"""Read, validate and write checkpoints — safely.

Formats read (all into a plain ``dict[str, torch.Tensor]``, the *state dict*):

* ``.safetensors`` — memory-mapped, never executes code;
* ``.pt`` / ``.pth`` / ``.bin`` — ``torch.load(weights_only=True, mmap=True)``; there is
  **no** fallback to unrestricted unpickling, so a malicious pickle is refused, not run;
* nested training checkpoints — ``{"state_dict": ...}``, ``{"model": ...}``, EMA weights
  (``state_dict_ema`` / ``model_ema``, preferred as timm does), ``module.`` prefixes from
  ``DataParallel``/DDP stripped;
* Hugging Face style directories — ``model.safetensors``, ``pytorch_model.bin`` and sharded
  ``*.index.json`` checkpoints;
* raw bytes (browser uploads) with :func:`load_state_dict_bytes`.

Example::

    >>> import torch, tempfile, os
    >>> from soup_core.checkpoints import save_state_dict, load_state_dict
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save_state_dict({"w": torch.ones(2)}, path, provenance={"recipe": "uniform"})
    >>> load_state_dict(path)["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

StateDict = dict[str, torch.Tensor]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# Keys under which training scripts nest the weights; EMA first because timm prefers it.
NESTED_KEYS_EMA = ("state_dict_ema", "model_ema")
NESTED_KEYS = ("state_dict", "model", "module", "net", "network")
PROVENANCE_KEY = "soup_provenance"
TIED_KEY = "soup_tied"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit with the others; the message says why."""


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def load_state_dict(path: str | os.PathLike[str], *, prefer_ema: bool = True) -> StateDict:
    """Read a checkpoint file or Hugging Face directory into a state dict.

    Tensors from safetensors and new-style torch files are memory-mapped: nothing is read
    until it is used, and the returned tensors must be treated as read-only.

    >>> from soup_core.checkpoints import load_state_dict
    >>> sd = load_state_dict("sample_data/digits-finetune/base.safetensors")
    >>> sorted(sd)[:2]
    ['body.0.bias', 'body.0.weight']
    """
    path = Path(path)
    if path.is_dir():
        return _load_directory(path, prefer_ema=prefer_ema)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if _is_safetensors(path):
        return _read_safetensors_file(path)
    return _finish_pickle(_torch_load(path, str(path)), str(path), prefer_ema)


def load_state_dict_bytes(data: bytes, name: str, *, prefer_ema: bool = True) -> StateDict:
    """Read an uploaded checkpoint held in memory; ``name`` is used for the format and errors.

    >>> import safetensors.torch, torch
    >>> from soup_core.checkpoints import load_state_dict_bytes
    >>> blob = safetensors.torch.save({"w": torch.zeros(3)})
    >>> load_state_dict_bytes(blob, "upload.safetensors")["w"].shape
    torch.Size([3])
    """
    if not data:
        raise CheckpointError(f"{name}: the file is empty")
    if name.endswith(SAFETENSORS_SUFFIXES) or _looks_like_safetensors(data[:8 + 2]):
        try:
            state = safetensors.torch.load(data)
        except Exception as exc:  # SafetensorError, json errors, ...
            raise CheckpointError(f"{name}: not a valid safetensors file ({_short(exc)})") from None
        return _retie(state, _safetensors_metadata_from_bytes(data), name)
    return _finish_pickle(_torch_load(io.BytesIO(data), name), name, prefer_ema)


class LazySafetensors(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only mapping that reads one tensor per lookup.

    For streaming work (angles of large models): memory holds only the tensors in use.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            self._handle = safetensors.safe_open(self.path, framework="pt")
            self._keys = list(self._handle.keys())
        except Exception as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file ({_short(exc)})") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{self.path}: cannot read {key!r} ({_short(exc)})") from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def open_checkpoint(path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """A lazy view for safetensors files, :func:`load_state_dict` (memory-mapped) otherwise."""
    path = Path(path)
    if path.is_file() and _is_safetensors(path) and path.stat().st_size > 0:
        return LazySafetensors(path)
    return load_state_dict(path)


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance manifest that :func:`save_state_dict` stored in a safetensors file
    (or in the first weights file of a Hugging Face directory)."""
    if Path(path).is_dir():
        files = sorted(Path(path).glob("model*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no model*.safetensors in this folder")
        path = files[0]
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({_short(exc)})") from None
    return json.loads(meta[PROVENANCE_KEY]) if PROVENANCE_KEY in meta else None


def _is_safetensors(path: Path) -> bool:
    if path.suffix in SAFETENSORS_SUFFIXES:
        return True
    if path.suffix in PICKLE_SUFFIXES:
        return False
    with open(path, "rb") as handle:
        return _looks_like_safetensors(handle.read(10))


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object.
    return len(head) >= 9 and head[8:9] == b"{"


def _read_safetensors_file(path: Path) -> StateDict:
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({_short(exc)})") from None
    return _retie(state, meta, str(path))


def _safetensors_metadata_from_bytes(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__", {}) or {}


def _retie(state: StateDict, meta: Mapping[str, str], name: str) -> StateDict:
    """Restore tied tensors that :func:`save_state_dict` stored once (safetensors cannot alias)."""
    if TIED_KEY not in meta:
        return state
    for alias, target in json.loads(meta[TIED_KEY]).items():
        if target not in state:
            raise CheckpointError(f"{name}: tied key {alias!r} points at missing key {target!r}")
        state[alias] = state[target]
    return state


def _torch_load(source: Path | io.BytesIO, name: str) -> Any:
    """``torch.load`` restricted to tensors and plain containers; never runs pickled code."""
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": True}
    is_zip = zipfile.is_zipfile(source)
    if isinstance(source, io.BytesIO):
        source.seek(0)
    elif is_zip:
        kwargs["mmap"] = True  # only the zip format can be memory-mapped
    try:
        return torch.load(source, **kwargs)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        detail = next((line for line in lines if "GLOBAL" in line), None)
        if detail is None:  # not a refusal: the bytes are simply not a pickle
            raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({_short(exc)})") from None
        raise CheckpointError(
            f"{name}: refused to unpickle — the file holds Python objects other than tensors "
            f"and is only ever loaded with weights_only=True ({detail})") from None
    except Exception as exc:  # truncated zips, garbage bytes, ...
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({_short(exc)})") from None


def _finish_pickle(obj: Any, name: str, prefer_ema: bool) -> StateDict:
    obj = _unnest(obj, prefer_ema)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: expected a state dict (a mapping of names to tensors), "
                              f"found {type(obj).__name__}")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{name}: entries that are not tensors: {_names(bad)}")
    return _strip_prefix({str(k): v for k, v in obj.items()}, "module.")


def _unnest(obj: Any, prefer_ema: bool) -> Any:
    order = NESTED_KEYS_EMA + NESTED_KEYS if prefer_ema else NESTED_KEYS + NESTED_KEYS_EMA
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[key] for key in order if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _strip_prefix(state: StateDict, prefix: str) -> StateDict:
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


def _load_directory(path: Path, *, prefer_ema: bool) -> StateDict:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            return _load_sharded(index, prefer_ema=prefer_ema)
    for file_name in ("model.safetensors", "pytorch_model.bin"):
        if (path / file_name).exists():
            return load_state_dict(path / file_name, prefer_ema=prefer_ema)
    raise CheckpointError(
        f"{path}: a directory without model.safetensors, pytorch_model.bin or a sharded index")


def _load_sharded(index: Path, *, prefer_ema: bool) -> StateDict:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index ({_short(exc)})") from None
    state: StateDict = {}
    root = index.parent.resolve()
    for shard in sorted(set(weight_map.values())):
        shard_path = (root / shard).resolve()
        if root not in shard_path.parents:
            raise CheckpointError(f"{index}: shard {shard!r} lies outside the checkpoint directory")
        state.update(load_state_dict(shard_path, prefer_ema=prefer_ema))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{index}: keys listed in the index but in no shard: {_names(missing)}")
    return state


# --------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file (or of every file of a directory, in name order), read in 1 MiB blocks."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict: keys, dtypes, shapes and values (the metric-cache key)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationReport:
    """What :func:`validate_state_dicts` found. ``errors`` block any math; the rest inform."""

    reference: str
    num_parameters: int
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    integer_keys: tuple[str, ...] = ()
    tied_groups: tuple[tuple[str, ...], ...] = ()
    duplicates: tuple[tuple[str, str], ...] = field(default=())

    def raise_for_errors(self) -> None:
        if self.errors:
            raise CheckpointError("; ".join(self.errors))


def tied_groups(state: Mapping[str, torch.Tensor]) -> tuple[tuple[str, ...], ...]:
    """Groups of keys whose tensors share storage (tied weights, e.g. embeddings and head)."""
    groups: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for key, tensor in state.items():
        if tensor.numel() == 0:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                 tuple(tensor.shape), tuple(tensor.stride()))
        groups.setdefault(ident, []).append(key)
    return tuple(tuple(keys) for keys in groups.values() if len(keys) > 1)


def is_float(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def validate_state_dicts(
    named: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    reference: str | None = None,
    check_values: bool = True,
) -> ValidationReport:
    """Check that checkpoints can be averaged: same keys, shapes and dtypes, finite values.

    Errors name the file, the keys and the shapes. Exact duplicates are a warning: they are
    legal, but a duplicate counts twice in a uniform soup. ``check_values=False`` checks the
    structure only (no NaN/Inf scan, no duplicate hashes), for streaming work on large files.

    >>> import torch
    >>> from soup_core.checkpoints import validate_state_dicts
    >>> report = validate_state_dicts({"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(3)}})
    >>> report.errors
    ("b: shape mismatch for 'w': (3,) here, (2,) in a",)
    """
    if not named:
        raise CheckpointError("no checkpoints given")
    ref_name = reference if reference is not None else next(iter(named))
    ref = named[ref_name]
    errors: list[str] = []
    warnings: list[str] = []
    for name, state in named.items():
        if name == ref_name:
            continue
        missing = sorted(set(ref) - set(state))
        unexpected = sorted(set(state) - set(ref))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys {_names(missing)}")
            if unexpected:
                parts.append(f"unexpected keys {_names(unexpected)}")
            errors.append(f"{name}: does not match {ref_name} — " + "; ".join(parts))
            continue
        for key in ref:
            a, b = ref[key], state[key]
            if a.shape != b.shape:
                errors.append(f"{name}: shape mismatch for {key!r}: {tuple(b.shape)} here, "
                              f"{tuple(a.shape)} in {ref_name}")
            elif a.dtype != b.dtype:
                errors.append(f"{name}: dtype mismatch for {key!r}: {b.dtype} here, "
                              f"{a.dtype} in {ref_name} — convert all checkpoints to one dtype")
    if check_values and not errors:
        for name, state in named.items():
            bad = sorted(k for k, t in state.items() if is_float(t) and not bool(torch.isfinite(t).all()))
            if bad:
                errors.append(f"{name}: NaN or Inf values in {_names(bad)}")
    duplicates: list[tuple[str, str]] = []
    if check_values and not errors:
        seen: dict[str, str] = {}
        for name, state in named.items():
            digest = state_dict_digest(state)
            if digest in seen:
                duplicates.append((seen[digest], name))
                warnings.append(f"{name} is an exact duplicate of {seen[digest]}: "
                                f"it would count twice in a uniform soup")
            else:
                seen[digest] = name
    integer_keys = tuple(k for k, t in ref.items() if not is_float(t))
    num_parameters = sum(t.numel() for k, t in ref.items() if is_float(t))
    return ValidationReport(ref_name, num_parameters, tuple(errors), tuple(warnings),
                            integer_keys, tied_groups(ref), tuple(duplicates))


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    provenance: Mapping[str, Any] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``state`` as safetensors atomically (temp file + rename), with provenance metadata.

    The file appears complete or not at all, and it is never written over one of ``inputs``
    (the checkpoints the soup was made from). Tied tensors are stored once and re-tied by
    :func:`load_state_dict` (safetensors cannot store aliases).
    """
    path = Path(path)
    target = path.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or (source.is_dir() and source in target.parents):
            raise CheckpointError(f"{path}: refusing to write over an input checkpoint ({source})")
    aliases: dict[str, str] = {}
    for group in tied_groups(state):
        aliases.update({alias: group[0] for alias in group[1:]})
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in aliases}
    metadata = {"format": "pt"}
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True, default=str)
    if aliases:
        metadata[TIED_KEY] = json.dumps(aliases, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")
HF_SHARD_BYTES = 5 << 30  # transformers' default max_shard_size


def save_hf_directory(
    state: Mapping[str, torch.Tensor],
    directory: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str],
    provenance: Mapping[str, Any] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    max_shard_bytes: int = HF_SHARD_BYTES,
) -> Path:
    """Write ``state`` as a Hugging Face directory that ``from_pretrained`` loads.

    Everything but the weights is copied from ``source`` (config, tokenizer, generation
    config); the weights go to ``model.safetensors``, or to shards
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` when they exceed
    ``max_shard_bytes``. Tied tensors are written once, as ``save_pretrained`` does. The folder
    is assembled beside the target and renamed into place; an existing non-empty target or an
    input is never written over.

    >>> import tempfile, torch, json, pathlib
    >>> src = pathlib.Path(tempfile.mkdtemp()); (src / "config.json").write_text("{}")
    2
    >>> out = save_hf_directory({"w": torch.ones(2)}, src.parent / (src.name + "-soup"), source=src)
    >>> sorted(p.name for p in out.iterdir())
    ['config.json', 'model.safetensors']
    """
    directory, source = Path(directory), Path(source)
    target = directory.resolve()
    for item in (*inputs, source):
        item = Path(item).resolve()
        if target == item or item in target.parents or target in item.parents:
            raise CheckpointError(f"{directory}: refusing to write over an input checkpoint ({item})")
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory}: exists and is not empty; choose a new folder")
    aliases = {alias: group[0] for group in tied_groups(state) for alias in group[1:]}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in aliases}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True, default=str)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for item in source.iterdir():
            if item.is_file() and not item.name.endswith(WEIGHT_FILE_SUFFIXES):
                shutil.copy2(item, staging / item.name)
        if len(shards) == 1:
            safetensors.torch.save_file(shards[0], staging / "model.safetensors", metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                safetensors.torch.save_file(shard, staging / name, metadata=metadata)
                weight_map.update({k: name for k in shard})
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def state_dict_bytes(state: Mapping[str, torch.Tensor], provenance: Mapping[str, Any] | None = None) -> bytes:
    """The bytes :func:`save_state_dict` would write (for downloads)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save_state_dict(state, Path(tmp) / "soup.safetensors", provenance=provenance)
        return path.read_bytes()


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
