"""The merge methods, specified: each as its paper defines it on a hand-worked example, and each equal
to mergekit's on the same folders (mergekit is the oracle; DARE, being random, by its statistics)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from soup_core.errors import RecipeError, SoupError
from soup_core.io import load_state_dict
from soup_core.merge import MappingSource, merge_in_memory
from soup_core.merge.karcher import karcher
from soup_core.merge.methods import wise_ft
from soup_core.merge.slerp import slerp
from soup_core.merge.task_vectors import magnitude_mask, outlier_mask, random_mask, rescaled, task_vector_method
from soup_core.mergekit_config import read_mergekit, to_mergekit
from soup_core.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]
THIS_TREE = {**os.environ, "PYTHONPATH": str(ROOT)}  # subprocesses run this tree's code (a mutation run's copy too)
F64 = torch.float64


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# --- each method as its paper writes it, on 2×2 examples worked by hand -------------------------------------

BASE = t([1.0, 1.0], [1.0, 1.0])
A = t([2.0, 1.0], [0.0, 1.5])  # δ_A = [[1, 0], [-1, 0.5]]
B = t([1.5, 3.0], [2.0, 1.0])  # δ_B = [[0.5, 2], [1, 0]]


def combine(method, *blocks, base=BASE):
    return method.combine(list(blocks), base, None, key="w")


def test_task_arithmetic_adds_lambda_times_the_weighted_task_vectors_to_theta0():
    method = task_vector_method("task-arithmetic", [1.0, 0.5], scale=0.5)
    # θ0 + 0.5·(δ_A + 0.5·δ_B) = 1 + 0.5·[[1.25, 1], [-0.5, 0.5]]
    assert combine(method, A, B).tolist() == [[1.625, 1.5], [0.75, 1.25]]


def test_ties_trims_elects_the_sign_of_the_sum_and_takes_the_disjoint_mean():
    method = task_vector_method("ties", [1.0, 1.0], sparsify="magnitude", density=0.5, consensus=True, normalize=True)
    # trim to 2 of 4: δ_A → [[1, 0], [-1, 0]], δ_B → [[0, 2], [1, 0]]
    # signs of the sum [[1, 2], [0, 0]]: all +; entry (1,0): δ_A = -1 disagrees, δ_B = 1 agrees
    assert combine(method, A, B).tolist() == [[2.0, 3.0], [2.0, 1.0]]


def test_ties_without_normalize_sums_the_agreeing_entries():
    method = task_vector_method("ties", [1.0, 1.0], sparsify="magnitude", density=1.0, consensus=True)
    # sums [[1.5, 2], [0, 0.5]] → signs +; (1,0): only δ_B = 1 agrees; (0,0): 1 + 0.5
    assert combine(method, A, B).tolist() == [[2.5, 3.0], [2.0, 1.5]]


def test_breadcrumbs_drops_the_largest_gamma_and_the_smallest_to_keep_density():
    delta = t([4.0, -1.0], [0.5, -2.0])
    # 4 entries, density 0.5 → keep 2; gamma 0.25 → drop the largest (4); the smallest (0.5) goes too
    assert outlier_mask(delta, 0.5, 0.25).tolist() == [[False, True], [False, True]]
    assert magnitude_mask(delta, 0.5).tolist() == [[True, False], [False, True]]


def test_dare_keeps_density_at_random_and_rescales_as_asked():
    delta = torch.randn(400, 500, dtype=F64, generator=torch.Generator().manual_seed(0))
    mask = random_mask(delta, 0.3, seed=7)
    assert abs(mask.double().mean().item() - 0.3) < 0.005  # 200,000 draws: 5 standard deviations
    assert torch.equal(mask, random_mask(delta, 0.3, seed=7)) and not torch.equal(mask, random_mask(delta, 0.3, 8))
    paper = rescaled(delta, mask, "density", 0.3)
    assert torch.equal(paper[mask], delta[mask] / 0.3) and bool((paper[~mask] == 0).all())
    l1 = rescaled(delta, mask, "l1", 0.3)
    assert torch.isclose(l1.abs().sum(), delta.abs().sum(), rtol=1e-12)


def test_slerp_follows_the_arc_and_falls_back_to_the_line_for_parallel_tensors():
    def run(a, b, at):
        method = slerp(at)
        return method.combine([a, b], None, method.summary(method.statistic([a, b], None)))

    a, b = t(1.0, 0.0), t(0.0, 1.0)
    half = run(a, b, 0.5)
    assert torch.allclose(half, t(2**-0.5, 2**-0.5), atol=1e-15)  # on the unit circle, not the chord's (0.5, 0.5)
    assert torch.allclose(run(a, b, 0.0), a) and torch.allclose(run(a, b, 1.0), b)
    assert torch.equal(run(t(1.0, 2.0), t(2.0, 4.0), 0.25), t(1.25, 2.5))  # parallel: the straight line


def test_the_karcher_mean_of_equal_directions_is_their_direction_at_the_mean_norm():
    method = karcher()
    merged = method.combine([t([3.0, 4.0]), t([6.0, 8.0])], None, None)  # norms 5 and 10, one direction
    assert torch.allclose(merged, t([4.5, 6.0]), atol=1e-12)  # 7.5 · (0.6, 0.8)
    three = method.combine([t([1.0, 0.0]), t([0.0, 1.0]), t([-1.0, 0.0])], None, None)
    assert torch.allclose(three, t([0.0, 1.0]), atol=1e-9)  # the centre of a half circle's ends and middle


def test_the_karcher_mean_on_a_circle_is_the_mean_angle_at_the_mean_norm():
    """On a circle, the Karcher mean of directions within a half circle is the mean of their angles.
    Directions at 0°, 30° and 90° with norms 2, 1 and 3: 40°, at norm 2. With a zero tensor in place
    of the 30° one: 45° (the zero tensor has no direction) at norm 5/3 (it counts in the norm)."""
    def polar(degrees: float, norm: float) -> torch.Tensor:
        return norm * t(math.cos(math.radians(degrees)), math.sin(math.radians(degrees)))
    method = karcher()
    merged = method.combine([polar(0, 2), polar(30, 1), polar(90, 3)], None, None)
    assert torch.allclose(merged, polar(40, 2), atol=1e-7)
    with_zero = method.combine([polar(0, 2), t(0.0, 0.0), polar(90, 3)], None, None)
    assert torch.allclose(with_zero, polar(45, 5 / 3), atol=1e-7)


def test_wise_ft_moves_from_theta0_to_the_soup_by_alpha():
    method = wise_ft(0.25)
    # (1 − 0.25)·θ0 + 0.25·mean(A, B) = 0.75 + 0.25·[[1.75, 2], [1, 1.25]]
    assert method.combine([A, B], BASE, None).tolist() == [[1.1875, 1.25], [1.0, 1.0625]]


def test_dare_is_the_same_merge_in_memory_whichever_order_the_tensors_come_in():
    g = torch.Generator().manual_seed(1)
    states = [{"a": torch.randn(8, 8, generator=g), "b": torch.randn(16, generator=g)} for _ in range(3)]
    base = {"a": torch.zeros(8, 8), "b": torch.zeros(16)}
    method = task_vector_method("dare-ties", [1.0, 1.0], sparsify="random", density=0.5, consensus=True,
                                rescale="l1", seed=3)
    forward = merge_in_memory(method, [MappingSource(s) for s in states[:2]], MappingSource(base))
    flipped = [{k: s[k] for k in ("b", "a")} for s in states[:2]]
    backward = merge_in_memory(method, [MappingSource(s) for s in flipped], MappingSource(base))
    assert all(torch.equal(forward[k], backward[k]) for k in forward)


def test_the_merge_recipes_need_what_they_need(tiny_states):
    with pytest.raises(RecipeError, match="needs a base checkpoint"):
        RECIPES["ties"].make(tiny_states)
    with pytest.raises(RecipeError, match="exactly 2 ingredient"):
        RECIPES["slerp"].make(tiny_states)
    with pytest.raises(RecipeError, match="density must be at least 0"):
        RECIPES["ties"].make(tiny_states, base=tiny_states["m0"], density=-0.5)


# --- mergekit's YAML: refused by name where it cannot be made exactly --------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"slices": []}, "slices"),
    ({"merge_method": "della", "models": [{"model": "."}]}, "merge_method 'della' is not supported"),
    ({"merge_method": "ties", "models": [{"model": "org/some-model-on-the-hub"}]}, "downloads nothing"),
    ({"merge_method": "ties", "models": [{"model": ".", "parameters": {"weight": [0.1, 0.9]}}]}, "gradients"),
    ({"merge_method": "linear", "models": [{"model": "."}], "parameters": {"normalize": False}}, "normalize: false"),
    ({"merge_method": "linear", "models": [{"model": "."}], "chat_template": "x"}, "chat_template"),
])
def test_a_mergekit_config_we_cannot_make_exactly_is_refused_by_name(config, message, tmp_path):
    with pytest.raises(SoupError, match=message):
        read_mergekit(yaml.safe_dump(config), relative_to=tmp_path)


def test_differing_per_model_densities_are_refused(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "base").mkdir()
    config = {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 1, "density": 0.5}},
        {"model": "b", "parameters": {"weight": 1, "density": 0.7}}]}
    with pytest.raises(SoupError, match=r"per-model density values differ \(0.5, 0.7\)"):
        read_mergekit(yaml.safe_dump(config), relative_to=tmp_path)


def test_yaml_that_is_not_a_config_is_one_line():
    with pytest.raises(SoupError, match="not valid YAML"):
        read_mergekit("merge_method: [unclosed")
    with pytest.raises(SoupError, match="a mapping"):
        read_mergekit("- just a list")


def test_to_mergekit_refuses_what_mergekit_cannot_remake():
    with pytest.raises(SoupError, match="no mergekit equivalent"):
        to_mergekit("learned", {"a": "/a"}, [1.0], {}, None)
    with pytest.raises(SoupError, match="rescale l1"):
        to_mergekit("dare-linear", {"a": "/a"}, [1.0], {"rescale": "density", "density": 0.5}, "/b")


# --- the same folders through mergekit and through ours ------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_zoo(tmp_path_factory) -> Path:
    """θ0 and three fine-tunings of a tiny float32 Llama, written by transformers' save_pretrained."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=96,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder / "base")
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    shared = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    for i in range(3):
        with torch.no_grad():
            for key, param in model.state_dict().items():
                param.copy_(theta0[key] + shared[key] + 0.02 * torch.randn(param.shape, generator=g))
        model.save_pretrained(folder / f"ft-{i}")
    return folder


def mergekit_merge(config: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return load_state_dict(out)


def soup_merge(config: dict, folder: Path, name: str) -> dict[str, torch.Tensor]:
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "soup_core", "merge", str(path), "--out", str(folder / name),
                          "--json", str(folder / f"{name}.json")], capture_output=True, text=True, cwd=ROOT, env=THIS_TREE,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return load_state_dict(folder / name)


def config_of(zoo: Path, method: str, parameters: dict, per_model: dict | None = None, models=("ft-0", "ft-1", "ft-2"),
              base: bool = True) -> dict:
    config = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(zoo / m), **({"parameters": per_model} if per_model else {})} for m in models]}
    if base:
        config["base_model"] = str(zoo / "base")
    if parameters:
        config["parameters"] = parameters
    return config


METHODS = {
    "linear": ({"normalize": True}, {"weight": 0.7}, False),
    "task_arithmetic": ({"lambda": 0.6}, {"weight": 0.5}, True),
    "ties": ({"density": 0.4}, {"weight": 0.8}, True),
    "ties-unnormalized": ({"density": 0.6, "normalize": False, "lambda": 0.5}, {"weight": 1.0}, True),
    "breadcrumbs": ({"density": 0.7, "gamma": 0.05}, {"weight": 0.5}, True),
    "breadcrumbs_ties": ({"density": 0.7, "gamma": 0.05}, {"weight": 0.5}, True),
    "model_stock": ({}, None, True),
    "karcher": ({"max_iter": 20}, None, False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_soup_merge_gives_mergekits_tensors(llama_zoo, tmp_path, name):
    pytest.importorskip("mergekit")
    parameters, per_model, base = METHODS[name]
    config = config_of(llama_zoo, name.split("-")[0], parameters, per_model, base=base)
    theirs = mergekit_merge(config, tmp_path / "mergekit")
    ours = soup_merge(config, tmp_path, "ours")
    assert set(theirs) == set(ours)
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6), key


@pytest.mark.slow
def test_soup_merge_gives_mergekits_slerp(llama_zoo, tmp_path):
    pytest.importorskip("mergekit")
    config = config_of(llama_zoo, "slerp", {"t": 0.3}, models=("base", "ft-1"))
    theirs, ours = mergekit_merge(config, tmp_path / "mergekit"), soup_merge(config, tmp_path, "ours")
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_mergekit_in_its_statistics(llama_zoo, tmp_path, method):
    """Random drops differ draw by draw; what must agree is the share kept and the L1 norm restored."""
    pytest.importorskip("mergekit")
    config = config_of(llama_zoo, method, {"density": 0.3}, {"weight": 1.0}, models=("ft-0",))
    theirs, ours = mergekit_merge(config, tmp_path / "mergekit"), soup_merge(config, tmp_path, "ours")
    base, tuned = load_state_dict(llama_zoo / "base"), load_state_dict(llama_zoo / "ft-0")
    for key in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        delta = (tuned[key] - base[key]).double()
        for merged in (theirs, ours):
            kept = (merged[key] - base[key]).double()
            assert abs((kept != 0).double().mean().item() - 0.3) < 0.02, key
            assert torch.isclose(kept.abs().sum(), delta.abs().sum(), rtol=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("recipe, flags", [("ties", ["--density", "0.5", "--weights", "ft-0=0.5"]),
                                           ("wise-ft", ["--alpha", "0.3"])])
def test_a_soup_exported_with_its_mergekit_yaml_is_remade_by_mergekit(llama_zoo, tmp_path, recipe, flags):
    pytest.importorskip("mergekit")
    out, yml = tmp_path / "soup", tmp_path / "soup.mergekit.yml"
    run = subprocess.run([sys.executable, "-m", "soup_core", "make", recipe, str(llama_zoo), *flags,
                          "--out", str(out), "--mergekit-yml", str(yml), "--json",
                          str(tmp_path / "make.json")], capture_output=True, text=True, cwd=ROOT, env=THIS_TREE, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "make.json").read_text())["mergekit_yml"] == str(yml)
    theirs, ours = mergekit_merge(yaml.safe_load(yml.read_text()), tmp_path / "mergekit"), load_state_dict(out)
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6), key


def test_the_export_pages_mergekit_yaml_is_the_one_soup_make_writes(tmp_path):
    from soup_core.export import Candidate, plan_export
    from soup_core.mergekit_config import mergekit_of_export
    from soup_core.zoo import open_zoo
    zoo = open_zoo("digits-finetune", device="cpu")
    plan = plan_export(zoo, Candidate.of_recipe("weighted", weights="ft-00=0,ft-05=3"))
    yml = tmp_path / "weighted.yml"
    run = subprocess.run([sys.executable, "-m", "soup_core", "make", "weighted", "digits-finetune", "--weights",
                          "ft-00=0,ft-05=3", "--mergekit-yml", str(yml)], capture_output=True, text=True, cwd=ROOT, env=THIS_TREE,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert mergekit_of_export(zoo, plan.provenance) == yml.read_text()
    assert "single files" in yml.read_text()  # mergekit needs Hugging Face folders, and the file says so
    models = yaml.safe_load(yml.read_text())["models"]
    assert len(models) == 31 and models[4]["parameters"]["weight"] == pytest.approx(3 / 33)
    point = plan_export(zoo, Candidate.point(("base", "ft-00", "ft-01"), (1.0, 0.5), "interpolate"))
    assert mergekit_of_export(zoo, point.provenance) is None
    assert mergekit_of_export(zoo, plan.provenance, local_names=("ft-05",)) is None


# --- more hand-worked cases, one per parameter (what a partial `make mutate` run found unpinned) ------------------

def test_task_arithmetic_normalized_divides_by_the_weights_sum():
    method = task_vector_method("task-arithmetic", [1.0, 3.0], normalize=True)
    # θ0 + (δ_A + 3·δ_B) / 4 = 1 + [[2.5, 6], [2, 0.5]] / 4
    assert combine(method, A, B).tolist() == [[1.625, 2.5], [1.5, 1.125]]


def test_ties_elects_the_sign_of_the_weighted_sum():
    method = task_vector_method("ties", [2.0, 1.0], sparsify="magnitude", density=1.0, consensus=True, normalize=True)
    a, b, base = t(1.0), t(-1.5), t(0.0)
    # weighted: 2·1 + 1·(−1.5) = 0.5 > 0, so only A's entry joins: 2 / 2 = 1 (unweighted signs would pick B's −1.5)
    assert method.combine([a, b], base, None, key="w").tolist() == [1.0]


def test_dare_keeping_everything_is_task_arithmetic_and_breadcrumbs_ties_trims_then_elects():
    dare = task_vector_method("dare-linear", [1.0, 0.5], sparsify="random", density=1.0, rescale="l1", scale=0.5)
    assert combine(dare, A, B).tolist() == combine(task_vector_method("ta", [1.0, 0.5], scale=0.5), A, B).tolist()
    crumbs = task_vector_method("breadcrumbs-ties", [1.0, 1.0], sparsify="magnitude_outliers", density=0.5,
                                gamma=0.25, consensus=True)
    # 4 entries, density 0.5, gamma 0.25: drop the smallest and the largest, keep the two between (by rank)
    # |δ_A| sorted 0, 0.5, 1, 1 → keep 0.5 and the first 1 → [[1, 0], [0, 0.5]]
    # |δ_B| = 0.5, 2, 1, 0 sorted 0, 0.5, 1, 2 → keep 0.5 and 1 → [[0.5, 0], [1, 0]]
    # sums [[1.5, 0], [1, 0.5]], all +: no normalize, so the agreeing entries add up
    assert combine(crumbs, A, B).tolist() == [[2.5, 1.0], [2.0, 1.5]]


def test_the_magnitude_threshold_is_the_kth_largest_and_gamma_zero_is_ties_trim():
    from soup_core.merge.task_vectors import kth_largest_magnitude
    delta = torch.randn(1000, dtype=F64, generator=torch.Generator().manual_seed(3))
    ordered = delta.abs().sort(descending=True).values
    for k in (1, 17, 500, 1000):
        assert kth_largest_magnitude(delta, k) == float(ordered[k - 1])
    assert torch.equal(outlier_mask(delta, 0.3, 0.0), magnitude_mask(delta, 0.3))
    assert bool(outlier_mask(delta, 1.0, 0.5).all()) and int(magnitude_mask(delta, 0.0).sum()) == 0


def test_karcher_leaves_zero_tensors_out_of_the_direction_but_not_out_of_the_norm():
    method = karcher()
    # directions: only (3, 4); norm: the mean of 0 and 5
    assert torch.allclose(method.combine([t(0.0, 0.0), t(3.0, 4.0)], None, None), t(1.5, 2.0), atol=1e-12)
    assert method.combine([t(0.0, 0.0), t(0.0, 0.0)], None, None).tolist() == [0.0, 0.0]
    assert method.combine([t(3.0, 4.0)], None, None).tolist() == [3.0, 4.0]


def test_slerp_coefficients_on_the_circle_and_at_the_guards():
    from soup_core.merge.slerp import slerp_coefficients
    a, b = slerp_coefficients(0.25, 1.0, 1.0, 0.0)  # orthogonal unit vectors: θ = π/2
    assert (a, b) == pytest.approx((math.sin(3 * math.pi / 8), math.sin(math.pi / 8)), abs=1e-15)
    assert slerp_coefficients(0.25, 4.0, 9.0, -6.0) == (0.75, 0.25)  # antiparallel: the straight line
    assert slerp_coefficients(0.25, 0.0, 1.0, 0.0) == pytest.approx((math.sin(3 * math.pi / 8), math.sin(math.pi / 8)))


@pytest.mark.parametrize("text, value", [("true", True), ("Yes", True), ("1", True), ("off", False), ("0", False),
                                         (False, False)])
def test_yes_no_parameters_read_their_spellings(text, value):
    assert RECIPES["ties"].resolve({"normalize": text})["normalize"] is value


def test_yes_no_parameters_refuse_anything_else():
    with pytest.raises(RecipeError, match="normalize must be a bool, not 'maybe'"):
        RECIPES["ties"].resolve({"normalize": "maybe"})


def test_every_merge_method_is_weight_only_and_on_the_board_but_slerp():
    for name in ("task-arithmetic", "ties", "dare-linear", "dare-ties", "breadcrumbs", "breadcrumbs-ties", "wise-ft",
                 "lines"):
        recipe = RECIPES[name]
        assert recipe.needs_base and not recipe.needs_evaluator and recipe.board and recipe.merge_path
        assert recipe.family == "merge" and recipe.plan_merge(("a", "b"), {}).method.needs_base
    assert RECIPES["slerp"].takes(2) and not RECIPES["slerp"].takes(3) and not RECIPES["karcher"].needs_base
    assert not RECIPES["slerp"].board  # a pair's merge: the board makes every recipe from all checkpoints


@pytest.mark.parametrize("max_iter", [0, 1, 2, 3, 20])
def test_the_karcher_mean_takes_mergekits_steps_one_by_one(max_iter):
    """mergekit's own karcher_merge_tensors on the same tensors (one of them zero) after each number of
    steps: the trajectory agrees, not only the fixed point both converge to."""
    mergekit_karcher = pytest.importorskip("mergekit.merge_methods.karcher")
    from soup_core.merge.karcher import karcher_mean
    generator = torch.Generator().manual_seed(7)
    tensors = [torch.randn(50, generator=generator, dtype=torch.float64) * scale for scale in (1.0, 3.0, 0.5)]
    tensors.append(torch.zeros(50, dtype=torch.float64))
    theirs = mergekit_karcher.karcher_merge_tensors(tensors, [0.25] * 4, max_iter=max_iter, tol=1e-5)
    torch.testing.assert_close(karcher_mean(tensors, max_iter=max_iter, tol=1e-5), theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [0.25, 0.5, 0.9])
def test_slerp_coefficients_worked_by_hand(t):
    """a = (½, 0) and b = (0.3, 0.3) are 45° apart (norms below 1, a·b ≠ 0): sin((1 − t)·π/4)/sin(π/4) of a
    and sin(t·π/4)/sin(π/4) of b; a zero a counts as norm 1; parallel and opposite ends take the line."""
    from soup_core.merge.slerp import slerp_coefficients
    quarter = math.pi / 4
    expected = (math.sin((1 - t) * quarter) / math.sin(quarter), math.sin(t * quarter) / math.sin(quarter))
    assert slerp_coefficients(t, 0.25, 0.18, 0.15) == pytest.approx(expected, rel=1e-12)
    assert slerp_coefficients(t, 0.0, 2.0, 0.0) == pytest.approx(  # cos 0: 90°
        (math.sin((1 - t) * 2 * quarter), math.sin(t * 2 * quarter)), rel=1e-12)
    assert slerp_coefficients(t, 1.0, 4.0, 1.9995) == pytest.approx((1 - t, t))  # cos 0.99975: the line
    assert slerp_coefficients(t, 1.0, 4.0, -1.9995) == pytest.approx((1 - t, t))  # antiparallel too
    assert slerp_coefficients(t, 1.0, 1.0, 0.999) != pytest.approx((1 - t, t), rel=1e-9)  # cos 0.999: still the arc


def test_trim_drop_and_rescale_masks_worked_by_hand():
    """TIES' trim keeps the density share of largest |δ| (ties: the first ones); Breadcrumbs drops
    the gamma share of largest and then the smallest; the kept entries are rescaled by nothing, by
    1/density (DARE), or to the L1 norm they had (mergekit)."""
    from soup_core.merge.task_vectors import magnitude_mask, outlier_mask, rescaled
    ties = torch.tensor([1.0, -1.0, 1.0, 0.5])
    assert magnitude_mask(ties, 0.5).tolist() == [True, True, False, False]  # three tie at 1: the first two
    assert magnitude_mask(torch.tensor([0.2, -3.0, 1.0]), 0.4).tolist() == [False, True, False]  # at least one
    assert magnitude_mask(ties, 1.0).all() and not magnitude_mask(ties, 0.0).any()
    delta = torch.tensor([0.1, -5.0, 0.3, 0.2, 4.0, -0.05, 1.0, 0.7, -0.6, 0.4])
    # |δ| ascending: .05 .1 .2 .3 .4 .6 .7 1 4 5; drop 2 largest (4, 5), keep the next 5: .3 .4 .6 .7 1
    assert outlier_mask(delta, 0.5, 0.2).nonzero().reshape(-1).tolist() == [2, 6, 7, 8, 9]
    assert outlier_mask(delta, 0.9, 0.5).nonzero().reshape(-1).tolist() == [0, 2, 3, 4, 5, 6, 7, 8, 9]  # 9 stay
    assert outlier_mask(delta, 1.0, 0.2).all()
    d, mask = torch.tensor([2.0, -1.0, 4.0, 1.0]), torch.tensor([True, False, True, False])
    assert rescaled(d, mask, "none", 0.5).tolist() == [2.0, 0.0, 4.0, 0.0]
    assert rescaled(d, mask, "density", 0.5).tolist() == [4.0, 0.0, 8.0, 0.0]
    assert rescaled(d, mask, "l1", 0.5).tolist() == pytest.approx([8 / 3, 0.0, 16 / 3, 0.0])  # L1 8 from 6
    assert d.tolist() == [2.0, -1.0, 4.0, 1.0]  # not in place: the caller's tensor is left
    assert rescaled(d, mask, "none", 0.5, in_place=True) is d and d.tolist() == [2.0, 0.0, 4.0, 0.0]
    assert rescaled(torch.zeros(3), torch.tensor([True, False, True]), "l1", 0.5).tolist() == [0.0, 0.0, 0.0]


def test_trim_and_drop_at_their_edges_worked_by_hand():
    """Ties at the threshold keep the first entries whatever their sign; a one-entry tensor keeps it;
    the early returns are masks (bool) too; both selections find the same k-th largest |δ|; the
    Breadcrumbs sort keeps equal magnitudes in place; nothing kept divides by nothing."""
    from soup_core.merge.task_vectors import kth_largest_by_kthvalue, kth_largest_by_partition
    assert magnitude_mask(torch.tensor([2.0, -2.0, 1.0]), 0.34).tolist() == [True, False, False]
    assert magnitude_mask(torch.tensor([-2.0, 2.0, 1.0]), 0.34).tolist() == [True, False, False]
    assert magnitude_mask(torch.tensor([3.0, 2.0, -2.0, 1.0]), 0.5).tolist() == [True, True, False, False]
    assert magnitude_mask(torch.tensor([2.0]), 0.5).tolist() == [True]
    ones = torch.ones(3)
    for mask in (magnitude_mask(ones, 0.0), magnitude_mask(ones, 1.0), outlier_mask(ones, 1.0, 0.1)):
        assert mask.dtype == torch.bool
    delta = torch.tensor([0.5, -4.0, 3.0, -0.25, 3.0, 1.0])
    for select in (kth_largest_by_partition, kth_largest_by_kthvalue):
        assert [select(delta, k) for k in range(1, 7)] == [4.0, 3.0, 3.0, 1.0, 0.5, 0.25]
    # four equal magnitudes, drop the top quarter and keep half: the 2nd and 3rd, in place
    assert outlier_mask(torch.tensor([1.0, -1.0, 1.0, -1.0]), 0.5, 0.25).tolist() == [False, True, True, False]
    nothing = torch.zeros(3, dtype=torch.bool)
    assert rescaled(torch.tensor([1.0, 2.0, 3.0]), nothing, "density", 0.0).tolist() == [0.0, 0.0, 0.0]
    assert rescaled(torch.tensor([1.0, 2.0, 3.0]), nothing, "l1", 0.0).tolist() == [0.0, 0.0, 0.0]


def test_the_karcher_defaults_are_mergekits():
    """Ten steps at tolerance 1e-5, as mergekit's karcher: on tensors still moving after the tenth step
    (an eleventh moves the mean by more than 1e-5), the default mean is mergekit's default one."""
    mergekit_karcher = pytest.importorskip("mergekit.merge_methods.karcher")
    from soup_core.merge.karcher import karcher_mean
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(3, generator=generator, dtype=F64) * scale for scale in (1.0, 3.0, 0.5, 2.0)]
    theirs = mergekit_karcher.karcher_merge_tensors(tensors, [0.25] * 4)
    assert not torch.allclose(theirs, mergekit_karcher.karcher_merge_tensors(tensors, [0.25] * 4, max_iter=11),
                              rtol=0, atol=1e-5)
    torch.testing.assert_close(karcher_mean(tensors), theirs, rtol=1e-12, atol=1e-12)
    stored = [t.float() for t in tensors]  # the method widens each block to float64 itself
    torch.testing.assert_close(karcher().combine(stored, None, None),
                               mergekit_karcher.karcher_merge_tensors([t.double() for t in stored], [0.25] * 4),
                               rtol=1e-12, atol=1e-12)


def test_dare_drops_with_a_seed_of_its_own_for_each_tensor_and_ingredient():
    """DARE's mask for ingredient i on tensor ``key`` is drawn from ``tensor_seed(seed, key, i)`` (seed 0
    by default), so a tensor's drop does not depend on which tensors came before it; the kept entries
    are divided by the density."""
    from soup_core.merge.task_vectors import tensor_seed
    base = torch.zeros(40, dtype=F64)
    deltas = [torch.linspace(-1, 1, 40, dtype=F64), torch.linspace(2, 0, 40, dtype=F64)]
    merged = task_vector_method("dare-linear", [1.0, 0.5], sparsify="random", density=0.5, rescale="density").combine(
        [base + d for d in deltas], base, None, key="layer.weight")
    expected = sum(w * d * random_mask(d, 0.5, tensor_seed(0, "layer.weight", i)) / 0.5
                   for i, (w, d) in enumerate(zip((1.0, 0.5), deltas)))
    torch.testing.assert_close(merged, expected, rtol=1e-15, atol=1e-15)


def test_normalized_weights_that_sum_to_zero_are_not_divided_by_it():
    """mergekit's rule: with ``normalize`` the merged update is divided by the weights' sum, unless that
    sum is 0 (|Σw| < 1e-8), when it is left as it is."""
    a, b, base = t(1.0, 2.0), t(3.0, -1.0), t(0.0, 0.0)
    method = task_vector_method("task-arithmetic", [1.0, -1.0], normalize=True)
    assert method.combine([a, b], base, None, key="w").tolist() == [-2.0, 3.0]


def test_a_method_that_trims_takes_each_tensor_whole():
    """TIES' trim and Breadcrumbs' drop rank a whole tensor's entries, and DARE's drop is seeded per
    tensor: they take each tensor whole; task arithmetic, which only adds, works on blocks."""
    assert not task_vector_method("dare-linear", [1.0], sparsify="random").elementwise
    assert not task_vector_method("ties", [1.0], sparsify="magnitude").elementwise
    assert not task_vector_method("breadcrumbs", [1.0], sparsify="magnitude_outliers").elementwise
    assert task_vector_method("task-arithmetic", [1.0]).elementwise is True


def test_the_karcher_mean_of_directions_that_cancel_is_mergekits():
    """Two opposite directions have no mean direction: both start from the first one, as mergekit does."""
    mergekit_karcher = pytest.importorskip("mergekit.merge_methods.karcher")
    from soup_core.merge.karcher import karcher_mean
    v = torch.tensor([3.0, 4.0, 0.0], dtype=F64)
    tensors = [v, -2 * v, torch.tensor([0.0, 0.0, 1.0], dtype=F64)]
    for chosen in (tensors[:2], tensors):
        theirs = mergekit_karcher.karcher_merge_tensors(chosen, [1 / len(chosen)] * len(chosen))
        torch.testing.assert_close(karcher_mean(chosen), theirs, rtol=1e-12, atol=1e-12)
