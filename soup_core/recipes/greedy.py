"""Greedy soup — paper Recipe 1 (§2), with the reproduction's extras (several passes, a cap).

Candidates are tried in decreasing order of val accuracy (``order="sorted"``, so the soup is
never worse on val than the best individual model) or in a seeded random order. A candidate
joins when the soup with it scores at least as well on val as the soup without it
(``tie="ge"``, as the paper writes it; ``"gt"`` as the official code does). The first
candidate is always accepted (baseline 0). With ``passes > 1`` the rejected candidates are
offered again; ``max_ingredients`` stops the soup growing past a size.

Each candidate costs one O(P) running-sum update and one evaluation; nothing is reloaded.
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator
from soup_core.params import RunningSum
from soup_core.recipes.base import (Ingredients, SoupOptions, SoupResult, TraceStep,
                                    candidate_order, finish, require_evaluator, require_ingredients)


def greedy_soup(ingredients: Ingredients, evaluator: Evaluator | None, *, base=None,
                options: SoupOptions = SoupOptions()) -> SoupResult:
    evaluator = require_evaluator(evaluator, "greedy")
    require_ingredients(ingredients, "greedy")
    order = candidate_order(ingredients, evaluator, options)
    soup, baseline, trace = RunningSum(), 0.0, []
    for _ in range(options.passes):
        for name in order:
            if name in soup:
                continue
            if options.max_ingredients is not None and len(soup) >= options.max_ingredients:
                break
            score = evaluator.accuracy(soup.mean_with(name, ingredients[name]), options.val_split,
                                       cache=len(soup) == 0)
            accepted = options.improves(score, baseline)
            if accepted:
                soup.add(name, ingredients[name])
                baseline = score
            trace.append(TraceStep(name, "add", score, accepted, soup.names))
    names = soup.names
    return finish("greedy", names, tuple(1.0 / len(names) for _ in names), trace, soup.mean(),
                  evaluator, options, ("order", "seed", "tie", "passes", "max_ingredients", "val_split"))
