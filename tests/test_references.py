"""Independent references for the core computations (issue 29): each checked against a hand-worked
example or a loop written out as the paper or the official code has it — never against the
code's own output. The last test plants the four one-line bugs that once passed every test and
asserts that each now fails one of these references."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from soup_core.evaluate import ensemble_logits, metrics_from_logits
from soup_core.landscape import path
from soup_core.recipes import RECIPES
from soup_core.recipes.base import candidate_order
from soup_core.recipes.parameters import Params
from soup_core.zoo import open_zoo


@pytest.fixture(scope="module")
def finetune():
    zoo = open_zoo("digits-finetune", device="cpu")
    return zoo, zoo.ingredients(), zoo.evaluator


# --- the error barrier ----------------------------------------------------------------------------------------

def check_barrier() -> None:
    # α = 0, ½, 1 with errors .1, .3, .2: the chord at ½ is .15, the barrier .3 − .15
    assert path.barrier(np.array([0.0, 0.5, 1.0]), np.array([0.1, 0.3, 0.2])) == pytest.approx(0.15)
    # α = ¼ tells the ends apart: the chord there is ¾·.1 + ¼·.2 = .125, so the barrier is .175
    assert path.barrier(np.array([0.0, 0.25, 1.0]), np.array([0.1, 0.3, 0.2])) == pytest.approx(0.175)
    # points outside [0, 1] (the CLI's default −0.5 … 1.5) do not count
    alphas, errors = np.array([-0.5, 0.0, 0.25, 1.0, 1.5]), np.array([0.9, 0.1, 0.3, 0.2, 0.9])
    assert path.barrier(alphas, errors) == pytest.approx(0.175)


def test_the_barrier_is_the_largest_rise_above_the_chord_between_the_ends():
    check_barrier()


# --- Model Stock --------------------------------------------------------------------------------------------------

def check_model_stock() -> None:
    # two fine-tunings 60° apart (cos ½) from θ0 = 0: t = 2·½ / (1 + ½) = ⅔, merged = ⅔·mean;
    # a second tensor whose two deltas point opposite ways (cos −1) keeps θ0
    s3 = math.sqrt(3)
    base = {"w": torch.zeros(2), "v": torch.full((2,), 5.0)}
    a = {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([6.0, 5.0])}
    b = {"w": torch.tensor([0.5, s3 / 2]), "v": torch.tensor([4.0, 5.0])}
    soup = RECIPES["model-stock"].make({"a": a, "b": b}, base=base)
    assert soup.state_dict["w"].tolist() == pytest.approx([0.5, s3 / 6], abs=1e-7)  # ⅔ · (¾, √3/4)
    assert soup.state_dict["v"].tolist() == [5.0, 5.0]
    assert soup.extras["ratios"]["w"] == pytest.approx(2 / 3, abs=1e-7) and soup.extras["ratios"]["v"] == 0.0


def test_model_stock_pulls_the_mean_back_towards_theta0_by_the_angle_per_tensor():
    check_model_stock()


# --- candidate orders ---------------------------------------------------------------------------------------------

def check_random_order() -> None:
    names = {f"m{i}": {} for i in range(12)}
    for seed in (0, 1, 7):
        expected = list(names)
        random.Random(seed).shuffle(expected)
        params = Params({"order": "random", "seed": seed, "tie_order": "manifest", "val_split": "val"})
        assert candidate_order(names, None, params) == expected
    orders = {tuple(candidate_order(names, None, Params({"order": "random", "seed": s, "tie_order": "manifest",
                                                           "val_split": "val"}))) for s in range(5)}
    assert len(orders) == 5  # different seeds, different orders


def test_the_random_order_is_random_shuffle_of_the_seed_and_seeds_differ():
    check_random_order()


# --- greedy with the official rule and order ----------------------------------------------------------------------

def official_greedy(ingredients, evaluator, split="val") -> list[str]:
    """github.com/mlfoundations/model-soups main.py: sort val accuracies ascending, reverse, and add
    a candidate when the soup's val accuracy is strictly better (``>``); soups averaged from scratch."""
    scores = {n: evaluator.accuracy(s, split) for n, s in ingredients.items()}
    order = [name for name, _ in sorted(scores.items(), key=lambda item: item[1])]
    order.reverse()
    kept, best = [order[0]], scores[order[0]]
    for name in order[1:]:
        trial = kept + [name]
        soup = {k: (sum(ingredients[n][k].double() for n in trial) / len(trial)).float() for k in ingredients[name]}
        score = evaluator.accuracy(soup, split, cache=False)
        if score > best:
            kept, best = trial, score
    return kept


def test_greedy_with_the_official_rule_and_order_keeps_what_the_official_code_keeps(finetune):
    _, ingredients, evaluator = finetune
    ours = RECIPES["greedy"].make(ingredients, evaluator, tie="gt", tie_order="official")
    assert list(ours.ingredients) == official_greedy(ingredients, evaluator)


# --- pruned soup and greedy ensemble, written out -----------------------------------------------------------------

def pruned_loop(ingredients, evaluator, passes: int, split="val") -> tuple[list[str], int]:
    """Dansereau et al., Algorithm 2: from the uniform soup of all, in decreasing val order, drop an
    ingredient when val accuracy does not drop; ``passes`` times. Returns the soup and the steps tried."""
    scores = {n: evaluator.accuracy(s, split) for n, s in ingredients.items()}
    order = sorted(ingredients, key=lambda n: -scores[n])
    keep = list(ingredients)

    def accuracy(names):
        soup = {k: (sum(ingredients[n][k].double() for n in names) / len(names)).float() for k in ingredients[names[0]]}
        return evaluator.accuracy(soup, split, cache=False)

    baseline, steps = accuracy(keep), 0
    for _ in range(passes):
        for name in order:
            if name not in keep or len(keep) == 1:
                continue
            trial = [n for n in keep if n != name]
            score, steps = accuracy(trial), steps + 1
            if score >= baseline:
                keep, baseline = trial, score
    return keep, steps


def check_pruned(ingredients, evaluator) -> None:
    for passes in (1, 2):
        ours = RECIPES["pruned"].make(ingredients, evaluator, passes=passes)
        kept, _ = pruned_loop(ingredients, evaluator, passes)
        assert sorted(ours.ingredients) == sorted(kept), passes


def pruning_subset(finetune) -> dict:
    """Ten ingredients on which a second pruning pass removes more than the first (so ``passes`` shows)."""
    zoo, ingredients, evaluator = finetune
    subset = {n: ingredients[n] for n in zoo.names[:10]}
    one, _ = pruned_loop(subset, evaluator, 1)
    two, _ = pruned_loop(subset, evaluator, 2)
    assert len(two) < len(one), "choose a subset where the second pass prunes more"
    return subset


def test_the_pruned_soup_is_algorithm_2_written_out(finetune):
    check_pruned(pruning_subset(finetune), finetune[2])


def test_the_greedy_ensemble_is_its_loop_written_out(finetune):
    _, ingredients, evaluator = finetune
    scores = {n: evaluator.accuracy(s, "val") for n, s in ingredients.items()}
    labels = evaluator.labels("val")
    logits = {n: evaluator.logits(s, "val") for n, s in ingredients.items()}
    members, best = [], 0.0
    for name in sorted(ingredients, key=lambda n: -scores[n]):
        trial = members + [name]
        score = metrics_from_logits(ensemble_logits([logits[n] for n in trial]), labels).accuracy
        if score >= best:
            members, best = trial, score
    assert list(RECIPES["greedy-ensemble"].make(ingredients, evaluator).ingredients) == members


# --- the four bugs that once passed every test --------------------------------------------------------------------

def test_each_of_the_four_planted_bugs_fails_a_reference(monkeypatch, finetune):
    from soup_core.merge import methods
    from soup_core.recipes import base as recipe_base
    from soup_core.recipes import pruned

    with monkeypatch.context() as m:  # the chord drawn from the wrong ends
        m.setattr(path, "chord", lambda alphas, values: alphas * values[..., :1] + (1 - alphas) * values[..., -1:])
        with pytest.raises(AssertionError):
            check_barrier()
    with monkeypatch.context() as m:  # Model Stock replaced by the uniform soup
        m.setattr(methods, "model_stock_ratio_from_gram", lambda gram: (1.0, 1.0))
        with pytest.raises(AssertionError):
            check_model_stock()
    with monkeypatch.context() as m:  # a "random" order that never shuffles, whatever the seed
        m.setattr(recipe_base.random, "Random", lambda seed: type("Unshuffled", (), {"shuffle": lambda self, x: None})())
        with pytest.raises(AssertionError):
            check_random_order()
    subset = pruning_subset(finetune)
    with monkeypatch.context() as m:  # the pruned soup ignoring passes
        original = pruned.pruned_soup
        m.setattr(pruned, "pruned_soup", lambda i, e, b, p: original(i, e, b, Params({**p, "passes": 1})))
        with pytest.raises(AssertionError):
            check_pruned(subset, finetune[2])


def test_a_running_sum_misused_says_so_as_a_recipe_error():
    from soup_core.errors import RecipeError
    from soup_core.params import RunningSum
    total = RunningSum()
    with pytest.raises(RecipeError, match="the soup is empty"):
        total.mean()
    total.add("a", {"w": torch.zeros(2)})
    with pytest.raises(RecipeError, match="already in the soup"):
        total.add("a", {"w": torch.zeros(2)})
    with pytest.raises(RecipeError, match="not in the soup"):
        total.remove("b")
