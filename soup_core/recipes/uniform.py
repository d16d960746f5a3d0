"""Uniform soup: θ_S = (1/k) Σ θ_i over every ingredient (paper §2, Table 2).

Needs no evaluator. Fails when a bad ingredient (e.g. a too-high learning rate that left
the basin) joins — the reason greedy and pruned soups exist (paper §3.3.1).
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator
from soup_core.params import uniform_average
from soup_core.recipes.base import Ingredients, SoupOptions, SoupResult, finish, require_ingredients


def uniform_soup(ingredients: Ingredients, evaluator: Evaluator | None, *, base=None,
                 options: SoupOptions = SoupOptions()) -> SoupResult:
    require_ingredients(ingredients, "uniform")
    names = tuple(ingredients)
    state = uniform_average([ingredients[n] for n in names])
    return finish("uniform", names, tuple(1.0 / len(names) for _ in names), [], state, evaluator, options)
