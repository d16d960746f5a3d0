"""31×31 loss landscape: our batched slice evaluator vs two peers, same model, data and points.

Peers:
* the pip package ``loss-landscapes`` (``planar_interpolation``: one forward per point,
  parameters moved in place along a snake path);
* a per-point loop in the style of tomgoldstein/loss-landscape (``set_weights`` then
  ``eval_loss``): for each point, write origin + x·d1 + y·d2 into the parameters and evaluate.

Both peers move parameters only, so BatchNorm statistics stay at the start model's: we run
ours with ``bn="keep"`` to compute the same function. Points are loss-landscapes' own:
start + (i/steps)·(B − A) + (j'/steps)·(C − A), with j' = j + 1 on even columns and j on odd
ones (its snake walk is off by one step on alternate columns). The peers compute the loss
only; ours computes loss and error.

    python bench/bench_landscape.py [--steps 31] [--repeats 5] [--device cpu|cuda] [--width N] [--return-freed-memory]
                                    [--threads N] [--strategy auto|fold|vmap|batched-loop|loop] [--working-set MIB] [--profile]
                                    [--fold-points N] [--layouts]

Each of ``--repeats`` rounds runs every method once; the best time per method is reported,
with its minor page faults per run. The process keeps freed memory (as the ``soup`` command
and the app do); ``--return-freed-memory`` leaves glibc's defaults.

``--threads``, ``--strategy``, ``--working-set`` and ``--fold-points`` reproduce the tuning
figures in RESULTS.md;
``--profile`` prints where our engine spends its time (torch.profiler) on each case;
``--layouts`` only times one convolution and one max-pool of the BatchNorm CNN in
channels-first and channels-last memory (why the folded strategy keeps channels last).

``--width`` swaps in a wide MLP (digits inputs, N hidden units, 3 layers) for a GPU run with a
model of ≥ 10M parameters; it is compared with the per-point loop only.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from soup_core.allocator import keep_freed_memory  # noqa: E402
from soup_core.evaluate import Evaluator  # noqa: E402
from soup_core.landscape import STRATEGIES, SliceEvaluator, strategies  # noqa: E402
from soup_core.zoo import open_zoo  # noqa: E402


def gemm_peak(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large float32 matmul, measured now on this device."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return _flops_per_second(lambda: a @ b, 2 * size ** 3, repeats, device)


def convolution_peak(device: torch.device, repeats: int = 10) -> float:
    """FLOP/s of a large float32 3×3 convolution in channels-last memory, measured now.

    On this project's CPU, PyTorch's float32 matmul runs MKL's AVX2 path while oneDNN's
    convolutions use AVX-512: the convolution, not the matmul, shows the machine's peak.
    """
    x = torch.randn(32, 256, 14, 14, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    flops = 2 * 32 * 14 * 14 * 256 * 256 * 9
    return _flops_per_second(lambda: torch.nn.functional.conv2d(x, w, padding=1), flops, repeats, device)


def _flops_per_second(function, flops: float, repeats: int, device: torch.device) -> float:
    for _ in range(3):
        function()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    sync(device)
    return flops * repeats / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(function, repeats: int, device: torch.device):
    result, times = None, []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = function()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def per_point_loop(model, origin, d1, d2, coords, x, y) -> np.ndarray:
    """tomgoldstein/loss-landscape's loop: set_weights, then eval_loss, point by point."""
    params = [p for _, p in model.named_parameters()]
    names = [n for n, _ in model.named_parameters()]
    out = []
    with torch.no_grad():
        for cx, cy in coords.tolist():
            for p, n in zip(params, names):
                p.data = origin[n] + cx * d1[n] + cy * d2[n]
            out.append(float(torch.nn.functional.cross_entropy(model(x), y)))
    return np.array(out)


def loss_landscapes_grid(model_a, model_b, model_c, x, y, steps: int) -> np.ndarray:
    import loss_landscapes
    import loss_landscapes.metrics
    metric = loss_landscapes.metrics.Loss(torch.nn.CrossEntropyLoss(), x, y)
    with torch.no_grad():
        grid = loss_landscapes.planar_interpolation(model_a, model_b, model_c, metric, steps=steps, deepcopy_model=True)
    return np.asarray(grid).reshape(-1)  # [i][j] = point (i, j) in the order of our coords


def run_case(label: str, evaluator: Evaluator, a, b, c, steps: int, repeats: int, bn: str, with_peer_package: bool,
             engine_options: dict, profile: bool = False):
    device = evaluator.device
    x, y = evaluator.splits["val"].inputs, evaluator.splits["val"].labels
    keys = [k for k, t in a.items() if t.is_floating_point()]
    d1 = {k: b[k].double() - a[k].double() for k in keys}
    d2 = {k: c[k].double() - a[k].double() for k in keys}
    ii, jj = np.meshgrid(np.arange(steps), np.arange(steps), indexing="ij")
    # loss-landscapes' snake walk evaluates even columns at (j + 1)·d2/steps and odd ones at
    # j·d2/steps (its add-then-evaluate vs subtract-then-evaluate): we use its actual points.
    offset = (ii % 2 == 0).astype(np.float64)
    coords = torch.tensor(np.stack([ii.reshape(-1) / steps, (jj + offset).reshape(-1) / steps], 1))
    points = len(coords)

    engine = SliceEvaluator(evaluator, a, [d1, d2], bn=bn, **engine_options)
    model = copy.deepcopy(evaluator.model).to(device).eval()
    model.load_state_dict(a)
    o32 = {n: a[n].to(device) for n, _ in model.named_parameters()}
    d1_32 = {n: d1[n].float().to(device) for n in o32}
    d2_32 = {n: d2[n].float().to(device) for n in o32}
    methods = {"ours: batched slice evaluator": lambda: engine.evaluate(coords, ["val"]).loss["val"],
               "per-point loop (tomgoldstein style)": lambda: per_point_loop(model, o32, d1_32, d2_32, coords, x, y)}
    if with_peer_package:
        models = []
        for state in (a, b, c):
            m = copy.deepcopy(evaluator.model).to(device).eval()
            m.load_state_dict(state)
            models.append(m)
        methods["loss-landscapes 3.0.6 planar_interpolation"] = lambda: loss_landscapes_grid(*models, x, y, steps)
    engine.evaluate(coords[:8], ["val"])  # warm-up
    # Rounds of one run of each method, best per method: a burst of load on a shared machine
    # then slows one round of every method rather than all the runs of one.
    times = dict.fromkeys(methods, float("inf"))
    faults = dict.fromkeys(methods, 0)
    results = {}
    for _ in range(repeats):
        for name, method in methods.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds, results[name] = best_time(method, 1, device)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            times[name] = min(times[name], seconds)
    ours = results["ours: batched slice evaluator"]
    rows = [(name, times[name], float(np.abs(np.asarray(results[name]) - ours).max()), faults[name] / repeats)
            for name in methods]
    if profile:
        from torch.profiler import profile as torch_profile
        with torch_profile() as prof:
            engine.evaluate(coords, ["val"])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))

    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x)
    flops = counter.get_total_flops()
    gemm = max(gemm_peak(device) for _ in range(3))  # a shared machine: the best of three
    convolution = max(convolution_peak(device) for _ in range(3))
    peak = max(gemm, convolution)
    floor = points * flops / peak
    params = sum(t.numel() for t in a.values() if t.is_floating_point())
    print(f"\n### {label}: {params:,} parameters, {len(y)} val samples, {points} points, BatchNorm {engine.bn}, "
          f"strategy {engine.strategy}, {engine.chunk_points(len(y))} points per call\n")
    print(f"FLOPs per point (full forward) {flops / 1e6:.1f} M; float32 peak measured now {peak / 1e9:.0f} GFLOP/s "
          f"(matmul {gemm / 1e9:.0f}, convolution {convolution / 1e9:.0f}); floor for {points} points "
          f"{floor * 1e3:.1f} ms\n")
    print("| method | time (s) | points/s | fraction of FLOP floor | max abs loss difference vs ours "
          "| minor page faults per run |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, diff, page_faults in rows:
        print(f"| {name} | {seconds:.3f} | {points / seconds:,.0f} | {floor / seconds:.1%} | {diff:.1e} "
              f"| {page_faults:,.0f} |")
    fastest_peer = min(r[1] for r in rows[1:])
    print(f"\nspeed-up over the faster peer: {fastest_peer / rows[0][1]:.2f}×")
    for name, _, diff, _ in rows[1:]:
        assert diff < 1e-4, f"{name} disagrees with ours by {diff}"


def layouts(repeats: int = 50) -> None:
    """The digits-bn CNN's second convolution and its max-pool, channels-first vs channels-last."""
    x = torch.randn(269, 16, 8, 8).relu()
    w, b = torch.randn(32, 16, 3, 3), torch.randn(32)
    y = torch.nn.functional.conv2d(x, w, b, padding=1)
    ops = {"3×3 convolution 16 → 32 on [269, 16, 8, 8]": (lambda t: torch.nn.functional.conv2d(t, w, b, padding=1), x),
           "2×2 max-pool of [269, 32, 8, 8]": (lambda t: torch.nn.functional.max_pool2d(t, 2), y)}
    print("\n| operation | channels-first (ms) | channels-last (ms) |\n|---|---:|---:|")
    for name, (op, t) in ops.items():
        times = []
        for layout in (t.contiguous(), t.contiguous(memory_format=torch.channels_last)):
            times.append(best_time(lambda: op(layout), repeats, torch.device("cpu"))[0] * 1e3)
        print(f"| {name} | {times[0]:.3f} | {times[1]:.3f} |")


class WideMLP(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                        torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU())
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=31)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each runs every method once")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--strategy", default="auto", choices=list(STRATEGIES))
    parser.add_argument("--working-set", type=float, default=None, help="MiB per vmapped call")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--fold-points", type=int, default=None, help="points per folded call (FOLD_POINTS)")
    parser.add_argument("--layouts", action="store_true", help="only time one convolution and max-pool in both layouts")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="leave glibc's malloc as it is (by default it keeps freed memory, for every method)")
    args = parser.parse_args()
    torch.manual_seed(0)
    allocator = "glibc default" if args.return_freed_memory else f"keep freed memory ({keep_freed_memory()})"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fold_points:
        strategies.FOLD_POINTS = args.fold_points
    options = {"strategy": args.strategy,
               "working_set": int(args.working_set * 2**20) if args.working_set else None}
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"strategy {args.strategy}, working set {args.working_set or 'default'} MiB, allocator {allocator}")
    if args.layouts:
        layouts()
        return
    if args.width:
        from sample_data.digits import make_evaluator
        evaluator = make_evaluator(lambda: WideMLP(args.width), device=args.device)
        a = {k: v.cpu() for k, v in WideMLP(args.width).state_dict().items()}
        b = {k: v + 0.01 * torch.randn_like(v) for k, v in a.items()}
        c = {k: v + 0.01 * torch.randn_like(v) for k, v in a.items()}
        run_case(f"wide MLP ({args.width} units)", evaluator, a, b, c, args.steps, args.repeats, "keep", False, options,
                 args.profile)
        return
    for zoo_name, bn in (("digits-finetune", "keep"), ("digits-bn", "keep")):
        zoo = open_zoo(zoo_name, device=args.device)
        names = zoo.names
        run_case(f"{zoo_name} (base, {names[0]}, {names[1]})", zoo.evaluator, zoo.base, zoo.state_dict(names[0]),
                 zoo.state_dict(names[1]), args.steps, args.repeats, bn, True, options, args.profile)


if __name__ == "__main__":
    main()
