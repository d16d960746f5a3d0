"""Uniform soup: θ_S = (1/k) Σ θ_i over every ingredient (paper §2, Table 2).

Needs no evaluator. Fails when a bad ingredient (e.g. a too-high learning rate that left
the basin) joins — the reason greedy and pruned soups exist (paper §3.3.1).
"""

from __future__ import annotations

from soup_core.params import uniform_average
from soup_core.recipes.base import Brew, Ingredients
from soup_core.recipes.parameters import Params


def uniform_soup(ingredients: Ingredients, evaluator, base, params: Params) -> Brew:
    names = tuple(ingredients)
    device = evaluator.device if evaluator is not None else None  # summed where it is scored
    return Brew(names, uniform_average([ingredients[n] for n in names], device))
