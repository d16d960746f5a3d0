"""Greedy soup on digits-finetune: ours vs the official code's approach.

    python bench/bench_greedy.py [--repeats 5]

The official model-soups code (Wortsman et al., ``main.py``) scores every model on the
held-out set by loading it from disk into a fresh model, sorts, and then for each
candidate loads it from disk again, forms the running float32 average, builds a model
from that state dict and evaluates it from scratch; it accepts on a strict improvement.
That loop is reproduced below. Ours (the ``greedy`` recipe, ``soup_core.recipes.greedy``) keeps a float64
running sum of memory-mapped tensors and evaluates through one model with
``torch.func.functional_call``, caching per-checkpoint logits by content. Both start cold
(nothing loaded, nothing cached) and use the same val split and tie rule (``gt``); the
script checks that they choose the same ingredients.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sample_data.digits import load_splits, make_mlp
from soup_core.io import load_state_dict
from soup_core.zoo import make_soup, open_zoo

ZOO = "digits-finetune"


def official_accuracy(state, inputs, labels, batch_size=1024) -> float:
    model = make_mlp()
    model.load_state_dict(state)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = model(inputs[start:start + batch_size])
            correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return correct / len(labels)


def official_greedy(paths: dict[str, str]) -> list[str]:
    val = load_splits()["val"]
    accs = {name: official_accuracy(load_state_dict(path), val.inputs, val.labels) for name, path in paths.items()}
    order = sorted(paths, key=lambda n: -accs[n])
    ingredients = [order[0]]
    soup = load_state_dict(paths[order[0]])
    best = accs[order[0]]
    for name in order[1:]:
        new = load_state_dict(paths[name])
        n = len(ingredients)
        candidate = {k: soup[k].clone() * (n / (n + 1.0)) + new[k].clone() * (1.0 / (n + 1)) for k in new}
        acc = official_accuracy(candidate, val.inputs, val.labels)
        if acc > best:
            ingredients.append(name)
            soup, best = candidate, acc
    return ingredients


def ours() -> list[str]:
    zoo = open_zoo(ZOO, device="cpu")
    return list(make_soup(zoo, "greedy", tie="gt").ingredients)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    zoo = open_zoo(ZOO)
    paths = {name: str(zoo.path(name)) for name in zoo.names}
    load_splits()  # the data set is built once for both; neither timing includes it
    results = {}
    for label, run in [("ours", ours), ("official approach", lambda: official_greedy(paths))]:
        times, chosen = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            chosen = run()
            times.append(time.perf_counter() - start)
        results[label] = (statistics.median(times), chosen)
    (t_ours, a), (t_peer, b) = results["ours"], results["official approach"]
    print(f"greedy soup on {ZOO} ({len(paths)} checkpoints), median of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print("| method | median time (s) | ingredients |")
    print("|---|---:|---|")
    print(f"| ours | {t_ours:.3f} | {', '.join(a)} |")
    print(f"| official approach | {t_peer:.3f} | {', '.join(b)} |")
    print(f"\nsame ingredients: {a == b}; speed-up {t_peer / t_ours:.1f}×")
    if a != b:
        raise SystemExit("the two greedy soups disagree")


if __name__ == "__main__":
    main()
