"""What every recipe shares: the :class:`Recipe` record, its result, the trace, val ranking.

A recipe is a function ``(ingredients, evaluator, base, params) -> Brew`` in a module of its
own, plus a :class:`Recipe` record in the registry that names it once, declares its parameters
and points at the function (imported on first use, so that reading the registry — for
``soup --help``, say — does not import torch). ``Recipe.make`` is the one entry point: it
checks the parameters, the evaluator, θ0 and the number of ingredients (so the functions need
not), runs the function, and finishes its :class:`Brew` into a :class:`SoupResult` (uniform
weights unless the recipe chose others; metrics on every split).
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from soup_core.errors import RecipeError
from soup_core.recipes.parameters import Parameter, Params, not_held_out
from soup_core.recipes.tuning import choose_on_val, parameter_on_val

if TYPE_CHECKING:  # the registry is read without importing torch
    import torch

    from soup_core.evaluate import Evaluator, Metrics
    from soup_core.merge import TensorMethod
    from soup_core.params import RunningSum
    from soup_core.state import StateDict

Ingredients = Mapping[str, Mapping[str, "torch.Tensor"]]


@dataclass(frozen=True)
class TraceStep:
    """One step of a recipe: the candidate tried, its val score, and whether it was kept."""

    candidate: str
    action: Literal["start", "add", "remove", "train"]
    score: float
    accepted: bool
    ingredients: tuple[str, ...]  # the soup after this step

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "action": self.action, "score": self.score,
                "accepted": self.accepted, "ingredients": list(self.ingredients)}


@dataclass(frozen=True)
class Brew:
    """What a recipe function returns; :meth:`Recipe.make` turns it into a :class:`SoupResult`.

    ``weights`` default to uniform; ``metrics`` default to the evaluator's on ``state_dict``
    (ensembles, which have no state dict, give their own)."""

    ingredients: tuple[str, ...]
    state_dict: StateDict | None
    trace: tuple[TraceStep, ...] | list[TraceStep] = ()
    weights: tuple[float, ...] | None = None
    metrics: Mapping[str, Metrics] | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Merge:
    """A weight-only recipe's plan for given ingredients and parameters: which ingredients, their
    weights, the per-tensor method (:mod:`soup_core.merge.methods`) and the ingredient whose
    integer tensors are copied. The same plan is run in memory (:func:`brew_merge`) or streamed
    to disk tensor by tensor (:func:`soup_core.export.write_streamed`)."""

    ingredients: tuple[str, ...]
    weights: tuple[float, ...]
    method: TensorMethod
    reference: str
    summary_name: str | None = None  # the extras key of the method's per-tensor summaries


def brew_merge(merge: Merge, ingredients: Ingredients, base: Mapping[str, torch.Tensor] | None,
               evaluator: Evaluator | None) -> Brew:
    """Run a weight-only recipe's :class:`Merge` in memory, on the evaluator's device (where the
    soup is scored next), else where the ingredients are."""
    from soup_core.merge import MappingSource, merge_in_memory
    sources = [MappingSource(ingredients[n], name=n) for n in merge.ingredients]
    base_source = MappingSource(base, name="base") if merge.method.needs_base else None
    summaries: dict[str, Any] = {}
    device = evaluator.device if evaluator is not None else _device_of(ingredients[merge.reference])
    state = merge_in_memory(merge.method, sources, base_source, reference=merge.ingredients.index(merge.reference),
                            device=device, summaries=summaries)
    extras = {merge.summary_name: summaries} if merge.summary_name else {}
    return Brew(merge.ingredients, state, weights=merge.weights, extras=extras)


@dataclass(frozen=True)
class SoupResult:
    """A finished soup. ``state_dict`` is None for ensembles, which are not one set of weights."""

    recipe: str
    ingredients: tuple[str, ...]
    weights: tuple[float, ...]
    trace: tuple[TraceStep, ...]
    metrics: Mapping[str, Metrics]
    state_dict: StateDict | None
    options: Mapping[str, Any] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A way to make a soup: its id (the one place it is spelled), pretty name, paper reference,
    declared parameters and requirements."""

    name: str
    pretty_name: str
    reference: str
    function_path: str  # "module:function" under soup_core.recipes
    parameters: tuple[Parameter, ...] = ()
    needs_evaluator: bool = True
    needs_base: bool = False
    is_soup: bool = True  # False for ensembles: no single set of weights to export
    min_ingredients: int = 1
    max_ingredients: int | None = None  # SLERP: exactly two
    board: bool = True  # on the app's Recipes board, its Landscape and warm-up (SLERP, of two models only: not)
    by_hand: bool = False  # its result is what the user set, not a method: boards and warm-ups skip it
    merge_path: str | None = None  # weight-only recipes: "module:function" (names, params) -> Merge
    app_values: tuple[tuple[str, Any], ...] = ()  # what the board, the Landscape and the sample results set
    family: Literal["soup", "merge"] = "soup"  # the soups paper's recipes, or the field's merge methods

    def plan_merge(self, names: tuple[str, ...], values: Mapping[str, Any]) -> Merge | None:
        """The per-tensor plan of a weight-only recipe (None for recipes that score candidates)."""
        if self.merge_path is None:
            return None
        self.check_count(len(names))
        params = self.resolve(values)
        asked = parameter_on_val(self.parameters, params, self.pretty_name)
        if asked is not None:
            raise RecipeError(f"{asked.name}=val is chosen by scoring soups on the val split: make the soup with the "
                              f"zoo's evaluator (its result records the {asked.name} chosen), or give a number")
        module, _, name = self.merge_path.partition(":")
        return getattr(importlib.import_module(f"soup_core.recipes.{module}"), name)(names, params)

    @property
    def function(self) -> Callable[..., Brew]:
        """The recipe's function ``(ingredients, evaluator, base, params) -> Brew``."""
        module, _, name = self.function_path.partition(":")
        return getattr(importlib.import_module(f"soup_core.recipes.{module}"), name)

    def takes(self, count: int) -> bool:
        """Whether this recipe can be made from ``count`` ingredients."""
        return self.min_ingredients <= count and (self.max_ingredients is None or count <= self.max_ingredients)

    def check_count(self, count: int) -> None:
        if not self.takes(count):
            exactly = self.max_ingredients == self.min_ingredients
            need = (f"exactly {self.min_ingredients}" if exactly else f"at least {self.min_ingredients}"
                    if self.max_ingredients is None else f"{self.min_ingredients} to {self.max_ingredients}")
            raise RecipeError(f"the {self.pretty_name} needs {need} ingredient(s), got {count}"
                              + ("; choose them with --ingredients" if count > (self.max_ingredients or count) else ""))

    def parameter(self, name: str) -> Parameter:
        return next(p for p in self.parameters if p.name == name)

    def resolve(self, values: Mapping[str, Any]) -> Params:
        """Every declared parameter, from ``values`` or its default; anything else is an error."""
        declared = {p.name: p for p in self.parameters}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise RecipeError(f"the {self.pretty_name} takes no {', '.join(unknown)}; it takes "
                              f"{', '.join(declared) or 'no parameters'}")
        return Params({name: p.check(values.get(name, p.default)) for name, p in declared.items()})

    def make(self, ingredients: Ingredients, evaluator: Evaluator | None = None, *,
             base: Mapping[str, torch.Tensor] | None = None, **values: Any) -> SoupResult:
        """Run the recipe on ``ingredients`` (name -> state dict) with parameters ``values``.

        >>> import torch
        >>> from soup_core.recipes import RECIPES
        >>> soup = RECIPES["uniform"].make({"a": {"w": torch.zeros(2)}, "b": {"w": torch.ones(2)}})
        >>> soup.state_dict["w"].tolist(), soup.weights
        ([0.5, 0.5], (0.5, 0.5))
        """
        params = self.resolve(values)
        if self.needs_evaluator and evaluator is None:
            raise RecipeError(f"the {self.pretty_name} scores candidates on a held-out val split and needs an "
                              "evaluator; give the zoo one (uniform and Model Stock soups do not)")
        if self.needs_base and base is None:
            raise RecipeError(f"the {self.pretty_name} needs a base checkpoint θ0 (`base = ...` in zoo.toml)")
        self.check_count(len(ingredients))
        chooses_on = params.get("val_split")
        if evaluator is not None and chooses_on in evaluator.shift_names:
            raise not_held_out(chooses_on, " (it is a distribution shift)")
        asked = parameter_on_val(self.parameters, params, self.pretty_name)
        if asked is None:
            brew = self.function(ingredients, evaluator, base, params)
        else:  # one soup per value of its grid, the best on val kept (soup_core.recipes.tuning)
            brew, params, curve = choose_on_val(asked, params, lambda p: self.function(ingredients, evaluator, base, p),
                                                evaluator, self.pretty_name)
            brew = replace(brew, extras={**brew.extras, "chosen_on_val": curve})
        names = brew.ingredients
        weights = brew.weights if brew.weights is not None else tuple(1.0 / len(names) for _ in names)
        metrics = brew.metrics
        if metrics is None:
            metrics = evaluator.evaluate(brew.state_dict) if evaluator is not None else {}
        state = brew.state_dict
        if state is not None:  # summed and scored on the evaluator's device; returned beside the ingredients
            from soup_core.state import to_device
            state = to_device(state, _device_of(next(iter(ingredients.values()))))
        return SoupResult(self.name, names, weights, tuple(brew.trace), metrics, state,
                          dict(params), dict(brew.extras))


def _device_of(state: Mapping[str, torch.Tensor]):
    return next((t.device for t in state.values()), "cpu")


def val_accuracies(ingredients: Ingredients, evaluator: Evaluator, split: str) -> dict[str, float]:
    return {name: evaluator.accuracy(state, split) for name, state in ingredients.items()}


def running_sum(ingredients: Ingredients, evaluator: Evaluator, params: Params) -> RunningSum:
    """An empty running sum on the evaluator's device, in the precision the parameters ask for
    (``auto``: float64 where it fits in the memory budget; :mod:`soup_core.memory`)."""
    from soup_core.memory import choose_precision
    from soup_core.params import RunningSum
    from soup_core.state import is_float, tied_aliases
    first = next(iter(ingredients.values()))
    aliases = tied_aliases(first)
    keys = [k for k, t in first.items() if is_float(t) and k not in aliases]
    precision = choose_precision(params.sum_precision, first, keys, evaluator.device, params.memory_budget)
    return RunningSum(evaluator.device, precision)


def candidate_order(ingredients: Ingredients, evaluator: Evaluator, params: Params) -> list[str]:
    """Names by decreasing val accuracy, or shuffled with the seed.

    Ties keep manifest order (``tie_order="manifest"``) or come in the order the official
    greedy-soup code gives them (``"official"``: a stable ascending sort, then reversed, so
    later entries come first); on small val sets ties are common and the choice shows.
    """
    names = list(ingredients)
    if params.order == "random":
        random.Random(params.seed).shuffle(names)
        return names
    scores = val_accuracies(ingredients, evaluator, params.val_split)
    if params.tie_order == "official":
        return sorted(names, key=lambda n: scores[n])[::-1]
    return sorted(names, key=lambda n: -scores[n])
