"""A zoo's manifest: ``zoo.toml`` (or a plain folder) read into a typed :class:`Manifest`.

Three jobs live here and nowhere else: parsing the TOML against its schema (one clear line
per mistake), the allowed-roots check every path goes through, and importing the
``module:function`` a manifest names. A manifest looks like::

    name = "my-zoo"
    model = "models:make_model"          # module:function, returns an nn.Module
    evaluator = "data:make_evaluator"     # module:function(model_factory) -> Evaluator
    base = "theta0.safetensors"           # optional θ0, always called "base"

    [[checkpoints]]
    name = "run-1"
    path = "runs/1.safetensors"
    hparams = { lr = 1e-4 }               # optional, shown in tables

``checkpoints`` may instead be a list of paths and globs (``["runs/*/model.safetensors"]``);
``model`` may be left out for Hugging Face folders and timm checkpoints (see
:mod:`soup_core.models`), and ``evaluator`` replaced by a ``[data]`` table (see
:mod:`soup_core.data`). A folder without a manifest is a zoo of the checkpoints in it.

Built-in sample zoos are ordinary manifests inside the ``sample_data`` package, found with
:mod:`importlib.resources` so that an installed wheel finds them too.

>>> from soup_core.zoo.manifest import read_manifest
>>> manifest = read_manifest("digits-finetune")
>>> manifest.name, len(manifest.entries), manifest.base_path.name
('digits-finetune', 32, 'base.safetensors')
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soup_core.errors import CheckpointError, ZooError
from soup_core.io.read import CHECKPOINT_SUFFIXES, inside_roots

BASE = "base"
GENERIC_STEMS = {"model", "pytorch_model", "adapter_model", "checkpoint", "weights", "last", "best", "model_best"}
ALLOWED_ROOTS_ENV = "SOUP_ALLOWED_ROOTS"
MANIFEST_FIELDS = {"name": str, "description": str, "model": str, "evaluator": str, "base": str,
                   "data": dict, "checkpoints": list}


def sample_root() -> Path:
    """The folder of the built-in sample zoos (inside the installed ``sample_data`` package)."""
    return Path(str(importlib.resources.files("sample_data"))).resolve()


def sample_zoos() -> dict[str, Path]:
    """Built-in sample zoos: name -> manifest path."""
    return {p.parent.name: p for p in sorted(sample_root().glob("*/zoo.toml"))}


@dataclass(frozen=True)
class CheckpointEntry:
    name: str
    path: Path
    hparams: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """What a ``zoo.toml`` (or a folder) says, every path resolved and inside the allowed roots."""

    name: str
    description: str
    path: Path  # the zoo.toml, or the folder itself
    root: Path
    entries: tuple[CheckpointEntry, ...]
    base_path: Path | None = None
    model_spec: str | None = None
    evaluator_spec: str | None = None
    data_spec: Mapping[str, Any] | None = None
    allowed_roots: tuple[Path, ...] | None = None


def allowed_roots_from_env() -> list[Path] | None:
    """``SOUP_ALLOWED_ROOTS`` (``os.pathsep``-separated folders) plus the built-in sample zoos,
    or None (no restriction) when unset."""
    value = os.environ.get(ALLOWED_ROOTS_ENV)
    if not value:
        return None
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p] + [sample_root()]


def within_roots(path: Path, roots: Sequence[Path] | None, what: str) -> Path:
    """``path`` with symlinks resolved, if it lies inside one of ``roots`` (None: anywhere).

    Resolving first is what stops both ``..`` traversal and symlinks that point outside.
    """
    if roots is None:
        return Path(path).expanduser().resolve()
    try:
        return inside_roots(path, roots)
    except CheckpointError:
        raise ZooError(f"{what} {path} is outside the allowed folders ({', '.join(map(str, roots))}); "
                       f"add its folder to {ALLOWED_ROOTS_ENV} where the command or the app's server starts "
                       f"(e.g. {ALLOWED_ROOTS_ENV}=/path/to/zoos make run; a running server must be restarted)") from None


def resolve_manifest(zoo: str | Path) -> Path:
    """A sample zoo's name, a ``zoo.toml`` path, or a folder holding one."""
    samples = sample_zoos()
    if isinstance(zoo, str) and zoo in samples:
        return samples[zoo]
    path = Path(zoo)
    if path.is_dir():
        path = path / "zoo.toml"
    if not path.is_file():
        raise ZooError(f"{zoo}: neither a sample zoo ({', '.join(samples)}) nor a zoo.toml")
    return path


def checkpoint_name(path: Path, root: Path) -> str:
    """A checkpoint's name from its path: the file stem, or its folder's name for generic stems
    (``runs/lr-1e-4/model.safetensors`` is ``lr-1e-4``)."""
    stem = path.name if path.is_dir() else path.name.split(".")[0]
    if stem in GENERIC_STEMS and path.parent != root:
        stem = path.parent.name
    return stem


def folder_manifest(folder: Path) -> dict[str, Any]:
    """What a folder of checkpoints means without a zoo.toml: every checkpoint file, Hugging Face
    directory or PEFT adapter folder in it; ``base.*`` (or a ``base/`` directory) is θ0 (else, for
    adapters, the base their config names: :func:`adapters_base`); no evaluator."""
    items = sorted(p for p in folder.iterdir()
                   if (p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
                   or (p.is_dir() and ((p / "config.json").is_file() or (p / "adapter_config.json").is_file())))
    base = [p for p in items if checkpoint_name(p, folder) == BASE]
    entries = [{"path": p.name} for p in items if p not in base]
    return {"name": folder.name, "description": f"checkpoints in {folder}", "checkpoints": entries,
            **({"base": base[0].name} if base else {})}


def check_schema(data: Mapping[str, Any], where: Path) -> None:
    """Every known field has its type; ``checkpoints`` entries are paths or tables with a path."""
    for key, kind in MANIFEST_FIELDS.items():
        if key in data and not isinstance(data[key], kind):
            raise ZooError(f"{where}: `{key}` must be a {'table' if kind is dict else kind.__name__}, "
                           f"not {type(data[key]).__name__} ({data[key]!r})")
    for i, item in enumerate(data.get("checkpoints", [])):
        if isinstance(item, str):
            if Path(item).is_absolute():
                raise ZooError(f"{where}: checkpoint #{i + 1} {item!r} is absolute; "
                               "paths are relative to the manifest's folder")
            continue
        if not isinstance(item, Mapping) or not isinstance(item.get("path"), str):
            raise ZooError(f"{where}: checkpoint #{i + 1} needs a `path` (a string relative to the manifest)")
        if not isinstance(item.get("name", ""), str) or not isinstance(item.get("hparams", {}), Mapping):
            raise ZooError(f"{where}: checkpoint #{i + 1}: `name` must be a string and `hparams` a table")


def read_manifest(zoo: str | Path, allowed_roots: Sequence[Path] | None = None) -> Manifest:
    """Read a sample zoo's name, a ``zoo.toml``, or a folder (with or without one)."""
    roots = tuple(allowed_roots) if allowed_roots is not None else None
    given = Path(zoo) if not (isinstance(zoo, str) and zoo in sample_zoos()) else None
    if given is not None and roots is not None:
        within_roots(given, roots, "folder")  # the same answer whether or not it exists
    if given is not None and given.is_dir() and not (given / "zoo.toml").is_file():
        folder = within_roots(given, roots, "folder")
        path, root, data = folder, folder, folder_manifest(folder)
    else:
        path = resolve_manifest(zoo)
        root = within_roots(path, roots, "manifest").parent
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except RecursionError:  # arrays or tables nested thousands deep
            raise ZooError(f"{path}: not valid TOML (nested too deeply to read)") from None
        except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError; an integer of over 4,300 digits
            raise ZooError(f"{path}: not valid TOML ({str(exc)[:200]})") from None
    check_schema(data, path)
    entries: dict[str, CheckpointEntry] = {}
    for entry in _checkpoint_entries(data.get("checkpoints", []), path, root, roots):
        if entry.name == BASE or entry.name in entries:
            raise ZooError(f"{path}: checkpoint name {entry.name!r} is reserved or used twice")
        entries[entry.name] = entry
    if not entries:
        raise ZooError(f"{path}: no checkpoints found (an empty folder, or globs that match nothing)")
    base = resolve_path(data["base"], "base", path, root, roots) if data.get("base") else adapters_base(entries, roots)
    return Manifest(data.get("name", root.name), data.get("description", ""), path, root,
                    tuple(entries.values()), base, data.get("model"), data.get("evaluator"),
                    data.get("data"), roots)


def adapters_base(entries: Mapping[str, CheckpointEntry], roots: Sequence[Path] | None) -> Path | None:
    """θ0 for a zoo that names none and has LoRA adapters: the folder the first adapter's
    ``adapter_config.json`` names (``base_model_name_or_path``, relative to the adapter's folder),
    when that is a local folder inside the allowed roots; else None (the zoo then says what to set)."""
    from soup_core.io.lora import AdapterConfig, is_adapter_folder
    first = next((e.path for e in entries.values() if is_adapter_folder(e.path)), None)
    if first is None:
        return None
    try:
        named = AdapterConfig.read(first).base_model
    except CheckpointError:  # reading the adapter says what is wrong with it, in its place
        return None
    if not named:
        return None
    folder = first / named
    if not folder.is_dir() or folder.resolve() == first.resolve():
        return None
    try:
        return within_roots(folder, roots, "base")
    except ZooError:
        return None


def resolve_path(relative: str, what: str, manifest: Path, root: Path, roots: Sequence[Path] | None) -> Path:
    """A path named in a manifest, relative to its folder, inside the allowed roots."""
    path = root / relative
    if not path.exists():
        raise ZooError(f"{manifest}: {what} {relative!r} does not exist")
    return within_roots(path, roots, what)


def _checkpoint_entries(items: Sequence[Any], manifest: Path, root: Path,
                        roots: Sequence[Path] | None) -> list[CheckpointEntry]:
    """``[[checkpoints]]`` tables (name, path, hparams) or plain paths and globs."""
    out = []
    for item in items:
        if isinstance(item, str):
            matches = sorted(root.glob(item)) if any(c in item for c in "*?[") else [root / item]
            for path in matches:
                if not path.exists():
                    raise ZooError(f"{manifest}: checkpoint {item!r} does not exist")
                out.append(CheckpointEntry(checkpoint_name(path, root), within_roots(path, roots, "checkpoint")))
        else:
            path = resolve_path(item["path"], "checkpoint", manifest, root, roots)
            out.append(CheckpointEntry(item.get("name", checkpoint_name(path, root)), path,
                                       item.get("hparams", {})))
    return out


def local_module(spec: str, root: Path) -> Path:
    """Where ``module:function``'s module lies beside a manifest (``pkg.mod`` -> ``root/pkg/mod.py``),
    whether or not it is there (else the module is an installed one)."""
    return root / (spec.partition(":")[0].replace(".", "/") + ".py")


def load_callable(spec: str, root: Path, allowed_roots: Sequence[Path] | None = None) -> Callable[..., Any]:
    """``module:function`` from ``<root>/<module>.py`` or an installed module.

    This runs code: only manifests on the server's own disk (inside the allowed roots) name
    it, never an upload. Module names are dotted identifiers, so they cannot climb out of
    ``root``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module_name) or not attr.isidentifier():
        raise ZooError(f"{spec!r} is not of the form module:function")
    local = local_module(spec, root)
    if local.is_file():
        within_roots(local, allowed_roots, "module")
    try:
        if local.is_file():
            unique = f"_soup_zoo_{abs(hash(str(local)))}_{local.stem}"
            module = sys.modules.get(unique)
            if module is None:
                spec_obj = importlib.util.spec_from_file_location(unique, local)
                module = importlib.util.module_from_spec(spec_obj)
                spec_obj.loader.exec_module(module)
                sys.modules[unique] = module
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ZooError(f"cannot import {module_name!r} for {spec!r}: {exc}") from None
    if not hasattr(module, attr):
        raise ZooError(f"module {module_name!r} has no {attr!r} (from {spec!r})")
    return getattr(module, attr)
