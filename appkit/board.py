"""What the Recipes board, the Landscape and the warm-up show: which recipes, and how a recipe's
settings chosen on val read."""

from __future__ import annotations

from soup_core.recipes import RECIPES, Recipe, SoupResult
from soup_core.zoo import Zoo

SYMBOLS = {"lambda": "λ", "alpha": "α", "beta": "β", "density": "density"}


def board_recipes(zoo: Zoo) -> list[Recipe]:
    """Every recipe this zoo can make from all its checkpoints and that is a method, not a choice
    by hand (the weighted soup) nor a pair's (SLERP): those that need θ0 only where it has one."""
    return [r for r in RECIPES.values() if r.board and not r.by_hand and (zoo.has_base or not r.needs_base)
            and r.takes(len(zoo.names)) and (zoo.evaluator is not None or not r.needs_evaluator)]


def chosen_on_val(result: SoupResult) -> str:
    """``λ = 0.3`` for a soup whose parameter was chosen on val, else ``—``."""
    curve = result.extras.get("chosen_on_val")
    if not curve:
        return "—"
    return f"{SYMBOLS.get(curve['parameter'], curve['parameter'])} = {curve['chosen']:g}"
