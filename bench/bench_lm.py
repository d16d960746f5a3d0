"""The language-model sample zoo on this machine: scoring, a greedy soup, a landscape, and the
board's λ searches with and without one merged update for every λ.

``python bench/bench_lm.py`` (``code-lm``: GPT-2, 0.93 M parameters, 16 fine-tunings; 48
sequences of up to 64 tokens a split). Each λ search is run twice in this process, the merged
update reused across λ (ours) and merged again for every λ (what the search did before), and
the two must choose the same λ and make the same soup to the bit.
"""

from __future__ import annotations

import time

import torch

from soup_core.landscape.engine import SliceEvaluator
from soup_core.merge import task_vectors
from soup_core.recipes import RECIPES
from soup_core.zoo import open_zoo

SEARCHED = ("ties", "dare-linear", "dare-ties", "breadcrumbs", "breadcrumbs-ties")


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def lambda_searches(zoo) -> None:
    ingredients, base = zoo.ingredients(), zoo.base
    print("| method | λ search, update reused (s) | merged again for every λ (s) | speed-up | same λ and soup |")
    print("|---|---:|---:|---:|---|")
    for name in SEARCHED:
        recipe = RECIPES[name]

        def search(recipe=recipe):
            return recipe.make(ingredients, zoo.evaluator, base=base, **{"normalize": True, "lambda": "val"})
        ours, ours_s = timed(search)
        kept, task_vectors.REUSED_UPDATE_BYTES = task_vectors.REUSED_UPDATE_BYTES, 0
        try:
            before, before_s = timed(search)
        finally:
            task_vectors.REUSED_UPDATE_BYTES = kept
        same = ours.options["lambda"] == before.options["lambda"] and all(
            torch.equal(ours.state_dict[k], before.state_dict[k]) for k in ours.state_dict)
        assert same, name
        print(f"| {name} | {ours_s:.1f} | {before_s:.1f} | {before_s / ours_s:.1f}× | {same} |")


def main() -> None:
    zoo, open_s = timed(lambda: open_zoo("code-lm", device="cpu"))
    evaluator = zoo.evaluator
    tokens = {s: len(evaluator.labels(s)) for s in evaluator.split_names}
    print(f"code-lm: {len(zoo.names)} checkpoints, tokens per split {tokens}, opened in {open_s:.1f} s\n")
    _, score_s = timed(lambda: [evaluator.evaluate(zoo.state_dict(n)) for n in zoo.all_names])
    greedy, greedy_s = timed(lambda: RECIPES["greedy"].make(zoo.ingredients(), evaluator))
    names = ("base", "full-00", "lora-03")
    origin = zoo.state_dict(names[0])
    floats = [k for k, v in origin.items() if v.is_floating_point()]
    directions = [{k: zoo.state_dict(n)[k] - origin[k] for k in floats} for n in names[1:]]
    engine = SliceEvaluator(evaluator, origin, directions, bn="keep")
    grid = torch.cartesian_prod(torch.linspace(-0.2, 1.2, 21), torch.linspace(-0.2, 1.2, 21))
    _, landscape_s = timed(lambda: engine.evaluate(grid, ("val",)))
    print("| step | seconds |\n|---|---:|")
    print(f"| score all 17 models on 4 splits | {score_s:.1f} |")
    print(f"| greedy soup ({len(greedy.ingredients)} ingredient(s) kept) | {greedy_s:.1f} |")
    print(f"| landscape, 21×21 = 441 points on val, strategy {engine.strategy} | {landscape_s:.1f} |\n")
    lambda_searches(zoo)


if __name__ == "__main__":
    main()
