"""Model Stock (Jang et al., 2024, "Model Stock: All we need is just a few fine-tuned models").

Per tensor, with deltas δ_i = θ_i − θ0 and cos the mean pairwise cosine between them:

    t = N·cos / (1 + (N − 1)·cos),   merged = t · mean(θ_i) + (1 − t) · θ0

so near-orthogonal fine-tunings are pulled back towards θ0 and aligned ones are kept. The
formula is meant for 0 < cos ≤ 1; for cos ≤ 0 (or a tensor no fine-tuning moved) the guard
sets t = 0, i.e. keeps θ0 for that tensor. Needs θ0 but no evaluator. Integer buffers come
from the first ingredient (see ``params.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from soup_core.params import ACCUMULATE_DTYPE, uniform_average
from soup_core.recipes.base import Brew, Ingredients
from soup_core.recipes.parameters import Params
from soup_core.state import is_float, tied_aliases


def model_stock_ratio(deltas: torch.Tensor) -> tuple[float, float]:
    """(mean pairwise cosine, interpolation ratio t) of a k×n matrix of float64 deltas."""
    k = deltas.shape[0]
    norms = deltas.norm(dim=1)
    if k < 2 or bool((norms == 0).any()):
        return 0.0, 0.0
    unit = deltas / norms[:, None]
    gram = unit @ unit.T
    cos = float((gram.sum() - gram.diagonal().sum()) / (k * (k - 1)))
    if cos <= 0:
        return cos, 0.0
    return cos, k * cos / (1 + (k - 1) * cos)


def model_stock(ingredients: Ingredients, evaluator, base: Mapping[str, torch.Tensor], params: Params) -> Brew:
    names = tuple(ingredients)
    states = [ingredients[n] for n in names]
    merged = uniform_average(states)
    ratios: dict[str, float] = {}
    aliases = tied_aliases(merged)
    for key, mean in merged.items():
        if not is_float(mean) or key in aliases:
            continue
        theta0 = base[key].to(ACCUMULATE_DTYPE)
        deltas = torch.stack([s[key].to(ACCUMULATE_DTYPE).reshape(-1) for s in states]) - theta0.reshape(1, -1)
        _, t = model_stock_ratio(deltas)
        ratios[key] = t
        merged[key] = (t * mean.to(ACCUMULATE_DTYPE) + (1 - t) * theta0).to(mean.dtype)
    merged.update({alias: merged[target] for alias, target in aliases.items()})
    return Brew(names, merged, extras={"ratios": ratios})
