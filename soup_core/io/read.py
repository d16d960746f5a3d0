"""Read checkpoints — safely — into plain state dicts.

Formats read (all into a ``dict[str, torch.Tensor]``):

* ``.safetensors`` — memory-mapped, never executes code;
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` / ``.pth.tar`` — ``torch.load(weights_only=True,
  mmap=True)``; there is **no** fallback to unrestricted unpickling, so a malicious pickle is
  refused, not run;
* nested training checkpoints — ``{"state_dict": ...}``, ``{"model": ...}``, EMA weights
  (``state_dict_ema`` / ``model_ema``, preferred as timm does), ``module.`` prefixes from
  ``DataParallel``/DDP stripped;
* Hugging Face style directories — ``model.safetensors``, ``pytorch_model.bin`` and sharded
  ``*.index.json`` checkpoints;
* raw bytes (browser uploads) with :func:`load_state_dict_bytes`.

>>> import safetensors.torch, torch
>>> from soup_core.io import load_state_dict_bytes
>>> blob = safetensors.torch.save({"w": torch.zeros(3)})
>>> load_state_dict_bytes(blob, "upload.safetensors")["w"].shape
torch.Size([3])
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from soup_core.errors import CheckpointError
from soup_core.io.maps import mapping_error
from soup_core.io.safety import (TRAINER_GLOBALS, check_header, check_keys, check_tensors, check_zip,
                                 not_a_checkpoint, safetensors_header)
from soup_core.state import StateDict, names_list, strip_prefix

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# Keys under which training scripts nest the weights; EMA first because timm prefers it.
NESTED_KEYS_EMA = ("state_dict_ema", "model_ema")
NESTED_KEYS = ("state_dict", "model", "module", "net", "network")
MAX_NESTING = 16  # levels of {"state_dict": {"model": ...}} a training checkpoint may wrap its weights in
# Metadata keys of the safetensors files we write (see soup_core.io.write).
PROVENANCE_KEY = "soup_provenance"
TIED_KEY = "soup_tied"


def load_state_dict(path: str | os.PathLike[str], *, prefer_ema: bool = True,
                    roots: Sequence[Path] | None = None) -> StateDict:
    """Read a checkpoint file or Hugging Face directory into a state dict.

    Tensors from safetensors and new-style torch files are memory-mapped: nothing is read
    until it is used, and the returned tensors must be treated as read-only. With ``roots``,
    every file read (a folder's weights and shards too, symlinks followed) must lie inside one
    of them.

    >>> from soup_core.io import load_state_dict
    >>> from soup_core.zoo import sample_zoos
    >>> sd = load_state_dict(sample_zoos()["digits-finetune"].parent / "base.safetensors")
    >>> sorted(sd)[:2]
    ['body.0.bias', 'body.0.weight']
    """
    path = Path(path)
    if roots is not None:
        inside_roots(path, roots)
    if path.is_dir():
        return _load_directory(path, prefer_ema=prefer_ema, roots=roots)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if is_safetensors_file(path):
        return _read_safetensors_file(path)
    return _finish_pickle(_torch_load(path, str(path)), str(path), prefer_ema)


def load_state_dict_bytes(data: bytes, name: str, *, prefer_ema: bool = True) -> StateDict:
    """Read an uploaded checkpoint held in memory; ``name`` is used for the format and errors."""
    if not data:
        raise CheckpointError(f"{name}: the file is empty")
    if name.endswith(SAFETENSORS_SUFFIXES) or _looks_like_safetensors(data[:8 + 2]):
        header = safetensors_header(data[:8], lambda size: data[8:8 + size], name)
        check_header(header, name)
        try:
            state = safetensors.torch.load(data)
        except Exception as exc:  # SafetensorError, json errors, ...
            raise CheckpointError(f"{name}: not a valid safetensors file ({short(exc)})") from None
        check_tensors(state, name)
        return _retie(state, json.loads(header).get("__metadata__") or {}, name)
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
            raise unreadable_safetensors(path, exc) from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{self.path}: cannot read {key!r} ({short(exc)})") from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def open_checkpoint(path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """A lazy view for safetensors files, :func:`load_state_dict` (memory-mapped) otherwise."""
    path = Path(path)
    if path.is_file() and is_safetensors_file(path) and path.stat().st_size > 0:
        return LazySafetensors(path)
    return load_state_dict(path)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file (or of every file of a directory, in name order), read in 1 MiB blocks.

    Hashed once per process: the result is cached by each file's :func:`stamp`, so a file that
    changes is hashed again and one that does not is never read twice.
    """
    files = hashed_files(path)
    key = stamp(files)
    if key not in _KNOWN_SHA256:
        _KNOWN_SHA256[key] = _sha256_of(files)
    return _KNOWN_SHA256[key]


def hashed_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files :func:`file_sha256` hashes, in the order it hashes them (one stream of bytes)."""
    path = Path(path).resolve()
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def remember_sha256(files: Sequence[Path], digest: str) -> None:
    """Record the sha256 of ``files`` (as :func:`hashed_files` lists them) computed elsewhere —
    by a merge, from the bytes it read anyway — so that :func:`file_sha256` does not read them again."""
    _KNOWN_SHA256[stamp(files)] = digest


def known_sha256(files: Sequence[Path]) -> str | None:
    """The sha256 of ``files`` if this process computed it already and none of them changed since."""
    return _KNOWN_SHA256.get(stamp(files))


def stamp(files: Sequence[Path]) -> tuple[tuple[str, int, int, int, int], ...]:
    """(path, device, inode, size, modification time) of each file: changes when one is replaced or rewritten."""
    return tuple((str(f), (s := f.stat()).st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for f in files)


# sha256 by the stamp of every file hashed: by file_sha256, or by a merge.
_KNOWN_SHA256: dict[tuple[tuple[str, int, int, int, int], ...], str] = {}


def _sha256_of(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def unreadable_safetensors(path: str | os.PathLike[str], exc: BaseException) -> CheckpointError:
    """The one-line error for a safetensors file that safetensors could not open or map."""
    return mapping_error(str(path), exc) or CheckpointError(f"{path}: not a valid safetensors file ({short(exc)})")


def short(exc: BaseException) -> str:
    """An exception's first line, at most 200 characters (for one-line error messages)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def is_safetensors_file(path: Path) -> bool:
    """Whether a file holds safetensors: by its suffix, or (other names) by its first bytes."""
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        return True
    if path.name.endswith(PICKLE_SUFFIXES):
        return False
    with open(path, "rb") as handle:
        return _looks_like_safetensors(handle.read(10))


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object.
    return len(head) >= 9 and head[8:9] == b"{"


def _read_safetensors_file(path: Path) -> StateDict:
    with open(path, "rb") as raw:
        check_header(safetensors_header(raw.read(8), raw.read, str(path)), str(path))
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise unreadable_safetensors(path, exc) from None
    check_tensors(state, str(path))
    return _retie(state, meta, str(path))


def _retie(state: StateDict, meta: Mapping[str, str], name: str) -> StateDict:
    """Restore tied tensors that ``save_state_dict`` stored once (safetensors cannot alias).

    The metadata is a hint, checked against the data: an alias absent from the file is
    restored as its target (same shape, by construction); an alias the file does hold is tied
    only if its values equal the target's, never replaced.
    """
    if TIED_KEY not in meta:
        return state
    try:
        ties = json.loads(meta[TIED_KEY])
    except ValueError:
        ties = None
    if not isinstance(ties, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ties.items()):
        raise CheckpointError(f"{name}: its {TIED_KEY!r} metadata is not a mapping of names to names")
    for alias, target in ties.items():
        if target not in state or target in ties:
            raise CheckpointError(f"{name}: tied key {alias!r} points at missing key {target!r}")
        if alias in state:
            same = state[alias].shape == state[target].shape and state[alias].dtype == state[target].dtype \
                and bool(torch.equal(state[alias], state[target]))
            if not same:
                raise CheckpointError(f"{name}: metadata ties {alias!r} to {target!r}, but the file holds "
                                      "different values for them; the file is inconsistent")
        state[alias] = state[target]
    return state


def _torch_load(source: Path | io.BytesIO, name: str) -> Any:
    """``torch.load`` restricted to tensors and plain containers; never runs pickled code."""
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": True}
    is_zip = zipfile.is_zipfile(source)
    if is_zip:
        size = source.getbuffer().nbytes if isinstance(source, io.BytesIO) else source.stat().st_size
        if isinstance(source, io.BytesIO):
            check_zip(source, name, size)
        else:
            with open(source, "rb") as handle:
                check_zip(handle, name, size)
    if isinstance(source, io.BytesIO):
        source.seek(0)
    elif is_zip:
        kwargs["mmap"] = True  # only the zip format can be memory-mapped
    try:
        with torch.serialization.safe_globals(TRAINER_GLOBALS):
            return torch.load(source, **kwargs)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        detail = next((line for line in lines if "GLOBAL" in line), None)
        if detail is None:  # not a refusal: the bytes are simply not a pickle
            raise _other_format(source, name) or CheckpointError(
                f"{name}: not a readable PyTorch checkpoint ({short(exc)})") from None
        raise CheckpointError(
            f"{name}: refused to unpickle — the file holds Python objects other than tensors "
            f"and is only ever loaded with weights_only=True ({detail})") from None
    except Exception as exc:  # truncated zips, garbage bytes, ...
        raise mapping_error(name, exc) or _other_format(source, name) or CheckpointError(
            f"{name}: not a readable PyTorch checkpoint ({short(exc)})") from None


def _other_format(source: Path | io.BytesIO, name: str) -> CheckpointError | None:
    """The error naming what a file that failed to load really is (a PNG, an HTML page), if its
    first bytes say; None otherwise."""
    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:16]
    else:
        with open(source, "rb") as handle:
            head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):  # torch.save writes a ZIP too: only one without data.pkl is something else
        try:
            with zipfile.ZipFile(source) as archive:
                if not any(member.endswith("data.pkl") for member in archive.namelist()):
                    return CheckpointError(f"{name}: this is a ZIP archive of other files, not a PyTorch checkpoint "
                                           "(it has no data.pkl); unpack it, or choose the weights file itself")
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
    return not_a_checkpoint(head, name)


def _finish_pickle(obj: Any, name: str, prefer_ema: bool) -> StateDict:
    obj = _unnest(obj, prefer_ema, name)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: expected a state dict (a mapping of names to tensors), "
                              f"found {type(obj).__name__}")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{name}: entries that are not tensors: {names_list(bad)}")
    check_keys(obj, name)
    state = strip_prefix({str(k): v for k, v in obj.items()}, "module.")
    check_tensors(state, name)
    return state


def _unnest(obj: Any, prefer_ema: bool, name: str = "checkpoint") -> Any:
    order = NESTED_KEYS_EMA + NESTED_KEYS if prefer_ema else NESTED_KEYS + NESTED_KEYS_EMA
    seen: set[int] = set()  # a dictionary that contains itself would be followed for ever
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[key] for key in order if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            return obj
        if id(inner) in seen or len(seen) >= MAX_NESTING:
            raise CheckpointError(f"{name}: its nested dictionaries refer to themselves or go deeper than "
                                  f"{MAX_NESTING} levels; save the model's state_dict() itself")
        seen.add(id(obj))
        obj = inner
    return obj


def inside_roots(path: Path, roots: Sequence[Path]) -> Path:
    """``path`` with symlinks resolved, if it lies inside one of ``roots``; else an error."""
    real = Path(path).expanduser().resolve()
    if any(real == root or real.is_relative_to(root) for root in roots):
        return real
    raise CheckpointError(f"{path} is outside the allowed folders ({', '.join(map(str, roots))})")


def _load_directory(path: Path, *, prefer_ema: bool, roots: Sequence[Path] | None) -> StateDict:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            return _load_sharded(index, prefer_ema=prefer_ema, roots=roots)
    for file_name in ("model.safetensors", "pytorch_model.bin"):
        if (path / file_name).exists():
            return load_state_dict(path / file_name, prefer_ema=prefer_ema, roots=roots)
    raise CheckpointError(f"{path}: a LoRA adapter, an update of θ0; open it in a zoo whose base is the model it "
                          "was trained on" if (path / "adapter_config.json").is_file() else
                          f"{path}: a directory without model.safetensors, pytorch_model.bin or a sharded index")


def shard_index(index: Path) -> tuple[dict[str, str], list[Path]]:
    """A sharded checkpoint's ``weight_map`` (tensor name -> shard file) and its shard files, each
    checked to lie inside the checkpoint's folder."""
    try:
        data = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index ({short(exc)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid shard index (`weight_map` must map tensor names to "
                              "shard file names)")
    root = index.parent.resolve()
    shards = []
    for shard in sorted(set(weight_map.values())):
        shard_path = (root / shard).resolve()
        if root not in shard_path.parents:
            raise CheckpointError(f"{index}: shard {shard!r} lies outside the checkpoint directory")
        shards.append(shard_path)
    return weight_map, shards


def check_index_keys(index: Path, weight_map: Mapping[str, str], found: Iterable[str]) -> None:
    """Every tensor the index lists must be in one of its shards."""
    missing = sorted(set(weight_map) - set(found))
    if missing:
        raise CheckpointError(f"{index}: keys listed in the index but in no shard: {names_list(missing)}")


def _load_sharded(index: Path, *, prefer_ema: bool, roots: Sequence[Path] | None) -> StateDict:
    weight_map, shards = shard_index(index)
    state: StateDict = {}
    found_in: dict[str, str] = {}
    for shard_path in shards:
        shard = load_state_dict(shard_path, prefer_ema=prefer_ema, roots=roots)
        if twice := sorted(shard.keys() & state.keys()):  # which copy would win is the files' order, not the index
            raise CheckpointError(f"{index.parent}: tensor {twice[0]!r} is in two shards "
                                  f"({found_in[twice[0]]} and {shard_path.name})")
        state.update(shard)
        found_in.update(dict.fromkeys(shard, shard_path.name))
    check_index_keys(index, weight_map, state)
    return state
