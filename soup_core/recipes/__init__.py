"""The recipe registry: every way to make a soup — its id, pretty name, reference, parameters.

Each recipe's function lives in a module of its own (``greedy.py``, ``pruned.py``, ...); its
record lives here, the one place its id is spelled, with the parameters it declares (shared
definitions in :mod:`~soup_core.recipes.parameters`). The ``soup make`` flags and the app's
controls are derived from these records.

>>> from soup_core.recipes import RECIPES
>>> RECIPES["greedy"].pretty_name
'Greedy soup'
>>> [p.name for p in RECIPES["greedy"].parameters]
['order', 'tie_order', 'seed', 'tie', 'passes', 'max_ingredients', 'val_split', 'sum_precision', 'memory_budget']

Every recipe is made as ``RECIPES[name].make(ingredients, evaluator, base=θ0, **parameters)``
and returns a :class:`SoupResult`.
"""

from __future__ import annotations

from soup_core.errors import RecipeError
from soup_core.recipes.base import Brew, Ingredients, Merge, Recipe, SoupResult, TraceStep
from soup_core.recipes.parameters import (ALPHA, BATCH_SIZE, DENSITY, EPOCHS, GAMMA, INTERPOLATION, LEARNING_RATE,
                                          LINES_ALPHA, LINES_BETA, MAX_INGREDIENTS, MAX_ITER, MEMORY_BUDGET, NORMALIZE,
                                          NORMALIZE_ON, ORDER, PASSES, RESCALE_L1, SCALE, SEED, SUM_PRECISION, TIE,
                                          TIE_ORDER, TOLERANCE, VAL_SPLIT, WEIGHTS, Parameter, Params)

PAPER = "Wortsman et al. 2022"
CHOOSING = (ORDER, TIE_ORDER, SEED, TIE, PASSES)  # what greedy-style recipes share
SUMMING = (SUM_PRECISION, MEMORY_BUDGET)  # recipes that keep a running sum of the soup
LEARNING = (EPOCHS, LEARNING_RATE, BATCH_SIZE, SEED, VAL_SPLIT)
DARE = (WEIGHTS, DENSITY, SCALE, NORMALIZE, RESCALE_L1, SEED, VAL_SPLIT)
BREADCRUMBS = (WEIGHTS, DENSITY, GAMMA, SCALE, NORMALIZE, VAL_SPLIT)
# what the app's board, its landscape and the sample results make a task-vector merge with: the
# mean task vector (normalize) and λ chosen on val, as the papers choose it
ON_VAL_MEAN = (("normalize", True), ("lambda", "val"))


def _merge(name: str, pretty: str, reference: str, parameters: tuple[Parameter, ...], **kw) -> Recipe:
    """A weight-only task-vector recipe (:mod:`soup_core.recipes.task_vectors`): needs θ0, no evaluator."""
    function = name.replace("-", "_")
    return Recipe(name, pretty, reference, f"task_vectors:{function}", parameters, needs_evaluator=False,
                  needs_base=True, merge_path=f"task_vectors:{function}_merge", app_values=ON_VAL_MEAN, family="merge",
                  **kw)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("best", "Best individual model", f"{PAPER}, Table 3", "best_individual:best_individual", (VAL_SPLIT,)),
    Recipe("uniform", "Uniform soup", f"{PAPER}, §2 / Table 2", "uniform:uniform_soup", needs_evaluator=False,
           merge_path="uniform:uniform_merge"),
    Recipe("greedy", "Greedy soup", f"{PAPER}, Recipe 1", "greedy:greedy_soup",
           (*CHOOSING, MAX_INGREDIENTS, VAL_SPLIT, *SUMMING)),
    Recipe("pruned", "Pruned soup", "Dansereau et al., Algorithm 2", "pruned:pruned_soup",
           (*CHOOSING, VAL_SPLIT, *SUMMING)),
    Recipe("learned", "Learned soup", f"{PAPER}, Appendix I", "learned:learned_soup", LEARNING),
    Recipe("learned-by-layer", "Learned soup (by layer)", f"{PAPER}, Appendix I", "learned:learned_soup_by_layer",
           LEARNING),
    Recipe("ensemble", "Logit ensemble", f"{PAPER}, Table 3", "ensemble:logit_ensemble", is_soup=False),
    Recipe("greedy-ensemble", "Greedy ensemble", f"{PAPER}, Table 3", "greedy_ensemble:greedy_ensemble",
           (*CHOOSING, VAL_SPLIT), is_soup=False),
    Recipe("model-stock", "Model Stock", "Jang et al. 2024, Model Stock", "model_stock:model_stock",
           needs_evaluator=False, needs_base=True, min_ingredients=2, merge_path="model_stock:model_stock_merge",
           family="merge"),
    Recipe("weighted", "Weighted soup", "weights by hand, as mergekit's linear merge; learned: App. I",
           "weighted:weighted_soup", (WEIGHTS,), needs_evaluator=False, by_hand=True,
           merge_path="weighted:weighted_merge"),
    _merge("task-arithmetic", "Task arithmetic", "Ilharco et al. 2023, Editing Models with Task Arithmetic",
           (WEIGHTS, SCALE, NORMALIZE, VAL_SPLIT)),
    _merge("ties", "TIES merging", "Yadav et al. 2023, TIES-Merging",
           (WEIGHTS, DENSITY, SCALE, NORMALIZE_ON, VAL_SPLIT)),
    _merge("dare-linear", "DARE (linear)", "Yu et al. 2024, Language Models are Super Mario (DARE)", DARE),
    _merge("dare-ties", "DARE with TIES signs", "Yu et al. 2024 (DARE) with Yadav et al. 2023 (TIES)", DARE),
    _merge("breadcrumbs", "Model Breadcrumbs", "Davari & Belilovsky 2024, Model Breadcrumbs", BREADCRUMBS),
    _merge("breadcrumbs-ties", "Model Breadcrumbs with TIES signs",
           "Davari & Belilovsky 2024 with Yadav et al. 2023 (TIES)", BREADCRUMBS),
    Recipe("slerp", "SLERP of two models", "Shoemake 1985; mergekit's slerp", "slerp:slerp_soup", (INTERPOLATION,),
           needs_evaluator=False, min_ingredients=2, max_ingredients=2, merge_path="slerp:slerp_merge", board=False,
           family="merge"),
    Recipe("karcher", "Karcher mean", "Karcher 1977 (Riemannian centre of mass); mergekit's karcher",
           "karcher:karcher_soup", (MAX_ITER, TOLERANCE), needs_evaluator=False, merge_path="karcher:karcher_merge",
           family="merge"),
    Recipe("wise-ft", "WiSE-FT", "Wortsman et al. 2022b, Robust fine-tuning of zero-shot models",
           "wise_ft:wise_ft_soup", (ALPHA, VAL_SPLIT), needs_evaluator=False, needs_base=True,
           merge_path="wise_ft:wise_ft_merge", family="merge"),
    Recipe("lines", "LiNeS", "Wang et al. 2024, LiNeS: Post-training Layer Scaling", "lines:lines_soup",
           (WEIGHTS, LINES_ALPHA, LINES_BETA, VAL_SPLIT), needs_evaluator=False, needs_base=True,
           merge_path="lines:lines_merge", app_values=(("beta", "val"),), family="merge"),
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def all_parameters() -> dict[str, tuple[Parameter, tuple[str, ...]]]:
    """Every declared parameter once, with the recipes that take it (for CLI flags and app controls)."""
    out: dict[str, tuple[Parameter, tuple[str, ...]]] = {}
    for recipe in RECIPES.values():
        for p in recipe.parameters:
            out[p.name] = (p, (*out.get(p.name, (p, ()))[1], recipe.name))
    return out


__all__ = ["RECIPES", "Brew", "Ingredients", "Merge", "Parameter", "Params", "Recipe", "SoupResult", "TraceStep",
           "all_parameters", "get_recipe"]
