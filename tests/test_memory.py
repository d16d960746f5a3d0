"""Memory an evaluated recipe holds, specified: chosen from a budget, bounded, and exact where it says so."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soup_core.errors import RecipeError
from soup_core.memory import ByteSize, choose_precision, largest_model, plan_bytes, state_plan
from soup_core.params import RunningSum, uniform_average
from soup_core.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]


def states(count: int, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=generator)
    return [{"w": (base + 0.01 * torch.randn(64, 32, generator=generator)).to(dtype),
             "b": torch.randn(32, generator=generator).to(dtype), "steps": torch.tensor(7 + i)}
            for i in range(count)]


def test_the_plan_counts_the_sum_the_candidate_and_a_moved_candidate_by_hand():
    # 1,000 bf16 parameters: float64 sum 8,000 B + candidate 2,000 B (+ 2,000 B moved to a GPU)
    assert plan_bytes(1000, 2, "float64") == 10_000
    assert plan_bytes(1000, 2, "float32") == 6_000
    assert plan_bytes(1000, 2, "float64", staged=True) == 12_000
    # 80 GB, fp32 model: 4 (model) + 8 (sum) + 4 (candidate) = 16 bytes a parameter
    assert largest_model(80 * 10**9, 4, "float64") == 5 * 10**9


def test_the_plan_of_a_state_counts_integer_buffers_once():
    state = states(1)[0]
    keys = ["w", "b"]
    floats = (64 * 32 + 32)
    # the float64 sum, the float32 candidate, the int64 counter, one float64 temporary of the largest tensor
    assert state_plan(state, keys, torch.device("cpu"), "float64") == floats * 8 + floats * 4 + 8 + 64 * 32 * 8


def test_auto_takes_float64_where_it_fits_float32_where_not_and_refuses_below_that():
    state, keys, cpu = states(1)[0], ["w", "b"], torch.device("cpu")
    float64, float32 = (state_plan(state, keys, cpu, p) for p in ("float64", "float32"))
    assert choose_precision("auto", state, keys, cpu, float64) == "float64"
    assert choose_precision("auto", state, keys, cpu, float64 - 1) == "float32"
    assert choose_precision("auto", state, keys, cpu, float32) == "float32"
    with pytest.raises(RecipeError, match=r"need 0\.00 GB on cpu, but 0\.00 GB is the memory budget"):
        choose_precision("auto", state, keys, cpu, float32 - 1)
    with pytest.raises(RecipeError, match="--sum-precision auto"):
        choose_precision("float64", state, keys, cpu, float32)


def test_a_float32_sum_holds_half_the_bytes_and_stays_within_its_error_bound():
    inputs = states(5)
    exact, half = RunningSum(precision="float64"), RunningSum(precision="float32")
    for i, state in enumerate(inputs):
        exact.add(str(i), state)
        half.add(str(i), state)
    assert half.nbytes * 2 == exact.nbytes == (64 * 32 + 32) * 8
    largest = torch.stack([s["w"].abs() for s in inputs]).amax(0)
    bound = 5 * 2.0**-24 * largest + torch.finfo(torch.float32).eps * largest  # k·u·max + the final rounding
    assert bool(((half.mean()["w"] - exact.mean()["w"]).abs() <= bound).all())
    half.remove("4")
    assert bool(((half.mean()["w"] - uniform_average(inputs[:4])["w"]).abs() <= bound).all())


def test_a_float32_sum_of_bfloat16_ingredients_equals_the_float64_soup():
    # bfloat16 keeps 8 bits: the float32 sum of 5 nearby values is exact, so the rounded mean is the same
    inputs = states(5, torch.bfloat16)
    means = []
    for precision in ("float64", "float32"):
        total = RunningSum(precision=precision)
        for i, state in enumerate(inputs):
            total.add(str(i), state)
        means.append(total.mean_with("x", inputs[0])["w"])
    assert torch.equal(*means)


def test_memory_budget_reads_sizes_and_refuses_nonsense():
    assert ByteSize("2GiB") == 2**31 and str(ByteSize("16GB")) == "16GB"
    with pytest.raises(RecipeError, match="is not a size"):
        RECIPES["greedy"].resolve({"memory_budget": "lots"})
    with pytest.raises(RecipeError, match="sum_precision must be one of auto, float64, float32"):
        RECIPES["greedy"].resolve({"sum_precision": "float16"})


@pytest.mark.parametrize("recipe", ["greedy", "pruned"])
def test_a_budget_between_the_two_plans_gives_a_float32_soup_with_the_same_ingredients(tiny_evaluator, tiny_states,
                                                                                    recipe):
    first = next(iter(tiny_states.values()))
    keys = [k for k, t in first.items() if t.is_floating_point()]
    budget = state_plan(first, keys, tiny_evaluator.device, "float32")
    exact = RECIPES[recipe].make(tiny_states, tiny_evaluator)
    small = RECIPES[recipe].make(tiny_states, tiny_evaluator, memory_budget=budget)
    assert exact.extras["sum_precision"] == "float64" and small.extras["sum_precision"] == "float32"
    assert small.ingredients == exact.ingredients
    for key, tensor in exact.state_dict.items():
        assert torch.allclose(small.state_dict[key].double(), tensor.double(), rtol=1e-6, atol=1e-7)
    with pytest.raises(RecipeError, match="the memory budget"):
        RECIPES[recipe].make(tiny_states, tiny_evaluator, memory_budget=budget - 1)


def test_the_readme_table_of_largest_models_is_what_the_plan_computes():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- largest-models -->")[1]
    rows = re.findall(r"^\| ([\d.]+) GiB \| (\w+) \| ([\d.]+) B \| ([\d.]+) B \|$", table, re.M)
    assert len(rows) >= 4
    for memory, dtype, float64, float32 in rows:
        size = {"bfloat16": 2, "float32": 4}[dtype]
        expected = [largest_model(int(float(memory) * 2**30), size, p) / 1e9 for p in ("float64", "float32")]
        assert [float(float64), float(float32)] == [round(e, 1) for e in expected], (memory, dtype)


def test_soup_make_takes_a_memory_budget_and_says_when_it_is_too_small(tmp_path):
    command = [sys.executable, "-m", "soup_core", "make", "greedy", "digits-finetune", "--ingredients",
               "ft-00,ft-01,ft-02", "--memory-budget", "1KB", "--json", str(tmp_path / "soup.json")]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode != 0
    assert "the memory budget" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "soup.json").exists()
