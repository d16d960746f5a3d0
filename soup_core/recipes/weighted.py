"""Weighted soup: θ_S = Σ w_i θ_i / Σ w_i with weights chosen by hand.

The learned soup (paper App. I) finds such weights by gradient descent on val; this recipe
takes them from the user, as mergekit's ``linear`` merge does: to try a soup that leans on the
models one trusts, or to reproduce a mix from elsewhere. An ingredient not named weighs 1 (all
unnamed: the uniform soup); weight 0 leaves it out.

>>> import torch
>>> from soup_core.recipes import RECIPES
>>> soup = RECIPES["weighted"].make({"a": {"w": torch.zeros(2)}, "b": {"w": torch.ones(2)}}, weights="a=3,b=1")
>>> soup.state_dict["w"].tolist(), soup.weights
([0.25, 0.25], (0.75, 0.25))
"""

from __future__ import annotations

import math

from soup_core.recipes.base import Brew, Ingredients, Merge, brew_merge
from soup_core.recipes.parameters import Params


def weighted_merge(names: tuple[str, ...], params: Params) -> Merge:
    from soup_core.merge import linear
    kept = params.weights.for_names(names)
    total = sum(kept.values())
    if not math.isfinite(total):  # weights near float's largest: their sum overflows, not their ratios
        largest = max(kept.values())
        kept = {name: weight / largest for name, weight in kept.items()}
        total = sum(kept.values())
    weights = tuple(w / total for w in kept.values())
    reference = max(kept, key=lambda n: kept[n])  # integer tensors from the heaviest (the first of equals)
    return Merge(tuple(kept), weights, linear(weights), reference)


def weighted_soup(ingredients: Ingredients, evaluator, base, params: Params) -> Brew:
    return brew_merge(weighted_merge(tuple(ingredients), params), ingredients, base, evaluator)
