"""What each error of the core says, word for word.

An error is the whole of what a user learns when something is wrong, so its words are part of the
behaviour: which input, which value, what is allowed, what to do. Each case below provokes one error
through the public function that raises it and compares the whole line (not a fragment: a fragment
still matches a garbled or truncated message).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from soup_core.errors import CheckpointError, RecipeError, SoupError
from soup_core.geometry import gram_matrix, plane_basis
from soup_core.merge.engine import MergeRun, check_compatible
from soup_core.merge.methods import mean_of
from soup_core.merge.slerp import slerp
from soup_core.merge.sources import MappingSource, SafetensorsSource, open_source
from soup_core.merge.task_vectors import task_vector_method
from soup_core.params import RunningSum, weighted_average
from soup_core.recipes import RECIPES, get_recipe
from soup_core.recipes.parameters import PASSES, SEED, MixingWeights, Parameter, Params, switch
from soup_core.significance import score_interval
from tests.conftest import write_sharded


ONE, TWO = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"  # a two-shard folder's files


def message(error: type[Exception], call) -> str:
    with pytest.raises(error) as raised:
        call()
    return str(raised.value)


def point(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


# -- parameters and recipes ------------------------------------------------------------------

def test_a_parameter_names_itself_the_bound_and_the_value():
    assert message(RecipeError, lambda: Parameter("t", float, 0.5, "").check("nan")) == \
        "t must be a finite number, not 'nan'"
    assert message(RecipeError, lambda: PASSES.check(101)) == "passes must be at most 100, not 101"
    assert PASSES.check(100) == 100 and Parameter("alpha", float, 0.5, "", maximum=1.5).check("1.5") == 1.5
    assert message(RecipeError, lambda: SEED.check(2**63)) == \
        f"seed must be at most {2**63 - 1}, not {2**63}"
    assert message(RecipeError, lambda: Parameter("alpha", float, 0.5, "", maximum=1.5).check(2)) == \
        "alpha must be at most 1.5, not 2"
    assert message(RecipeError, lambda: Parameter("on", bool, False, "").check("maybe")) == \
        "on must be a bool, not 'maybe'"


def test_a_switch_refuses_with_the_value_it_was_given():
    assert message(ValueError, lambda: switch("maybe")) == "maybe"
    assert [switch(v) for v in ("true", " YES", "1", "on", "false", "No", "0", "off ")] == [True] * 4 + [False] * 4


def test_an_undeclared_parameter_lists_the_declared_ones():
    assert message(AttributeError, lambda: Params({"t": 0.5, "seed": 1}).alpha) == \
        "no parameter 'alpha' (declared: t, seed)"
    assert message(AttributeError, lambda: Params({}).alpha) == "no parameter 'alpha' (declared: none)"


def test_weights_for_names_that_are_not_ingredients():
    assert message(RecipeError, lambda: MixingWeights({"c": 1.0}).for_names(("a", "b"))) == \
        "weights name c, which is not among this soup's ingredients (a, b); name ingredients only"
    assert message(RecipeError, lambda: MixingWeights({"c": 1.0, "d": 2.0}).for_names(("a", "b"))) == \
        "weights name c, d, which are not among this soup's ingredients (a, b); name ingredients only"
    assert message(RecipeError, lambda: MixingWeights({"a": 0.0, "b": 0.0}).for_names(("a", "b"))) == \
        "every weight is 0: give at least one ingredient a positive weight"
    assert MixingWeights({"a": 0.0, "c": 2.0}).for_names(("a", "b", "c")) == {"b": 1.0, "c": 2.0}  # 0 leaves out


def test_a_recipe_names_what_it_takes():
    assert message(RecipeError, lambda: get_recipe("soupy")) == \
        f"unknown recipe 'soupy'; choose one of {', '.join(RECIPES)}"
    assert message(RecipeError, lambda: RECIPES["uniform"].resolve({"passes": 2, "alpha": 1})) == \
        "the Uniform soup takes no alpha, passes; it takes no parameters"
    assert message(RecipeError, lambda: RECIPES["slerp"].resolve({"passes": 2})) == \
        "the SLERP of two models takes no passes; it takes t"
    assert message(RecipeError, lambda: RECIPES["karcher"].resolve({"passes": 2})) == \
        "the Karcher mean takes no passes; it takes max_iter, tol"
    from soup_core.recipes.parameters import HeldOutSplit
    assert message(RecipeError, lambda: HeldOutSplit("test")) == \
        ("val_split must be a held-out split such as val, not 'test': a choice made on the splits that report "
         "it makes their scores meaningless")


def test_a_plan_says_which_parameter_needs_the_evaluator():
    assert message(RecipeError, lambda: RECIPES["ties"].plan_merge(("a", "b"), {"lambda": "val"})) == \
        ("lambda=val is chosen by scoring soups on the val split: make the soup with the zoo's evaluator (its "
         "result records the lambda chosen), or give a number")
    assert message(RecipeError, lambda: RECIPES["lines"].plan_merge(("a", "b"), {"alpha": "val", "beta": "val"})) == \
        "the LiNeS chooses one parameter on val at a time, not alpha and beta; give the others a number"


def test_a_recipe_names_the_ingredient_or_base_that_holds_nan():
    fine, broken = {"w": torch.ones(2)}, {"w": torch.tensor([1.0, math.nan])}
    assert message(CheckpointError, lambda: RECIPES["uniform"].make({"a": fine, "b": broken})) == \
        "b: tensor 'w' holds NaN or Inf values; a soup with it would be NaN too — leave this checkpoint out"
    assert message(CheckpointError, lambda: RECIPES["task-arithmetic"].make({"a": fine, "b": fine}, base=broken)) == \
        "base: tensor 'w' holds NaN or Inf values; a soup with it would be NaN too — leave this checkpoint out"


def test_a_recipe_that_chooses_refuses_a_missing_evaluator_and_a_shift(tiny_evaluator, tiny_states):
    assert message(RecipeError, lambda: RECIPES["greedy"].make(tiny_states)) == \
        ("the Greedy soup scores candidates on a held-out val split and needs an evaluator; give the zoo one "
         "(uniform and Model Stock soups do not)")
    assert message(RecipeError, lambda: RECIPES["greedy"].make(tiny_states, tiny_evaluator,
                                                                val_split="shift")) == \
        ("val_split must be a held-out split such as val, not 'shift': a choice made on the splits that report "
         "it makes their scores meaningless (it is a distribution shift)")


# -- running sums and averages -----------------------------------------------------------------

def test_running_sums_and_averages_say_what_is_missing():
    assert message(RecipeError, lambda: RunningSum(precision="float16")) == \
        "precision must be one of float64, float32, not 'float16'"
    assert message(RecipeError, lambda: RunningSum().mean()) == \
        "the soup is empty: add at least one ingredient before taking its mean"
    soup = RunningSum()
    soup.add("a", point(1.0))
    assert message(RecipeError, lambda: soup.mean_without("a")) == \
        "cannot remove 'a': a soup needs at least one ingredient"
    assert message(RecipeError, lambda: weighted_average([point(1.0), point(2.0)], [1.0])) == \
        "need one weight per state dict: 2 state dicts, 1 weights"


# -- geometry and significance ---------------------------------------------------------------------

def test_geometry_names_the_points_that_make_no_plane():
    assert message(SoupError, lambda: gram_matrix([])) == "need at least one state dict"
    assert message(SoupError, lambda: plane_basis(point(0, 0), point(0, 0), point(1, 1), names=("x", "y", "z"))) == \
        "x and y are the same point; a plane needs three distinct, non-collinear points"
    assert message(SoupError, lambda: plane_basis(point(0, 0), point(1, 1), point(2, 2), names=("x", "y", "z"))) == \
        "x, y, z are collinear; pick a third point off the line through the first two"


def test_a_paired_interval_names_counts_that_cannot_be():
    assert message(SoupError, lambda: score_interval(3, 4, 6)) == \
        "a paired interval needs 0 <= a_only + b_only <= n images, got 3 + 4 of 6"
    assert message(SoupError, lambda: score_interval(-1, 2, 6)) == \
        "a paired interval needs 0 <= a_only + b_only <= n images, got -1 + 2 of 6"
    assert message(SoupError, lambda: score_interval(0, 0, 0)) == \
        "a paired interval needs 0 <= a_only + b_only <= n images, got 0 + 0 of 0"


# -- the merge engine and its methods ------------------------------------------------------------

def test_a_merge_says_which_input_is_wrong():
    ties = task_vector_method("ties", [1.0, 1.0], sparsify="magnitude", consensus=True)
    assert message(RecipeError, lambda: MergeRun(mean_of(), [])) == "a merge needs at least one ingredient"
    assert message(RecipeError, lambda: MergeRun(ties, [MappingSource(point(1.0))])) == \
        "ties needs a base checkpoint θ0 (`base = ...` in zoo.toml)"
    a, b = MappingSource({"w": torch.zeros(2), "v": torch.zeros(1)}, name="a"), MappingSource({"w": torch.zeros(2),
                                                                                              "u": torch.zeros(1)},
                                                                                             name="b")
    assert message(CheckpointError, lambda: check_compatible([a, b])) == \
        ("b and a hold different tensors: b lacks 'v' and has 'u' that a has not; "
         "a merge needs the same architecture")
    nan = MappingSource({"w": torch.tensor([1.0, math.nan])}, name="broken")
    run = MergeRun(mean_of(), [MappingSource(point(1.0, 2.0), name="fine"), nan])
    assert message(CheckpointError, lambda: dict((k, v) for k, _, v in run.blocks())) == \
        "broken: tensor 'w' holds NaN or Inf values; a soup with it would be NaN too — leave this checkpoint out"
    huge = MergeRun(task_vector_method("task-arithmetic", [1.0, 1.0], scale=1e30),
                    [MappingSource(point(3e38)), MappingSource(point(3e38))], base=MappingSource(point(0.0)))
    assert message(CheckpointError, lambda: list(huge.blocks())) == \
        ("'w': the merged values overflow float32 (weights this far outside the inputs' range have no finite "
         "value in that dtype)")


def test_a_merge_method_refuses_what_it_cannot_do():
    assert message(RecipeError, lambda: task_vector_method("ties", [1.0], sparsify="biggest")) == \
        "ties: unknown sparsification 'biggest'; one of magnitude, random, magnitude_outliers"
    assert message(RecipeError, lambda: task_vector_method("ties", [1.0], rescale="double")) == \
        "ties: rescale must be one of none, l1, density, not 'double'"
    three = [MappingSource(point(1.0)), MappingSource(point(2.0)), MappingSource(point(3.0))]
    assert message(RecipeError, lambda: list(MergeRun(task_vector_method("ties", [1.0, 1.0]), three,
                                                      base=MappingSource(point(0.0))).blocks())) == \
        "ties: 2 weights for 3 ingredients; give one weight each"
    assert message(RecipeError, lambda: list(MergeRun(slerp(0.5), three).blocks())) == \
        "SLERP interpolates between exactly two ingredients, not 3"


# -- checkpoints read by byte ranges -------------------------------------------------------------

def test_a_checkpoint_folder_names_the_missing_file(tmp_path):
    tmp_path = tmp_path.resolve()  # a file found is named by its resolved path
    assert message(CheckpointError, lambda: open_source(tmp_path / "nowhere")) == \
        f"{tmp_path / 'nowhere'}: no such file or folder"
    folder = tmp_path / "sharded"
    index = write_sharded(folder, {ONE: {"a": torch.zeros(2)}}, {"a": ONE, "b": TWO})
    assert message(CheckpointError, lambda: open_source(folder)) == \
        f"{index}: shard '{TWO}' is missing from {folder}"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["fc"]}))
    save_file({"base_model.model.fc.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.fc.lora_B.weight": torch.zeros(3, 2)}, str(adapter / "adapter_model.safetensors"))
    assert message(CheckpointError, lambda: open_source(adapter)) == \
        (f"{adapter}: a LoRA adapter is an update of θ0; give its zoo a base "
         "(base = \"...\" in zoo.toml: the model the adapter was trained on)")


def test_a_checkpoint_names_the_tensor_and_the_shards(tmp_path):
    tmp_path = tmp_path.resolve()  # a file found is named by its resolved path
    eight_bit = tmp_path / "fp8.safetensors"
    save_file({"z": torch.zeros(2, dtype=torch.float8_e4m3fn)}, str(eight_bit))
    assert message(CheckpointError, lambda: open_source(eight_bit)) == \
        (f"{eight_bit}: tensor 'z' has dtype float8_e4m3fn, which soups do not average; "
         "convert to bfloat16, float16 or float32")
    folder = tmp_path / "twice"
    write_sharded(folder, {ONE: {"a": torch.zeros(2)}, TWO: {"a": torch.zeros(2), "b": torch.zeros(2)}})
    assert message(CheckpointError, lambda: open_source(folder)) == \
        f"{folder}: tensor 'a' is in two shards ({ONE} and {TWO})"


def test_a_sharded_checkpoint_names_the_tensors_its_index_promises_and_no_shard_holds(tmp_path):
    tmp_path = tmp_path.resolve()  # a file found is named by its resolved path
    folder = tmp_path / "promised"
    index = write_sharded(folder, {ONE: {"a": torch.zeros(2)}}, {"a": ONE, "b": ONE})
    assert message(CheckpointError, lambda: open_source(folder)) == \
        f"{index}: keys listed in the index but in no shard: 'b'"


def test_a_checkpoint_cut_short_mid_read_names_the_byte_it_ended_at(tmp_path):
    """The file ends inside the tensor being read: the first read returns part, the next returns
    nothing, and the message names the file's new length (where the part ended), not where it began."""
    tmp_path = tmp_path.resolve()  # a file found is named by its resolved path
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(file))
    source = SafetensorsSource(tmp_path, [file])
    length = file.stat().st_size - 2000
    with open(file, "r+b") as handle:
        handle.truncate(length)
    assert message(CheckpointError, lambda: source.read("w")) == \
        (f"{file}: the file ended at byte {length:,} while it was being read (was it changed or truncated "
         "during the merge?); nothing was written")


def test_a_path_that_does_not_exist_is_named_as_given():
    """Relative stays relative: the user reads the path they typed."""
    assert message(CheckpointError, lambda: open_source(Path("no/such/model"))) == \
        "no/such/model: no such file or folder"


def test_a_recipe_says_how_many_ingredients_it_needs():
    from soup_core.recipes import Recipe
    assert message(RecipeError, lambda: RECIPES["slerp"].check_count(3)) == \
        "the SLERP of two models needs exactly 2 ingredient(s), got 3; choose them with --ingredients"
    assert message(RecipeError, lambda: RECIPES["model-stock"].check_count(1)) == \
        "the Model Stock needs at least 2 ingredient(s), got 1"
    ranged = Recipe("few", "Few soup", "", "uniform:uniform_soup", min_ingredients=2, max_ingredients=4)
    assert message(RecipeError, lambda: ranged.check_count(5)) == \
        "the Few soup needs 2 to 4 ingredient(s), got 5; choose them with --ingredients"
    assert message(RecipeError, lambda: ranged.check_count(1)) == "the Few soup needs 2 to 4 ingredient(s), got 1"


def test_each_merge_method_carries_the_name_its_errors_use():
    from soup_core.merge.karcher import karcher
    from soup_core.merge.lines import lines
    from soup_core.merge.methods import linear, model_stock, wise_ft
    assert message(RecipeError, lambda: MergeRun(wise_ft(0.5), [MappingSource(point(1.0))])) == \
        "wise-ft needs a base checkpoint θ0 (`base = ...` in zoo.toml)"
    methods = [mean_of(), linear([1.0]), wise_ft(0.5), model_stock(), karcher(), slerp(0.5)]
    assert [m.name for m in methods] == ["mean", "linear", "wise-ft", "model-stock", "karcher", "slerp"]
    assert lines([1.0], 0.5, 0.5).name == "lines"
