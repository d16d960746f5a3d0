"""Greedy ensemble — the paper's Table 3 baseline: Recipe 1 with logits averaged, not weights.

Candidates in decreasing val accuracy (or seeded random order); one joins when the logit
ensemble with it scores at least as well on val (same ``tie`` rule as the greedy soup).
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator, metrics_from_logits
from soup_core.recipes.base import Brew, Ingredients, TraceStep, candidate_order
from soup_core.recipes.ensemble import ensemble_metrics
from soup_core.recipes.parameters import Params, improves


def greedy_ensemble(ingredients: Ingredients, evaluator: Evaluator, base, params: Params) -> Brew:
    split, labels = params.val_split, evaluator.labels(params.val_split)
    members: list[str] = []
    total, baseline, trace = None, 0.0, []
    order = candidate_order(ingredients, evaluator, params)
    for _ in range(params.passes):
        before = tuple(members)
        for name in order:
            if name in members:
                continue
            logits = evaluator.logits(ingredients[name], split).double()
            candidate = logits if total is None else total + logits
            score = metrics_from_logits(candidate / (len(members) + 1), labels).accuracy
            accepted = improves(score, baseline, params.tie)
            if accepted:
                members.append(name)
                total, baseline = candidate, score
            trace.append(TraceStep(name, "add", score, accepted, tuple(members)))
        if tuple(members) == before:  # a pass that changed nothing: the next would not either
            break
    names = tuple(members)
    return Brew(names, None, trace, metrics=ensemble_metrics(ingredients, evaluator, names))
