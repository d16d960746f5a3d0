"""Big merges on small machines: ours (streamed, tensor by tensor) against mergekit, same folders.

    python bench/bench_merge.py [--sizes 50M,220M] [--ingredients 4] [--repeats 2] [--device cpu]
    python bench/bench_merge.py --tiny          # a 2M-parameter zoo: checks that it runs and agrees

For each size, a synthetic Llama-architecture zoo is written once under ``bench/.cache/merge``
(random weights in bfloat16, Hugging Face folders from ``save_pretrained``: ``base/`` and
``ft-0``…; nothing is downloaded). Then, in this process, on the same folders with the page
cache warm:

* **floor** — read every input file once and write the output's bytes once (with fsync, as we do);
* **mergekit 0.1.5** ``linear`` (``normalize``, computed in float32, written in bfloat16) through
  its own ``run_merge``, lazy unpickling on;
* **ours** ``uniform`` through :func:`soup_core.export.write_streamed` (what ``soup make uniform DIR
  --out OUT`` runs), the inputs' sha256 for the provenance included: the first run of a process
  hashes the bytes it reads (row ``ours``), later runs on unchanged files reuse the digests (row
  ``ours, hashed``: the best of the remaining repeats);
* ``model-stock`` against mergekit's ``model_stock`` (the two differ by design where a tensor's
  mean cosine is ≤ 0 or a delta is zero; here none is);
* ``task-arithmetic`` and ``ties`` (density 0.5) against mergekit's methods of the same name
  (``--methods uniform,model-stock,task-arithmetic,ties``). On bfloat16 inputs many entries of a
  task vector share the magnitude at TIES' trim threshold; which of them are kept is arbitrary
  (mergekit: whatever its sort puts first, which differs between CPU and GPU; ours: the first by
  position, on every device), so the two TIES outputs differ in those entries.

Each row: wall time (best of ``--repeats``), peak anonymous memory above the level before the
run (``RssAnon`` sampled every 2 ms: memory-mapped and page-cache bytes are not counted), and
the outputs compared tensor by tensor (``uniform`` vs ``linear``: bfloat16 bytes identical).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_angles import PeakMemory  # noqa: E402

from soup_core.allocator import keep_freed_memory  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache" / "merge"
SIZES = {  # name: (hidden, intermediate, layers, vocab) of a Llama model
    "2M": (64, 172, 2, 4096),
    "50M": (512, 1408, 8, 32000),
    "220M": (1024, 2816, 14, 32000),
    "440M": (1024, 2816, 30, 32000),
    "1B": (2048, 5632, 16, 32000),  # 1.1B parameters

}


def build_zoo(size: str, ingredients: int) -> Path:
    """base/ and ft-0.. as Hugging Face folders of a random bf16 Llama (θi = θ0 + noise)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = CACHE / f"llama-{size}-x{ingredients}"
    if (folder / f"ft-{ingredients - 1}" / "config.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    hidden, intermediate, layers, vocab = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder / "base")
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    shared = {k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in theta0.items()}
    for i in range(ingredients):
        with torch.no_grad():
            for key, param in model.state_dict().items():
                noise = 0.01 * torch.randn(param.shape, generator=generator)
                param.copy_((theta0[key].float() + shared[key] + noise).to(param.dtype))
        model.save_pretrained(folder / f"ft-{i}")
    return folder


def warm(paths: list[Path]) -> int:
    """Read every file once (page cache warm for every method); returns the bytes read."""
    total = 0
    for path in paths:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            with open(file, "rb") as handle:
                while block := handle.read(64 << 20):
                    total += len(block)
    return total


def floor(inputs: list[Path], output_bytes: int, out: Path) -> float:
    """Read every input once and write ``output_bytes`` once (fsync'd): the least a merge can do."""
    start = time.perf_counter()
    warm(inputs)
    block = bytes(64 << 20)
    with open(out, "wb") as handle:
        left = output_bytes
        while left > 0:
            left -= handle.write(block[:min(left, len(block))])
        handle.flush()
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - start
    out.unlink()
    return elapsed


def run_mergekit(zoo: Path, names: list[str], out: Path, method: str, device: str) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    models = [{"model": str(zoo / n), "parameters": {"weight": 1.0}} for n in names]
    config = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": "bfloat16"}
    if method == "linear":
        config["parameters"] = {"normalize": True}
    else:
        config["base_model"] = str(zoo / "base")
    if method == "ties":
        config["parameters"] = {"density": 0.5}  # ours' default; weights 1, normalize true for both
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False, quiet=True,
                           cuda=device == "cuda"))


def run_ours(zoo: Path, out: Path, recipe: str, device: str) -> None:
    from soup_core.export import Candidate, write_streamed
    from soup_core.zoo import open_zoo
    write_streamed(open_zoo(zoo), Candidate.of_recipe(recipe), out, device=device)


def timed(function, *args) -> tuple[float, int]:
    """Wall time and peak anonymous memory above the level before; freed heap that
    ``keep_freed_memory`` keeps is handed back first (malloc_trim), so each run starts level."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with PeakMemory() as memory:
        start = time.perf_counter()
        function(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed, memory.used


def compare(ours: Path, theirs: Path) -> tuple[int, int, float, float]:
    """(tensors, tensors with identical bytes, max abs difference, share of elements that differ)
    between two HF output folders."""
    from soup_core.io import load_state_dict
    a, b = load_state_dict(ours), load_state_dict(theirs)
    if sorted(a) != sorted(b):
        raise SystemExit(f"the outputs hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    same = sum(bool(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16))) for k in a)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    differ = sum(int((a[k].view(torch.int16) != b[k].view(torch.int16)).sum()) for k in a)
    return len(a), same, worst, differ / sum(t.numel() for t in a.values())


def exact_mean_elements(output: Path, inputs: list[Path]) -> tuple[int, int]:
    """(elements, elements that differ from the correctly rounded mean of the bf16 inputs).

    The reference is the float64 sum divided by the (power-of-two) count, rounded once to bf16.
    It is the exact mean where the float64 sum is exact, which is checked here, not assumed: in
    every tensor the inputs' exponents span few enough binades that 8-bit significands and the
    carries of the sum fit float64's 53 bits.
    """
    from soup_core.io import load_state_dict
    merged, states = load_state_dict(output), [load_state_dict(p) for p in inputs]
    if len(states) & (len(states) - 1):
        raise SystemExit("the exact-mean check needs a power-of-two number of ingredients")
    count = wrong = 0
    for key, tensor in merged.items():
        values = torch.stack([s[key].double().reshape(-1) for s in states]).abs()
        _, exponents = torch.frexp(values[values > 0])
        span = int(exponents.max() - exponents.min()) if exponents.numel() else 0
        if span + 8 + len(states).bit_length() > 53:
            raise SystemExit(f"{key}: values span 2^{span}: the float64 sum may round; no exact reference")
        exact = (sum(s[key].double() for s in states) / len(states)).to(tensor.dtype)
        count += tensor.numel()
        wrong += int((exact.view(torch.int16) != tensor.view(torch.int16)).sum())
    return count, wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50M,220M")
    parser.add_argument("--ingredients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool (ours: the first hashes)")
    parser.add_argument("--methods", default="uniform,model-stock")
    parser.add_argument("--device", default="cpu", help="where ours (and mergekit, with cuda) combine tensors")
    parser.add_argument("--tools", default="mergekit,ours", help="mergekit,ours; ours-cpu,ours-cuda to set "
                        "our device per row (a GPU machine without mergekit: --tools ours-cpu,ours-cuda)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    keep_freed_memory()  # as the soup command does; for mergekit too (one process)
    sizes = ["2M"] if args.tiny else args.sizes.split(",")
    peers = {"uniform": "linear", "model-stock": "model_stock", "task-arithmetic": "task_arithmetic", "ties": "ties"}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}")
    for size in sizes:
        zoo = build_zoo(size, args.ingredients)
        names = [f"ft-{i}" for i in range(args.ingredients)]
        inputs = [zoo / n for n in names]
        input_bytes = warm([zoo / "base", *inputs])
        output_bytes = input_bytes // (args.ingredients + 1)
        params = output_bytes // 2
        scratch = CACHE / "out"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        floor_s = min(floor(inputs, output_bytes, scratch / "floor.bin") for _ in range(args.repeats))
        print(f"\n{size}: {params / 1e6:.0f}M parameters (bf16) x {args.ingredients} ingredients; "
              f"floor (read {args.ingredients} inputs, write 1 output) {floor_s:.2f} s")
        print(f"  {'method':12s} {'tool':9s} {'wall s':>8s} {'x floor':>8s} {'peak anon MB':>13s}")
        for recipe in args.methods.split(","):
            results = {}
            for tool in args.tools.split(","):
                best = None
                if tool != "mergekit":
                    from soup_core.io.read import _KNOWN_SHA256
                    _KNOWN_SHA256.clear()  # this tool's first run hashes
                for r in range(args.repeats):
                    out = scratch / f"{tool}-{recipe}-{r}"
                    if tool == "mergekit":
                        wall, peak = timed(run_mergekit, zoo, names, out, peers[recipe], args.device)
                    else:
                        device = tool.partition("-")[2] or args.device
                        wall, peak = timed(run_ours, zoo, out, recipe, device)
                    if tool != "mergekit" and r == 0:
                        print(f"  {recipe:12s} {tool:9s} {wall:8.2f} {wall / floor_s:8.2f} {peak / 2**20:13.0f}"
                              "   (first run: hashes its inputs)")
                        continue
                    best = (wall, peak) if best is None or wall < best[0] else best
                    results[tool] = out
                label = tool if tool == "mergekit" else f"{tool}, hashed"
                print(f"  {recipe:12s} {label:9s} {best[0]:8.2f} {best[0] / floor_s:8.2f} {best[1] / 2**20:13.0f}")
            first, *others = list(results)
            for other in others:
                count, same, worst, share = compare(results[other], results[first])
                print(f"  {recipe}: {other} {same}/{count} tensors byte-identical to {first}'s, "
                      f"max |difference| {worst:.3g}, {100 * share:.4g}% of elements differ")
            if recipe == "uniform":
                for tool, out in results.items():
                    elements, wrong = exact_mean_elements(out, inputs)
                    print(f"  {tool}: {wrong:,} of {elements:,} elements differ from the correctly rounded mean")
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
