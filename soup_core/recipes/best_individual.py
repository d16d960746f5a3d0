"""Best individual model: the baseline every soup is compared with (paper Table 3, row 1).

Chosen on the held-out val split only, never on test.
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator
from soup_core.recipes.base import (Ingredients, SoupOptions, SoupResult, TraceStep, finish,
                                    require_evaluator, require_ingredients, val_accuracies)


def best_individual(ingredients: Ingredients, evaluator: Evaluator | None, *, base=None,
                    options: SoupOptions = SoupOptions()) -> SoupResult:
    evaluator = require_evaluator(evaluator, "best individual")
    require_ingredients(ingredients, "best individual")
    scores = val_accuracies(ingredients, evaluator, options.val_split)
    best = max(scores, key=lambda name: scores[name])  # first on ties: manifest order
    trace = [TraceStep(name, "add", score, name == best, (best,) if name == best else ())
             for name, score in scores.items()]
    state = {k: v.clone() for k, v in ingredients[best].items()}
    return finish("best", (best,), (1.0,), trace, state, evaluator, options)
