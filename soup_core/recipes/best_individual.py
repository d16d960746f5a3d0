"""Best individual model: the baseline every soup is compared with (paper Table 3, row 1).

Chosen on the held-out val split only, never on test. On a small val split several models often
tie; the first in manifest order is taken, and the tie is said out loud: the result's extras name
every tied model with its accuracy on the first report split (test), so a reader sees how much
the choice among equals moves the baseline (:func:`tie_sentence`).
"""

from __future__ import annotations

from soup_core.evaluate import Evaluator
from soup_core.recipes.base import Brew, Ingredients, SoupResult, TraceStep, val_accuracies
from soup_core.recipes.parameters import Params


def best_individual(ingredients: Ingredients, evaluator: Evaluator, base, params: Params) -> Brew:
    scores = val_accuracies(ingredients, evaluator, params.val_split)
    best = max(scores, key=lambda name: scores[name])  # first on ties: manifest order
    trace = [TraceStep(name, "add", score, name == best, (best,) if name == best else ())
             for name, score in scores.items()]
    tied = [name for name, score in scores.items() if score == scores[best]]
    extras = {}
    report = [s for s in evaluator.split_names if s != params.val_split][:1]
    if len(tied) > 1:
        extras = {"tied_on_val": tied, "val_split": params.val_split, "val_accuracy": scores[best]}
        if report:
            extras["tied_report"] = {"split": report[0],
                                     "accuracy": {n: evaluator.accuracy(ingredients[n], report[0]) for n in tied}}
    return Brew((best,), {k: v.clone() for k, v in ingredients[best].items()}, trace, extras=extras)


def tie_sentence(result: SoupResult, *, report: bool = True) -> str | None:
    """``4 models tie on val at 96.7% (ft-17, ft-20, ft-22, ft-24); on test they score 96.3% to
    97.1%; the first in manifest order, ft-17, is the best individual.`` — or None without a tie.
    ``report=False`` leaves out how they score on the report split (a room that hides test)."""
    tied = result.extras.get("tied_on_val")
    if not tied:
        return None
    text = (f"{len(tied)} models tie on {result.extras['val_split']} at {result.extras['val_accuracy']:.1%} "
            f"({', '.join(tied)})")
    scored = result.extras.get("tied_report") if report else None
    if scored:
        accuracies = scored["accuracy"].values()
        text += f"; on {scored['split']} they score {min(accuracies):.1%} to {max(accuracies):.1%}"
    return text + f"; the first in manifest order, {result.ingredients[0]}, is the best individual."
