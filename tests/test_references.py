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

def uniform_accuracy(ingredients, names, evaluator, split) -> float:
    """Accuracy of the plain average of ``names``, summed in float64 from scratch (no running sum)."""
    soup = {k: (sum(ingredients[n][k].double() for n in names) / len(names)).float() for k in ingredients[names[0]]}
    return evaluator.accuracy(soup, split, cache=False)


def official_greedy(ingredients, evaluator, split="val") -> list[str]:
    """github.com/mlfoundations/model-soups main.py: sort val accuracies ascending, reverse, and add
    a candidate when the soup's val accuracy is strictly better (``>``); soups averaged from scratch."""
    scores = {n: evaluator.accuracy(s, split) for n, s in ingredients.items()}
    order = [name for name, _ in sorted(scores.items(), key=lambda item: item[1])]
    order.reverse()
    kept, best = [order[0]], scores[order[0]]
    for name in order[1:]:
        trial = kept + [name]
        score = uniform_accuracy(ingredients, trial, evaluator, split)
        if score > best:
            kept, best = trial, score
    return kept


def test_greedy_with_the_official_rule_and_order_keeps_what_the_official_code_keeps(finetune):
    _, ingredients, evaluator = finetune
    ours = RECIPES["greedy"].make(ingredients, evaluator, tie="gt", tie_order="official")
    assert list(ours.ingredients) == official_greedy(ingredients, evaluator)


# --- pruned soup and greedy ensemble, written out -----------------------------------------------------------------

def pruned_loop(ingredients, evaluator, passes: int, split="val") -> tuple[list[str], int, list[tuple]]:
    """Dansereau et al., Algorithm 2: from the uniform soup of all, in decreasing val order, drop an
    ingredient when val accuracy does not drop; ``passes`` times, stopping after a pass that drops
    nothing. Returns the soup, the steps tried, and the trace: (candidate, action, val accuracy,
    kept, the soup after), starting from the uniform soup."""
    scores = {n: evaluator.accuracy(s, split) for n, s in ingredients.items()}
    order = sorted(ingredients, key=lambda n: -scores[n])
    keep = list(ingredients)
    baseline, steps = uniform_accuracy(ingredients, keep, evaluator, split), 0
    trace = [("uniform", "start", baseline, True, tuple(keep))]
    for _ in range(passes):
        before = list(keep)
        for name in order:
            if name not in keep or len(keep) == 1:
                continue
            trial = [n for n in keep if n != name]
            score, steps = uniform_accuracy(ingredients, trial, evaluator, split), steps + 1
            accepted = score >= baseline
            if accepted:
                keep, baseline = trial, score
            trace.append((name, "remove", score, accepted, tuple(keep)))
        if keep == before:
            break
    return keep, steps, trace


def greedy_loop(ingredients, evaluator, passes: int, split="val") -> tuple[list[str], list[tuple]]:
    """The paper's Recipe 1 with the reproduction's passes: in decreasing val order, add a candidate
    when the soup with it is at least as good on val (the first always joins); offer the rejected
    ones again on the next pass, stopping after a pass that adds nothing. Returns the soup and the
    trace: (candidate, action, val accuracy, kept, the soup after)."""
    scores = {n: evaluator.accuracy(s, split) for n, s in ingredients.items()}
    order = sorted(ingredients, key=lambda n: -scores[n])
    kept, best, trace = [], 0.0, []
    for _ in range(passes):
        before = list(kept)
        for name in order:
            if name in kept:
                continue
            trial = kept + [name]
            score = uniform_accuracy(ingredients, trial, evaluator, split)
            accepted = score >= best
            if accepted:
                kept, best = trial, score
            trace.append((name, "add", score, accepted, tuple(kept)))
        if kept == before:
            break
    return kept, trace


def as_tuples(trace) -> list[tuple]:
    return [(s.candidate, s.action, s.score, s.accepted, tuple(s.ingredients)) for s in trace]


def check_pruned(ingredients, evaluator) -> None:
    for passes in (1, 2, 5):
        ours = RECIPES["pruned"].make(ingredients, evaluator, passes=passes)
        kept, _, trace = pruned_loop(ingredients, evaluator, passes)
        assert sorted(ours.ingredients) == sorted(kept), passes
        assert as_tuples(ours.trace) == trace, passes  # every step, its score and the soup after


def pruning_subset(finetune) -> dict:
    """Ten ingredients on which a second pruning pass removes more than the first (so ``passes`` shows)."""
    zoo, ingredients, evaluator = finetune
    subset = {n: ingredients[n] for n in zoo.names[:10]}
    one, _, _ = pruned_loop(subset, evaluator, 1)
    two, _, _ = pruned_loop(subset, evaluator, 2)
    assert len(two) < len(one), "choose a subset where the second pass prunes more"
    return subset


def test_the_pruned_soup_is_algorithm_2_written_out(finetune):
    check_pruned(pruning_subset(finetune), finetune[2])


def test_greedy_is_recipe_1_written_out_step_by_step_over_passes(finetune):
    zoo, ingredients, evaluator = finetune
    ingredients = {n: ingredients[n] for n in zoo.names[8:24]}  # ft-20 joins on the second pass only
    one, _ = greedy_loop(ingredients, evaluator, 1)
    three, _ = greedy_loop(ingredients, evaluator, 3)
    assert set(three) - set(one) == {"ft-20"}, "a second pass adds a candidate the first rejected, so passes shows"
    for passes in (1, 3, 5):  # five: the third pass adds nothing, and ends the recipe
        ours = RECIPES["greedy"].make(ingredients, evaluator, passes=passes)
        kept, trace = greedy_loop(ingredients, evaluator, passes)
        assert list(ours.ingredients) == kept and as_tuples(ours.trace) == trace, passes


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


# --- the learned soup, written out (paper App. I) -------------------------------------------------------------------

def learned_loop(ingredients, model, val, *, epochs, lr, batch_size, seed, by_layer):
    """Mixing logits z (one row per layer, or one row) from 0 and an output temperature β from 1,
    trained by AdamW at ``lr`` on the cross-entropy of β·f(x; Σ_i softmax(z)_i θ_i) over the val
    split, shuffled with seed + epoch. Returns softmax(z) (rows × ingredients) and β."""
    from torch.func import functional_call
    names = list(ingredients)
    keys = list(ingredients[names[0]])
    layers = sorted({k.rsplit(".", 1)[0] for k in keys}) if by_layer else ["all"]
    z = torch.zeros(len(layers), len(names), requires_grad=True)
    beta = torch.ones((), requires_grad=True)
    optimiser = torch.optim.AdamW([z, beta], lr=lr)
    x_all, y_all = val
    for epoch in range(epochs):
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(y_all), batch_size):
            idx = order[start:start + batch_size]
            alpha = z.softmax(dim=1)
            weights = {k: sum(alpha[layers.index(k.rsplit(".", 1)[0]) if by_layer else 0, i] * ingredients[n][k]
                              for i, n in enumerate(names)) for k in keys}
            loss = torch.nn.functional.cross_entropy(beta * functional_call(model, weights, (x_all[idx],)), y_all[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return z.detach().double().softmax(dim=1), float(beta.detach())


@pytest.mark.parametrize("name, by_layer", [("learned", False), ("learned-by-layer", True)])
def test_the_learned_soup_is_appendix_i_written_out(finetune, name, by_layer):
    zoo, ingredients, evaluator = finetune
    subset = {n: ingredients[n] for n in zoo.names[:4]}
    params = {"epochs": 2, "learning_rate": 0.1, "batch_size": 128, "seed": 3}
    ours = RECIPES[name].make(subset, evaluator, **params)
    val = (evaluator.splits["val"].inputs, evaluator.splits["val"].labels)
    alpha, beta = learned_loop(subset, evaluator.model_copy(), val, epochs=2, lr=0.1, batch_size=128, seed=3,
                               by_layer=by_layer)
    assert ours.extras["temperature"] == pytest.approx(beta, abs=1e-5) and beta != pytest.approx(1.0, abs=1e-3)
    assert list(ours.weights) == pytest.approx(alpha.mean(dim=0).tolist(), abs=1e-5)
    assert max(abs(w - 0.25) for w in ours.weights) > 1e-3  # it learned: not the uniform start
    if by_layer:
        layers = sorted({k.rsplit(".", 1)[0] for k in subset[zoo.names[0]]})
        assert list(ours.extras["layer_weights"]) == layers
        for i, layer in enumerate(layers):
            assert ours.extras["layer_weights"][layer] == pytest.approx(alpha[i].tolist(), abs=1e-5)
    mixed = {k: sum(alpha[sorted({j.rsplit(".", 1)[0] for j in subset["ft-00"]}).index(k.rsplit(".", 1)[0])
                          if by_layer else 0, i] * subset[n][k].double() for i, n in enumerate(subset)).float()
             for k in subset["ft-00"]}
    assert all(torch.allclose(ours.state_dict[k], mixed[k], atol=1e-5) for k in mixed)
    assert [(s.candidate, s.action, s.accepted, tuple(s.ingredients)) for s in ours.trace] == [
        (f"epoch {e}", "train", True, tuple(subset)) for e in (1, 2)]
    assert ours.trace[-1].score == evaluator.accuracy(ours.state_dict, "val")


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


def test_the_best_individual_written_out(tiny_evaluator, tiny_states):
    """The model with the highest val accuracy, the first of equals; its trace scores every model; a
    tie names the tied models with their accuracies on the first report split (test)."""
    scores = {name: tiny_evaluator.accuracy(state, "val") for name, state in tiny_states.items()}
    best = next(name for name in scores if scores[name] == max(scores.values()))
    result = RECIPES["best"].make(tiny_states, tiny_evaluator)
    assert result.ingredients == (best,) and result.extras == {}
    assert [step.to_dict() for step in result.trace] == [
        {"candidate": name, "action": "add", "score": score, "accepted": name == best,
         "ingredients": [best] if name == best else []} for name, score in scores.items()]
    assert all(torch.equal(result.state_dict[k], t) and result.state_dict[k] is not t
               for k, t in tiny_states[best].items())  # a copy: the soup is the user's to change
    twins = {"first": tiny_states[best], "other": tiny_states["m0" if best != "m0" else "m1"],
             "second": {k: t.clone() for k, t in tiny_states[best].items()}}
    tied = RECIPES["best"].make(twins, tiny_evaluator)
    test_accuracy = tiny_evaluator.accuracy(tiny_states[best], "test")
    assert tied.ingredients == ("first",) and tied.extras == {
        "tied_on_val": ["first", "second"], "val_split": "val", "val_accuracy": scores[best],
        "tied_report": {"split": "test", "accuracy": {"first": test_accuracy, "second": test_accuracy}}}


def test_a_soup_is_compared_with_the_best_individual_on_every_report_split(tiny_evaluator, tiny_states):
    from soup_core.significance import compare, versus, versus_best
    soup = RECIPES["uniform"].make(tiny_states, tiny_evaluator)
    best = RECIPES["best"].make(tiny_states, tiny_evaluator)
    comparisons = versus_best(soup, tiny_states, tiny_evaluator)
    assert [c.split for c in comparisons] == ["test", "shift"]  # every split but val, where the best was chosen
    for c in comparisons:
        expected = compare(f"best individual ({best.ingredients[0]})", tiny_evaluator.logits(best.state_dict, c.split),
                           "Uniform soup", tiny_evaluator.logits(soup.state_dict, c.split),
                           tiny_evaluator.labels(c.split), c.split, "samples")  # a tensor evaluator's unit
        assert c == expected
    assert [c.split for c in versus_best(soup, tiny_states, tiny_evaluator, ["shift"])] == ["shift"]
    assert versus_best(best, tiny_states, tiny_evaluator) == [] and versus_best(soup, tiny_states, None) == []
    ensemble = RECIPES["ensemble"].make(tiny_states, tiny_evaluator)  # no weights: its averaged logits
    averaged = ensemble_logits([tiny_evaluator.logits(s, "test") for s in tiny_states.values()])
    labels = tiny_evaluator.labels("test")
    assert versus(soup, ensemble, tiny_states, tiny_evaluator, ["test"]) == [
        compare("Uniform soup", tiny_evaluator.logits(soup.state_dict, "test"), "Logit ensemble", averaged, labels, "test",
                "samples")]


def test_the_greedy_ensemble_is_recipe_1_on_logits_written_out(finetune):
    """Table 3's greedy ensemble: Recipe 1 with the members' logits averaged instead of their weights;
    its trace step by step, over passes, stopping after a pass that adds nothing."""
    zoo, ingredients, evaluator = finetune
    ingredients = {n: ingredients[n] for n in zoo.names[:12]}
    labels = evaluator.labels("val")
    logits = {n: evaluator.logits(s, "val").double() for n, s in ingredients.items()}
    scores = {n: evaluator.accuracy(s, "val") for n, s in ingredients.items()}
    order = sorted(ingredients, key=lambda n: -scores[n])
    members, best, trace, passes_run = [], 0.0, [], 0
    for _ in range(4):
        passes_run, before = passes_run + 1, list(members)
        for name in order:
            if name in members:
                continue
            mean = torch.stack([logits[n] for n in members + [name]]).mean(dim=0)
            score = metrics_from_logits(mean, labels).accuracy
            if score >= best:
                members, best = members + [name], score
            trace.append((name, "add", score, score >= best and members[-1] == name, tuple(members)))
        if members == before:
            break
    assert passes_run < 4, "the loop ends on a pass that adds nothing, before the passes run out"
    ours = RECIPES["greedy-ensemble"].make(ingredients, evaluator, passes=4)
    assert list(ours.ingredients) == members and ours.state_dict is None
    assert [(n, a, pytest.approx(s, abs=1e-12), k, m) for n, a, s, k, m in as_tuples(ours.trace)] == trace


def test_the_barrier_interval_is_the_bootstrap_written_out(tiny_evaluator, tiny_states):
    """Error at 11 evenly spaced α from the models' own predictions; 2000 resamples of the images
    (seed 0, drawn as multinomial counts: each image's number of copies); in each, the error at every
    α, its largest rise above the chord between the ends; the 2.5% and 97.5% quantiles of those."""
    a, b = tiny_states["m1"], tiny_states["m3"]
    labels = tiny_evaluator.labels("test")
    alphas = [i / 10 for i in range(11)]
    correct = np.stack([(tiny_evaluator.logits({k: (1 - t) * a[k] + t * b[k] for k in a}, "test").argmax(dim=1)
                         == labels).double().numpy() for t in alphas])
    n = correct.shape[1]
    copies = np.random.default_rng(0).multinomial(n, [1 / n] * n, size=2000)
    rises = []
    for weights in copies:
        error = [1 - float(weights @ row) / n for row in correct]
        rises.append(max(e - ((1 - t) * error[0] + t * error[-1]) for t, e in zip(alphas, error)))
    line = path.barrier_interval(tiny_evaluator, a, b, "test")
    assert line.alphas.tolist() == pytest.approx(alphas, abs=1e-15)
    assert line.error.tolist() == pytest.approx([1 - row.mean() for row in correct], abs=1e-12)
    assert (line.low, line.high) == pytest.approx(tuple(np.quantile(rises, [0.025, 0.975])), abs=1e-12)
    assert line.low < line.high
