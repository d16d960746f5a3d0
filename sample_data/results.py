"""The README's results table: every recipe on ``digits-finetune``-style sweeps, over seeds.

    python -m sample_data.results [--zoo digits-finetune|digits-soup] [--seeds 5] [--models 32]
    python -m sample_data.results --committed [--zoo ...]   # seed 0 from the committed files only

θ0 (pretraining + linear probe) and the data splits are fixed; each sweep seed draws new
hyperparameters and training seeds for all fine-tuned models (seed 0 is the committed zoo).
Every choice is made on val; test and the shift average are reported only. Prints a
Markdown table of mean ± std over seeds, and for each recipe its test difference from the best
individual model and from the greedy soup, with how many seeds it was significantly better (↑)
or worse (↓) by an exact McNemar test at p < 0.05 on the 630 test images. The merge methods are
made as the app's board makes them (:attr:`Recipe.app_values`: the mean task vector, λ — LiNeS'
β — chosen on val).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sample_data.build import finetune_sweep, pretrain
from sample_data.paper import good_sweep, pretrain_on_source
from sample_data.digits import make_evaluator, make_mlp
from soup_core.evaluate import shift_average
from soup_core.recipes import RECIPES
from soup_core.significance import versus, versus_best
from soup_core.zoo import open_zoo

ROWS = ["best", "uniform", "greedy", "pruned", "learned", "learned-by-layer", "ensemble",
        "greedy-ensemble", "model-stock", "task-arithmetic", "ties", "dare-linear", "dare-ties", "breadcrumbs",
        "breadcrumbs-ties", "karcher", "wise-ft", "lines"]


def run_seed(theta0, seed: int, models: int, zoo: str = "digits-finetune") -> dict[str, tuple]:
    sweep = (good_sweep(theta0, models, sweep_seed=seed) if zoo == "digits-soup"
             else finetune_sweep(theta0, make_mlp, models, sweep_seed=seed))
    return score_recipes({name: state for name, (state, _) in sweep.items()}, theta0.state_dict())


def committed_seed(zoo: str) -> dict[str, tuple]:
    """Sweep seed 0 as committed: the zoo's own files, nothing trained but the learned soups."""
    opened = open_zoo(zoo, device="cpu")
    return score_recipes(opened.ingredients(), opened.base)


def score_recipes(ingredients, base) -> dict[str, tuple]:
    evaluator = make_evaluator(make_mlp, device="cpu")
    results = {}
    for name in ROWS:
        params = {"passes": 2} if name == "pruned" else dict(RECIPES[name].app_values)
        results[name] = RECIPES[name].make(ingredients, evaluator, base=base, **params)
    out = {}
    for name, result in results.items():
        m = result.metrics
        best = versus_best(result, ingredients, evaluator, ["test"])
        greedy = [] if name == "greedy" else versus(results["greedy"], result, ingredients, evaluator, ["test"])
        out[name] = (m["val"].accuracy, m["test"].accuracy, shift_average(m, evaluator.shift_names),
                     len(result.ingredients), *counted(best), *counted(greedy))
    return out


def counted(comparisons) -> tuple[float, int, int]:
    """(test difference, 1 if significantly better, 1 if significantly worse); zeros for none."""
    if not comparisons:
        return 0.0, 0, 0
    c = comparisons[0]
    return c.difference, int(c.significant and c.difference > 0), int(c.significant and c.difference < 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", type=int, default=32)
    parser.add_argument("--zoo", choices=["digits-finetune", "digits-soup"], default="digits-finetune",
                        help="the sweep: digits-finetune's (bad runs included) or digits-soup's (the paper's conditions)")
    parser.add_argument("--committed", action="store_true",
                        help="seed 0 only, from the committed checkpoints (the same digits on any machine)")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    if args.committed:
        per_seed = [committed_seed(args.zoo)]
        print(f"{args.zoo} as committed: {len(open_zoo(args.zoo).names)} fine-tuned models, sweep seed 0; accuracy in %")
        print_table(per_seed, mean_std=False)
        return
    theta0 = pretrain_on_source() if args.zoo == "digits-soup" else pretrain(make_mlp)
    per_seed = [run_seed(theta0, seed, args.models, args.zoo) for seed in range(args.seeds)]
    print(f"{args.zoo}: {args.models} fine-tuned models per sweep, {args.seeds} sweep seeds (0–{args.seeds - 1}); "
          "accuracy in %, mean ± std over seeds")
    print_table(per_seed)


def print_table(per_seed: list[dict[str, tuple]], mean_std: bool = True) -> None:

    def one(value: float) -> str:  # a small negative mean reads 0.0, not -0.0
        text = f"{value:.1f}"
        return "0.0" if text == "-0.0" else text

    def cell(values, percent=True):
        scale = 100 if percent else 1
        if not mean_std:
            return one(scale * values[0]) if percent else f"{values[0]:.0f}"
        mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{one(scale * mean)} ± {one(scale * std)}"

    seeds = "seeds " if mean_std else ""
    print(f"| recipe | val | test | shift avg | ingredients | test − best (points) | {seeds}p < 0.05 "
          f"| test − greedy (points) | {seeds}p < 0.05 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def verdict(better, worse) -> str:
        if mean_std:
            return f"{sum(better)}↑ {sum(worse)}↓ of {len(per_seed)}"
        return "better" if better[0] else "worse" if worse[0] else "no"

    for name in ROWS:
        cols = list(zip(*(seed[name] for seed in per_seed)))
        versus_best_cell = "—" if name == "best" else verdict(cols[5], cols[6])
        versus_greedy_cell = "—" if name == "greedy" else verdict(cols[8], cols[9])
        print(f"| {RECIPES[name].pretty_name} | {cell(cols[0])} | {cell(cols[1])} | {cell(cols[2])} | "
              f"{cell(cols[3], percent=False)} | {cell(cols[4])} | {versus_best_cell} | {cell(cols[7])} | "
              f"{versus_greedy_cell} |")


if __name__ == "__main__":
    main()
