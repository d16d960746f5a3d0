"""Uniform soup: θ_S = (1/k) Σ θ_i over every ingredient (paper §2, Table 2).

Needs no evaluator. Fails when a bad ingredient (e.g. a too-high learning rate that left
the basin) joins — the reason greedy and pruned soups exist (paper §3.3.1). A per-tensor
method, so ``soup make uniform`` streams it to disk for models of any size.
"""

from __future__ import annotations

from soup_core.recipes.base import Brew, Ingredients, Merge, brew_merge
from soup_core.recipes.parameters import Params


def uniform_merge(names: tuple[str, ...], params: Params) -> Merge:
    from soup_core.merge import mean_of
    return Merge(names, tuple(1.0 / len(names) for _ in names), mean_of(), names[0])


def uniform_soup(ingredients: Ingredients, evaluator, base, params: Params) -> Brew:
    return brew_merge(uniform_merge(tuple(ingredients), params), ingredients, base, evaluator)
