"""Karcher mean of the ingredients (mergekit's ``karcher``): per tensor, the Riemannian centre of
the models' directions on the sphere, scaled by their mean norm — SLERP for any number of
models. The maths is :mod:`soup_core.merge.karcher`; weight-only, no θ0.

>>> import torch
>>> from soup_core.recipes import RECIPES
>>> soup = RECIPES["karcher"].make({"a": {"w": torch.tensor([2.0, 0.0])}, "b": {"w": torch.tensor([0.0, 2.0])}})
>>> [round(v, 4) for v in soup.state_dict["w"].tolist()]
[1.4142, 1.4142]
"""

from __future__ import annotations

from soup_core.recipes.base import Brew, Ingredients, Merge, brew_merge
from soup_core.recipes.parameters import Params


def karcher_merge(names: tuple[str, ...], params: Params) -> Merge:
    from soup_core.merge.karcher import karcher
    return Merge(names, tuple(1.0 / len(names) for _ in names), karcher(params.max_iter, params.tol), names[0])


def karcher_soup(ingredients: Ingredients, evaluator, base, params: Params) -> Brew:
    return brew_merge(karcher_merge(tuple(ingredients), params), ingredients, base, evaluator)
