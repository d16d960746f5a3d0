"""Greedy ensemble — the paper's Table 3 baseline: Recipe 1 with logits averaged, not weights.

Candidates in decreasing val accuracy (or seeded random order); one joins when the logit
ensemble with it scores at least as well on val (same ``tie`` rule as the greedy soup).
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator, metrics_from_logits
from soup_core.recipes.base import (Ingredients, SoupOptions, SoupResult, TraceStep,
                                    candidate_order, require_evaluator, require_ingredients)
from soup_core.recipes.ensemble import ensemble_metrics


def greedy_ensemble(ingredients: Ingredients, evaluator: Evaluator | None, *, base=None,
                    options: SoupOptions = SoupOptions()) -> SoupResult:
    evaluator = require_evaluator(evaluator, "greedy ensemble")
    require_ingredients(ingredients, "greedy ensemble")
    split, labels = options.val_split, evaluator.labels(options.val_split)
    members: list[str] = []
    total, baseline, trace = None, 0.0, []
    order = candidate_order(ingredients, evaluator, options)
    for _ in range(options.passes):
        for name in order:
            if name in members:
                continue
            logits = evaluator.logits(ingredients[name], split).double()
            candidate = logits if total is None else total + logits
            score = metrics_from_logits(candidate / (len(members) + 1), labels).accuracy
            accepted = options.improves(score, baseline)
            if accepted:
                members.append(name)
                total, baseline = candidate, score
            trace.append(TraceStep(name, "add", score, accepted, tuple(members)))
    names = tuple(members)
    return SoupResult("greedy-ensemble", names, tuple(1.0 / len(names) for _ in names), tuple(trace),
                      ensemble_metrics(ingredients, evaluator, names), None,
                      {"order": options.order, "seed": options.seed, "tie": options.tie})
