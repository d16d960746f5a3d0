"""Points of a zoo's weight space, named as the CLI and the app name them.

A point is a checkpoint's name, ``base`` (θ0), or a soup recipe (``uniform``, ``greedy``, ...)
made from all of the zoo's checkpoints; checkpoint names win over recipe names.

>>> from soup_core.zoo import open_zoo, make_soup
>>> zoo = open_zoo("digits-finetune", device="cpu")
>>> make_soup(zoo, "uniform", ["ft-00", "ft-01"]).weights
(0.5, 0.5)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from soup_core.errors import ZooError
from soup_core.geometry import Plane, plane_basis
from soup_core.recipes import RECIPES, SoupResult, get_recipe
from soup_core.state import StateDict
from soup_core.zoo.manifest import BASE
from soup_core.zoo.zoo import Zoo


def make_soup(zoo: Zoo, recipe_name: str, ingredients: Sequence[str] | None = None, **params: Any) -> SoupResult:
    """Run a recipe on a zoo's checkpoints (all, or ``ingredients``) with the recipe's declared
    ``params``: the CLI's and the app's entry point."""
    recipe = get_recipe(recipe_name)
    evaluator = zoo.require_evaluator(f"the {recipe.pretty_name}") if recipe.needs_evaluator else zoo.evaluator
    return recipe.make(zoo.ingredients(ingredients), evaluator, base=zoo.base, **params)


def zoo_point(zoo: Zoo, name: str) -> tuple[StateDict, SoupResult | None]:
    """The weights a name stands for and, for a soup, its :class:`SoupResult` (default parameters)."""
    if name in zoo.entries or (name == BASE and zoo.has_base):
        return zoo.state_dict(name), None
    if name in RECIPES:
        if not RECIPES[name].is_soup:
            raise ZooError(f"{RECIPES[name].pretty_name} is not one set of weights, so it is not a point; "
                           f"choose a soup recipe ({', '.join(n for n, r in RECIPES.items() if r.is_soup)})")
        result = make_soup(zoo, name)
        return result.state_dict, result
    raise ZooError(f"{zoo.name}: {name!r} is neither a checkpoint"
                   + (", base" if zoo.has_base else "") + f" nor a soup recipe; checkpoints are "
                   f"{', '.join(zoo.names)}")


def zoo_plane(zoo: Zoo, names: Sequence[str]) -> Plane:
    """The plane through three named points of a zoo (origin: the first); see :func:`zoo_point`."""
    if len(set(names)) != 3:
        raise ZooError("a plane needs three different points: checkpoints, base, or soup recipes")
    return plane_basis(*(zoo_point(zoo, n)[0] for n in names), names=tuple(names))
