"""Angles between 8 checkpoints of 25M parameters: ours vs flatten-everything-then-multiply.

    python bench/bench_angles.py [--models 8] [--params 25_000_000]

Ours (soup_core.geometry.pairwise_angles) streams one tensor chunk at a time from
memory-mapped safetensors and accumulates the Gram matrix of θi − θ0 in float64. The peer
approach, common in notebooks and in tools built on ``parameters_to_vector``, loads every
checkpoint, flattens each into one float32 vector, stacks them and multiplies once. Both run
in this process on the same files; a float64 flatten-and-multiply is the reference. Peak
memory is the peak anonymous resident memory above the level before each method, sampled
every 2 ms.
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
from pathlib import Path

import safetensors.torch
import torch

from soup_core.io import open_checkpoint
from soup_core.geometry import angles_from_gram, pairwise_angles

CACHE = Path(__file__).resolve().parent / ".cache" / "angles"


def rss() -> int:
    """Anonymous resident memory: what a method allocates. File pages that a memory map
    brings in are page cache the kernel can drop, so they are not counted."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakMemory:
    def __enter__(self):
        gc.collect()
        self.start = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.used = self.peak - self.start


def make_checkpoints(models: int, params: int) -> tuple[Path, list[Path]]:
    """θ0 plus fine-tunings θ0 + shared + own noise: five tensors of params/5 entries each."""
    folder = CACHE / f"{models}x{params}"
    paths = [folder / f"ft-{i}.safetensors" for i in range(models)]
    base = folder / "base.safetensors"
    if base.exists() and all(p.exists() for p in paths):
        return base, paths
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shapes = [(params // 5 // 1000, 1000)] * 5
    theta0 = {f"layer{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    shared = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    safetensors.torch.save_file(theta0, base)
    for path in paths:
        safetensors.torch.save_file({k: v + shared[k] + 0.01 * torch.randn(v.shape, generator=g)
                                     for k, v in theta0.items()}, path)
    return base, paths


def flatten_then_multiply(base: Path, paths: list[Path], dtype: torch.dtype) -> torch.Tensor:
    """The peer approach: load all, flatten each model to one vector, one matmul."""
    theta0 = safetensors.torch.load_file(base)
    origin = torch.cat([t.reshape(-1).to(dtype) for t in theta0.values()])
    rows = []
    for path in paths:
        state = safetensors.torch.load_file(path)
        rows.append(torch.cat([state[k].reshape(-1).to(dtype) for k in theta0]) - origin)
    matrix = torch.stack(rows)
    return angles_from_gram((matrix @ matrix.T).double()).cosine


def ours(base: Path, paths: list[Path]) -> torch.Tensor:
    return pairwise_angles([open_checkpoint(p) for p in paths], open_checkpoint(base)).cosine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base, paths = make_checkpoints(args.models, args.params)
    print(f"{args.models} checkpoints × {args.params:,} parameters (float32), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    reference = flatten_then_multiply(base, paths, torch.float64)
    rows = []
    for label, run in [("ours: streaming float64 Gram", lambda: ours(base, paths)),
                       ("peer: flatten all, float32 matmul", lambda: flatten_then_multiply(base, paths, torch.float32))]:
        times, peaks = [], []
        for _ in range(args.repeats):
            with PeakMemory() as mem:
                start = time.perf_counter()
                cosine = run()
                times.append(time.perf_counter() - start)
            peaks.append(mem.used)
            del cosine
        cosine = run()
        error = float((cosine - reference).abs().max())
        rows.append((label, sorted(times)[len(times) // 2], max(peaks), error))
    print("| method | median time (s) | peak extra anonymous memory (MiB) | max abs cosine error vs float64 reference |")
    print("|---|---:|---:|---:|")
    for label, t, peak, error in rows:
        print(f"| {label} | {t:.2f} | {peak / 2**20:.0f} | {error:.1e} |")
    (o, p) = rows
    print(f"\nratios (peer / ours): time {p[1] / o[1]:.2f}×, peak memory {p[2] / max(o[2], 1):.1f}×")


if __name__ == "__main__":
    main()
