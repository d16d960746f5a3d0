"""Recipes, specified on tiny models and on the committed sample zoo."""

import pytest
import torch

from soup_core.evaluate import ensemble_logits, metrics_from_logits
from soup_core.params import RunningSum, uniform_average
from soup_core.recipes import RECIPES, Recipe
from soup_core.recipes.best_individual import tie_sentence
from soup_core.recipes.model_stock import model_stock_ratio
from soup_core.zoo import open_zoo


@pytest.fixture(scope="module")
def finetune():
    zoo = open_zoo("digits-finetune", device="cpu")
    return zoo, zoo.ingredients(), zoo.evaluator


def replay(trace):
    """Rebuild the final ingredient set from the trace alone."""
    members = []
    for step in trace:
        if step.action == "start":
            members = list(step.ingredients)
        elif step.accepted and step.action == "add":
            members.append(step.candidate)
        elif step.accepted and step.action == "remove":
            members.remove(step.candidate)
    return members


@pytest.mark.parametrize("order,passes", [("sorted", 1), ("random", 1), ("random", 2)])
def test_the_greedy_trace_reproduces_its_final_ingredient_set(finetune, order, passes):
    zoo, ingredients, evaluator = finetune
    result = RECIPES["greedy"].make(ingredients, evaluator, order=order, seed=3, passes=passes)
    assert replay(result.trace) == list(result.ingredients)
    soup = uniform_average([ingredients[n] for n in result.ingredients])
    assert all(torch.equal(soup[k], result.state_dict[k]) for k in soup)
    accepted_scores = [s.score for s in result.trace if s.accepted]
    assert result.metrics["val"].accuracy == pytest.approx(accepted_scores[-1], abs=1e-12)


def test_a_sorted_greedy_soup_is_never_below_the_best_individual_on_val(finetune):
    zoo, ingredients, evaluator = finetune
    best = RECIPES["best"].make(ingredients, evaluator)
    greedy = RECIPES["greedy"].make(ingredients, evaluator)
    assert greedy.ingredients[0] == best.ingredients[0]
    assert greedy.metrics["val"].accuracy >= best.metrics["val"].accuracy


def test_the_pruned_soup_is_never_below_uniform_on_val(finetune):
    zoo, ingredients, evaluator = finetune
    uniform = RECIPES["uniform"].make(ingredients, evaluator)
    for order in ("sorted", "random"):
        pruned = RECIPES["pruned"].make(ingredients, evaluator, order=order, passes=2)
        assert pruned.metrics["val"].accuracy >= uniform.metrics["val"].accuracy
        assert replay(pruned.trace) == list(pruned.ingredients)


def test_the_tie_rule_decides_whether_an_equal_score_joins(tiny_evaluator, tiny_states):
    twin = {"a": tiny_states["m0"], "b": {k: v.clone() for k, v in tiny_states["m0"].items()}}
    ge = RECIPES["greedy"].make(twin, tiny_evaluator, tie="ge")
    gt = RECIPES["greedy"].make(twin, tiny_evaluator, tie="gt")
    assert ge.ingredients == ("a", "b") and gt.ingredients == ("a",)


def test_max_ingredients_caps_the_greedy_soup(finetune):
    zoo, ingredients, evaluator = finetune
    result = RECIPES["greedy"].make(ingredients, evaluator, max_ingredients=1)
    assert len(result.ingredients) == 1


def test_the_ensemble_scores_the_mean_of_logits(tiny_evaluator, tiny_states):
    result = RECIPES["ensemble"].make(tiny_states, tiny_evaluator)
    logits = ensemble_logits([tiny_evaluator.logits(s, "test") for s in tiny_states.values()])
    assert result.metrics["test"] == metrics_from_logits(logits, tiny_evaluator.labels("test"))
    assert result.state_dict is None


def test_greedy_ensemble_trace_reproduces_its_members(finetune):
    zoo, ingredients, evaluator = finetune
    result = RECIPES["greedy-ensemble"].make(ingredients, evaluator)
    assert replay(result.trace) == list(result.ingredients)


@pytest.mark.parametrize("name", ["learned", "learned-by-layer"])
def test_learned_soup_weights_are_a_distribution_and_training_is_recorded(tiny_evaluator, tiny_states, name):
    result = RECIPES[name].make(tiny_states, tiny_evaluator, epochs=2)
    assert sum(result.weights) == pytest.approx(1.0, abs=1e-9)
    assert all(w > 0 for w in result.weights)
    assert len(result.trace) == 2 and result.extras["temperature"] > 0
    if name == "learned-by-layer":
        assert set(result.extras["layer_weights"]) == {"fc1", "fc2"}


def test_a_learned_soup_does_not_lose_to_its_uniform_start_on_val(finetune):
    zoo, ingredients, evaluator = finetune
    names = list(ingredients)[:6]
    subset = {n: ingredients[n] for n in names}
    uniform = RECIPES["uniform"].make(subset, evaluator)
    learned = RECIPES["learned"].make(subset, evaluator)
    assert learned.metrics["val"].loss <= uniform.metrics["val"].loss + 1e-6


def test_model_stock_ratio_follows_the_formula():
    from soup_core.merge.methods import model_stock_ratio_from_gram
    assert model_stock_ratio_from_gram(torch.zeros(2, 2, dtype=torch.float64)) == (0.0, 0.0)  # zero deltas: θ0
    assert model_stock_ratio_from_gram(torch.tensor([[4.0]], dtype=torch.float64)) == (0.0, 0.0)  # one: no angle
    torch.manual_seed(0)
    shared = torch.randn(1, 1000, dtype=torch.float64)
    deltas = shared + 0.5 * torch.randn(3, 1000, dtype=torch.float64)
    cos, t = model_stock_ratio(deltas)
    unit = deltas / deltas.norm(dim=1, keepdim=True)
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected_cos = sum(float(unit[i] @ unit[j]) for i, j in pairs) / 3
    assert cos == pytest.approx(expected_cos, abs=1e-12)
    assert t == pytest.approx(3 * cos / (1 + 2 * cos), abs=1e-12)
    assert model_stock_ratio(torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)) == (-1.0, 0.0)


def test_model_stock_of_aligned_models_is_their_mean_and_needs_a_base(tiny_states):
    base = tiny_states["m0"]
    delta = {k: torch.ones_like(v) for k, v in base.items()}
    same = {"a": {k: base[k] + delta[k] for k in base}, "b": {k: base[k] + delta[k] for k in base}}
    result = RECIPES["model-stock"].make(same, None, base=base)
    assert all(torch.allclose(result.state_dict[k], same["a"][k], atol=1e-6) for k in base)
    with pytest.raises(ValueError, match="base checkpoint"):
        RECIPES["model-stock"].make(same, None, base=None)


def test_a_weighted_soup_is_the_uniform_soup_by_default_and_divides_by_the_weights_sum(tiny_states):
    uniform = RECIPES["uniform"].make(tiny_states)
    assert all(torch.equal(RECIPES["weighted"].make(tiny_states).state_dict[k], uniform.state_dict[k])
               for k in uniform.state_dict)
    names = list(tiny_states)
    result = RECIPES["weighted"].make(tiny_states, weights=f"{names[0]}=3,{names[1]}=0")
    assert names[1] not in result.ingredients  # weight 0 leaves it out
    weights = [3.0] + [1.0] * (len(names) - 2)
    assert result.weights == pytest.approx([w / sum(weights) for w in weights])
    kept = [tiny_states[n] for n in result.ingredients]
    expected = {k: sum(w * s[k].double() for w, s in zip(result.weights, kept)) for k in kept[0]}
    assert all(torch.allclose(result.state_dict[k].double(), expected[k], atol=1e-6) for k in expected)


@pytest.mark.parametrize("recipe, params, reported", [
    ("uniform", {}, [1 / 3] * 3),
    ("model-stock", {}, [1 / 3] * 3),  # the mean that t then pulls towards θ0
    ("karcher", {}, [1 / 3] * 3),
    ("wise-ft", {"alpha": 0.6}, [0.2] * 3),  # α of the fine-tunings' mean, 1 − α of θ0
    ("weighted", {"weights": "m0=1,m1=3"}, [0.2, 0.6, 0.2]),  # m2 unnamed: weight 1
    ("weighted", {"weights": "m0=1.5e308,m1=0.5e308,m2=0"}, [0.75, 0.25]),  # the sum overflows, the ratios do not
    ("lines", {"weights": "m0=1,m1=3"}, [1.0, 3.0, 1.0]),  # LiNeS: task-vector weights as given
])
def test_a_merge_recipe_reports_the_weight_each_ingredient_has_in_it(tiny_states, recipe, params, reported):
    """What the model card and the Recipes table show as each ingredient's weight."""
    ingredients = {n: tiny_states[n] for n in ("m0", "m1", "m2")}
    result = RECIPES[recipe].make(ingredients, base=tiny_states["m4"], **params)
    assert list(result.weights) == pytest.approx(reported, rel=1e-12)


@pytest.mark.parametrize("weights, message", [
    ("not-a-model=2", "not among this soup's ingredients"),
    ("m0=-1", "finite number ≥ 0"),
    ("m0", "is not NAME=WEIGHT"),
    ("m0=1,m0=2", "given twice"),
])
def test_weights_a_soup_cannot_use_are_clear_errors(tiny_states, weights, message):
    with pytest.raises(ValueError, match=message):
        RECIPES["weighted"].make(tiny_states, weights=weights)


def test_a_soup_with_every_weight_zero_is_a_clear_error(tiny_states):
    with pytest.raises(ValueError, match="every weight is 0"):
        RECIPES["weighted"].make(tiny_states, weights=",".join(f"{n}=0" for n in tiny_states))


def test_recipes_that_score_on_val_say_they_need_an_evaluator(tiny_states):
    for recipe in RECIPES.values():
        if recipe.needs_evaluator:
            with pytest.raises(ValueError, match="needs an evaluator"):
                recipe.make(tiny_states, None, base=tiny_states["m0"])


def test_every_recipe_carries_a_name_a_pretty_name_and_a_reference():
    for name, recipe in RECIPES.items():
        assert recipe.name == name and recipe.pretty_name and recipe.reference


def test_the_official_tie_order_puts_later_entries_first_among_equal_scores(tiny_evaluator, tiny_states):
    twin = {"a": tiny_states["m0"], "b": {k: v.clone() for k, v in tiny_states["m0"].items()}}
    manifest = RECIPES["greedy"].make(twin, tiny_evaluator, tie="gt")
    official = RECIPES["greedy"].make(twin, tiny_evaluator, tie="gt", tie_order="official")
    assert manifest.ingredients == ("a",) and official.ingredients == ("b",)
    assert official.options["tie_order"] == "official"


def official_greedy(ingredients, evaluator, split="val"):
    """The official model-soups loop: sort by val, then for each candidate build the averaged
    state dict from scratch, load it and evaluate; keep it when val does not drop (>=)."""
    scores = {n: evaluator.accuracy(s, split) for n, s in ingredients.items()}
    order = sorted(ingredients, key=lambda n: -scores[n])
    kept, best = [], 0.0
    for name in order:
        trial = kept + [name]
        soup = {k: sum(ingredients[n][k].double() for n in trial) / len(trial) for k in ingredients[name]}
        score = evaluator.accuracy({k: v.float() for k, v in soup.items()}, split, cache=False)
        if score >= best:
            kept, best = trial, score
    return kept


def test_greedy_soup_keeps_what_the_official_loop_keeps():
    zoo = open_zoo("digits-finetune", device="cpu")
    result = RECIPES["greedy"].make(zoo.ingredients(), zoo.evaluator)
    assert list(result.ingredients) == official_greedy(zoo.ingredients(), zoo.evaluator)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device: run where CUDA is (bench_gpu.py)")
@pytest.mark.parametrize("recipe", ["greedy", "pruned"])
def test_greedy_and_pruned_pick_the_same_ingredients_on_a_gpu(recipe):
    on_gpu, on_cpu = open_zoo("digits-finetune", device="cuda"), open_zoo("digits-finetune", device="cpu")
    here = RECIPES[recipe].make(on_gpu.ingredients(), on_gpu.evaluator)
    there = RECIPES[recipe].make(on_cpu.ingredients(), on_cpu.evaluator)
    assert here.ingredients == there.ingredients
    assert [s.score for s in here.trace] == [s.score for s in there.trace]
    # the soup comes back beside its ingredients, whatever device summed it
    assert all(t.device.type == "cpu" for t in here.state_dict.values())


def test_a_running_sum_lives_on_its_device_and_stays_exact():
    generator = torch.Generator().manual_seed(0)
    states = {f"m{i}": {"w": torch.randn(50, generator=generator).half(), "n": torch.tensor(i)} for i in range(3)}
    soup = RunningSum("cpu")
    for name, state in states.items():
        assert soup.mean_with(name, state)["w"].device.type == "cpu"
        soup.add(name, state)
    exact = sum(s["w"].double() for s in states.values()) / 3
    assert torch.equal(soup.mean()["w"], exact.half())
    assert soup.mean()["n"] == 0  # integer buffers from the first ingredient
    soup.remove("m1")
    assert torch.equal(soup.mean()["w"], ((states["m0"]["w"].double() + states["m2"]["w"].double()) / 2).half())


def test_a_tie_for_the_best_model_is_said_out_loud_with_the_spread_on_test(finetune):
    zoo, ingredients, evaluator = finetune
    val = {n: evaluator.accuracy(s, "val") for n, s in ingredients.items()}
    tied = [n for n in ingredients if val[n] == max(val.values())]  # manifest order
    assert len(tied) > 1  # digits-finetune has a four-way tie on val
    best = RECIPES["best"].make(ingredients, evaluator)
    assert best.ingredients == (tied[0],) and best.extras["tied_on_val"] == tied
    test = {n: evaluator.accuracy(ingredients[n], "test") for n in tied}
    assert best.extras["tied_report"] == {"split": "test", "accuracy": test}
    assert tie_sentence(best) == (f"{len(tied)} models tie on val at {max(val.values()):.1%} ({', '.join(tied)}); "
                                  f"on test they score {min(test.values()):.1%} to {max(test.values()):.1%}; "
                                  f"the first in manifest order, {tied[0]}, is the best individual.")
    assert tie_sentence(best, report=False) == (f"{len(tied)} models tie on val at {max(val.values()):.1%} "
                                                f"({', '.join(tied)}); the first in manifest order, {tied[0]}, is the "
                                                "best individual.")  # a room that hides test
    alone = RECIPES["best"].make({tied[0]: ingredients[tied[0]]}, evaluator)
    assert alone.extras == {} and tie_sentence(alone) is None


def test_the_slerp_recipe_walks_the_arc_and_reports_its_ends_weights():
    """a = (2, 0), b = (0, 2) are 90° apart: at t = ¼ the soup is 2·(sin(3π/8), sin(π/8)), and the
    reported weights are the line's, (¾, ¼)."""
    import math
    soup = RECIPES["slerp"].make({"a": {"w": torch.tensor([2.0, 0.0])}, "b": {"w": torch.tensor([0.0, 2.0])}}, t=0.25)
    assert soup.state_dict["w"].tolist() == pytest.approx([2 * math.sin(3 * math.pi / 8), 2 * math.sin(math.pi / 8)])
    assert soup.weights == (0.75, 0.25) and soup.ingredients == ("a", "b")
    quarter = math.pi / 4  # a and b are π/2 apart: sin(3π/8)/sin(π/2) and sin(π/8)/sin(π/2)
    assert soup.extras["coefficients"]["w"] == pytest.approx((math.sin(1.5 * quarter), math.sin(0.5 * quarter)))
    assert RECIPES["uniform"].make({"a": {"w": torch.ones(2)}}).extras == {}  # no per-tensor summary


@pytest.mark.parametrize("recipe, params, counted_from", [
    ("uniform", {}, "a"),  # the first ingredient
    ("model-stock", {}, "a"),
    ("karcher", {}, "a"),
    ("wise-ft", {"alpha": 0.5}, "a"),
    ("slerp", {"t": 0.5}, "a"),  # the nearer end; at t = ½ the first
    ("slerp", {"t": 0.75}, "b"),
    ("weighted", {"weights": "a=1,b=3,c=2"}, "b"),  # the heaviest
    ("weighted", {"weights": "a=3,b=3,c=1"}, "a"),  # the first of equals
    ("task-arithmetic", {"weights": "a=1,b=3,c=2"}, "b"),
    ("ties", {"weights": "a=2,b=1,c=0"}, "a"),  # c's weight 0 leaves it out
    ("lines", {"weights": "a=5,b=1,c=1"}, "a"),
])
def test_a_merge_copies_its_counters_from_the_ingredient_it_names_as_reference(recipe, params, counted_from):
    """A counter (BatchNorm's ``num_batches_tracked``) differs between ingredients and is copied, not
    averaged: from the first ingredient, the heaviest one, or SLERP's nearer end."""
    def model(index: int) -> dict[str, torch.Tensor]:
        return {"bn.weight": torch.full((3,), float(index + 1)), "bn.num_batches_tracked": torch.tensor(100 * index)}
    names = ("a", "b") if recipe == "slerp" else ("a", "b", "c")
    ingredients = {name: model(i + 1) for i, name in enumerate(names)}
    result = RECIPES[recipe].make(ingredients, base=model(0), **params)
    assert int(result.state_dict["bn.num_batches_tracked"]) == int(ingredients[counted_from]["bn.num_batches_tracked"])


def test_every_parameter_is_listed_once_with_every_recipe_that_takes_it():
    from soup_core.recipes import all_parameters
    from soup_core.recipes.parameters import SEED
    assert all_parameters()["seed"] == (SEED, ("greedy", "pruned", "learned", "learned-by-layer", "greedy-ensemble",
                                               "dare-linear", "dare-ties"))
    assert all_parameters()["t"][1] == ("slerp",)


def test_a_val_grid_is_written_as_its_decimals():
    from soup_core.recipes.parameters import SCALE, grid
    assert grid(0.0, 1.0, 0.1) == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert grid(0.5, 2.0, 0.5) == (0.5, 1.0, 1.5, 2.0)
    assert SCALE.val_grid == tuple(i / 10 for i in range(1, 21))  # λ from 0.1 to 2 (Ilharco et al. 2023)


def test_a_task_vector_recipe_is_declared_by_its_name_alone():
    """``_merge`` and ``_recipe`` build the six task-vector recipes from their names: the entry a
    name declares, and the plan and soup its functions make, are the method of that name."""
    from soup_core.recipes import _merge
    from soup_core.recipes import task_vectors as module
    from soup_core.recipes.parameters import DENSITY, WEIGHTS
    assert _merge("dare-ties", "DARE", "Yu et al.", (WEIGHTS, DENSITY), min_ingredients=2) == Recipe(
        "dare-ties", "DARE", "Yu et al.", "task_vectors:dare_ties", (WEIGHTS, DENSITY), needs_evaluator=False,
        needs_base=True, min_ingredients=2, merge_path="task_vectors:dare_ties_merge",
        app_values=(("normalize", True), ("lambda", "val")), family="merge")
    plan, soup = module._recipe("ties")
    params = RECIPES["ties"].resolve({"weights": "a=2,b=1", "density": 0.5, "lambda": 1.0})
    merge = plan(("a", "b"), params)
    assert (merge.ingredients, merge.weights, merge.method.name, merge.reference) == \
        (("a", "b"), (2.0, 1.0), "ties", "a")
    base = {"w": torch.zeros(4)}
    ingredients = {"a": {"w": torch.tensor([1.0, -2.0, 0.5, 0.0])}, "b": {"w": torch.tensor([-3.0, 1.0, 0.0, 0.25])}}
    brew = soup(ingredients, None, base, params)
    # Trim each task vector to its larger half: a keeps 1, -2; b keeps -3, 1. Weighted: 2a = [2, -4, 0, 0],
    # b = [-3, 1, 0, 0]; their sum elects signs [-, -]; the agreeing entries over their weights' sum:
    # -3 / 1 and -4 / 2.
    assert brew.ingredients == ("a", "b") and brew.weights == (2.0, 1.0)
    assert brew.state_dict["w"].tolist() == [-3.0, -2.0, 0.0, 0.0]


def test_a_parameter_chosen_on_val_keeps_its_curve_and_ties_go_to_the_default(tiny_evaluator, tiny_states):
    """Ingredients equal to θ0 have no task vector: every λ makes the same soup and scores the same, so
    the tie goes to the method's own λ = 1; the curve records every value's val accuracy."""
    base = tiny_states["m0"]
    ingredients = {"a": base, "b": {k: t.clone() for k, t in base.items()}}
    result = RECIPES["task-arithmetic"].make(ingredients, tiny_evaluator, base=base, **{"lambda": "val"})
    accuracy = tiny_evaluator.accuracy(base, "val")
    assert result.options["lambda"] == 1.0
    assert result.extras["chosen_on_val"] == {"parameter": "lambda", "split": "val",
                                              "grid": [round(0.1 * i, 10) for i in range(1, 21)],
                                              "val_accuracy": [accuracy] * 20, "chosen": 1.0}


def test_a_learned_soup_copies_counters_from_its_heaviest_ingredient():
    """BatchNorm's counters are not mixed: the learned soup takes them from the ingredient with the
    largest mean weight, as weighted_average does."""
    zoo = open_zoo("digits-bn")
    names = zoo.names[:3]
    ingredients = {}
    for i, name in enumerate(names):
        state = dict(zoo.state_dict(name))
        for key in [k for k in state if k.endswith("num_batches_tracked")]:
            state[key] = torch.tensor(100 * (i + 1))
        ingredients[name] = state
    result = RECIPES["learned"].make(ingredients, zoo.evaluator, epochs=1)
    heaviest = max(range(3), key=lambda i: result.weights[i])
    assert heaviest != 0, "the heaviest is not the first: copying from the first would show"
    assert int(result.state_dict["body.1.num_batches_tracked"]) == 100 * (heaviest + 1)
    assert result.ingredients == tuple(names)
