"""A parameter chosen on val: one soup per value of its declared grid, the best val accuracy kept.

Task arithmetic's λ (Ilharco et al. 2023), TIES' λ (Yadav et al. 2023), WiSE-FT's α and LiNeS'
β are chosen on held-out validation data in their papers. Here any
parameter that declares a ``val_grid`` takes the value ``val``:

    soup make ZOO ties --lambda val

makes the soup at every value of the grid, scores each on the val split (``val_split``; never
test) and keeps the value with the highest accuracy. Small val sets tie often; a tie goes to the
value nearest the parameter's default (the method's own choice: λ = 1, density 0.5), then to the
smaller one. The result's options hold the value chosen, so its export,
model card and mergekit YAML remake exactly that soup; ``extras["chosen_on_val"]`` keeps the
whole curve. One parameter at a time: a grid of grids would be chosen on val many times over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from soup_core.errors import RecipeError
from soup_core.recipes.parameters import ON_VAL, Parameter, Params

SCALE_NAME = "lambda"  # the task-vector methods' last step: θ0 + λ · merged update (one update for every λ)

if TYPE_CHECKING:
    from soup_core.evaluate import Evaluator


class Made(Protocol):  # what a recipe function makes (a Brew): its soup's state dict is scored
    state_dict: Any


Brew = TypeVar("Brew", bound=Made)


def parameter_on_val(parameters: tuple[Parameter, ...], params: Params, pretty_name: str) -> Parameter | None:
    """The one declared parameter whose value is ``val``, or None; two of them is an error."""
    asked = [p for p in parameters if p.val_grid is not None and params[p.name] == ON_VAL]
    if len(asked) > 1:
        raise RecipeError(f"the {pretty_name} chooses one parameter on val at a time, not "
                          f"{' and '.join(p.name for p in asked)}; give the others a number")
    return asked[0] if asked else None


def choose_on_val(parameter: Parameter, params: Params, make: Callable[[Params], Brew], evaluator: Evaluator | None,
                  pretty_name: str) -> tuple[Brew, Params, Mapping[str, Any]]:
    """``(brew, params with the value chosen, the curve)`` for ``parameter`` = val: ``make`` is
    run once per grid value and its soup scored on ``params.val_split`` (or ``val``)."""
    if evaluator is None:
        raise RecipeError(f"{parameter.name}=val chooses the {pretty_name}'s {parameter.name} by val accuracy and "
                          f"needs the zoo's evaluator; give {parameter.name} a number, or a zoo with data")
    from soup_core.merge.task_vectors import one_update_for_every_scale  # torch: not when the CLI parses flags
    split = params.get("val_split", "val")  # the built-in recipes declare it; a user's Recipe may not
    with one_update_for_every_scale() if parameter.name == SCALE_NAME else contextlib.nullcontext():
        return _choose(parameter, params, make, evaluator, split)


def _choose(parameter: Parameter, params: Params, make: Callable[[Params], Brew], evaluator: Evaluator,
            split: str) -> tuple[Brew, Params, Mapping[str, Any]]:
    best: tuple[float, float, float, Brew] | None = None
    scores = []
    for value in parameter.val_grid or ():
        brew = make(Params({**params, parameter.name: value}))
        score = evaluator.accuracy(brew.state_dict, split, cache=False)  # one-off candidates: not kept
        scores.append(score)
        distance = abs(value - parameter.default)
        if best is None or score > best[0] or (score == best[0] and distance < best[1]):
            best = (score, distance, value, brew)
    assert best is not None  # every declared grid has values
    _, _, chosen, brew = best
    curve = {"parameter": parameter.name, "split": split, "grid": list(parameter.val_grid or ()),
             "val_accuracy": scores, "chosen": chosen}
    return brew, Params({**params, parameter.name: chosen}), curve
