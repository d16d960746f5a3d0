"""What every recipe shares: options, the trace, the result, and ranking by val accuracy."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from soup_core.checkpoints import StateDict
from soup_core.evaluate import VAL, Evaluator, Metrics

Ingredients = Mapping[str, Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class SoupOptions:
    """Knobs of the recipes; each recipe reads the ones it documents and ignores the rest.

    ``tie`` decides what greedy and pruned soups do when a candidate leaves val accuracy
    exactly unchanged: ``"ge"`` accepts it, as the paper's Recipe 1 and the reproduction's
    Algorithm 2 are written (the default); ``"gt"`` rejects it, as the official greedy-soup
    code does. On small val sets ties are common, so the choice is visible.
    """

    order: Literal["sorted", "random"] = "sorted"
    seed: int = 0
    tie: Literal["ge", "gt"] = "ge"
    passes: int = 1
    max_ingredients: int | None = None
    val_split: str = VAL
    epochs: int = 3
    learning_rate: float = 0.1
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.order not in ("sorted", "random"):
            raise ValueError(f"order must be 'sorted' or 'random', not {self.order!r}")
        if self.tie not in ("ge", "gt"):
            raise ValueError(f"tie must be 'ge' (accept equal val accuracy) or 'gt', not {self.tie!r}")
        if self.passes < 1:
            raise ValueError(f"passes must be at least 1, not {self.passes}")
        if self.max_ingredients is not None and self.max_ingredients < 1:
            raise ValueError(f"max_ingredients must be at least 1, not {self.max_ingredients}")

    def improves(self, score: float, baseline: float) -> bool:
        return score >= baseline if self.tie == "ge" else score > baseline


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


def require_evaluator(evaluator: Evaluator | None, recipe: str) -> Evaluator:
    if evaluator is None:
        raise ValueError(f"the {recipe} recipe scores candidates on a held-out val split and needs "
                         "an evaluator; give the zoo one (uniform and Model Stock soups do not)")
    return evaluator


def require_ingredients(ingredients: Ingredients, recipe: str, minimum: int = 1) -> None:
    if len(ingredients) < minimum:
        raise ValueError(f"the {recipe} recipe needs at least {minimum} ingredient(s), got {len(ingredients)}")


def val_accuracies(ingredients: Ingredients, evaluator: Evaluator, split: str) -> dict[str, float]:
    return {name: evaluator.accuracy(state, split) for name, state in ingredients.items()}


def candidate_order(ingredients: Ingredients, evaluator: Evaluator, options: SoupOptions) -> list[str]:
    """Names sorted by decreasing val accuracy (stable: ties keep manifest order), or shuffled."""
    names = list(ingredients)
    if options.order == "random":
        random.Random(options.seed).shuffle(names)
        return names
    scores = val_accuracies(ingredients, evaluator, options.val_split)
    return sorted(names, key=lambda n: -scores[n])


def finish(recipe: str, ingredients: tuple[str, ...], weights: tuple[float, ...],
           trace: list[TraceStep], state: StateDict | None, evaluator: Evaluator | None,
           options: SoupOptions, option_names: tuple[str, ...] = (), **extras: Any) -> SoupResult:
    metrics = evaluator.evaluate(state) if (evaluator is not None and state is not None) else {}
    return SoupResult(recipe, ingredients, weights, tuple(trace), metrics, state,
                      {name: getattr(options, name) for name in option_names}, extras)
