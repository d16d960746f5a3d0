"""Greedy soup — paper Recipe 1 (§2), with the reproduction's extras (several passes, a cap).

Candidates are tried in decreasing order of val accuracy (``order="sorted"``, so the soup is
never worse on val than the best individual model) or in a seeded random order. A candidate
joins when the soup with it scores at least as well on val as the soup without it
(``tie="ge"``, as the paper writes it; ``"gt"`` as the official code does). The first
candidate is always accepted (baseline 0). With ``passes > 1`` the rejected candidates are
offered again; ``max_ingredients`` stops the soup growing past a size.

Each candidate costs one O(P) running-sum update and one evaluation; nothing is reloaded, and
the sum stays on the evaluator's device (a GPU's), so each step moves at most the one candidate
there (:class:`soup_core.params.RunningSum`). The sum is float64 where it fits, float32 where
not (``sum_precision``, ``memory_budget``: :mod:`soup_core.memory`); the result records which.
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator
from soup_core.recipes.base import Brew, Ingredients, TraceStep, candidate_order, running_sum
from soup_core.recipes.parameters import Params, improves


def greedy_soup(ingredients: Ingredients, evaluator: Evaluator, base, params: Params) -> Brew:
    order = candidate_order(ingredients, evaluator, params)
    soup, baseline, trace = running_sum(ingredients, evaluator, params), 0.0, []
    for _ in range(params.passes):
        before = soup.names
        for name in order:
            if name in soup:
                continue
            if params.max_ingredients is not None and len(soup) >= params.max_ingredients:
                break
            score = evaluator.accuracy(soup.mean_with(name, ingredients[name]), params.val_split,
                                       cache=len(soup) == 0)
            accepted = improves(score, baseline, params.tie)
            if accepted:
                soup.add(name, ingredients[name])
                baseline = score
            trace.append(TraceStep(name, "add", score, accepted, soup.names))
        if soup.names == before:  # a pass that changed nothing: the next would not either
            break
    return Brew(soup.names, soup.mean(), trace, extras={"sum_precision": soup.precision})
