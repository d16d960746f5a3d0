"""Task-vector merges as recipes: task arithmetic, TIES, DARE and Model Breadcrumbs.

Each recipe is mergekit's method of the same name (``ties``, ``dare_ties``, ...) with the same
parameters: per-ingredient ``weights``, ``density``, ``gamma``, ``lambda``, ``normalize``, and
DARE's ``rescale`` and ``seed``. They need θ0 (the zoo's ``base``) and no evaluator: the merge is
weight-only and streams tensor by tensor (:mod:`soup_core.merge.task_vectors` has the maths).

* task arithmetic (Ilharco et al. 2023): θ0 + λ Σ w_i δ_i;
* TIES (Yadav et al. 2023): trim each δ_i to its largest ``density`` share, elect signs, disjoint mean;
* DARE (Yu et al. 2024): drop entries at random, keep ``density``, rescale; linear or with TIES' signs;
* Model Breadcrumbs (Davari & Belilovsky 2024): drop the ``gamma`` largest and the smallest entries.

>>> import torch
>>> from soup_core.recipes import RECIPES
>>> base = {"w": torch.zeros(2)}
>>> soup = RECIPES["task-arithmetic"].make({"a": {"w": torch.tensor([1.0, 0.0])}, "b": {"w": torch.tensor([0.0, 2.0])}},
...                                        base=base, weights="a=0.5,b=0.5")
>>> soup.state_dict["w"].tolist()
[0.5, 1.0]
"""

from __future__ import annotations

from soup_core.recipes.base import Brew, Ingredients, Merge, brew_merge
from soup_core.recipes.parameters import Params

# recipe -> (sparsification, sign consensus); mergekit's names are in soup_core.mergekit_config
FAMILY = {
    "task-arithmetic": (None, False),
    "ties": ("magnitude", True),
    "dare-linear": ("random", False),
    "dare-ties": ("random", True),
    "breadcrumbs": ("magnitude_outliers", False),
    "breadcrumbs-ties": ("magnitude_outliers", True),
}


def task_vector_merge(recipe: str, names: tuple[str, ...], params: Params) -> Merge:
    from soup_core.merge.task_vectors import task_vector_method
    sparsify, consensus = FAMILY[recipe]
    kept = params.weights.for_names(names)
    weights = tuple(kept.values())
    declared = {k: params[k] for k in ("density", "gamma", "rescale", "seed") if k in params}  # the rest: unused
    method = task_vector_method(recipe, weights, sparsify=sparsify, consensus=consensus, normalize=params["normalize"],
                                scale=params["lambda"], **declared)
    reference = max(kept, key=lambda n: kept[n])  # integer tensors from the heaviest (the first of equals)
    return Merge(tuple(kept), weights, method, reference)


def _recipe(name: str):
    def merge(names: tuple[str, ...], params: Params) -> Merge:
        return task_vector_merge(name, names, params)

    def soup(ingredients: Ingredients, evaluator, base, params: Params) -> Brew:
        return brew_merge(merge(tuple(ingredients), params), ingredients, base, evaluator)
    return merge, soup


task_arithmetic_merge, task_arithmetic = _recipe("task-arithmetic")
ties_merge, ties = _recipe("ties")
dare_linear_merge, dare_linear = _recipe("dare-linear")
dare_ties_merge, dare_ties = _recipe("dare-ties")
breadcrumbs_merge, breadcrumbs = _recipe("breadcrumbs")
breadcrumbs_ties_merge, breadcrumbs_ties = _recipe("breadcrumbs-ties")
