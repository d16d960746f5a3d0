"""Memory of a greedy soup on a big model: ours (float64 or float32 running sum) against the official
code's loop, each measured against :mod:`soup_core.memory`'s plan.

    python bench/bench_greedy_memory.py [--params 100M] [--ingredients 4]
    python bench/bench_greedy_memory.py --tiny     # a 2M-parameter zoo: checks that it runs

A synthetic float32 MLP zoo (``--ingredients`` checkpoints of ``--params`` parameters: θ0 plus
noise, safetensors, written once under ``bench/.cache/greedy_memory``; nothing downloaded) and a
val split of random inputs. Each tool runs in a fresh process: the checkpoints memory-mapped and
the evaluator built first, then the greedy soup (order sorted, tie ``gt``) while ``RssAnon`` is
sampled every 2 ms. The row is the peak anonymous memory above the level before the soup
(memory-mapped checkpoints are page cache, not counted), beside the plan: the running sum plus
one candidate soup. Every tool must choose the same ingredients.

* ``ours-float64``, ``ours-float32``: ``RECIPES["greedy"].make(..., sum_precision=...)``;
* ``official``: the official model-soups loop (Wortsman et al., ``main.py``): a float32 running
  average as a state dict, each candidate formed as ``soup·n/(n+1) + new·1/(n+1)`` from clones and
  loaded into a fresh model to be scored.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CACHE = Path(__file__).resolve().parent / ".cache" / "greedy_memory"
WIDTH = 2048
SAMPLES = 256
TOOLS = ("ours-float64", "ours-float32", "official")


def make_model(layers: int) -> torch.nn.Module:
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(WIDTH, 10))


def layers_for(params: int) -> int:
    return max(1, round(params / (WIDTH * WIDTH + WIDTH)))


def build_zoo(params: int, ingredients: int) -> list[Path]:
    import safetensors.torch
    folder = CACHE / f"{ingredients}x{params}"
    paths = [folder / f"ft-{i}.safetensors" for i in range(ingredients)]
    if all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    theta0 = make_model(layers_for(params)).state_dict()
    for i, path in enumerate(paths):
        g = torch.Generator().manual_seed(i + 1)
        state = {k: (v + 0.02 * v.std() * torch.randn(v.shape, generator=g)).contiguous() for k, v in theta0.items()}
        safetensors.torch.save_file(state, path)
    return paths


def val_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SAMPLES, WIDTH, generator=g), torch.randint(0, 10, (SAMPLES,), generator=g)


def official_greedy(paths: list[Path], layers: int) -> list[str]:
    from safetensors.torch import load_file
    x, y = val_split()

    def accuracy(state) -> float:
        model = make_model(layers)
        model.load_state_dict(state)
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    names = [p.stem for p in paths]
    scores = {p.stem: accuracy(load_file(p)) for p in paths}
    order = sorted(names, key=lambda n: -scores[n])
    by_name = dict(zip(names, paths))
    kept, soup = [order[0]], load_file(by_name[order[0]])
    best = scores[order[0]]
    for name in order[1:]:
        new = load_file(by_name[name])
        n = len(kept)
        candidate = {k: soup[k].clone() * (n / (n + 1.0)) + new[k].clone() * (1.0 / (n + 1)) for k in new}
        score = accuracy(candidate)
        if score > best:
            kept.append(name)
            soup, best = candidate, score
    return kept


def one(tool: str, paths: list[Path], params: int) -> dict:
    """Run one tool in this (fresh) process; the measured row."""
    from bench_angles import PeakMemory
    from soup_core.allocator import keep_freed_memory
    from soup_core.evaluate import Evaluator, Split
    from soup_core.io import load_state_dict
    from soup_core.memory import state_plan
    from soup_core.recipes import RECIPES
    keep_freed_memory()
    layers = layers_for(params)
    ingredients = {p.stem: load_state_dict(p) for p in paths}  # memory-mapped
    x, y = val_split()
    evaluator = Evaluator(lambda: make_model(layers), {"val": Split(x, y)}, device="cpu")
    parameters = sum(t.numel() for t in next(iter(ingredients.values())).values())
    start = time.perf_counter()
    with PeakMemory() as memory:
        if tool == "official":
            kept = official_greedy(paths, layers)
            plan = None
        else:
            precision = tool.removeprefix("ours-")
            soup = RECIPES["greedy"].make(ingredients, evaluator, tie="gt", **(
                {} if precision == "default" else {"sum_precision": precision}))
            kept = list(soup.ingredients)
            plan = state_plan(next(iter(ingredients.values())), list(ingredients[kept[0]]), evaluator.device,
                              "float64" if precision == "default" else precision)
    return {"tool": tool, "wall_s": time.perf_counter() - start, "peak": memory.used, "plan": plan,
            "parameters": parameters, "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="100M", help="parameters per model (e.g. 100M)")
    parser.add_argument("--ingredients", type=int, default=4)
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {', '.join(TOOLS)}, "
                        "or ours-default (whatever the installed code does by default)")
    parser.add_argument("--tiny", action="store_true", help="a 2M-parameter zoo, to check that it runs")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = 2_000_000 if args.tiny else int(float(args.params.upper().rstrip("M")) * 1e6)
    paths = build_zoo(params, args.ingredients)
    if args.one:
        print(json.dumps(one(args.one, paths, params)))
        return
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"{args.ingredients} float32 checkpoints of {layers_for(params)} × {WIDTH}² parameters")
    print(f"{'tool':14} {'wall s':>7} {'peak anon MB':>13} {'plan MB':>8} {'peak/plan':>9}  kept")
    rows = []
    for tool in args.tools.split(","):
        run = subprocess.run([sys.executable, __file__, "--params", args.params, "--ingredients",
                              str(args.ingredients), *(["--tiny"] if args.tiny else []), "--one", tool],
                             capture_output=True, text=True, check=True)
        row = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append(row)
        plan = f"{row['plan'] / 1e6:8.0f} {row['peak'] / row['plan']:9.2f}" if row["plan"] else f"{'':8} {'':9}"
        print(f"{row['tool']:14} {row['wall_s']:7.1f} {row['peak'] / 1e6:13.0f} {plan}  {','.join(row['kept'])}")
    if len({tuple(r["kept"]) for r in rows}) != 1:
        raise SystemExit("the tools chose different ingredients")
    print(f"parameters: {rows[0]['parameters']:,}; every tool chose the same ingredients")


if __name__ == "__main__":
    main()
