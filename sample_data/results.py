"""The README's results table: every recipe on ``digits-finetune``-style sweeps, over seeds.

    python -m sample_data.results [--zoo digits-finetune|digits-soup] [--seeds 5] [--models 32]

θ0 (pretraining + linear probe) and the data splits are fixed; each sweep seed draws new
hyperparameters and training seeds for all fine-tuned models (seed 0 is the committed zoo).
Every choice is made on val; test and the shift average are reported only. Prints a
Markdown table of mean ± std over seeds, and for each recipe its test difference from the best
individual model with how many seeds it was significantly better (↑) or worse (↓) by an exact
McNemar test at p < 0.05 on the 630 test images.
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
from soup_core.significance import versus_best

ROWS = ["best", "uniform", "greedy", "pruned", "learned", "learned-by-layer", "ensemble",
        "greedy-ensemble", "model-stock"]


def run_seed(theta0, seed: int, models: int, zoo: str = "digits-finetune") -> dict[str, tuple]:
    sweep = (good_sweep(theta0, models, sweep_seed=seed) if zoo == "digits-soup"
             else finetune_sweep(theta0, make_mlp, models, sweep_seed=seed))
    ingredients = {name: state for name, (state, _) in sweep.items()}
    evaluator = make_evaluator(make_mlp, device="cpu")
    out = {}
    for name in ROWS:
        params = {"passes": 2} if name == "pruned" else {}
        result = RECIPES[name].make(ingredients, evaluator, base=theta0.state_dict(), **params)
        m = result.metrics
        test = next((c for c in versus_best(result, ingredients, evaluator) if c.split == "test"), None)
        out[name] = (m["val"].accuracy, m["test"].accuracy,
                     shift_average(m, evaluator.shift_names), len(result.ingredients),
                     0.0 if test is None else test.difference,
                     0 if test is None else int(test.significant and test.difference > 0),
                     0 if test is None else int(test.significant and test.difference < 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", type=int, default=32)
    parser.add_argument("--zoo", choices=["digits-finetune", "digits-soup"], default="digits-finetune",
                        help="the sweep: digits-finetune's (bad runs included) or digits-soup's (the paper's conditions)")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    theta0 = pretrain_on_source() if args.zoo == "digits-soup" else pretrain(make_mlp)
    per_seed = [run_seed(theta0, seed, args.models, args.zoo) for seed in range(args.seeds)]

    def cell(values, percent=True):
        mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * mean:.1f} ± {100 * std:.1f}" if percent else f"{mean:.1f} ± {std:.1f}"

    print(f"{args.zoo}: {args.models} fine-tuned models per sweep, {args.seeds} sweep seeds (0–{args.seeds - 1}); "
          "accuracy in %, mean ± std over seeds")
    print("| recipe | val | test | shift avg | ingredients | test − best (points) | seeds p < 0.05 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ROWS:
        cols = list(zip(*(seed[name] for seed in per_seed)))
        verdict = "—" if name == "best" else f"{sum(cols[5])}↑ {sum(cols[6])}↓ of {len(per_seed)}"
        print(f"| {RECIPES[name].pretty_name} | {cell(cols[0])} | {cell(cols[1])} | {cell(cols[2])} | "
              f"{cell(cols[3], percent=False)} | {cell(cols[4])} | {verdict} |")


if __name__ == "__main__":
    main()
