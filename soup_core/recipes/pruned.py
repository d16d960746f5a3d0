"""Pruned soup — Algorithm 2 of the reproduction (Dansereau et al., §2.3).

Start from the uniform soup of every ingredient; for N passes, try removing each ingredient
in turn (in decreasing val accuracy, as the algorithm is written, or a seeded random order)
and keep the removal when val accuracy does not drop (``tie="ge"``; ``"gt"`` removes only on
a strict gain). By construction the result is never below the uniform soup on val.
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator
from soup_core.params import RunningSum
from soup_core.recipes.base import (Ingredients, SoupOptions, SoupResult, TraceStep,
                                    candidate_order, finish, require_evaluator, require_ingredients)


def pruned_soup(ingredients: Ingredients, evaluator: Evaluator | None, *, base=None,
                options: SoupOptions = SoupOptions()) -> SoupResult:
    evaluator = require_evaluator(evaluator, "pruned")
    require_ingredients(ingredients, "pruned")
    order = candidate_order(ingredients, evaluator, options)
    soup = RunningSum()
    for name in ingredients:
        soup.add(name, ingredients[name])
    baseline = evaluator.accuracy(soup.mean(), options.val_split)
    trace = [TraceStep("uniform", "start", baseline, True, soup.names)]
    for _ in range(options.passes):
        for name in order:
            if name not in soup or len(soup) == 1:
                continue
            score = evaluator.accuracy(soup.mean_without(name), options.val_split, cache=False)
            accepted = options.improves(score, baseline)
            if accepted:
                soup.remove(name)
                baseline = score
            trace.append(TraceStep(name, "remove", score, accepted, soup.names))
    names = soup.names
    return finish("pruned", names, tuple(1.0 / len(names) for _ in names), trace, soup.mean(),
                  evaluator, options, ("order", "seed", "tie", "passes", "val_split"))
