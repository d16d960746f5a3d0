"""SLERP of two ingredients (mergekit's ``slerp``): per tensor, the point at ``t`` on the arc from the
first ingredient to the second; the maths, with the straight-line fallback for near-parallel
tensors, is :mod:`soup_core.merge.slerp`. Weight-only and streamed; needs no θ0.

>>> import torch
>>> from soup_core.recipes import RECIPES
>>> soup = RECIPES["slerp"].make({"a": {"w": torch.tensor([2.0, 0.0])}, "b": {"w": torch.tensor([0.0, 2.0])}}, t=0.5)
>>> [round(v, 4) for v in soup.state_dict["w"].tolist()]
[1.4142, 1.4142]
"""

from __future__ import annotations

from soup_core.recipes.base import Brew, Ingredients, Merge, brew_merge
from soup_core.recipes.parameters import Params


def slerp_merge(names: tuple[str, ...], params: Params) -> Merge:
    from soup_core.merge.slerp import slerp
    return Merge(names, (1 - params.t, params.t), slerp(params.t), names[0] if params.t <= 0.5 else names[1],
                 summary_name="coefficients")


def slerp_soup(ingredients: Ingredients, evaluator, base, params: Params) -> Brew:
    return brew_merge(slerp_merge(tuple(ingredients), params), ingredients, base, evaluator)
