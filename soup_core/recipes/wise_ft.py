"""WiSE-FT (Wortsman et al. 2022b, "Robust fine-tuning of zero-shot models"): (1 − α)·θ0 + α·θ,
with θ the uniform soup of the ingredients (one ingredient: that fine-tuned model). α = 1 is the
soup, α = 0 is θ0; the whole curve over α is ``soup path ZOO base uniform --range 0 1``.

>>> import torch
>>> from soup_core.recipes import RECIPES
>>> soup = RECIPES["wise-ft"].make({"a": {"w": torch.tensor([4.0])}}, base={"w": torch.tensor([0.0])}, alpha=0.25)
>>> soup.state_dict["w"].tolist()
[1.0]
"""

from __future__ import annotations

from soup_core.recipes.base import Brew, Ingredients, Merge, brew_merge
from soup_core.recipes.parameters import Params


def wise_ft_merge(names: tuple[str, ...], params: Params) -> Merge:
    from soup_core.merge.methods import wise_ft
    return Merge(names, tuple(params.alpha / len(names) for _ in names), wise_ft(params.alpha), names[0])


def wise_ft_soup(ingredients: Ingredients, evaluator, base, params: Params) -> Brew:
    return brew_merge(wise_ft_merge(tuple(ingredients), params), ingredients, base, evaluator)
