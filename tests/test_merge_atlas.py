"""The merge methods beside the soups: LiNeS as its paper (and its authors' code) scales, parameters
chosen on val as the papers choose them, and the board, the Landscape and the Tour that show them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from appkit.plain import as_read
from soup_core.errors import RecipeError
from soup_core.merge.lines import block_depths, numbered_block
from soup_core.recipes import RECIPES
from soup_core.significance import versus, versus_best
from soup_core.zoo import make_soup, open_zoo, zoo_plane

ROOT = Path(__file__).resolve().parents[1]
THIS_TREE = {**os.environ, "PYTHONPATH": str(ROOT)}


# --- LiNeS (Wang et al. 2024) -----------------------------------------------------------------------------

def test_lines_scales_the_mean_task_vector_linearly_in_depth_and_leaves_the_head_at_alpha():
    base = {"layers.0.w": torch.zeros(2), "layers.1.w": torch.zeros(2), "layers.2.w": torch.zeros(2),
            "head.w": torch.zeros(2)}
    a = {k: torch.tensor([2.0, 0.0]) for k in base}
    b = {k: torch.tensor([0.0, 4.0]) for k in base}  # mean task vector [1, 2] everywhere
    soup = RECIPES["lines"].make({"a": a, "b": b}, base=base, alpha=0.5, beta=1.0).state_dict
    assert soup["layers.0.w"].tolist() == [0.5, 1.0]  # α
    assert soup["layers.1.w"].tolist() == [1.0, 2.0]  # α + β/2
    assert soup["layers.2.w"].tolist() == [1.5, 3.0]  # α + β
    assert soup["head.w"].tolist() == [0.5, 1.0]  # outside the blocks: α, as the authors' code


def test_lines_weights_the_task_vectors_as_given():
    base = {"0.w": torch.tensor([1.0])}
    soup = RECIPES["lines"].make({"a": {"0.w": torch.tensor([4.0])}, "b": {"0.w": torch.tensor([2.0])}}, base=base,
                                 weights="a=3,b=1", alpha=1.0, beta=0.0).state_dict
    assert soup["0.w"].item() == 1.0 + (3 * 3.0 + 1 * 1.0) / 4


def test_the_blocks_are_the_prefix_with_the_most_numbered_children_ranked_in_order():
    assert numbered_block("model.layers.3.mlp.experts.7.w") == ("model.layers", 3)
    assert numbered_block("embed.weight") is None and numbered_block("layers.7") is None  # a name, not a block
    depths = block_depths(["features.0.w", "features.3.w", "features.6.w", "classifier.1.w", "embed.w"])
    assert depths == {"features.0.w": 0.0, "features.3.w": 0.5, "features.6.w": 1.0, "classifier.1.w": 0.0,
                      "embed.w": 0.0}
    assert block_depths(["a.w", "b.w"]) == {"a.w": 0.0, "b.w": 0.0}
    assert block_depths(["h.0.w", "h.0.b"]) == {"h.0.w": 0.0, "h.0.b": 0.0}  # one block: no depth to scale by


def test_lines_equals_the_authors_scaling_of_the_summed_task_vectors():
    """Their code scales the sum of T task vectors by α_p + β_p·ℓ/(L − 1) with α_p = 1/T (task
    arithmetic); on the mean that is α = 1, β = T·β_p."""
    torch.manual_seed(0)
    keys = [f"visual.resblocks.{i}.w" for i in range(4)] + ["visual.proj"]
    base = {k: torch.randn(3, dtype=torch.float64) for k in keys}
    models = {f"m{j}": {k: v + torch.randn(3, dtype=torch.float64) for k, v in base.items()} for j in range(3)}
    beta_paper, tasks, blocks = 0.4, 3, 4
    expected = {}
    for k in keys:
        summed = sum(models[m][k] - base[k] for m in models)
        scale = 1 / tasks + (beta_paper * int(k.split(".")[2]) / (blocks - 1) if "resblocks" in k else 0.0)
        expected[k] = base[k] + scale * summed
    soup = RECIPES["lines"].make(models, base=base, alpha=1.0, beta=tasks * beta_paper).state_dict
    assert all(torch.allclose(soup[k], expected[k], rtol=0, atol=1e-12) for k in keys)


def test_lines_without_depth_is_wise_ft_and_at_one_the_uniform_soup():
    zoo = open_zoo("digits-finetune")
    ingredients = zoo.ingredients(zoo.names[:4])
    flat = RECIPES["lines"].make(ingredients, base=zoo.base, alpha=0.3, beta=0.0).state_dict
    wise = RECIPES["wise-ft"].make(ingredients, base=zoo.base, alpha=0.3).state_dict
    uniform = RECIPES["uniform"].make(ingredients).state_dict
    one = RECIPES["lines"].make(ingredients, base=zoo.base, alpha=1.0, beta=0.0).state_dict
    assert all(torch.allclose(flat[k], wise[k], atol=1e-6) for k in flat)
    assert all(torch.allclose(one[k], uniform[k], atol=1e-6) for k in one)


def test_lines_never_writes_into_theta0():
    base = {"0.w": torch.zeros(2, dtype=torch.float64)}
    RECIPES["lines"].make({"a": {"0.w": torch.ones(2, dtype=torch.float64)}}, base=base)
    assert base["0.w"].tolist() == [0.0, 0.0]


# --- a parameter chosen on val -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo():
    return open_zoo("digits-finetune")


def test_a_lambda_search_reuses_the_merged_update_and_each_soup_is_bit_for_bit_the_one_made_alone(zoo):
    """TIES at λ = 0.3 and 1.7 inside one search (the second reuses the first's trimmed, elected
    update) equal TIES made alone at each λ, to the bit; the search's curve is theirs."""
    from soup_core.merge.task_vectors import one_update_for_every_scale
    names = zoo.names[:5]
    alone = {x: make_soup(zoo, "ties", names, **{"lambda": x}).state_dict for x in (0.3, 1.7)}
    with one_update_for_every_scale():
        shared = {x: make_soup(zoo, "ties", names, **{"lambda": x}).state_dict for x in (0.3, 1.7)}
    for x in alone:
        assert all(torch.equal(alone[x][k], shared[x][k]) for k in alone[x]), x
    assert not all(torch.equal(alone[0.3][k], alone[1.7][k]) for k in alone[0.3])
    tuned = RECIPES["ties"].make({n: zoo.state_dict(n) for n in names}, zoo.evaluator, base=zoo.base,
                                 **{"lambda": "val"})
    curve = tuned.extras["chosen_on_val"]
    for x, score in list(zip(curve["grid"], curve["val_accuracy"]))[::5]:
        assert score == zoo.evaluator.accuracy(make_soup(zoo, "ties", names, **{"lambda": x}).state_dict, "val")


def test_lambda_val_keeps_the_lambda_whose_soup_is_best_on_val(zoo):
    """The curve is each λ's own soup scored on val; the choice is its maximum, ties to the λ nearest 1."""
    ingredients = zoo.ingredients()
    grid = [round(0.1 * i, 10) for i in range(1, 21)]
    curve = [zoo.evaluator.accuracy(make_soup(zoo, "task-arithmetic", normalize=True, **{"lambda": x}).state_dict,
                                    "val") for x in grid]
    top = max(curve)
    expected = min((x for x, score in zip(grid, curve) if score == top), key=lambda x: (abs(x - 1.0), x))
    tuned = RECIPES["task-arithmetic"].make(ingredients, zoo.evaluator, base=zoo.base, normalize=True,
                                            **{"lambda": "val"})
    assert tuned.extras["chosen_on_val"]["grid"] == grid
    assert tuned.extras["chosen_on_val"]["val_accuracy"] == curve
    assert tuned.options["lambda"] == expected and tuned.extras["chosen_on_val"]["chosen"] == expected
    remade = make_soup(zoo, "task-arithmetic", normalize=True, **{"lambda": expected})
    assert all(torch.equal(tuned.state_dict[k], remade.state_dict[k]) for k in remade.state_dict)
    assert tuned.metrics["test"].accuracy == remade.metrics["test"].accuracy  # test is reported, never chosen on


def test_a_tie_on_val_goes_to_the_value_nearest_the_default(zoo):
    """On digits-soup many λ tie at the top of val (269 images): the choice is the one nearest λ = 1."""
    soup_zoo = open_zoo("digits-soup")
    tuned = make_soup(soup_zoo, "ties", **{"lambda": "val"})
    curve = tuned.extras["chosen_on_val"]
    top = max(curve["val_accuracy"])
    tied = [x for x, s in zip(curve["grid"], curve["val_accuracy"]) if s == top]
    assert len(tied) > 1 and curve["chosen"] == min(tied, key=lambda x: (abs(x - 1.0), x))


def test_val_is_refused_where_it_cannot_be_chosen(zoo):
    with pytest.raises(RecipeError, match="one parameter on val at a time, not density and lambda"):
        make_soup(zoo, "ties", density="val", **{"lambda": "val"})
    with pytest.raises(RecipeError, match="needs the zoo's evaluator"):
        RECIPES["ties"].make(zoo.ingredients(zoo.names[:2]), None, base=zoo.base, **{"lambda": "val"})
    with pytest.raises(RecipeError, match="is chosen by scoring soups on the val split"):
        RECIPES["ties"].plan_merge(("a", "b"), {"lambda": "val"})
    with pytest.raises(RecipeError, match="passes must be a int"):
        make_soup(zoo, "pruned", passes="val")  # only a parameter with a grid takes val


def test_the_command_line_takes_val_and_refuses_other_words(tmp_path):
    out = subprocess.run([sys.executable, "-m", "soup_core", "make", "wise-ft", "digits-finetune", "--alpha", "val",
                          "--json", str(tmp_path / "w.json")], capture_output=True, text=True, env=THIS_TREE,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    import json
    payload = json.loads((tmp_path / "w.json").read_text())
    assert payload["options"]["alpha"] == payload["extras"]["chosen_on_val"]["chosen"]
    bad = subprocess.run([sys.executable, "-m", "soup_core", "make", "ties", "digits-finetune", "--lambda", "best"],
                         capture_output=True, text=True, env=THIS_TREE, cwd=ROOT, timeout=600)
    assert bad.returncode == 2 and "'best' is neither a number nor val" in bad.stderr
    assert bad.stderr.count("\n") <= 2


# --- the board, the Landscape and the Tour ---------------------------------------------------------------

def _app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()


def test_the_board_shows_every_merge_method_with_its_choice_and_its_tests_against_best_and_greedy(zoo):
    at = _app()
    at.switch_page("pages/recipes.py").run()
    assert not at.exception
    table = at.dataframe[0].value
    ingredients = zoo.ingredients()
    greedy = make_soup(zoo, "greedy")
    for name in ("task-arithmetic", "ties", "dare-linear", "dare-ties", "breadcrumbs", "breadcrumbs-ties", "karcher",
                 "wise-ft", "lines", "model-stock"):
        recipe = RECIPES[name]
        made = make_soup(zoo, name, **dict(recipe.app_values))
        row = table[table["recipe"] == recipe.pretty_name].iloc[0]
        assert row["test"] == pytest.approx(100 * made.metrics["test"].accuracy)
        assert row["test vs best"] == versus_best(made, ingredients, zoo.evaluator, ["test"])[0].brief()
        assert row["test vs greedy"] == versus(greedy, made, ingredients, zoo.evaluator, ["test"])[0].brief()
        curve = made.extras.get("chosen_on_val")
        symbol = {"lambda": "λ", "beta": "β"}
        assert row["chosen on val"] == (f"{symbol[curve['parameter']]} = {curve['chosen']:g}" if curve else "—")
    assert "SLERP of two models" not in set(table["recipe"])  # two ingredients only: not a board row
    assert table[table["recipe"] == "Greedy soup"].iloc[0]["test vs greedy"] == "—"


def test_the_landscape_draws_the_merge_methods_and_the_density_slider_redraws_its_point(zoo):
    import json
    at = _app()
    at.switch_page("pages/landscape.py").run()
    at.slider(key="land-grid").set_value(5).run()
    at.button(key="land-compute").click().run()
    assert not at.exception
    plane = zoo_plane(zoo, ("base", "ft-00", "ft-01"))

    def figure() -> dict:
        return json.loads(next(c.proto.spec for c in at.get("plotly_chart") if "land-chart" in c.proto.id))

    methods = next(t for t in figure()["data"] if t.get("name") == "merge methods")
    drawn = [RECIPES[n] for n in RECIPES if RECIPES[n].family == "merge" and RECIPES[n].board]
    assert len(methods["x"]) == len(drawn)
    ties = plane.project(make_soup(zoo, "ties", **dict(RECIPES["ties"].app_values)).state_dict)
    hover = next(h for h in methods["hovertext"] if h.startswith("TIES merging<br>"))
    i = methods["hovertext"].index(hover)
    assert (methods["x"][i], methods["y"][i]) == pytest.approx(ties.xy) and f"{ties.off_plane:.3f}" in hover
    at.selectbox(key="land-sparse").set_value("dare-ties").run()
    at.slider(key="land-density").set_value(0.3).run()
    assert not at.exception
    made = make_soup(zoo, "dare-ties", normalize=True, density=0.3, **{"lambda": "val"})
    expected = plane.project(made.state_dict)
    point = next(t for t in figure()["data"] if t.get("name") == "DARE with TIES signs, density 0.3")
    assert (point["x"][0], point["y"][0]) == pytest.approx(expected.xy)
    assert any(f"val {100 * made.metrics['val'].accuracy:.1f}%" in c.value for c in at.caption)


def test_the_tours_merge_step_says_what_its_data_shows(zoo):
    at = _app()
    at.switch_page("pages/tour.py").run()
    at.radio(key="tour-step").set_value(next(s for s in at.radio(key="tour-step").options if s.startswith("7"))).run()
    assert not at.exception
    text = " ".join(as_read(m.value) for m in at.markdown)
    names = [n for n, r in RECIPES.items() if r.family == "merge" and r.board]
    made = {n: make_soup(zoo, n, **dict(RECIPES[n].app_values)) for n in names}
    top = max(names, key=lambda n: made[n].metrics["val"].accuracy)
    greedy = make_soup(zoo, "greedy")
    tests = {n: versus(greedy, made[n], zoo.ingredients(), zoo.evaluator, ["test"])[0] for n in names}
    worse = sum(c.significant and c.difference < 0 for c in tests.values())
    better = sum(c.significant and c.difference > 0 for c in tests.values())
    assert f"the method best on val is **{RECIPES[top].pretty_name}**" in text
    assert f"against the greedy soup on test, {tests[top].sentence()}" in text
    assert (f"Of the {len(names)} methods, {worse} are significantly worse than the greedy soup on test, {better} "
            f"significantly better, and {len(names) - worse - better} cannot be told apart") in text
