"""A soup of LoRA adapters written back as one LoRA adapter (``soup make … --adapter-rank R``).

The soup's update on each module the ingredients adapted, ΔW = θ_soup − θ0, is rarely of rank R
(the mean of k rank-r updates has rank up to k·r). The adapter written holds its best rank-R
approximation in Frobenius norm (Eckart–Young): the truncated SVD ΔW ≈ U_R S_R V_Rᵀ, stored as
B = U_R √S_R and A = √S_R V_Rᵀ with ``lora_alpha = r`` (scale 1), transposed where PEFT
transposes (embeddings, ``fan_in_fan_out``). What is lost is measured, not hidden: the relative
Frobenius error ‖ΔW − BA‖ / ‖ΔW‖ = √(Σ_{i>R} s_i²) / √(Σ s_i²) per module, in the JSON output and
the adapter's model card. R at least k·r reproduces the soup (to float rounding). The folder is
what PEFT's ``save_pretrained`` writes: ``PeftModel.from_pretrained(θ0, folder)`` loads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from soup_core.errors import SoupError
from soup_core.io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, LoraUpdate, is_adapter_folder, read_updates
from soup_core.io.weights_out import state_dict_bytes
from soup_core.io.write import atomic_folder
from soup_core.recipes import RECIPES, SoupResult
from soup_core.zoo import BASE, Zoo

MAX_RANK = 4096


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, relative Frobenius error)`` with B·A the best rank-``rank`` approximation of
    ``delta`` (float64 SVD); a matrix of smaller rank is padded with zeros, so B·A is exact.

    >>> b, a, error = low_rank(torch.tensor([[3.0, 0.0], [0.0, 4.0]]), 1)
    >>> (b @ a).tolist(), round(error, 6)
    ([[0.0, 0.0], [0.0, 4.0]], 0.6)
    """
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :kept], a[:kept] = u[:, :kept] * root, root[:, None] * vh[:kept]
    total = float((s ** 2).sum())
    return b, a, math.sqrt(float((s[kept:] ** 2).sum()) / total) if total > 0 else 0.0


def adapter_updates(zoo: Zoo, names: Iterable[str]) -> dict[str, LoraUpdate]:
    """Every module any of ``names`` adapts (the first adapter's update, for its kind), or an
    error naming the ingredients that are not adapters."""
    names = list(names)
    full = [n for n in names if not is_adapter_folder(zoo.path(n))]
    if full:
        raise SoupError(f"{', '.join(full)} {'is not a LoRA adapter' if len(full) == 1 else 'are not LoRA adapters'}"
                        ": a soup is written as one adapter only when every ingredient is one; write its full "
                        "weights instead")
    modules: dict[str, LoraUpdate] = {}
    for name in names:
        for key, update in read_updates(zoo.path(name), zoo.base, roots=zoo.allowed_roots).items():
            modules.setdefault(key, update)
    return modules


def write_adapter(zoo: Zoo, result: SoupResult, out: str | Path, rank: int, *, command: str = "",
                  inputs: Iterable[str | Path] = ()) -> tuple[Path, dict[str, float]]:
    """Write ``result`` (a soup of adapters) as a LoRA adapter folder of rank ``rank``; returns the
    folder and the relative Frobenius error per module."""
    if not 1 <= rank <= MAX_RANK:
        raise SoupError(f"the adapter's rank must be 1 to {MAX_RANK}, not {rank}")
    if result.state_dict is None:
        raise SoupError(f"{RECIPES[result.recipe].pretty_name} is not one set of weights; choose a soup recipe")
    modules = adapter_updates(zoo, result.ingredients)
    base, soup = zoo.base, result.state_dict
    moved = [k for k in soup if k not in modules and not torch.equal(soup[k], base[k])]
    if moved:
        raise SoupError(f"the soup changes {moved[0]!r}, which no adapter updates; write its full weights instead")
    tensors, errors = {}, {}
    for key, update in modules.items():
        delta = soup[key].to(torch.float64) - base[key].to(torch.float64)
        b, a, errors[key.removesuffix(".weight")] = low_rank(delta.T if update.transpose else delta, rank)
        module, dtype = PREFIX + key.removesuffix(".weight"), base[key].dtype
        a_key, b_key = (f"{module}.lora_embedding_A", f"{module}.lora_embedding_B") if update.embedding else \
            (f"{module}.lora_A.weight", f"{module}.lora_B.weight")
        tensors[a_key], tensors[b_key] = a.to(dtype), b.to(dtype)
    first = json.loads((zoo.path(result.ingredients[0]) / ADAPTER_CONFIG).read_text())
    config = {"peft_type": "LORA", "task_type": first.get("task_type"), "r": rank, "lora_alpha": rank,
              "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted(k.removesuffix(".weight") for k in modules),
              "fan_in_fan_out": any(u.transpose for u in modules.values() if not u.embedding),
              "base_model_name_or_path": str(zoo.path(BASE).resolve()), "rank_pattern": {}, "alpha_pattern": {},
              "modules_to_save": None, "init_lora_weights": True}
    card = adapter_card(result, rank, errors, command)
    folder = atomic_folder(out, {ADAPTER_CONFIG: json.dumps(config, indent=2), ADAPTER_WEIGHTS: state_dict_bytes(tensors),
                                 "README.md": card}, inputs=[*inputs, *(zoo.path(n) for n in zoo.all_names)])
    return folder, errors


def adapter_card(result: SoupResult, rank: int, errors: Mapping[str, float], command: str) -> str:
    """The adapter's model card: what it is, how it was made, and what the rank cut lost, per module."""
    recipe = RECIPES[result.recipe]
    worst = max(errors.values(), default=0.0)
    rows = "\n".join(f"| `{module}` | {error:.2e} |" for module, error in sorted(errors.items()))
    return (f"# {recipe.pretty_name} of {len(result.ingredients)} LoRA adapters, as one adapter of rank {rank}\n\n"
            f"Made by Model Soup Lab from {', '.join(result.ingredients)} ({recipe.reference}); weights "
            f"{', '.join(f'{w:g}' for w in result.weights)}.\n\n"
            + (f"Remake it: `{command}`\n\n" if command else "")
            + f"Each module's soup update ΔW = θ_soup − θ0 is stored as its best rank-{rank} approximation "
            "(truncated SVD), B = U√S and A = √S Vᵀ with lora_alpha = r. What the cut loses, "
            f"‖ΔW − BA‖_F / ‖ΔW‖_F, is at most {worst:.2e}:\n\n| module | relative Frobenius error |\n|---|---:|\n"
            f"{rows}\n\nLoad it with PEFT: `PeftModel.from_pretrained(base_model, this_folder)`.\n")
