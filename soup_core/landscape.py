"""Loss and error landscapes: many weight points per forward pass, exact at the anchors.

A slice is an affine subspace θ(c) = origin + Σ_k c_k d_k of weight space: a line (k = 1) for
interpolation paths and error barriers (paper App. J.1) or the θ0 → soup curve (WiSE-FT,
App. D); a plane (k = 2) for the paper's Figure 2 (see :func:`soup_core.geometry.plane_basis`)
or filter-normalised random slices. :class:`SliceEvaluator` scores many points c at once:

* **Stacked weights.** A chunk of G points becomes one batched state dict (one GEMM per
  tensor: origin + C·D) and runs in one pass instead of G Python-level forwards: through
  :class:`soup_core.folded.FoldedForward` (points folded into the channels of channels-last
  activations, for models built from standard layers) or one ``torch.vmap`` of
  ``torch.func.functional_call`` (any model vmap can run). A per-point loop on a private copy
  is the third way; the engine times all three on the spot and keeps the fastest that agrees
  with the loop.
* **The first layer is linear in its weights.** Its input does not depend on the point, so
  the layer runs once for the origin and once per direction, and each point only mixes those
  k + 1 outputs with its coefficients (exact: Linear/Conv are linear in (weight, bias)).
* **Bounded memory.** Points and data are chunked from a measured activation size and a byte
  budget; the evaluation data may be subsampled (a fixed, seeded subset, the same for every
  point — never chosen by results).
* **Progress and cancellation.** A callback reports progress; ``should_stop`` ends the run
  between chunks and what was computed is kept (NaN elsewhere), ordered coarse-to-fine so a
  cancelled grid is already a usable low-resolution map, and ``resume`` continues it.

BatchNorm — the pitfall users meet here. A BatchNorm network's running statistics belong to
the weights they were measured with; at an interpolated or extrapolated point neither end's
statistics fit, and the reproduction saw ResNet/EfficientNet soups collapse for that suspected
reason. Three policies (``bn=``):

* ``"recompute"`` (default): at every point, re-estimate running mean and variance on the
  evaluator's training data exactly as ``torch.optim.swa_utils.update_bn`` does (train-mode
  forward, cumulative average over the same batches; only BatchNorm switches to train mode,
  so dropout stays off). This is what the point's weights would really be deployed with.
* ``"interpolate"``: treat the statistics like weights (their affine combination; variances
  clamped at 0 when extrapolating). Cheap, and what a plain soup does.
* ``"keep"``: use the origin's statistics everywhere (θ0's when θ0 is the first point).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from soup_core.evaluate import Evaluator, Split
from soup_core.folded import Folded, FoldedForward, Unsupported
from soup_core.errors import SoupError
from soup_core.geometry import Direction, Plane, Projection, plane_keys
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

AFFINE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _AffineFirstLayer(nn.Module):
    """Runs a Linear/Conv once for the origin and each direction; mixes per point.

    ``coefficients`` ([1, c_1, …, c_k], batched under vmap) is set just before each call.
    """

    def __init__(self, layer: nn.Module, weights: Sequence[Mapping[str, torch.Tensor]]) -> None:
        super().__init__()
        self.layer = layer
        self.channel_dim = -1 if isinstance(layer, nn.Linear) else 1
        self.terms = len(weights)
        self.stacked = {name: torch.cat([w[name] for w in weights]) for name in weights[0]}
        self.coefficients: torch.Tensor | None = None
        self._input: torch.Tensor | None = None
        self._terms: torch.Tensor | None = None
        self._folded_terms: torch.Tensor | None = None

    def _same_input(self, x: torch.Tensor) -> bool:
        # Views (x.flatten(1) in a forward) are new objects over the same memory. Holding the
        # cached input keeps its storage alive, so an equal address means the same data.
        cached = self._input
        return cached is not None and (x is cached or (
            x.data_ptr() == cached.data_ptr() and x.shape == cached.shape and x.stride() == cached.stride()
            and x.dtype == cached.dtype and x._version == cached._version))

    def forget(self) -> None:
        self._input = self._terms = self._folded_terms = None

    def _terms_for(self, x: torch.Tensor) -> torch.Tensor:
        """[k+1, *out]: the layer's output for the origin and each direction."""
        if not self._same_input(x):  # a loop over points feeds the same batch every time
            y = functional_call(self.layer, self.stacked, (x,))  # (k+1)·C outputs, computed once
            dim = self.channel_dim % y.dim()
            self._input, self._terms = x, y.unflatten(dim, (self.terms, -1)).movedim(dim, 0).contiguous()
            self._folded_terms = None
        return self._terms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        terms = self._terms_for(x)
        # A vector–matrix product per point; under vmap one GEMM [G, k+1] × [k+1, out] whose
        # result is already in the batch-first layout the next layer wants.
        return (self.coefficients @ terms.flatten(1)).view(terms.shape[1:])

    def folded(self, x: torch.Tensor) -> torch.Tensor:
        """All points' outputs in :mod:`soup_core.folded`'s layout, [N, G·C, *spatial]."""
        terms = self._terms_for(x)
        if self._folded_terms is None:  # [N, *spatial, k+1, C]: samples outermost, like the output
            self._folded_terms = terms.permute(1, *range(3, terms.dim()), 0, 2).contiguous()
        n, *spatial, _, c = self._folded_terms.shape
        # [G, k+1] × [k+1, C] for each sample and position: each point's C channels side by side.
        mixed = torch.matmul(self.coefficients, self._folded_terms).view(n, *spatial, -1)
        return mixed.permute(0, mixed.dim() - 1, *range(1, mixed.dim() - 1)) if spatial else mixed


class _BatchNormSlice(nn.Module):
    """A BatchNorm that can record batch statistics (``collect``) or use given running ones.

    Same parameter and buffer names as the module it replaces, so state-dict keys still apply.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean.clone())
        self.register_buffer("running_var", bn.running_var.clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.clone())
        self.collect: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.batched = True  # set by SliceEvaluator: True while running under vmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.collect is not None and not self.batched:
            # update_bn's own step with momentum 1: the fused kernel normalises with the batch
            # statistics and leaves the batch mean and unbiased variance in the buffers.
            mean, var = torch.zeros_like(self.running_mean), torch.ones_like(self.running_var)
            y = nn.functional.batch_norm(x, mean, var, self.weight, self.bias, True, 1.0, self.eps)
            self.collect.append((mean, var))
            return y
        if self.collect is not None:  # the same under vmap, where buffers cannot be updated in place
            dims = [0] + list(range(2, x.dim()))
            mean, var = x.mean(dims), x.var(dims, correction=0)
            n = x.numel() // x.shape[1]
            self.collect.append((mean, var * (n / max(n - 1, 1))))  # running_var is unbiased
        else:  # eval mode: the fused kernel
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def _folded_first_layer(folded: FoldedForward, module: _AffineFirstLayer, x: torch.Tensor):
    """The cached first layer under :class:`FoldedForward`: mixed outputs, or per-point weights."""
    if isinstance(module.layer, nn.Linear):
        return Folded(module.folded(x), len(module.coefficients))
    # A convolution has many positions per output channel: mixing k+1 outputs at each costs
    # more than convolving once with every point's own filters (k+1 tiny GEMMs for those).
    weights = {n: (module.coefficients @ t.unflatten(0, (module.terms, -1)).flatten(1)).view(
               len(module.coefficients), -1, *t.shape[1:]) for n, t in module.stacked.items()}
    return module.layer, weights["weight"], weights.get("bias")


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
            model.set_submodule(name, _BatchNormSlice(model.get_submodule(name)))
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
            self._affine = _AffineFirstLayer(module, weights)
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
                self.model, {_AffineFirstLayer: _folded_first_layer}, batchnorms=(_BatchNormSlice,))
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

    def evaluate(self, coords: torch.Tensor | Sequence[Sequence[float]], splits: Sequence[str] = ("val",),
                 *, progress: Progress | None = None, should_stop: ShouldStop | None = None) -> PointValues:
        """Loss and error at each row of ``coords`` ([G, k]); NaN where stopped before."""
        coords = torch.as_tensor(coords, dtype=torch.float32).to(self.device).reshape(-1, self.k)
        data = {s: _subsample(self.evaluator.splits[s], self.max_samples, self.sample_seed) for s in splits}
        loss = {s: np.full(len(coords), np.nan) for s in splits}
        error = {s: np.full(len(coords), np.nan) for s in splits}
        chunk = self.chunk_points(max(len(d) for d in data.values()))
        if self.bn == "recompute" and self.strategy != "loop":  # statistics: whole bn batches per call
            bn_samples = min(self.bn_batch_size, len(self.evaluator.train))
            chunk = max(1, min(chunk, self.working_set // (self.activations_per_sample * 4 * bn_samples)))
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


def coarse_to_fine(size: int) -> list[int]:
    """Flat indices of a size×size grid, coarsest lattice first (stride halves each level).

    Every level includes the last row and column, so each prefix covers the whole extent.
    """
    order: list[int] = []
    seen = np.zeros(size * size, dtype=bool)
    stride = 1 << max(0, math.ceil(math.log2(max(size - 1, 1))))
    while stride >= 1:
        lattice = sorted(set(range(0, size, stride)) | {size - 1})
        for iy in lattice:
            for ix in lattice:
                flat = iy * size + ix
                if not seen[flat]:
                    seen[flat] = True
                    order.append(flat)
        stride //= 2
    return order


def grid_extent(points: Sequence[tuple[float, float]], margin: float = 0.2) -> tuple[tuple[float, float], tuple[float, float]]:
    """The anchors' bounding box widened by ``margin`` × its larger side on every side."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span = max(max(xs) - min(xs), max(ys) - min(ys), 1e-12)
    pad = margin * span
    return (min(xs) - pad, max(xs) + pad), (min(ys) - pad, max(ys) + pad)


@dataclass
class Landscape:
    """Loss and error over an R×R grid of a plane. Arrays are indexed [row = y, column = x]
    (Plotly's ``z`` convention); NaN marks points not computed yet (a cancelled run)."""

    xs: np.ndarray
    ys: np.ndarray
    splits: tuple[str, ...]
    loss: dict[str, np.ndarray]
    error: dict[str, np.ndarray]
    bn: str
    anchors: list[Projection] = field(default_factory=list)
    projections: list[Projection] = field(default_factory=list)
    max_samples: int | None = None

    @property
    def done(self) -> np.ndarray:
        return ~np.isnan(self.loss[self.splits[0]])

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def preview(self, values: np.ndarray) -> np.ndarray:
        """A partial grid filled from the nearest computed point (for drawing while computing)."""
        done = ~np.isnan(values)
        if done.all() or not done.any():
            return values
        from scipy.ndimage import distance_transform_edt
        _, (iy, ix) = distance_transform_edt(~done, return_indices=True)
        return values[iy, ix]

    def to_json(self) -> dict:
        def grid(a: np.ndarray) -> list:
            return [[None if math.isnan(v) else float(v) for v in row] for row in a]
        return {"axes": {"x": self.xs.tolist(), "y": self.ys.tolist()}, "bn": self.bn,
                "max_samples": self.max_samples, "splits": list(self.splits), "complete": self.complete,
                "loss": {s: grid(a) for s, a in self.loss.items()},
                "error": {s: grid(a) for s, a in self.error.items()},
                "anchors": [{"name": a.name, "xy": list(a.xy)} for a in self.anchors],
                "projections": [p.to_json() for p in self.projections]}

    @classmethod
    def from_json(cls, data: Mapping) -> Landscape:
        def array(rows: list) -> np.ndarray:
            return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
        return cls(np.array(data["axes"]["x"]), np.array(data["axes"]["y"]), tuple(data["splits"]),
                   {s: array(a) for s, a in data["loss"].items()}, {s: array(a) for s, a in data["error"].items()},
                   data["bn"], [Projection(a["name"], tuple(a["xy"]), 0.0) for a in data["anchors"]],
                   [Projection(p["name"], tuple(p["xy"]), p["off_plane"]) for p in data["projections"]],
                   data.get("max_samples"))


def plane_landscape(evaluator: Evaluator, plane: Plane, *, grid: int = 21, margin: float = 0.2,
                    splits: Sequence[str] = ("val",), bn: str = "recompute",
                    extent: tuple[tuple[float, float], tuple[float, float]] | None = None,
                    projections: Sequence[Projection] = (), max_samples: int | None = None,
                    resume: Landscape | None = None, progress: Progress | None = None,
                    should_stop: ShouldStop | None = None, engine: SliceEvaluator | None = None) -> Landscape:
    """Loss and error on a grid×grid lattice of ``plane`` (paper Figure 2).

    The extent is the anchors' bounding box plus ``margin`` unless given. Points run coarse to
    fine; ``should_stop`` keeps what was done and ``resume`` (a partial result of the same grid)
    computes only the rest.
    """
    if grid < 2:
        raise SoupError(f"grid must be at least 2 points per side, got {grid}")
    engine = engine or SliceEvaluator(evaluator, plane.origin, plane.directions, bn=bn, max_samples=max_samples)
    if resume is not None:
        # Mixing two runs is only right when they computed the same function on the same plane.
        same_plane = [a.name for a in resume.anchors] == [a.name for a in plane.anchors] and np.allclose(
            [a.xy for a in resume.anchors], [a.xy for a in plane.anchors], rtol=1e-9, atol=1e-12)
        if (len(resume.xs) != grid or tuple(resume.splits) != tuple(splits) or resume.bn != engine.bn
                or resume.max_samples != engine.max_samples or not same_plane):
            raise SoupError("the partial landscape to resume was made with other settings (plane, grid, splits, "
                             "BatchNorm policy or samples); start a new one")
        xs, ys = resume.xs, resume.ys
    else:
        (x0, x1), (y0, y1) = extent or grid_extent([a.xy for a in plane.anchors], margin)
        xs, ys = np.linspace(x0, x1, grid), np.linspace(y0, y1, grid)
    result = resume or Landscape(xs, ys, tuple(splits), {s: np.full((grid, grid), np.nan) for s in splits},
                                 {s: np.full((grid, grid), np.nan) for s in splits}, engine.bn,
                                 max_samples=engine.max_samples)
    result.anchors, result.projections = list(plane.anchors), list(projections)
    todo = [f for f in coarse_to_fine(grid) if not result.done.reshape(-1)[f]]
    coords = torch.tensor([[xs[f % grid], ys[f // grid]] for f in todo], dtype=torch.float64).reshape(-1, 2)
    values = engine.evaluate(coords, splits, progress=progress, should_stop=should_stop)
    for s in splits:
        result.loss[s].reshape(-1)[todo] = values.loss[s]
        result.error[s].reshape(-1)[todo] = values.error[s]
    return result


# ---- 1D paths -----------------------------------------------------------------------------


@dataclass
class Path:
    """Loss and error along (1 − α)·a + α·b for each α, with the barrier between the ends."""

    names: tuple[str, str]
    alphas: np.ndarray
    loss: dict[str, np.ndarray]
    error: dict[str, np.ndarray]
    bn: str

    def barrier(self, values: np.ndarray) -> float:
        """max over α ∈ [0, 1] of value(α) − ((1 − α)·value(0) + α·value(1)) (Frankle et al. 2020)."""
        inside = (self.alphas >= 0) & (self.alphas <= 1)
        a, v = self.alphas[inside], values[inside]
        straight = (1 - a) * v[0] + a * v[-1]
        return float(np.max(v - straight))

    def to_json(self) -> dict:
        return {"names": list(self.names), "alphas": self.alphas.tolist(), "bn": self.bn,
                "loss": {s: a.tolist() for s, a in self.loss.items()},
                "error": {s: a.tolist() for s, a in self.error.items()},
                "barrier": {s: {"loss": self.barrier(self.loss[s]), "error": self.barrier(self.error[s])}
                            for s in self.loss}}


def path_alphas(points: int = 41, low: float = -0.5, high: float = 1.5) -> np.ndarray:
    """``points`` evenly spaced α in [low, high], with 0 and 1 always included (the ends)."""
    alphas = np.union1d(np.linspace(low, high, points), [0.0, 1.0])
    return alphas


def interpolation_path(evaluator: Evaluator, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                       alphas: Sequence[float] | np.ndarray | None = None, *, names: tuple[str, str] = ("a", "b"),
                       splits: Sequence[str] = ("val",), bn: str = "recompute", max_samples: int | None = None,
                       progress: Progress | None = None) -> Path:
    """Loss and error on the line through ``a`` and ``b``, past both ends (paper App. J.1).

    With ``a`` = θ0 and ``b`` a soup or fine-tuned model this is the WiSE-FT curve (App. D).
    """
    alphas = path_alphas() if alphas is None else np.asarray(alphas, dtype=np.float64)
    keys = plane_keys(a)
    direction = {k: b[k].to(torch.float64) - a[k].to(torch.float64) for k in keys}
    engine = SliceEvaluator(evaluator, a, [direction], bn=bn, max_samples=max_samples)
    values = engine.evaluate(torch.tensor(alphas).reshape(-1, 1), splits, progress=progress)
    return Path(names, alphas, values.loss, values.error, engine.bn)


def batchnorm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the running statistics of a model's BatchNorm layers."""
    return [f"{name}.{buffer}" for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for buffer in ("running_mean", "running_var")]


def recompute_batchnorm(evaluator: Evaluator, state: Mapping[str, torch.Tensor],
                        batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """``state`` with BatchNorm statistics re-estimated on the evaluator's training data, exactly
    as ``torch.optim.swa_utils.update_bn`` does with batches of ``batch_size`` (default: the
    evaluator's). The input is not modified."""
    model = evaluator.model_copy()
    model.load_state_dict(state)
    if not batchnorm_keys(model):
        return dict(state)
    if evaluator.train is None:
        raise SoupError("recomputing BatchNorm statistics needs training data: pass train=Split(...) "
                         "to the Evaluator, or export with bn='interpolate' or bn='keep'")
    loader = torch.utils.data.DataLoader(evaluator.train.inputs, batch_size=batch_size or evaluator.batch_size)
    torch.optim.swa_utils.update_bn(loader, model, device=evaluator.device)
    fresh = model.state_dict()
    return {k: (fresh[k].detach().cpu().to(t.dtype) if k in fresh else t) for k, t in state.items()}


def point_weights(evaluator: Evaluator, plane: Plane, x: float, y: float, bn: str = "recompute") -> dict[str, torch.Tensor]:
    """The weights at (x, y) of ``plane`` as the landscape scored them under ``bn``."""
    if bn not in BN_POLICIES:
        raise SoupError(f"unknown BatchNorm policy {bn!r}; use one of {', '.join(BN_POLICIES)}")
    state = plane.point(x, y)
    keys = batchnorm_keys(evaluator.model)
    if bn == "keep":
        state.update({k: plane.origin[k] for k in keys})
    elif bn == "interpolate":
        state.update({k: state[k].clamp_min(0) for k in keys if k.endswith("running_var")})
    else:
        state = recompute_batchnorm(evaluator, state)
    return state
