"""Landscapes on a Ray cluster: 1 vs 2 workers against one process, on this machine.

    python bench/bench_ray.py [--grid 31] [--wide 512] [--wide-grid 15]

Two models: the sample MLP (digits-finetune, 26k parameters) and a wider synthetic MLP zoo
built on the spot (64 → W → W → 10, three checkpoints from one random θ0). For each: the
single-process engine, then a local Ray cluster (127.0.0.1) with 1 and 2 workers, all with the
strategy the single process chose, so the grids must be equal bit for bit (checked). Printed:
worker start-up (the first call: each worker imports torch and opens the zoo), then with the
workers up: seconds (best of 2), time to the first finished chunk, overhead per chunk against
one process, and the scaling efficiency T(1 worker) / (2 · T(2 workers)).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from soup_core import distributed  # noqa: E402
from soup_core.io import save_state_dict  # noqa: E402
from soup_core.landscape import SliceEvaluator, plane_landscape  # noqa: E402
from soup_core.zoo import open_zoo, zoo_plane  # noqa: E402

WIDE_MODEL = '''
from torch import nn

def make_wide():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, {width}), nn.ReLU(), nn.Linear({width}, {width}), nn.ReLU(),
                         nn.Linear({width}, 10))
'''


def wide_zoo(folder: Path, width: int) -> Path:
    (folder / "wide.py").write_text(WIDE_MODEL.format(width=width))
    sys.path.insert(0, str(folder))
    import wide
    torch.manual_seed(0)
    base = wide.make_wide().state_dict()
    save_state_dict(base, folder / "base.safetensors")
    for i in range(3):
        save_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.items()}, folder / f"m{i}.safetensors")
    (folder / "zoo.toml").write_text('name = "wide"\nmodel = "wide:make_wide"\n'
                                     'evaluator = "sample_data.digits:make_evaluator"\nbase = "base.safetensors"\n'
                                     'checkpoints = ["m*.safetensors"]\n')
    return folder


def run(ray, manifest, points, grid: int, label: str) -> None:
    zoo = open_zoo(manifest, device="cpu")
    plane = zoo_plane(zoo, points)
    engine = SliceEvaluator(zoo.evaluator, plane.origin, plane.directions)
    chunks = -(-grid * grid // engine.chunk_for(["val"]))
    times, reference = [], None
    for _ in range(2):
        started = time.perf_counter()
        reference = plane_landscape(zoo.evaluator, plane, grid=grid, engine=engine)
        times.append(time.perf_counter() - started)
    single = min(times)
    print(f"\n{label}: {grid}×{grid} grid, {chunks} chunks of {engine.chunk_for(['val'])} points, strategy "
          f"{engine.strategy}, {sum(t.numel() for t in plane.origin.values()):,} parameters")
    print("| run | seconds | first chunk (s) | overhead per chunk (ms) | equal to one process |")
    print("|---|---:|---:|---:|---|")
    print(f"| one process | {single:.2f} | — | — | — |")
    started = time.perf_counter()
    distributed.landscape(ray, zoo, points, grid=3, workers=2, strategy=engine.strategy)
    print(f"(2 workers started and a 3×3 grid computed in {time.perf_counter() - started:.1f} s)")
    by_workers = {}
    for workers in (1, 2):
        best, first_best = float("inf"), float("inf")
        for _ in range(2):
            first = []
            started = time.perf_counter()
            result = distributed.landscape(ray, zoo, points, grid=grid, workers=workers, strategy=engine.strategy,
                                           progress=lambda f, m: first or first.append(time.perf_counter()))
            elapsed = time.perf_counter() - started
            best, first_best = min(best, elapsed), min(first_best, first[0] - started)
        by_workers[workers] = best
        same = result.to_json() == reference.to_json()
        print(f"| Ray, {workers} worker(s) | {best:.2f} | {first_best:.2f} | "
              f"{1000 * (best - single / workers) / (chunks / workers):.0f} | {'yes' if same else 'NO'} |")
    print(f"scaling efficiency 1 → 2 workers: {by_workers[1] / (2 * by_workers[2]):.2f} "
          f"(speed-up {by_workers[1] / by_workers[2]:.2f}×)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", type=int, default=31)
    parser.add_argument("--wide", type=int, default=512, help="hidden width of the synthetic zoo")
    parser.add_argument("--wide-grid", type=int, default=15, help="grid of the synthetic zoo's landscape")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU only")
    started = time.perf_counter()
    with distributed.cluster("auto", workers=2) as ray:
        print(f"local Ray cluster started in {time.perf_counter() - started:.1f} s")
        run(ray, "digits-finetune", ("base", "ft-00", "ft-01"), args.grid, "digits-finetune (sample MLP)")
        with tempfile.TemporaryDirectory() as tmp:
            run(ray, str(wide_zoo(Path(tmp), args.wide)), ("base", "m0", "m1"), args.wide_grid,
                f"synthetic MLP, width {args.wide}")


if __name__ == "__main__":
    main()
