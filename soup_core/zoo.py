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

A ``module`` is looked up first as ``<module>.py`` beside the manifest, then as an installed
module. Checkpoints load lazily (memory-mapped) and are validated together once, on first use.

>>> from soup_core.zoo import open_zoo
>>> zoo = open_zoo("digits-finetune")
>>> len(zoo.names), zoo.has_base
(32, True)
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
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
from soup_core.evaluate import Evaluator, Metrics
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


def load_callable(spec: str, root: Path) -> Callable[..., Any]:
    """``module:function`` from ``<root>/<module>.py`` or an installed module."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ZooError(f"{spec!r} is not of the form module:function")
    local = root / (module_name.replace(".", "/") + ".py")
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

    def __init__(self, manifest: str | Path, *, device: str | None = None) -> None:
        self.manifest = resolve_manifest(manifest)
        self.root = self.manifest.parent
        try:
            data = tomllib.loads(self.manifest.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ZooError(f"{self.manifest}: not valid TOML ({exc})") from None
        self.name: str = data.get("name", self.root.name)
        self.description: str = data.get("description", "")
        self.model_spec: str | None = data.get("model")
        self.evaluator_spec: str | None = data.get("evaluator")
        self.device = device
        entries = data.get("checkpoints", [])
        if not entries:
            raise ZooError(f"{self.manifest}: no [[checkpoints]] listed")
        self.entries: dict[str, CheckpointEntry] = {}
        for i, entry in enumerate(entries):
            if "path" not in entry:
                raise ZooError(f"{self.manifest}: checkpoint #{i + 1} has no path")
            name = entry.get("name", Path(entry["path"]).stem)
            if name == BASE or name in self.entries:
                raise ZooError(f"{self.manifest}: checkpoint name {name!r} is reserved or used twice")
            self.entries[name] = CheckpointEntry(name, self.root / entry["path"], entry.get("hparams", {}))
        self.base_path: Path | None = self.root / data["base"] if data.get("base") else None
        self._states: dict[str, StateDict] = {}

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
        return load_callable(self.model_spec, self.root) if self.model_spec else None

    @cached_property
    def evaluator(self) -> Evaluator | None:
        """None for a weights-only zoo (no model or no evaluator in the manifest)."""
        if self.model_factory is None or not self.evaluator_spec:
            return None
        return load_callable(self.evaluator_spec, self.root)(self.model_factory, device=self.device)

    def require_evaluator(self, what: str) -> Evaluator:
        if self.evaluator is None:
            raise ZooError(f"{self.name}: {what} needs a model factory and an evaluator "
                           "(`model = ...` and `evaluator = ...` in zoo.toml)")
        return self.evaluator

    def metrics(self, name: str) -> dict[str, Metrics]:
        """Every split's metrics for one checkpoint (cached by content in the evaluator)."""
        return self.require_evaluator("scoring checkpoints").evaluate(self.state_dict(name))


def open_zoo(zoo: str | Path, *, device: str | None = None) -> Zoo:
    """Open a sample zoo by name or any ``zoo.toml``; raises :class:`ZooError` on bad manifests."""
    try:
        return Zoo(zoo, device=device)
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
