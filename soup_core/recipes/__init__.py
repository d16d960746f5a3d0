"""The recipe registry: every way to make a soup, with its name, pretty name and reference.

>>> from soup_core.recipes import RECIPES
>>> RECIPES["greedy"].pretty_name
'Greedy soup'

Every recipe is called as ``recipe.make(ingredients, evaluator, base=θ0, options=SoupOptions())``
and returns a :class:`SoupResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from soup_core.recipes.base import Ingredients, SoupOptions, SoupResult, TraceStep
from soup_core.recipes.best_individual import best_individual
from soup_core.recipes.ensemble import logit_ensemble
from soup_core.recipes.greedy import greedy_soup
from soup_core.recipes.greedy_ensemble import greedy_ensemble
from soup_core.recipes.learned import learned_soup
from soup_core.recipes.model_stock import model_stock
from soup_core.recipes.pruned import pruned_soup
from soup_core.recipes.uniform import uniform_soup


@dataclass(frozen=True)
class Recipe:
    name: str
    pretty_name: str
    reference: str
    make: Callable[..., SoupResult]
    needs_evaluator: bool
    needs_base: bool = False
    is_soup: bool = True  # False for ensembles: no single set of weights to export


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("best", "Best individual model", "Wortsman et al. 2022, Table 3", best_individual, True),
    Recipe("uniform", "Uniform soup", "Wortsman et al. 2022, §2 / Table 2", uniform_soup, False),
    Recipe("greedy", "Greedy soup", "Wortsman et al. 2022, Recipe 1", greedy_soup, True),
    Recipe("pruned", "Pruned soup", "Dansereau et al., Algorithm 2", pruned_soup, True),
    Recipe("learned", "Learned soup", "Wortsman et al. 2022, Appendix I", learned_soup, True),
    Recipe("learned-by-layer", "Learned soup (by layer)", "Wortsman et al. 2022, Appendix I",
           partial(learned_soup, by_layer=True), True),
    Recipe("ensemble", "Logit ensemble", "Wortsman et al. 2022, Table 3", logit_ensemble, True,
           is_soup=False),
    Recipe("greedy-ensemble", "Greedy ensemble", "Wortsman et al. 2022, Table 3", greedy_ensemble,
           True, is_soup=False),
    Recipe("model-stock", "Model Stock", "Jang et al. 2024, Model Stock", model_stock, False,
           needs_base=True),
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


__all__ = ["RECIPES", "Ingredients", "Recipe", "SoupOptions", "SoupResult", "TraceStep", "get_recipe"]
