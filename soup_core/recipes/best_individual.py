"""Best individual model: the baseline every soup is compared with (paper Table 3, row 1).

Chosen on the held-out val split only, never on test.
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator
from soup_core.recipes.base import Brew, Ingredients, TraceStep, val_accuracies
from soup_core.recipes.parameters import Params


def best_individual(ingredients: Ingredients, evaluator: Evaluator, base, params: Params) -> Brew:
    scores = val_accuracies(ingredients, evaluator, params.val_split)
    best = max(scores, key=lambda name: scores[name])  # first on ties: manifest order
    trace = [TraceStep(name, "add", score, name == best, (best,) if name == best else ())
             for name, score in scores.items()]
    return Brew((best,), {k: v.clone() for k, v in ingredients[best].items()}, trace)
