"""The slice engine: many weight points of θ(c) = origin + Σ_k c_k d_k scored per forward pass.

See :mod:`soup_core.landscape` for what it does and why; this module holds
:class:`SliceEvaluator` and the chunk sizes it works with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from soup_core.errors import SoupError
from soup_core.evaluate import Evaluator, Split
from soup_core.geometry import Direction, plane_keys
from soup_core.landscape.batchnorm import BatchNormSlice
from soup_core.landscape.first_layer import AFFINE_LAYERS, AffineFirstLayer, folded_first_layer
from soup_core.landscape.folded import FoldedForward, Unsupported
from soup_core.policies import BN_POLICIES
from soup_core.state import Progress, ShouldStop, tied_aliases

# Bytes of activations one vmapped call may touch. On a CPU, tiny calls drown in per-call
# overhead and huge ones leave the cache (`bench/bench_landscape.py --strategy vmap
# --working-set N` measures it; bench/RESULTS.md, "Landscape"). A GPU wants large calls.
WORKING_SET = {"cpu": 32 << 20, "cuda": 1 << 30}
# Points per folded call: oneDNN's grouped kernels gain from many groups, and each call has a
# fixed dispatch cost (`bench/bench_landscape.py --fold-points N` compares).
FOLD_POINTS = 32
# The folded layout sizes its sample batches by its largest activation instead: glibc serves
# allocations above 32 MiB with fresh pages from the kernel every time, whatever the process
# asks (soup_core/allocator.py), and such page faults slow a call severalfold.
FOLD_LARGEST_TENSOR = 8 << 20
FOLD_SAMPLES_PER_CALL = 1024
WEIGHTS_BUDGET = 1 << 30  # bytes of stacked weights per chunk
MAX_CHUNK_POINTS = 256
SAMPLES_PER_CALL = 256
# Timing the strategies at start-up: a probe of PROBE_SAMPLES samples checks they agree; then
# each runs its own chunk (up to PROBE_POINTS points, PROBE_SAMPLES samples), best of
# PROBE_ROUNDS (the first warms up).
PROBE_SAMPLES = 128
PROBE_POINTS = 32
PROBE_ROUNDS = 4
STRATEGIES = ("auto", "fold", "vmap", "loop")


@dataclass(frozen=True)
class PointValues:
    """Mean cross-entropy and error (1 − accuracy) per split, one entry per point."""

    loss: dict[str, np.ndarray]
    error: dict[str, np.ndarray]


def _loss_and_wrong(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (float64) and count of wrong predictions per point of [G, N, C] logits."""
    # Cross-entropy as logsumexp − logit of the label; max gives argmax too.
    top, predicted = logits.max(dim=-1)
    lse = top + (logits - top.unsqueeze(-1)).exp().sum(-1).log()
    picked = logits.gather(-1, labels.expand(len(logits), -1).unsqueeze(-1)).squeeze(-1)
    return (lse - picked).sum(-1, dtype=torch.float64), (predicted != labels).sum(-1)


def _subsample(split: Split, max_samples: int | None, seed: int) -> Split:
    if max_samples is None or len(split) <= max_samples:
        return split
    index = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:max_samples]
    index = index.sort().values.to(split.labels.device)
    return Split(split.inputs[index], split.labels[index])


class SliceEvaluator:
    """Scores points of the slice origin + Σ c_k d_k of one evaluator's model.

    In a script of your own on Linux, call :func:`soup_core.allocator.keep_freed_memory` first:
    the folded strategy otherwise page-faults its activations back in for every chunk.

    >>> import torch
    >>> from soup_core.evaluate import Evaluator, Split
    >>> ev = Evaluator(lambda: torch.nn.Linear(2, 2), {"val": Split(torch.eye(2), torch.tensor([0, 1]))})
    >>> origin = {"weight": torch.eye(2), "bias": torch.zeros(2)}
    >>> flip = {"weight": torch.tensor([[-2., 2.], [2., -2.]], dtype=torch.float64), "bias": torch.zeros(2, dtype=torch.float64)}
    >>> values = SliceEvaluator(ev, origin, [flip]).evaluate(torch.tensor([[0.0], [1.0]]))
    >>> values.error["val"].tolist()
    [0.0, 1.0]
    """

    def __init__(self, evaluator: Evaluator, origin: Mapping[str, torch.Tensor], directions: Sequence[Direction],
                 *, bn: str = "recompute", max_samples: int | None = None, sample_seed: int = 0,
                 working_set: int | None = None, reuse_first_layer: bool = True, strategy: str = "auto",
                 bn_batch_size: int | None = None) -> None:
        if bn not in BN_POLICIES:
            raise SoupError(f"unknown BatchNorm policy {bn!r}; use one of {', '.join(BN_POLICIES)}")
        if not directions:
            raise SoupError("a slice needs at least one direction")
        self.evaluator, self.device = evaluator, evaluator.device
        self.k = len(directions)
        if strategy not in STRATEGIES:
            raise SoupError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        self.max_samples, self.sample_seed = max_samples, sample_seed
        # update_bn's loader batch size: it defines the recomputed statistics, so it is fixed
        # here and never shrunk for memory (chunks get fewer points instead).
        self.bn_batch_size = bn_batch_size or evaluator.batch_size
        self.working_set = working_set or WORKING_SET.get(self.device.type, WORKING_SET["cuda"])
        model = evaluator.model_copy().eval()
        self.bn_modules = [name for name, m in model.named_modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.bn = bn if self.bn_modules else "none"
        if self.bn == "recompute" and evaluator.train is None:
            raise SoupError("bn='recompute' re-estimates BatchNorm statistics on training data, and this "
                            "evaluator has none: pass train=Split(...) to the Evaluator, or use "
                            "bn='interpolate' or bn='keep'")
        for name in self.bn_modules:
            model.set_submodule(name, BatchNormSlice(model.get_submodule(name)))
        stat_keys = {f"{m}.{b}" for m in self.bn_modules for b in ("running_mean", "running_var")}

        keys = plane_keys(origin)
        # BatchNorm statistics follow the slice only under "interpolate".
        moving = [k for k in keys if k not in stat_keys or self.bn == "interpolate"]
        self.first_layer = self._first_affine_layer(model, set(moving)) if reuse_first_layer else None
        if self.first_layer is not None:
            name, module = self.first_layer
            names = [n for n, _ in module.named_parameters()]
            weights = [{n: origin[f"{name}.{n}"].to(self.device, torch.float32) for n in names}]
            weights += [{n: d[f"{name}.{n}"].to(self.device, torch.float32) for n in names} for d in directions]
            self._affine = AffineFirstLayer(module, weights)
            model.set_submodule(name, self._affine)
            moving = [k for k in moving if not k.startswith(name + ".")]
        self.model = model.to(self.device)
        # Held at the origin's values: integer buffers, and statistics under "keep". Tied aliases
        # are left out (functional_call re-ties them), as are the first layer's weights and, under
        # "recompute", the statistics (computed per point).
        skip = set(moving) | set(tied_aliases(origin)) | (stat_keys if self.bn == "recompute" else set())
        self.fixed = {k: t.to(self.device) for k, t in origin.items()
                      if k not in skip and not (self.first_layer and k.startswith(self.first_layer[0] + "."))}
        self.moving = moving
        self.shapes = {k: origin[k].shape for k in moving}
        self.origin32 = {k: origin[k].reshape(-1).to(self.device, torch.float32) for k in moving}
        self.dirs32 = {k: torch.stack([d[k].reshape(-1) for d in directions]).to(self.device, torch.float32)
                       for k in moving}
        self.stat_keys = sorted(stat_keys)
        self.parameter_count = sum(t.numel() for t in self.origin32.values())
        # The copy's own tensors by state-dict key, holding the fixed values (for the loop strategy).
        self._tensors = {**dict(model.named_parameters(remove_duplicate=False)),
                         **dict(model.named_buffers(remove_duplicate=False))}
        with torch.no_grad():
            for key, value in self.fixed.items():
                if key in self._tensors:
                    self._tensors[key].copy_(value)
        try:
            self._folded: FoldedForward | None = FoldedForward(
                self.model, {AffineFirstLayer: folded_first_layer}, batchnorms=(BatchNormSlice,))
            self.fold_unsupported = ""
        except Unsupported as exc:
            self._folded, self.fold_unsupported = None, str(exc)
        if strategy == "fold" and self._folded is None:
            raise SoupError(f"strategy='fold' cannot run this model ({self.fold_unsupported}); "
                            "use 'vmap', 'loop' or 'auto'")
        self.strategy = "loop"  # measuring needs no batching, and every model runs in a loop
        self.activations_per_sample, self.largest_activation = self._activation_size()
        self.strategy = self._fastest_strategy() if strategy == "auto" else strategy

    # ---- set-up -------------------------------------------------------------------------

    def _probe_input(self) -> torch.Tensor:
        split = next(iter(self.evaluator.splits.values()))
        return split.inputs[:2]

    def _first_affine_layer(self, model: nn.Module, moving: set[str]) -> tuple[str, nn.Module] | None:
        """The first module with weights that the forward pass calls, if it is a Linear/Conv."""
        called: list[str] = []
        hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: called.append(name))
                 for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        try:
            with torch.no_grad():
                model.to(self.device)(self._probe_input())
        finally:
            for h in hooks:
                h.remove()
        if not called:
            return None
        name = called[0]
        module = model.get_submodule(name)
        if not isinstance(module, AFFINE_LAYERS) or getattr(module, "groups", 1) != 1:
            return None
        if called.count(name) > 1 or not all(f"{name}.{n}" in moving for n, _ in module.named_parameters()):
            return None
        return name, module

    def _activation_size(self) -> tuple[int, int]:
        """Floats per sample of all module outputs and of the largest per-point one (a probe batch).

        The cached first layer's own output holds k+1 terms once per batch, not once per point,
        so it counts in the total only.
        """
        sizes: list[tuple[nn.Module, int]] = []
        hooks = [m.register_forward_hook(lambda mod, args, out: sizes.append((mod, out.numel()))
                                         if isinstance(out, torch.Tensor) else None)
                 for m in self.model.modules() if not list(m.children())]
        try:
            self._logits(torch.zeros(1, self.k, device=self.device), self._probe_input())
        finally:
            for h in hooks:
                h.remove()
        once = self._affine.layer if self.first_layer is not None else None
        largest = max((n for m, n in sizes if m is not once), default=2)
        return max(1, sum(n for _, n in sizes) // 2), max(1, largest // 2)

    def _fastest_strategy(self) -> str:
        """On a CPU, whichever of fold, vmap and a per-point loop is fastest here; vmap elsewhere.

        Batched convolutions become grouped convolutions under vmap, which CPUs run slowly in
        channels-first memory, while the folded layout runs them in channels-last memory; and
        small matmul networks gain from batching: so it is measured, not guessed. A strategy
        whose logits disagree with the plain loop's is never chosen.
        """
        split = next(iter(self.evaluator.splits.values()))
        runs = ["loop"]
        for strategy in ("fold", "vmap"):
            if strategy == "fold" and self._folded is None:
                continue
            try:  # some models (data-dependent control flow) cannot run under vmap at all
                self.strategy = strategy
                self._logits(torch.zeros(2, self.k, device=self.device), split.inputs[:2])
                runs.append(strategy)
            except Exception:
                pass
            finally:
                self.strategy = "loop"
        if self.device.type != "cpu":
            return "vmap" if "vmap" in runs else runs[-1]
        probe = torch.linspace(-1, 1, 4 * self.k, device=self.device).view(4, self.k)
        reference = None
        for strategy in list(runs):  # the same small probe for all: do they agree?
            self.strategy = strategy
            logits = self._logits(probe, split.inputs[:PROBE_SAMPLES])
            if reference is None:
                reference = logits
            elif not torch.allclose(logits, reference, rtol=1e-4, atol=1e-4):
                runs.remove(strategy)
        # Each timed at its own chunk size (up to PROBE_POINTS points), per point and sample.
        shapes = {}
        for strategy in runs:
            self.strategy = strategy
            points = min(self.chunk_points(len(split)), PROBE_POINTS)
            shapes[strategy] = (torch.linspace(-1, 1, points * self.k, device=self.device).view(points, self.k),
                                split.inputs[:min(self._batch_size(points, len(split)), PROBE_SAMPLES)])
        timings = dict.fromkeys(runs, math.inf)
        for round_ in range(PROBE_ROUNDS):  # interleaved: a shared machine's noise hits all alike
            for strategy in runs:
                coords, x = shapes[strategy]
                self.strategy = strategy
                start = time.perf_counter()
                self._logits(coords, x)
                timings[strategy] = min(timings[strategy], (time.perf_counter() - start) / (len(coords) * len(x)))
            if round_ and max(timings.values()) * PROBE_POINTS * PROBE_SAMPLES > 0.5:
                break  # a large model: one timed round (after the warm-up) tells them apart
        self.strategy = "loop"
        return min(timings, key=timings.get)

    # ---- evaluation ---------------------------------------------------------------------

    def _coefficients(self, coords: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.ones(len(coords), 1, device=coords.device), coords], dim=1)

    def _point_params(self, coords: torch.Tensor) -> dict[str, torch.Tensor]:
        """origin + coords · D for every moving tensor: [G, *shape] each, one GEMM per tensor."""
        return {k: torch.addmm(self.origin32[k], coords, self.dirs32[k]).view(len(coords), *self.shapes[k])
                for k in self.moving}

    def _forward(self, params: dict[str, torch.Tensor], coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.first_layer is not None:
            self._affine.coefficients = coefficients
        try:
            if self.strategy == "loop":  # our private copy: write the point in place, like the peers
                for key, value in params.items():
                    self._tensors[key].copy_(value)
                return self.model(x)
            if self.strategy == "fold":
                return self._folded(params, self.fixed, x, points=len(coefficients))
            return functional_call(self.model, (params, self.fixed), (x,))
        finally:
            if self.first_layer is not None:
                self._affine.coefficients = None

    def _run(self, function: Callable, params: dict[str, torch.Tensor], coefficients: torch.Tensor,
             x: torch.Tensor):
        """``function`` at each point of a chunk: one vmapped call, or a loop of plain calls."""
        for name in self.bn_modules:
            self.model.get_submodule(name).batched = self.strategy == "vmap"
        try:
            if self.strategy == "fold":  # the whole chunk in one call already
                return function(params, coefficients, x)
            if self.strategy == "vmap":
                return torch.vmap(function, in_dims=(0, 0, None))(params, coefficients, x)
            outputs = [function({k: v[i] for k, v in params.items()}, coefficients[i], x)
                       for i in range(len(coefficients))]
        finally:  # the first layer's cached batch lives for one call (fold: one evaluation)
            if self.first_layer is not None and self.strategy != "fold":
                self._affine.forget()
        if isinstance(outputs[0], torch.Tensor):
            return torch.stack(outputs)
        return [torch.stack(parts) for parts in zip(*outputs)]

    def _logits(self, coords: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        try:
            with torch.no_grad():
                return self._run(self._forward, self._point_params(coords), self._coefficients(coords), x)
        finally:
            self._release()

    def chunk_points(self, samples: int) -> int:
        """Points per batched call.

        A loop holds one point at a time, so only the stacked weights count. vmap takes the
        points whose activations for up to 256 samples fit the working set. The folded layout
        takes FOLD_POINTS points (its grouped kernels want many groups) and fits the samples
        to the working set instead.
        """
        by_weights = WEIGHTS_BUDGET // max(self.parameter_count * 4, 1)
        if self.strategy == "loop":
            return int(max(1, min(MAX_CHUNK_POINTS, by_weights)))
        if self.strategy == "fold":
            return int(max(1, min(FOLD_POINTS, by_weights)))
        per_point = self.activations_per_sample * 4 * min(samples, SAMPLES_PER_CALL)
        return int(max(1, min(MAX_CHUNK_POINTS, by_weights, self.working_set // max(per_point, 1))))

    def _batch_size(self, points: int, samples: int) -> int:
        """Samples per call: within the working set when batched; a plain model's batch size in a loop.

        Batches are made even (269 samples in batches of 256 would leave one of 13).
        """
        if self.strategy == "loop":
            cap = self.evaluator.batch_size
        elif self.strategy == "fold":
            cap = min(FOLD_SAMPLES_PER_CALL, FOLD_LARGEST_TENSOR // (self.largest_activation * 4 * points))
        else:
            cap = min(SAMPLES_PER_CALL, self.working_set // max(self.activations_per_sample * 4 * points, 1))
        batches = math.ceil(samples / max(1, cap))
        return int(max(1, math.ceil(samples / batches)))

    def _recomputed_statistics(self, params: dict[str, torch.Tensor], coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """update_bn at each point of the chunk: average over the training batches of batch stats."""
        train = _subsample(self.evaluator.train, self.max_samples, self.sample_seed)
        modules = [self.model.get_submodule(name) for name in self.bn_modules]
        totals: list[list[torch.Tensor]] | None = None
        batches = 0
        batch_size = self.bn_batch_size

        def collect(p, c, x):
            for m in modules:
                m.collect = []
            self._forward(p, c, x)
            if any(len(m.collect) != 1 for m in modules):
                raise SoupError("bn='recompute' needs each BatchNorm module called once per forward; "
                                "use bn='interpolate' or bn='keep' for this model")
            return [t for m in modules for t in m.collect[0]]

        try:
            for start in range(0, len(train), batch_size):
                x = train.inputs[start:start + batch_size]
                stats = self._run(collect, params, coefficients, x)
                totals = stats if totals is None else [a + b for a, b in zip(totals, stats)]
                batches += 1
        finally:
            for m in modules:
                m.collect = None
        out = {}
        for i, name in enumerate(self.bn_modules):
            out[f"{name}.running_mean"] = totals[2 * i] / batches
            out[f"{name}.running_var"] = totals[2 * i + 1] / batches
        return out

    def chunk_for(self, splits: Sequence[str]) -> int:
        """Points per call of :meth:`evaluate` on these splits. A chunk's values depend only on
        its points and this engine's settings, which is what lets :mod:`soup_core.distributed`
        hand whole chunks to other processes and get the same numbers back."""
        samples = max(len(_subsample(self.evaluator.splits[s], self.max_samples, self.sample_seed)) for s in splits)
        chunk = self.chunk_points(samples)
        if self.bn == "recompute" and self.strategy != "loop":  # statistics: whole bn batches per call
            bn_samples = min(self.bn_batch_size, len(self.evaluator.train))
            chunk = max(1, min(chunk, self.working_set // (self.activations_per_sample * 4 * bn_samples)))
        return chunk

    def evaluate(self, coords: torch.Tensor | Sequence[Sequence[float]], splits: Sequence[str] = ("val",),
                 *, progress: Progress | None = None, should_stop: ShouldStop | None = None) -> PointValues:
        """Loss and error at each row of ``coords`` ([G, k]); NaN where stopped before."""
        coords = torch.as_tensor(coords, dtype=torch.float32).to(self.device).reshape(-1, self.k)
        data = {s: _subsample(self.evaluator.splits[s], self.max_samples, self.sample_seed) for s in splits}
        loss = {s: np.full(len(coords), np.nan) for s in splits}
        error = {s: np.full(len(coords), np.nan) for s in splits}
        chunk = self.chunk_for(splits)
        try:
            for start in range(0, len(coords), chunk):
                if should_stop is not None and should_stop():
                    break
                part = coords[start:start + chunk]
                with torch.no_grad():
                    params = self._point_params(part)
                    coefficients = self._coefficients(part)
                    if self.bn == "recompute":  # a new dict: the folded forward caches weights per dict
                        params = {**params, **self._recomputed_statistics(params, coefficients)}
                    elif self.bn == "interpolate":
                        for k in self.stat_keys:
                            if k.endswith("running_var"):
                                params[k] = params[k].clamp_min(0.0)
                    for s, split in data.items():
                        total_loss = torch.zeros(len(part), dtype=torch.float64, device=self.device)
                        wrong = torch.zeros(len(part), dtype=torch.float64, device=self.device)
                        batch_size = self._batch_size(len(part), len(split))
                        for b in range(0, len(split), batch_size):
                            x, y = split.inputs[b:b + batch_size], split.labels[b:b + batch_size]
                            losses, wrongs = _loss_and_wrong(self._run(self._forward, params, coefficients, x), y)
                            total_loss += losses
                            wrong += wrongs
                        loss[s][start:start + len(part)] = (total_loss / len(split)).cpu().numpy()
                        error[s][start:start + len(part)] = (wrong / len(split)).cpu().numpy()
                if progress is not None:
                    progress(min(1.0, (start + len(part)) / len(coords)), f"{start + len(part)}/{len(coords)} points")
        finally:
            self._release()
        return PointValues(loss, error)

    def _release(self) -> None:
        """Drop what the folded forward keeps between calls: first-layer terms, a chunk's weights."""
        if self.first_layer is not None:
            self._affine.forget()
        if self._folded is not None:
            self._folded.release()


# ---- 2D grids -----------------------------------------------------------------------------
