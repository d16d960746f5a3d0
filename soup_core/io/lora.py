"""PEFT LoRA adapters as checkpoints: θ0 + ΔW, with ΔW = scale · B·A per target module.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (what PEFT's
``save_pretrained`` writes) is read as the full weights it stands for on θ0 (the zoo's ``base``):
each target module's weight gets PEFT's own update (``get_delta_weight``), every other tensor is
θ0's. Soups of adapters are then soups of those weights — the mean of the *updates* B·A, which
PEFT's ``add_weighted_adapter(combination_type="linear")`` is not (it averages A and B apart,
adding cross terms). Per module, as PEFT computes it:

* scale = ``lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``); r and alpha from
  ``rank_pattern`` / ``alpha_pattern`` where a pattern matches the module's name (PEFT's
  ``get_pattern_key``: the first pattern p with ``(.*\\.)?(p)$`` matching it);
* a linear layer: ΔW = scale · B·A (transposed with ``fan_in_fan_out``, GPT-2's Conv1D);
* an embedding: ΔW = scale · (B·A)ᵀ (``lora_embedding_A`` / ``lora_embedding_B``);
* θ0 + ΔW computed in float32 (float64 for float64 weights) and rounded once to θ0's dtype, as
  ``merge_and_unload`` rounds it.

Refused by name, never guessed: other PEFT types, DoRA, trained biases (``bias`` other than
``none``, ``lora_bias``), ``modules_to_save`` and trainable tokens (full copies of modules),
LoRA on convolutions or on bare parameters, ``layer_replication``, an update whose module has no
weight in θ0 (an adapter written for another model, or for names transformers 5 renamed), a
rank that differs from the configuration's.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soup_core.errors import CheckpointError
from soup_core.io.read import load_state_dict
from soup_core.state import tied_groups

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
REFUSED_WHEN_SET = {  # config field -> what it is, for the one-line refusal
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "trained LoRA biases",
    "modules_to_save": "modules_to_save (full copies of modules)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
}


def is_adapter_folder(path: str | Path) -> bool:
    """A folder PEFT wrote an adapter into (``adapter_config.json``)."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdapterConfig:
    """What of ``adapter_config.json`` the update needs (everything else is refused or irrelevant)."""

    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    base_model: str | None

    @classmethod
    def read(cls, folder: Path) -> AdapterConfig:
        where = folder / ADAPTER_CONFIG
        try:
            data = json.loads(where.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{where}: not a readable adapter configuration ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: an adapter configuration is a JSON object")
        kind = data.get("peft_type")
        if kind != "LORA":
            raise CheckpointError(f"{where}: a {kind or 'untyped'} adapter; only PEFT LoRA adapters are read "
                                  "(peft_type LORA)")
        for name, what in REFUSED_WHEN_SET.items():
            if data.get(name):
                raise CheckpointError(f"{where}: {what} cannot be read as a weight update here; merge the adapter "
                                      "with PEFT's merge_and_unload and add the merged model instead")
        if data.get("bias", "none") != "none":
            raise CheckpointError(f"{where}: bias={data['bias']!r} trains biases beside the update; only "
                                  "bias='none' adapters are read")
        try:
            r, alpha = int(data["r"]), float(data["lora_alpha"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: r and lora_alpha must be numbers") from None
        patterns = {}
        for name in ("rank_pattern", "alpha_pattern"):
            value = data.get(name) or {}
            if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
                raise CheckpointError(f"{where}: {name} must map module patterns to numbers")
            patterns[name] = dict(value)
        if r <= 0 or not math.isfinite(alpha):
            raise CheckpointError(f"{where}: r must be positive and lora_alpha finite, not {r} and {alpha}")
        return cls(r, alpha, bool(data.get("use_rslora")), bool(data.get("fan_in_fan_out")),
                   patterns["rank_pattern"], patterns["alpha_pattern"], data.get("base_model_name_or_path"))

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """The module's (r, lora_alpha): the first pattern that matches it, as PEFT's ``get_pattern_key``."""
        return (int(_pattern_value(self.rank_pattern, module, self.r)),
                float(_pattern_value(self.alpha_pattern, module, self.lora_alpha)))

    def scale(self, module: str) -> float:
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraUpdate:
    """One module's update: ΔW = scale · B·A, transposed for embeddings and ``fan_in_fan_out``."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool
    embedding: bool = False  # lora_embedding_A/B (else lora_A/B.weight)
    saved_base: torch.Tensor | None = None  # the layer's own weight, saved with embedding adapters (PEFT loads it)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        product = self.b.to(dtype) @ self.a.to(dtype)
        return (product.T if self.transpose else product) * self.scale


def read_updates(folder: str | Path, base: Mapping[str, torch.Tensor], *,
                 roots: Sequence[Path] | None = None) -> dict[str, LoraUpdate]:
    """Every update in the adapter, by the θ0 tensor it changes (``<module>.weight``); its files
    must lie inside ``roots`` when given."""
    folder = Path(folder)
    config = AdapterConfig.read(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG} (PEFT's save_pretrained "
                              "writes it; a pickled adapter_model.bin is not read)")
    tensors = load_state_dict(weights, roots=roots)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B|base_layer)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)",
                             key)
        if match is None:
            raise CheckpointError(f"{weights}: {key!r} is not a LoRA A or B matrix; only the updates of a plain "
                                  "LoRA adapter are read")
        module, role = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        parts.setdefault(module.removeprefix(PREFIX), {})[role] = tensor
    updates = {}
    for module, found in parts.items():
        updates[f"{module}.weight"] = _update(weights, module, found, config, base)
    return updates


def _update(weights: Path, module: str, found: Mapping[str, torch.Tensor], config: AdapterConfig,
            base: Mapping[str, torch.Tensor]) -> LoraUpdate:
    embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
    a, b = (found.get("lora_embedding_A"), found.get("lora_embedding_B")) if embedding else \
        (found.get("lora_A"), found.get("lora_B"))
    if a is None or b is None:
        raise CheckpointError(f"{weights}: {module} has " + ("only one of its two LoRA matrices" if a is not None or
                                                            b is not None else "a saved weight but no LoRA update"))
    if a.dim() != 2 or b.dim() != 2:
        raise CheckpointError(f"{weights}: {module} is LoRA on a convolution ({a.dim()}-d matrices); only linear "
                              "and embedding layers are read")
    r, _ = config.rank_and_alpha(module)
    if a.shape[0] != r or b.shape[1] != r:
        raise CheckpointError(f"{weights}: {module} has rank {a.shape[0]} but its configuration says r = {r}")
    target = f"{module}.weight"
    if target not in base:
        raise CheckpointError(f"{weights}: the adapter updates {module}, but θ0 has no {target!r}; is θ0 (the "
                              "zoo's base) the model this adapter was trained on?")
    saved = found.get("base_layer")  # save_embedding_layers: PEFT loads this weight under the update
    if saved is not None and tuple(saved.shape) != tuple(base[target].shape):
        raise CheckpointError(f"{weights}: the adapter resizes {target} from {tuple(base[target].shape)} to "
                              f"{tuple(saved.shape)} (added tokens); soups need every ingredient's shapes equal")
    return LoraUpdate(a, b, config.scale(module), transpose=embedding or config.fan_in_fan_out, embedding=embedding,
                      saved_base=saved)


def updated(base: torch.Tensor, update: LoraUpdate, key: str = "") -> torch.Tensor:
    """θ0 + ΔW for one tensor, computed in float32 (float64 for float64 θ0), rounded once to θ0's dtype."""
    wide = torch.float64 if base.dtype == torch.float64 else torch.float32
    delta = update.delta(wide)
    if delta.shape != base.shape:
        raise CheckpointError(f"{key}: the adapter's update has shape {tuple(delta.shape)}, θ0's weight "
                              f"{tuple(base.shape)}; is θ0 the model this adapter was trained on?")
    start = base if update.saved_base is None else update.saved_base
    return (start.to(wide) + delta).to(base.dtype)


class AdapterWeights(Mapping[str, torch.Tensor]):
    """An adapter on θ0 as a state dict, computed a tensor at a time (θ0's own tensors elsewhere):
    what a streamed merge reads, holding one updated tensor, never the model."""

    def __init__(self, base: Mapping[str, torch.Tensor], updates: Mapping[str, LoraUpdate]) -> None:
        self._base, self._updates = base, over_ties(base, updates)
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._updates:
            return self._base[key]
        if self._last is None or self._last[0] != key:  # blocks of one tensor come in a row
            self._last = (key, updated(self._base[key], self._updates[key], key))
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def over_ties(base: Mapping[str, torch.Tensor], updates: Mapping[str, LoraUpdate]) -> dict[str, LoraUpdate]:
    """``updates`` with each one also under the names of θ0 tensors tied to its own (an input
    embedding tied to the output layer changes both, as PEFT's in-place merge changes both)."""
    out = dict(updates)
    for group in tied_groups(base):
        hit = [key for key in group if key in updates]
        if len(hit) > 1:
            raise CheckpointError(f"the adapter updates {hit[0]!r} and {hit[1]!r}, which are one tied tensor in θ0")
        for key in group if hit else ():
            out[key] = updates[hit[0]]
    return out


def apply_adapter(base: Mapping[str, torch.Tensor], folder: str | Path, *,
                  roots: Sequence[Path] | None = None) -> dict[str, torch.Tensor]:
    """The full weights an adapter folder stands for on θ0 (``base``): updated tensors are new (one
    per tied group), the others are θ0's own (shared: never modify them)."""
    updates = over_ties(base, read_updates(folder, base, roots=roots))
    made: dict[int, torch.Tensor] = {}  # by update: tied names get the same tensor
    out = {}
    for key, tensor in base.items():
        if key in updates:
            update = updates[key]
            out[key] = made.setdefault(id(update), updated(tensor, update, key))
        else:
            out[key] = tensor
    return out
