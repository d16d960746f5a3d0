"""Logit ensemble — the paper's ensemble baseline (§3.1, Table 3).

Averages the *outputs* (logits, as in Gontijo-Lopes et al. 2022) of every ingredient: k
forward passes at inference instead of one, which is exactly the cost a soup avoids. There
is no single state dict to export, so ``state_dict`` is None.
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator, ensemble_logits, metrics_from_logits
from soup_core.recipes.base import (Ingredients, SoupOptions, SoupResult, require_evaluator,
                                    require_ingredients)


def ensemble_metrics(ingredients: Ingredients, evaluator: Evaluator, names: tuple[str, ...]):
    """Metrics of the logit ensemble of ``names`` on every split (ingredient logits are cached)."""
    return {split: metrics_from_logits(
                ensemble_logits([evaluator.logits(ingredients[n], split) for n in names]),
                evaluator.labels(split))
            for split in evaluator.split_names}


def logit_ensemble(ingredients: Ingredients, evaluator: Evaluator | None, *, base=None,
                   options: SoupOptions = SoupOptions()) -> SoupResult:
    evaluator = require_evaluator(evaluator, "ensemble")
    require_ingredients(ingredients, "ensemble")
    names = tuple(ingredients)
    return SoupResult("ensemble", names, tuple(1.0 / len(names) for _ in names), (),
                      ensemble_metrics(ingredients, evaluator, names), None)
