"""Ablations from the reproduction: greedy soups vs how many models were considered, pruned
soups vs passes — reported on every split, as mean ± std over seeds where order is random.

Only the ingredients and seeds vary; every recipe choice is still made on ``val``.

>>> from soup_core.zoo import open_zoo
>>> zoo = open_zoo("digits-finetune", device="cpu")
>>> rows = greedy_vs_models_considered(zoo.ingredients(), zoo.evaluator, counts=(1, 4), seeds=(0, 1))
>>> [(r["models_considered"], len(r["test"])) for r in rows]
[(1, 2), (4, 2)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soup_core.evaluate import Evaluator
from soup_core.recipes import Ingredients, get_recipe


def _accuracies(metrics, splits: Sequence[str]) -> dict[str, float]:
    return {s: metrics[s].accuracy for s in splits}


def greedy_vs_models_considered(ingredients: Ingredients, evaluator: Evaluator, *,
                                counts: Sequence[int] = (1, 2, 4, 8, 16, 32),
                                seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> list[dict]:
    """For each k: a greedy soup (Recipe 1) of the first k models of a seeded random order.

    Returns one row per k with the per-seed accuracies on every split (lists, one per seed).
    """
    names = list(ingredients)
    greedy = get_recipe("greedy")
    rows = []
    for k in [c for c in counts if c <= len(names)]:
        row: dict = {"models_considered": k, **{s: [] for s in evaluator.split_names}, "size": []}
        for seed in seeds:
            order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))[:k]
            subset = {names[i]: ingredients[names[i]] for i in order.tolist()}
            result = greedy.make(subset, evaluator)
            for s, acc in _accuracies(result.metrics, evaluator.split_names).items():
                row[s].append(acc)
            row["size"].append(len(result.ingredients))
        rows.append(row)
    return rows


def pruned_vs_passes(ingredients: Ingredients, evaluator: Evaluator, *,
                     passes: Sequence[int] = (1, 2, 3, 4)) -> list[dict]:
    """Pruned soups (reproduction, Algorithm 2) with more and more pruning passes."""
    pruned = get_recipe("pruned")
    rows = []
    for p in passes:
        result = pruned.make(ingredients, evaluator, passes=p)
        rows.append({"passes": p, "size": len(result.ingredients),
                     **_accuracies(result.metrics, evaluator.split_names)})
    return rows
