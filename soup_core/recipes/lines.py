"""LiNeS (Wang et al. 2024): the ingredients' mean task vector added to θ0 with a scale that grows
linearly with depth, α at the shallowest block and α + β at the deepest (the maths and how the
blocks are found: :mod:`soup_core.merge.lines`). Needs θ0; β (or α) can be chosen on val
(``--beta val``), as the paper does.

>>> import torch
>>> from soup_core.recipes import RECIPES
>>> base = {"0.w": torch.zeros(1), "1.w": torch.zeros(1)}
>>> soup = RECIPES["lines"].make({"a": {"0.w": torch.ones(1), "1.w": torch.ones(1)}}, base=base, alpha=0.5, beta=1.0)
>>> soup.state_dict["0.w"].item(), soup.state_dict["1.w"].item()
(0.5, 1.5)
"""

from __future__ import annotations

from soup_core.recipes.base import Brew, Ingredients, Merge, brew_merge
from soup_core.recipes.parameters import Params


def lines_merge(names: tuple[str, ...], params: Params) -> Merge:
    from soup_core.merge.lines import lines
    kept = params.weights.for_names(names)
    method = lines(tuple(kept.values()), params.alpha, params.beta)
    return Merge(tuple(kept), tuple(kept.values()), method, max(kept, key=lambda n: kept[n]))


def lines_soup(ingredients: Ingredients, evaluator, base, params: Params) -> Brew:
    return brew_merge(lines_merge(tuple(ingredients), params), ingredients, base, evaluator)
