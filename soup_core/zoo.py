"""A Zoo: a manifest (``zoo.toml``) + checkpoints + model factory + evaluator.

Sample zoos and user zoos are the same thing: the built-in ones are ordinary manifests under
``sample_data/``. A manifest looks like::

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
:mod:`soup_core.data`). Without a model or data the zoo is weights-only. A folder without a
manifest is a zoo of the checkpoints in it.

A ``module`` is looked up first as ``<module>.py`` beside the manifest, then as an installed
module. Checkpoints load lazily (memory-mapped) and are validated together once, on first use.
With ``allowed_roots`` (or ``SOUP_ALLOWED_ROOTS``) every path the manifest names must resolve,
symlinks followed, inside one of them.

>>> from soup_core.zoo import open_zoo
>>> zoo = open_zoo("digits-finetune")
>>> len(zoo.names), zoo.has_base
(32, True)
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from soup_core.checkpoints import (CheckpointError, StateDict, ValidationReport, file_sha256,
                                   load_state_dict, validate_state_dicts)
from soup_core.data import DataError, data_evaluator
from soup_core import __version__
from soup_core.evaluate import Evaluator, Metrics, metrics_to_json
from soup_core.geometry import Plane, plane_basis
from soup_core.models import ModelError, detect_model_factory
from soup_core.recipes import RECIPES, SoupOptions, SoupResult, get_recipe

SAMPLE_ROOT = Path(__file__).resolve().parent.parent / "sample_data"
BASE = "base"


class ZooError(ValueError):
    """A manifest that cannot be opened; the message names the file and the field."""


@dataclass(frozen=True)
class CheckpointEntry:
    name: str
    path: Path
    hparams: Mapping[str, Any] = field(default_factory=dict)


def sample_zoos() -> dict[str, Path]:
    """Built-in sample zoos: name -> manifest path."""
    return {p.parent.name: p for p in sorted(SAMPLE_ROOT.glob("*/zoo.toml"))}


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
GENERIC_STEMS = {"model", "pytorch_model", "checkpoint", "weights", "last", "best", "model_best"}
ALLOWED_ROOTS_ENV = "SOUP_ALLOWED_ROOTS"


def allowed_roots_from_env() -> list[Path] | None:
    """``SOUP_ALLOWED_ROOTS`` (``os.pathsep``-separated folders) plus the built-in sample zoos,
    or None (no restriction) when unset."""
    value = os.environ.get(ALLOWED_ROOTS_ENV)
    if not value:
        return None
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p] + [SAMPLE_ROOT.resolve()]


def within_roots(path: Path, roots: Sequence[Path] | None, what: str) -> Path:
    """``path`` with symlinks resolved, if it lies inside one of ``roots`` (None: anywhere).

    Resolving first is what stops both ``..`` traversal and symlinks that point outside.
    """
    real = Path(path).expanduser().resolve()
    if roots is None or any(real == root or real.is_relative_to(root) for root in roots):
        return real
    raise ZooError(f"{what} {path} is outside the allowed folders ({', '.join(map(str, roots))}); "
                   f"add its folder to {ALLOWED_ROOTS_ENV} to use it")


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


def _checkpoint_name(path: Path, root: Path) -> str:
    stem = path.name if path.is_dir() else path.name.split(".")[0]
    if stem in GENERIC_STEMS and path.parent != root:
        stem = path.parent.name
    return stem


def folder_manifest(folder: Path) -> dict[str, Any]:
    """What a folder of checkpoints means without a zoo.toml: every checkpoint file or Hugging
    Face directory in it; ``base.*`` (or a ``base/`` directory) is θ0; no evaluator."""
    items = sorted(p for p in folder.iterdir()
                   if (p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES)) or (p.is_dir() and (p / "config.json").is_file()))
    base = [p for p in items if _checkpoint_name(p, folder) == BASE]
    entries = [{"path": p.name} for p in items if p not in base]
    return {"name": folder.name, "description": f"checkpoints in {folder}", "checkpoints": entries,
            **({"base": base[0].name} if base else {})}


def load_callable(spec: str, root: Path, allowed_roots: Sequence[Path] | None = None) -> Callable[..., Any]:
    """``module:function`` from ``<root>/<module>.py`` or an installed module.

    This runs code: only manifests on the server's own disk (inside the allowed roots) name
    it, never an upload. Module names are dotted identifiers, so they cannot climb out of
    ``root``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module_name) or not attr.isidentifier():
        raise ZooError(f"{spec!r} is not of the form module:function")
    local = root / (module_name.replace(".", "/") + ".py")
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


class Zoo:
    """Checkpoints of one model family, with what it takes to score them."""

    def __init__(self, manifest: str | Path, *, device: str | None = None,
                 allowed_roots: Sequence[Path] | None = None) -> None:
        self.allowed_roots = allowed_roots if allowed_roots is not None else allowed_roots_from_env()
        given = Path(manifest) if not (isinstance(manifest, str) and manifest in sample_zoos()) else None
        if given is not None and given.is_dir() and not (given / "zoo.toml").is_file():
            folder = within_roots(given, self.allowed_roots, "folder")
            self.manifest, self.root, data = folder, folder, folder_manifest(folder)
        else:
            self.manifest = resolve_manifest(manifest)
            self.root = within_roots(self.manifest, self.allowed_roots, "manifest").parent
            try:
                data = tomllib.loads(self.manifest.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ZooError(f"{self.manifest}: not valid TOML ({exc})") from None
        self.name: str = data.get("name", self.root.name)
        self.description: str = data.get("description", "")
        self.model_spec: str | None = data.get("model")
        self.evaluator_spec: str | None = data.get("evaluator")
        self.data_spec: Mapping[str, Any] | None = data.get("data")
        self.device = device
        self.entries: dict[str, CheckpointEntry] = {}
        for entry in self._checkpoint_entries(data.get("checkpoints", [])):
            if entry.name == BASE or entry.name in self.entries:
                raise ZooError(f"{self.manifest}: checkpoint name {entry.name!r} is reserved or used twice")
            self.entries[entry.name] = entry
        if not self.entries:
            raise ZooError(f"{self.manifest}: no checkpoints found (an empty folder, or globs that match nothing)")
        self.base_path: Path | None = self.resolve(data["base"], "base") if data.get("base") else None
        self._states: dict[str, StateDict] = {}

    def resolve(self, relative: str, what: str) -> Path:
        """A path named in the manifest, relative to its folder, inside the allowed roots."""
        path = self.root / relative
        if not path.exists():
            raise ZooError(f"{self.manifest}: {what} {relative!r} does not exist")
        return within_roots(path, self.allowed_roots, what)

    def _checkpoint_entries(self, items: Sequence[Any]) -> list[CheckpointEntry]:
        """``[[checkpoints]]`` tables (name, path, hparams) or plain paths and globs."""
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                matches = sorted(self.root.glob(item)) if any(c in item for c in "*?[") else [self.root / item]
                for path in matches:
                    if not path.exists():
                        raise ZooError(f"{self.manifest}: checkpoint {item!r} does not exist")
                    out.append(CheckpointEntry(_checkpoint_name(path, self.root),
                                               within_roots(path, self.allowed_roots, "checkpoint"), {}))
            elif isinstance(item, Mapping) and "path" in item:
                path = self.resolve(item["path"], "checkpoint")
                out.append(CheckpointEntry(item.get("name", _checkpoint_name(path, self.root)), path,
                                           item.get("hparams", {})))
            else:
                raise ZooError(f"{self.manifest}: checkpoint #{i + 1} has no path")
        return out

    # ---- checkpoints -------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    @property
    def has_base(self) -> bool:
        return self.base_path is not None

    def path(self, name: str) -> Path:
        if name == BASE and self.base_path is not None:
            return self.base_path
        if name not in self.entries:
            raise ZooError(f"{self.name}: no checkpoint {name!r}; it has {', '.join(self.names)}"
                           + (" and base" if self.has_base else ""))
        return self.entries[name].path

    def state_dict(self, name: str) -> StateDict:
        """The checkpoint's tensors (memory-mapped, shared: never modify them)."""
        if name not in self._states:
            self._states[name] = load_state_dict(self.path(name))
        return self._states[name]

    @property
    def base(self) -> StateDict | None:
        return self.state_dict(BASE) if self.has_base else None

    def ingredients(self, names: tuple[str, ...] | list[str] | None = None) -> dict[str, StateDict]:
        self.validation.raise_for_errors()
        return {n: self.state_dict(n) for n in (names if names is not None else self.names)}

    @cached_property
    def validation(self) -> ValidationReport:
        named = {n: self.state_dict(n) for n in self.names}
        if self.has_base:
            named = {BASE: self.state_dict(BASE), **named}
        return validate_state_dicts(named)

    @cached_property
    def sha256(self) -> dict[str, str]:
        names = ((BASE,) if self.has_base else ()) + self.names
        return {n: file_sha256(self.path(n)) for n in names}

    def extended(self, extra: Mapping[str, str | Path]) -> Zoo:
        """A new Zoo with the same model, evaluator and base plus more checkpoints (by path).

        The app uses it for uploaded checkpoints; the original Zoo (shared between sessions)
        is left as it was. Checkpoint names must be new.
        """
        clash = [n for n in extra if n in self.entries or n == BASE]
        if clash:
            raise ZooError(f"{self.name}: checkpoint name(s) already used: {', '.join(clash)}")
        other = copy.copy(self)  # shares the evaluator and loaded tensors, never changes them
        other.entries = {**self.entries, **{n: CheckpointEntry(n, Path(p), {}) for n, p in extra.items()}}
        other._states = dict(self._states)
        for derived in ("validation", "sha256"):
            other.__dict__.pop(derived, None)
        return other

    def hparams(self, name: str) -> Mapping[str, Any]:
        return self.entries[name].hparams

    # ---- scoring -----------------------------------------------------------------------

    @cached_property
    def model_factory(self) -> Callable[[], torch.nn.Module] | None:
        """The manifest's ``model = "module:function"``, else one found from the checkpoints
        (Hugging Face directory, timm checkpoint), else None (a weights-only zoo)."""
        if self.model_spec and self.model_spec != "auto":
            return load_callable(self.model_spec, self.root, self.allowed_roots)
        first = self.path(self.names[0])
        try:
            return detect_model_factory(first, self.state_dict(self.names[0]))
        except ModelError as exc:
            raise ZooError(str(exc)) from None

    @cached_property
    def evaluator(self) -> Evaluator | None:
        """None for a weights-only zoo (no model, or neither an evaluator nor ``[data]``)."""
        if self.model_factory is None:
            return None
        if self.evaluator_spec:
            return load_callable(self.evaluator_spec, self.root, self.allowed_roots)(self.model_factory,
                                                                                    device=self.device)
        if self.data_spec:
            folders = [p for p in (self.base_path, *(e.path for e in self.entries.values()))
                       if p is not None and p.is_dir()]
            tokenizer = next((p for p in folders
                              if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()), None)
            try:
                return data_evaluator(self.data_spec, self.model_factory, lambda rel: self.resolve(rel, "data file"),
                                      tokenizer_dir=tokenizer, device=self.device)
            except DataError as exc:
                raise ZooError(f"{self.manifest}: {exc}") from None
        return None

    def require_evaluator(self, what: str) -> Evaluator:
        if self.evaluator is None:
            raise ZooError(f"{self.name} is weights-only: {what} scores models on held-out data, so it needs "
                           "a model and data (`model = ...` and `evaluator = ...` or `[data]` in zoo.toml); "
                           "inspect, angles, uniform and Model Stock soups and export work without")
        return self.evaluator

    def metrics(self, name: str) -> dict[str, Metrics]:
        """Every split's metrics for one checkpoint (cached by content in the evaluator)."""
        return self.require_evaluator("scoring checkpoints").evaluate(self.state_dict(name))


def open_zoo(zoo: str | Path, *, device: str | None = None, allowed_roots: Sequence[Path] | None = None) -> Zoo:
    """Open a sample zoo by name, a ``zoo.toml``, or a folder (with a zoo.toml, or of checkpoints);
    raises :class:`ZooError` on bad manifests and paths outside ``allowed_roots``."""
    try:
        return Zoo(zoo, device=device, allowed_roots=allowed_roots)
    except CheckpointError as exc:
        raise ZooError(str(exc)) from None


def make_soup(zoo: Zoo, recipe_name: str, options: SoupOptions,
              ingredients: Sequence[str] | None = None) -> SoupResult:
    """Run a recipe on a zoo's checkpoints (all, or ``ingredients``): the CLI's and the app's entry point."""
    recipe = get_recipe(recipe_name)
    evaluator = zoo.require_evaluator(f"the {recipe.pretty_name}") if recipe.needs_evaluator else zoo.evaluator
    if recipe.needs_base and not zoo.has_base:
        raise ZooError(f"{zoo.name}: {recipe.pretty_name} needs a base checkpoint θ0 (`base = ...` in zoo.toml)")
    return recipe.make(zoo.ingredients(ingredients), evaluator, base=zoo.base, options=options)


def zoo_point(zoo: Zoo, name: str, options: SoupOptions | None = None) -> tuple[StateDict, SoupResult | None]:
    """A point of weight space named the way the CLI and the app name them.

    A checkpoint's name, ``base`` (θ0), or a soup recipe (``uniform``, ``greedy``, ...), made
    from all of the zoo's checkpoints; checkpoint names win over recipe names. Returns the
    state dict and, for a soup, its :class:`SoupResult`.
    """
    if name in zoo.entries or (name == BASE and zoo.has_base):
        return zoo.state_dict(name), None
    if name in RECIPES:
        if not RECIPES[name].is_soup:
            raise ZooError(f"{RECIPES[name].pretty_name} is not one set of weights, so it is not a point; "
                           f"choose a soup recipe ({', '.join(n for n, r in RECIPES.items() if r.is_soup)})")
        result = make_soup(zoo, name, options or SoupOptions())
        return result.state_dict, result
    raise ZooError(f"{zoo.name}: {name!r} is neither a checkpoint"
                   + (", base" if zoo.has_base else "") + f" nor a soup recipe; checkpoints are "
                   f"{', '.join(zoo.names)}")


def zoo_plane(zoo: Zoo, names: Sequence[str]) -> Plane:
    """The plane through three named points of a zoo (origin: the first); see :func:`zoo_point`."""
    if len(set(names)) != 3:
        raise ZooError("a plane needs three different points: checkpoints, base, or soup recipes")
    return plane_basis(*(zoo_point(zoo, n)[0] for n in names), names=tuple(names))


def soup_provenance(zoo: Zoo, result: SoupResult, command: str) -> dict[str, Any]:
    """What an exported soup carries: enough to check where it came from and to remake it."""
    recipe = get_recipe(result.recipe)
    return {"recipe": result.recipe, "recipe_name": recipe.pretty_name, "reference": recipe.reference,
            "zoo": zoo.name, "manifest": str(zoo.manifest),
            "ingredients": [{"name": n, "sha256": zoo.sha256[n]} for n in result.ingredients],
            "weights": list(result.weights), "options": dict(result.options),
            "data": dict(zoo.evaluator.info) if zoo.evaluator is not None else {},
            "metrics": metrics_to_json(result.metrics), "library_version": __version__,
            "command": command}


def point_provenance(zoo: Zoo, names: Sequence[str], xy: Sequence[float], bn: str,
                     metrics: Mapping[str, Metrics], command: str) -> dict[str, Any]:
    """Provenance of the weights at one point of a zoo's plane (``soup point``, the app's export)."""
    return {"recipe": "landscape-point", "recipe_name": "Landscape point",
            "reference": "Wortsman et al. 2022, Figure 2 (plane through three points)",
            "zoo": zoo.name, "manifest": str(zoo.manifest), "plane": list(names), "xy": list(xy), "bn": bn,
            "ingredients": [{"name": n, "sha256": zoo.sha256[n]} for n in names if n in zoo.sha256],
            "data": dict(zoo.evaluator.info) if zoo.evaluator is not None else {},
            "metrics": metrics_to_json(metrics), "library_version": __version__, "command": command}
