"""A Zoo: a manifest's checkpoints, loaded lazily, validated once, with what it takes to score them.

Checkpoints load memory-mapped on first use and are validated together once (keys, shapes,
dtypes, NaN/Inf) before any math. The model and the evaluator are built on first use.

>>> from soup_core.zoo import open_zoo
>>> zoo = open_zoo("digits-finetune")
>>> len(zoo.names), zoo.has_base
(32, True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from soup_core.align import permutation_groups, permute, units_moved, weight_matching
from soup_core.data import data_evaluator
from soup_core.errors import CheckpointError, DataError, ModelError, SoupError, ZooError
from soup_core.evaluate import Evaluator, Metrics
from soup_core.io import ValidationReport, file_sha256, load_state_dict, validate_state_dicts
from soup_core.io.lora import AdapterConfig, apply_adapter, is_adapter_folder
from soup_core.io.read import inside_roots, short
from soup_core.io.resident import load_resident
from soup_core.models import config_channels, detect_model_factory
from soup_core.state import StateDict
from soup_core.zoo.manifest import (BASE, CheckpointEntry, Manifest, allowed_roots_from_env, load_callable,
                                    read_manifest, resolve_path, within_roots)


class Zoo:
    """Checkpoints of one model family, with what it takes to score them."""

    def __init__(self, manifest: Manifest, *, device: str | None = None, resident: bool = False) -> None:
        self.spec = manifest
        self.manifest: Path = manifest.path
        self.root: Path = manifest.root
        self.name: str = manifest.name
        self.description: str = manifest.description
        self.allowed_roots = manifest.allowed_roots
        self.device = device
        self.entries: dict[str, CheckpointEntry] = {e.name: e for e in manifest.entries}
        self.base_path: Path | None = manifest.base_path
        self.aligned_to: str | None = None  # see aligned()
        self.units_moved: dict[str, dict[str, tuple[int, int]]] = {}  # aligned(): per checkpoint and layer
        self._states: dict[str, StateDict] = {}
        # resident: checkpoints read into memory, not mapped (servers: a file replaced under them
        # must not SIGBUS the process; soup_core.io.resident)
        self.resident = resident
        self.identity: tuple | None = None  # the files' stamps when a server opened it (appkit.cache.load_zoo)

    # ---- checkpoints -------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    @property
    def has_base(self) -> bool:
        return self.base_path is not None

    @property
    def all_names(self) -> tuple[str, ...]:
        """``base`` (when the zoo has one) and then every checkpoint."""
        return ((BASE,) if self.has_base else ()) + self.names

    def path(self, name: str) -> Path:
        if name == BASE and self.base_path is not None:
            return self.base_path
        if name not in self.entries:
            raise ZooError(f"{self.name}: no checkpoint {name!r}; it has {', '.join(self.names)}"
                           + (" and base" if self.has_base else ""))
        return self.entries[name].path

    def state_dict(self, name: str) -> StateDict:
        """The checkpoint's tensors (memory-mapped, or in memory when resident; shared: never modify them)."""
        if name not in self._states:
            path = self.path(name)
            if name != BASE and is_adapter_folder(path):
                self._states[name] = self._adapter(name, path)
            else:
                read = load_resident if self.resident else load_state_dict
                self._states[name] = read(path, roots=self.allowed_roots)
        return self._states[name]

    def _adapter(self, name: str, path: Path) -> StateDict:
        """A LoRA adapter's full weights on θ0 (:mod:`soup_core.io.lora`)."""
        if not self.has_base:
            trained_on = AdapterConfig.read(path).base_model
            raise ZooError(f"{self.name}: {name} is a LoRA adapter ({path}), an update of θ0; set base = \"...\" "
                           "in zoo.toml to the model it was trained on"
                           + (f" (its adapter_config.json names {trained_on!r})" if trained_on else ""))
        if self.allowed_roots is not None:
            inside_roots(path, self.allowed_roots)
        return apply_adapter(self.base, path, roots=self.allowed_roots)

    @property
    def base(self) -> StateDict | None:
        return self.state_dict(BASE) if self.has_base else None

    def ingredients(self, names: Sequence[str] | None = None) -> dict[str, StateDict]:
        self.validation.raise_for_errors()
        return {n: self.state_dict(n) for n in (names if names is not None else self.names)}

    @cached_property
    def validation(self) -> ValidationReport:
        return validate_state_dicts({n: self.state_dict(n) for n in self.all_names})

    @cached_property
    def sha256(self) -> dict[str, str]:
        return {n: file_sha256(self.path(n)) for n in self.all_names}

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
        if self.allowed_roots is not None:  # the added files' own folders (the app's upload folder)
            other.allowed_roots = (*self.allowed_roots, *{Path(p).resolve().parent for p in extra.values()})
        other._states = dict(self._states)
        for derived in ("validation", "sha256"):
            other.__dict__.pop(derived, None)
        return other

    def aligned(self, reference: str) -> Zoo:
        """A new Zoo whose checkpoints have their hidden units permuted to match ``reference``'s
        (weight matching, :mod:`soup_core.align`): each computes the same function as before.

        For models trained from scratch (paper §3.2). θ0, when there is one, is left as it is.
        """
        if reference not in self.entries:
            raise ZooError(f"{self.name}: no checkpoint {reference!r} to align to; it has {', '.join(self.names)}")
        evaluator = self.require_evaluator("alignment")  # the model's graph, and inputs for its shapes
        example = next(iter(evaluator.splits.values())).inputs[:2]
        groups = permutation_groups(evaluator.model, example)
        ingredients = self.ingredients()
        other = copy.copy(self)
        other._states = dict(self._states)
        other.units_moved = {}
        for name, state in ingredients.items():
            if name != reference:
                perms = weight_matching(ingredients[reference], state, groups)
                other._states[name] = permute(state, groups, perms)
                other.units_moved[name] = units_moved(groups, perms)
        other.aligned_to = reference
        return other

    def hparams(self, name: str) -> Mapping[str, Any]:
        return self.entries[name].hparams

    # ---- scoring -----------------------------------------------------------------------

    @cached_property
    def model_factory(self) -> Callable[[], torch.nn.Module] | None:
        """The manifest's ``model = "module:function"``, else one found from the checkpoints
        (Hugging Face directory, timm checkpoint; for LoRA adapters, the base's), else None (a weights-only zoo)."""
        if self.spec.model_spec and self.spec.model_spec != "auto":
            return _reported(load_callable(self.spec.model_spec, self.root, self.allowed_roots),
                             f"{self.manifest}: `model = {self.spec.model_spec!r}`")
        first, name = self.path(self.names[0]), self.names[0]
        if is_adapter_folder(first) and self.has_base:  # an adapter's model is its base's
            first, name = self.base_path, BASE
        try:
            return detect_model_factory(first, self.state_dict(name))
        except ModelError as exc:
            raise ZooError(str(exc)) from None

    @cached_property
    def evaluator(self) -> Evaluator | None:
        """None for a weights-only zoo (neither an evaluator nor ``[data]``, or no model). A zoo with
        nothing to score on never builds its model, so weight-only work on Hugging Face or timm
        checkpoints (soups, angles, export) needs neither transformers nor timm."""
        if not (self.spec.evaluator_spec or self.spec.data_spec) or self.model_factory is None:
            return None
        if self.spec.evaluator_spec:
            make = load_callable(self.spec.evaluator_spec, self.root, self.allowed_roots)
            try:
                evaluator = make(self.model_factory, device=self.device)
            except SoupError:
                raise
            except Exception as exc:  # the manifest's own code: report it, do not crash the caller
                raise ZooError(f"{self.manifest}: `evaluator = {self.spec.evaluator_spec!r}` failed "
                               f"({type(exc).__name__}: {short(exc)})") from None
            if not isinstance(evaluator, Evaluator):
                raise ZooError(f"{self.manifest}: `evaluator = {self.spec.evaluator_spec!r}` returned "
                               f"{type(evaluator).__name__}, not an Evaluator")
            return evaluator
        if self.spec.data_spec:
            folders = [p for p in (self.base_path, *(e.path for e in self.entries.values()))
                       if p is not None and p.is_dir()]
            tokenizer = next((p for p in folders
                              if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()), None)
            try:
                return data_evaluator(self.spec.data_spec, self.model_factory,
                                      lambda rel: resolve_path(rel, "data file", self.manifest, self.root,
                                                               self.allowed_roots),
                                      tokenizer_dir=tokenizer, default_channels=config_channels(folders),
                                      device=self.device,
                                      inside=lambda file: within_roots(file, self.allowed_roots, "data file"))
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


def open_zoo(zoo: str | Path, *, device: str | None = None, allowed_roots: Sequence[Path] | None = None,
             resident: bool = False) -> Zoo:
    """Open a sample zoo by name, a ``zoo.toml``, or a folder (with a zoo.toml, or of checkpoints);
    raises :class:`ZooError` on bad manifests and paths outside ``allowed_roots`` (default:
    ``SOUP_ALLOWED_ROOTS``, unrestricted when unset)."""
    roots = allowed_roots if allowed_roots is not None else allowed_roots_from_env()
    try:
        return Zoo(read_manifest(zoo, roots), device=device, resident=resident)
    except CheckpointError as exc:
        raise ZooError(str(exc)) from None


def _reported(factory: Callable[[], torch.nn.Module], what: str) -> Callable[[], torch.nn.Module]:
    """A manifest's model factory whose own failure is one :class:`ZooError` naming it."""
    def build() -> torch.nn.Module:
        try:
            return factory()
        except SoupError:
            raise
        except Exception as exc:  # the manifest's own code: report it, do not crash the caller
            raise ZooError(f"{what} failed ({type(exc).__name__}: {short(exc)})") from None
    return build
