"""Pruned soup — Algorithm 2 of the reproduction (Dansereau et al., §2.3).

Start from the uniform soup of every ingredient; for N passes, try removing each ingredient
in turn (in decreasing val accuracy, as the algorithm is written, or a seeded random order)
and keep the removal when val accuracy does not drop (``tie="ge"``; ``"gt"`` removes only on
a strict gain). By construction the result is never below the uniform soup on val.
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator
from soup_core.recipes.base import Brew, Ingredients, TraceStep, candidate_order, running_sum
from soup_core.recipes.parameters import Params, improves


def pruned_soup(ingredients: Ingredients, evaluator: Evaluator, base, params: Params) -> Brew:
    order = candidate_order(ingredients, evaluator, params)
    soup = running_sum(ingredients, evaluator, params)
    for name in ingredients:
        soup.add(name, ingredients[name])
    baseline = evaluator.accuracy(soup.mean(), params.val_split)
    trace = [TraceStep("uniform", "start", baseline, True, soup.names)]
    for _ in range(params.passes):
        before = soup.names
        for name in order:
            if name not in soup or len(soup) == 1:
                continue
            score = evaluator.accuracy(soup.mean_without(name), params.val_split, cache=False)
            accepted = improves(score, baseline, params.tie)
            if accepted:
                soup.remove(name)
                baseline = score
            trace.append(TraceStep(name, "remove", score, accepted, soup.names))
        if soup.names == before:  # a pass that changed nothing: the next would not either
            break
    return Brew(soup.names, soup.mean(), trace, extras={"sum_precision": soup.precision})
