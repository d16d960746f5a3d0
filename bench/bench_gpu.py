"""Real models on a GPU: landscapes, greedy soups and angles, ours against the peers' ways, in one process.

Landscapes (a CIFAR ResNet-18 and a ViT-S/16-shaped transformer, both defined here in plain
torch so that nothing needs torchvision or timm): a random θ0, θ1 and θ2 = θ0 + small
perturbations, labels from θ0's own predictions (finite, comparable losses), the same plane,
points (loss-landscapes' own snake walk) and samples, resident on the device, for every method:

* ours, ``SliceEvaluator`` with ``strategy="auto"`` in fp32, tf32 and bf16 (``bn="keep"``: the
  peers move parameters only);
* a per-point loop in the style of tomgoldstein/loss-landscape (batch 128, ``.item()`` per batch);
* loss-landscapes 3.0.6 ``planar_interpolation`` (when installed: requirements-bench.txt);
* a skilled user's loop: weights mixed on the device, bf16 autocast, channels-last, batch 1024,
  ``torch.compile`` with ``--compile``.

Each row: ms per point, the fraction of the FLOP floor (a full forward per point counted with
``torch.utils.flop_counter``, at the matmul peak measured now in that row's precision), peak
device memory, and the max abs loss difference against the fp32 per-point loop.

Greedy soup over N checkpoints written to disk: ours (read once, ``RECIPES["greedy"]``) against
the official approach (every step re-reads the soup's ingredients, averages, ``load_state_dict``,
evaluates) and a hand-written loop with everything resident on the device; all must keep the
same ingredients. Angles: ``pairwise_angles`` of k ViT-B-sized checkpoints on the CPU and on the
device, equal to 1e-9 in cosine.

    python bench/bench_gpu.py --device cuda [--grid 21] [--samples 2048] [--compile]
    python bench/bench_gpu.py --device cpu --tiny      # small models: checks that it runs and agrees
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_landscape import loss_landscapes_grid, sync  # noqa: E402

from soup_core.allocator import keep_freed_memory  # noqa: E402
from soup_core.evaluate import Evaluator, Split  # noqa: E402
from soup_core.geometry import pairwise_angles  # noqa: E402
from soup_core.io import open_checkpoint, save_state_dict  # noqa: E402
from soup_core.landscape import SliceEvaluator  # noqa: E402
from soup_core.recipes import RECIPES  # noqa: E402

# ---- the models ------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 (kuangliu/pytorch-cifar's): 11.2M parameters at width 64."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).unbind(-3)
        q, k, v = (t.transpose(-2, -3) for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v).transpose(-2, -3).flatten(-2)
        x = x + self.proj(attention)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """ViT-S/16 at the defaults (224², width 384, depth 12, 6 heads: 21.7M parameters)."""

    def __init__(self, image: int = 224, patch: int = 16, width: int = 384, depth: int = 12, heads: int = 6,
                 classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1) + self.position
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def model_factories(tiny: bool):
    if tiny:
        return {"ResNet-18 (width 8)": (lambda: ResNet18(8), 32),
                "ViT (32², patch 8, width 32, depth 2)": (lambda: ViT(32, 8, 32, 2, 2), 32)}
    return {"CIFAR ResNet-18": (ResNet18, 32), "ViT-S/16": (ViT, 224)}


def perturbed(state, scale: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return {k: t + scale * t.std().nan_to_num(0.0) * torch.randn(t.shape, generator=generator)
            if t.is_floating_point() and "running" not in k else t.clone() for k, t in state.items()}


def case(factory, image: int, samples: int, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    theta0 = {k: v.clone() for k, v in factory().state_dict().items()}
    x = torch.randn(samples, 3, image, image, generator=torch.Generator().manual_seed(seed))
    model = factory().eval()
    model.load_state_dict(theta0)
    with torch.no_grad():
        y = torch.cat([model(x[i:i + 256]).argmax(-1) for i in range(0, samples, 256)])
    evaluator = Evaluator(factory, {"val": Split(x, y)}, device=device, batch_size=256)
    return evaluator, theta0


# ---- timing ----------------------------------------------------------------------------------


def timed(function, device: torch.device, repeats: int):
    """Best of ``repeats`` after one warm-up, with the peak device memory of the last run."""
    result = function()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        result = function()
        sync(device)
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return best, result, peak


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 4096, repeats: int = 10) -> float:
    """FLOP/s of a large matmul in ``dtype`` (tf32 when the flag is on), measured now."""
    size = size if device.type == "cuda" else 1024
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    best, _, _ = timed(lambda: a @ b, device, repeats)
    return 2 * size ** 3 / best


def tomgoldstein_loop(model, origin, d1, d2, coords, x, y, batch: int = 128) -> np.ndarray:
    """set_weights then eval_loss per point: batches of 128, a host sync (.item()) per batch."""
    params = dict(model.named_parameters())
    out = []
    with torch.no_grad():
        for cx, cy in coords.tolist():
            for name, p in params.items():
                p.copy_(origin[name] + cx * d1[name] + cy * d2[name])
            total = 0.0
            for i in range(0, len(x), batch):
                total += F.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum").item()
            out.append(total / len(x))
    return np.array(out)


def skilled_loop(model, origin, d1, d2, coords, x, y, batch: int = 1024) -> np.ndarray:
    """Weights mixed on the device, bf16 autocast, channels-last input, one host sync at the end."""
    params = dict(model.named_parameters())
    totals = torch.zeros(len(coords), device=x.device, dtype=torch.float64)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        for i, (cx, cy) in enumerate(coords.tolist()):
            for name, p in params.items():
                p.copy_(origin[name] + cx * d1[name] + cy * d2[name])
            for b in range(0, len(x), batch):
                logits = model(x[b:b + batch]).float()
                totals[i] += F.cross_entropy(logits, y[b:b + batch], reduction="sum").double()
    return (totals / len(x)).cpu().numpy()


def landscape(label: str, factory, image: int, args, device: torch.device) -> None:
    evaluator, a = case(factory, image, args.samples, device)
    b, c = perturbed(a, 0.05, 1), perturbed(a, 0.05, 2)
    keys = [k for k, t in a.items() if t.is_floating_point()]
    d1 = {k: b[k].double() - a[k].double() for k in keys}
    d2 = {k: c[k].double() - a[k].double() for k in keys}
    steps = args.grid
    ii, jj = np.meshgrid(np.arange(steps), np.arange(steps), indexing="ij")
    offset = (ii % 2 == 0).astype(np.float64)  # loss-landscapes' own points (see bench_landscape.py)
    coords = torch.tensor(np.stack([ii.reshape(-1) / steps, (jj + offset).reshape(-1) / steps], 1))
    x, y = evaluator.splits["val"].inputs, evaluator.splits["val"].labels

    def fresh(channels_last=False, compiled=False):
        model = factory().to(device).eval()
        model.load_state_dict(a)
        model.requires_grad_(False)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return torch.compile(model) if compiled else model

    names = dict(fresh().named_parameters())
    o32 = {n: a[n].to(device) for n in names}
    d1_32, d2_32 = ({n: d[n].float().to(device) for n in names} for d in (d1, d2))
    methods = {}
    for precision in args.precisions:
        engine = SliceEvaluator(evaluator, a, [d1, d2], bn="keep", precision=precision)
        methods[f"ours, auto → {engine.strategy}, {precision}"] = (
            precision, lambda engine=engine: engine.evaluate(coords, ["val"]).loss["val"])
    loop_model = fresh()
    methods["per-point loop (tomgoldstein style), fp32"] = (
        "fp32", lambda: tomgoldstein_loop(loop_model, o32, d1_32, d2_32, coords, x, y))
    try:
        import loss_landscapes  # noqa: F401
        peers = [fresh() for _ in range(3)]
        for m, state in zip(peers, (a, b, c)):
            m.load_state_dict(state)
        methods["loss-landscapes 3.0.6 planar_interpolation, fp32"] = (
            "fp32", lambda: loss_landscapes_grid(*peers, x, y, steps))
    except ImportError:
        print("(loss-landscapes is not installed: pip install -r requirements-bench.txt)")
    xs = x.contiguous(memory_format=torch.channels_last)
    skilled = fresh(channels_last=True, compiled=args.compile)
    methods[f"skilled loop: bf16, channels-last{', compile' if args.compile else ''}, batch 1024"] = (
        "bf16", lambda: skilled_loop(skilled, o32, d1_32, d2_32, coords, xs, y))

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fresh()(x)
    flops = counter.get_total_flops() * len(coords)
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        peaks["tf32"] = matmul_peak(device, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        peaks["tf32"] = peaks["fp32"]
    rows = {name: timed(run, device, args.repeats) for name, (_, run) in methods.items()}
    reference = rows["per-point loop (tomgoldstein style), fp32"][1]
    parameters = sum(t.numel() for t in a.values() if t.is_floating_point())
    print(f"\n### {label}: {parameters / 1e6:.1f}M parameters, {steps}×{steps} plane, {len(x)} samples on "
          f"{device}, FLOP floor at peaks measured now (fp32 {peaks['fp32'] / 1e12:.1f}, tf32 "
          f"{peaks['tf32'] / 1e12:.1f}, bf16 {peaks['bf16'] / 1e12:.1f} TFLOP/s)\n")
    print("| method | ms/point | fraction of FLOP floor | peak memory (MiB) | max abs loss diff vs fp32 loop |")
    print("|---|---:|---:|---:|---:|")
    for name, (seconds, values, peak) in rows.items():
        floor = flops / peaks[methods[name][0]]
        memory = "—" if peak is None else f"{peak / 2**20:,.0f}"
        diff = float(np.abs(np.asarray(values) - reference).max())
        print(f"| {name} | {seconds / len(coords) * 1e3:.2f} | {floor / seconds:.1%} | {memory} | {diff:.1e} |")
        if name.startswith("ours") and name.endswith("fp32"):
            assert diff < 1e-4, f"{name} disagrees with the fp32 loop by {diff}"


# ---- greedy soup and angles ------------------------------------------------------------------


def official_greedy(paths, evaluator, factory, device) -> list[str]:
    """The official model-soups loop: per step, re-read the soup's ingredients, average, load, evaluate."""
    model = factory().to(device).eval()
    x, y = evaluator.splits["val"].inputs, evaluator.splits["val"].labels

    def accuracy(state) -> float:
        model.load_state_dict(state)
        with torch.no_grad():
            return float((model(x).argmax(-1) == y).float().mean())

    scores = {name: accuracy(open_checkpoint(path)) for name, path in paths.items()}
    kept, best = [], 0.0
    for name in sorted(paths, key=lambda n: -scores[n]):
        trial = kept + [name]
        states = [open_checkpoint(paths[n]) for n in trial]
        soup = {k: sum(s[k].double() for s in states) / len(states) if states[0][k].is_floating_point()
                else states[0][k] for k in states[0]}
        score = accuracy({k: v.float() if v.is_floating_point() else v for k, v in soup.items()})
        if score >= best:
            kept, best = trial, score
    return kept


def resident_greedy(states, evaluator, factory, device) -> list[str]:
    """A hand-written greedy loop with every checkpoint and the running sum on the device."""
    model = factory().to(device).eval()
    x, y = evaluator.splits["val"].inputs, evaluator.splits["val"].labels
    on_device = {n: {k: t.to(device) for k, t in s.items()} for n, s in states.items()}

    def accuracy(state) -> float:
        model.load_state_dict(state)
        with torch.no_grad():
            return float((model(x).argmax(-1) == y).float().mean())

    scores = {n: accuracy(s) for n, s in on_device.items()}
    first = next(iter(on_device.values()))
    total = {k: torch.zeros_like(t, dtype=torch.float64) for k, t in first.items() if t.is_floating_point()}
    kept, best = [], 0.0
    for name in sorted(on_device, key=lambda n: -scores[n]):
        state = on_device[name]
        trial = {k: ((total[k] + state[k]) / (len(kept) + 1)).float() for k in total}
        score = accuracy({**state, **trial})
        if score >= best:
            for k in total:
                total[k] += state[k]
            kept, best = kept + [name], score
    return kept


def greedy(args, device: torch.device) -> None:
    factory, image = next(iter(model_factories(args.tiny).values()))
    label = next(iter(model_factories(args.tiny)))
    evaluator, theta0 = case(factory, image, args.samples, device)
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for i in range(args.checkpoints):  # small steps keep the basin, large ones leave it
            paths[f"ft-{i:02d}"] = Path(folder) / f"ft-{i:02d}.safetensors"
            save_state_dict(perturbed(theta0, 0.01 * (1 + i % 4) ** 2, 100 + i), paths[f"ft-{i:02d}"])

        def ours():
            states = {n: open_checkpoint(p) for n, p in paths.items()}
            return list(RECIPES["greedy"].make(states, evaluator).ingredients)

        states = {n: open_checkpoint(p) for n, p in paths.items()}
        rows = {"ours: read once, RECIPES['greedy'] (sum on the device)": ours,
                "official approach: re-read, load_state_dict, evaluate each step":
                    lambda: official_greedy(paths, evaluator, factory, device),
                "hand-written loop, everything resident on the device":
                    lambda: resident_greedy(states, evaluator, factory, device)}
        results = {name: timed(run, device, args.repeats) for name, run in rows.items()}
    print(f"\n### Greedy soup: {args.checkpoints} {label} checkpoints on disk, {args.samples} val samples on {device}\n")
    print("| method | seconds | ingredients kept |\n|---|---:|---|")
    for name, (seconds, kept, _) in results.items():
        print(f"| {name} | {seconds:.2f} | {len(kept)}: {', '.join(kept)} |")
    kept = {tuple(r[1]) for r in results.values()}
    assert len(kept) == 1, f"the methods kept different ingredients: {kept}"


def angles(args, device: torch.device) -> None:
    width, depth = (64, 2) if args.tiny else (768, 12)  # ViT-B/16: 86M parameters
    factory = (lambda: ViT(224, 16, width, depth, width // 64 or 1))
    base = {k: v.clone() for k, v in factory().state_dict().items()}
    states = [perturbed(base, 0.05, 200 + i) for i in range(args.angle_checkpoints)]
    cpu_seconds, cpu, _ = timed(lambda: pairwise_angles(states, base, device="cpu"), torch.device("cpu"), 1)
    rows = [("cpu", cpu_seconds, 0.0)]
    if device.type == "cuda":
        seconds, here, _ = timed(lambda: pairwise_angles(states, base, device=device), device, args.repeats)
        rows.append((f"{device} (states read from host memory)", seconds, float((here.cosine - cpu.cosine).abs().max())))
        resident = [{k: t.to(device) for k, t in s.items()} for s in states]
        seconds, here, _ = timed(lambda: pairwise_angles(resident, base, device=device), device, args.repeats)
        rows.append((f"{device} (states resident)", seconds, float((here.cosine - cpu.cosine).abs().max())))
    parameters = sum(t.numel() for t in base.values() if t.is_floating_point())
    print(f"\n### Angles: {len(states)} checkpoints of {parameters / 1e6:.1f}M parameters, float64, θi − θ0\n")
    print("| device | seconds | max abs cosine difference vs cpu |\n|---|---:|---:|")
    for name, seconds, diff in rows:
        print(f"| {name} | {seconds:.2f} | {diff:.1e} |")
        assert diff < 1e-9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small models and data (a CPU check that it runs)")
    parser.add_argument("--grid", type=int, default=None, help="points per side (default 21; 5 with --tiny)")
    parser.add_argument("--samples", type=int, default=None, help="samples on the device (default 2048; 256 tiny)")
    parser.add_argument("--precisions", default="fp32,tf32,bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the skilled loop's model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=None, help="greedy ingredients (default 16; 6 tiny)")
    parser.add_argument("--angle-checkpoints", type=int, default=8)
    parser.add_argument("--only", choices=["landscape", "greedy", "angles"], default=None)
    args = parser.parse_args()
    args.grid = args.grid or (5 if args.tiny else 21)
    args.samples = args.samples or (256 if args.tiny else 2048)
    args.checkpoints = args.checkpoints or (6 if args.tiny else 16)
    args.precisions = [p for p in args.precisions.split(",") if p]
    device = torch.device(args.device)
    keep_freed_memory()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, threads {torch.get_num_threads()}")
    if args.only in (None, "landscape"):
        for label, (factory, image) in model_factories(args.tiny).items():
            landscape(label, factory, image, args, device)
    if args.only in (None, "greedy"):
        greedy(args, device)
    if args.only in (None, "angles"):
        angles(args, device)


if __name__ == "__main__":
    main()
