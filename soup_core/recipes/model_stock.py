"""Model Stock (Jang et al., 2024, "Model Stock: All we need is just a few fine-tuned models").

Per tensor, with deltas δ_i = θ_i − θ0 and cos the mean pairwise cosine between them:

    t = N·cos / (1 + (N − 1)·cos),   merged = t · mean(θ_i) + (1 − t) · θ0

so near-orthogonal fine-tunings are pulled back towards θ0 and aligned ones are kept. The
formula is meant for 0 < cos ≤ 1; for cos ≤ 0 (or a tensor no fine-tuning moved) the guard
sets t = 0, i.e. keeps θ0 for that tensor. Needs θ0 but no evaluator. Integer buffers come
from the first ingredient (see ``params.py``). The per-tensor method is
:func:`soup_core.merge.model_stock`: the angle is summed over a tensor's blocks, so it streams too.

mergekit's ``model_stock`` differs in two places: it clamps each pairwise cosine's denominator
at 1e-6 and has no guard for cos ≤ 0 (t turns negative and the merge extrapolates away from
the fine-tunings); ours keeps θ0 there, as the paper's derivation (0 < cos) requires.
"""

from __future__ import annotations

import torch

from soup_core.recipes.base import Brew, Ingredients, Merge, brew_merge
from soup_core.recipes.parameters import Params


def model_stock_ratio(deltas: torch.Tensor) -> tuple[float, float]:
    """(mean pairwise cosine, interpolation ratio t) of a k×n matrix of float64 deltas."""
    from soup_core.merge import model_stock_ratio_from_gram
    return model_stock_ratio_from_gram(deltas @ deltas.T)


def model_stock_merge(names: tuple[str, ...], params: Params) -> Merge:
    from soup_core.merge import model_stock
    return Merge(names, tuple(1.0 / len(names) for _ in names), model_stock(), names[0], summary_name="ratios")


def model_stock(ingredients: Ingredients, evaluator, base, params: Params) -> Brew:
    return brew_merge(model_stock_merge(tuple(ingredients), params), ingredients, base, evaluator)
