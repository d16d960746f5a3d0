"""Logit ensemble — the paper's ensemble baseline (§3.1, Table 3).

Averages the *outputs* (logits, as in Gontijo-Lopes et al. 2022) of every ingredient: k
forward passes at inference instead of one, which is exactly the cost a soup avoids. There
is no single state dict to export, so ``state_dict`` is None.
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator, Metrics, ensemble_logits
from soup_core.recipes.base import Brew, Ingredients
from soup_core.recipes.parameters import Params


def ensemble_metrics(ingredients: Ingredients, evaluator: Evaluator, names: tuple[str, ...]) -> dict[str, Metrics]:
    """Metrics of the logit ensemble of ``names`` on every split (ingredient logits are cached)."""
    return {split: evaluator.metrics(ensemble_logits([evaluator.logits(ingredients[n], split) for n in names]), split)
            for split in evaluator.split_names}


def logit_ensemble(ingredients: Ingredients, evaluator: Evaluator, base, params: Params) -> Brew:
    names = tuple(ingredients)
    return Brew(names, None, metrics=ensemble_metrics(ingredients, evaluator, names))
