"""The slice engine: many weight points of θ(c) = origin + Σ_k c_k d_k scored per forward pass
(:class:`SliceEvaluator` and its chunk sizes; :mod:`soup_core.landscape` says what it does and why)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils._named_member_accessor import NamedMemberAccessor

from soup_core.errors import SoupError
from soup_core.evaluate import Evaluator, Split
from soup_core.geometry import Direction, plane_keys
from soup_core.landscape.batchnorm import BatchNormSlice
from soup_core.landscape.budget import Budget
from soup_core.landscape.choice import PROBE_SAMPLES, fastest_strategy
from soup_core.landscape.first_layer import AFFINE_LAYERS, AffineFirstLayer, folded_first_layer
from soup_core.landscape.folded import FoldedForward, Unsupported
from soup_core.landscape.scores import PointValues, loss_and_wrong
from soup_core.landscape.strategies import STRATEGIES, STRATEGY_TYPES, Loop, Strategy
from soup_core.policies import BN_POLICIES
from soup_core.precision import check_precision, precision
from soup_core.state import Progress, ShouldStop, tied_aliases

# In bf16/tf32 the first DEVIATION_POINTS points of a run are scored in fp32 as well; the
# largest loss difference is reported as the run's precision_deviation.
DEVIATION_POINTS = 4


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
                 bn_batch_size: int | None = None, precision: str | None = None,
                 memory_budget: int | None = None) -> None:
        if bn not in BN_POLICIES:
            raise SoupError(f"unknown BatchNorm policy {bn!r}; use one of {', '.join(BN_POLICIES)}")
        if not directions:
            raise SoupError("a slice needs at least one direction")
        if strategy not in STRATEGIES:
            raise SoupError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        self.evaluator, self.device = evaluator, evaluator.device
        self.k = len(directions)
        self.precision = check_precision(precision or evaluator.precision)
        self.precision_deviation: float | None = None  # measured by evaluate() unless fp32
        self.max_samples, self.sample_seed = max_samples, sample_seed
        # update_bn's loader batch size: it defines the recomputed statistics, so it is fixed
        # here and never shrunk for memory (chunks get fewer points instead).
        self.bn_batch_size = bn_batch_size or evaluator.batch_size
        budget = Budget.on(self.device, memory_budget, working_set)  # see soup_core.landscape.budget
        self.budget, self.working_set, self.weights_budget = budget.total, budget.working_set, budget.weights
        model = evaluator.model_copy().eval()
        # No gradients here, ever; and autocast caches its bf16 copy of a leaf that requires
        # grad, so the loops' in-place writes would not reach a bf16 forward.
        model.requires_grad_(False)
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
        # The copy's own tensors by state-dict key, holding the fixed values (the loops write
        # each point's moving tensors into them).
        self.model_tensors = {**dict(model.named_parameters(remove_duplicate=False)),
                              **dict(model.named_buffers(remove_duplicate=False))}
        accessor = NamedMemberAccessor(model)  # checkpoint names that are attribute aliases (soup_core.models)
        for key in origin:
            if key not in self.model_tensors:
                with contextlib.suppress(AttributeError):
                    self.model_tensors[key] = accessor.get_tensor(key)
        with torch.no_grad():
            for key, value in self.fixed.items():
                if key in self.model_tensors:
                    self.model_tensors[key].copy_(value)
        try:
            self.folded: FoldedForward | None = FoldedForward(
                self.model, {AffineFirstLayer: folded_first_layer}, batchnorms=(BatchNormSlice,))
            self.fold_unsupported = ""
        except Unsupported as exc:
            self.folded, self.fold_unsupported = None, str(exc)
        if strategy == "fold" and self.folded is None:
            raise SoupError(f"strategy='fold' cannot run this model ({self.fold_unsupported}); "
                            "use 'vmap', 'loop', 'batched-loop' or 'auto'")
        self._strategy: Strategy = Loop(self)  # measuring needs no batching, and every model runs in a loop
        self.activation_bytes, self.largest_activation_bytes = self._activation_size()
        smallest = self._strategy.call_bytes(1, 1)
        if smallest > self.budget:
            raise SoupError(f"one point on one sample needs {smallest / 2**20:.1f} MiB (weights and activations), "
                            f"more than this run's memory budget of {self.budget / 2**20:.1f} MiB; free memory "
                            "on the device or give a larger memory_budget")
        if strategy == "auto":
            candidates = [STRATEGY_TYPES[name](self) for name in STRATEGY_TYPES
                          if name != "loop" and (name != "fold" or self.folded is not None)]
            split = next(iter(self.evaluator.splits.values()))
            self._strategy = fastest_strategy(self._strategy, candidates, self._logits_with, split.inputs, self.k,
                                              self.device)
        else:
            self._strategy = STRATEGY_TYPES[strategy](self)
        self._strategy.prepare()

    @property
    def strategy(self) -> str:
        """The name of the strategy chosen (one of :data:`STRATEGIES` but ``auto``)."""
        return self._strategy.name

    # ---- set-up -------------------------------------------------------------------------

    def _probe_input(self, samples: int = 2) -> torch.Tensor:
        split = next(iter(self.evaluator.splits.values()))
        return split.inputs[:samples]

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
        """Bytes per sample of one point's activations, and of its largest per-point activation.

        On CUDA the first is the peak memory a probe call allocates beyond its weights, per
        sample (what is alive at once, including what modules compute inline); on a CPU, which
        has no such counter, the sum of all module outputs (an upper bound under no_grad). The
        cached first layer's own output holds k+1 terms once per batch, not once per point, so it
        counts in the total only.
        """
        sizes: list[tuple[nn.Module, int]] = []
        hooks = [m.register_forward_hook(lambda mod, args, out: sizes.append((mod, out.numel() * out.element_size()))
                                         if isinstance(out, torch.Tensor) else None)
                 for m in self.model.modules() if not list(m.children())]
        x = self._probe_input(2)
        try:
            self._logits(torch.zeros(1, self.k, device=self.device), x)
        finally:
            for h in hooks:
                h.remove()
        once = self._affine.layer if self.first_layer is not None else None
        largest = max((n for m, n in sizes if m is not once), default=8) // len(x)
        total = sum(n for _, n in sizes) // len(x)
        if self.device.type == "cuda":
            total = self._peak_bytes_per_sample()
        return max(1, total), max(1, largest)

    def _peak_bytes_per_sample(self) -> int:
        """CUDA: the peak allocated by one point's forward on a probe batch, per sample."""
        x = self._probe_input(PROBE_SAMPLES)
        coords = torch.zeros(1, self.k, device=self.device)
        with torch.no_grad(), precision(self.precision, self.device):
            params = self._point_params(coords)
            coefficients = self._coefficients(coords)
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._run(self._forward, params, coefficients, x)
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - before
        self._release()
        return peak // len(x)

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
            return self._strategy.forward(params, x, len(coefficients) if coefficients.dim() > 1 else 1)
        finally:
            if self.first_layer is not None:
                self._affine.coefficients = None

    def _run(self, function: Callable, params: dict[str, torch.Tensor], coefficients: torch.Tensor,
             x: torch.Tensor):
        """``function`` at each point of a chunk, the way the strategy runs chunks."""
        for name in self.bn_modules:
            self.model.get_submodule(name).batched = self._strategy.batched_batchnorm
        return self._strategy.run(function, params, coefficients, x)

    def _logits(self, coords: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        try:
            with torch.no_grad(), precision(self.precision, self.device):
                return self._run(self._forward, self._point_params(coords), self._coefficients(coords), x)
        finally:
            self._release()

    def _logits_with(self, strategy: Strategy, coords: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_logits` run with ``strategy`` (for :func:`~soup_core.landscape.choice.fastest_strategy`)."""
        chosen, self._strategy = self._strategy, strategy
        try:
            return self._logits(coords, x)
        finally:
            self._strategy = chosen

    def chunk_points(self, samples: int) -> int:
        """Points per chunk of the chosen strategy (see :mod:`soup_core.landscape.strategies`)."""
        return self._strategy.chunk_points(samples)

    def _recomputed_statistics(self, params: dict[str, torch.Tensor], coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """update_bn at each point of the chunk: average over the training batches of batch stats."""
        train = _subsample(self.evaluator.train, self.max_samples, self.sample_seed)
        modules = [self.model.get_submodule(name) for name in self.bn_modules]
        totals: list[torch.Tensor] | None = None
        batches = 0
        batch_size = self.bn_batch_size

        def collect(p, c, x):
            for m in modules:
                m.collect = []
            self._forward(p, c, x)
            if any(len(m.collect) != 1 for m in modules):
                raise SoupError("bn='recompute' needs each BatchNorm module called once per forward; "
                                "use bn='interpolate' or bn='keep' for this model")
            return [t.float() for m in modules for t in m.collect[0]]

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
        if self.bn == "recompute" and self._strategy.points_at_once:  # statistics: whole bn batches per call
            bn_samples = min(self.bn_batch_size, len(self.evaluator.train))
            while chunk > 1 and (self._strategy.call_bytes(chunk, bn_samples) > self.budget
                                 or chunk * bn_samples * self.activation_bytes > self.working_set):
                chunk -= 1
        return chunk

    def _chunk_values(self, part: torch.Tensor, data: Mapping[str, Split]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Summed loss and wrong count per point of ``part`` on each split (on the device)."""
        out = {}
        with torch.no_grad(), precision(self.precision, self.device):
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
                batch_size = self._strategy.batch_size(len(part), len(split))
                for b in range(0, len(split), batch_size):
                    x, y = split.inputs[b:b + batch_size], split.labels[b:b + batch_size]
                    logits = self._run(self._forward, params, coefficients, x).float()
                    losses, wrongs = loss_and_wrong(logits, y)
                    total_loss += losses
                    wrong += wrongs
                out[s] = (total_loss / split.predictions, wrong / split.predictions)
        return out

    def _measure_deviation(self, part: torch.Tensor, data: Mapping[str, Split],
                           values: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """|loss − fp32 loss| at most, over the first points this engine scores in bf16/tf32."""
        points = part[:DEVIATION_POINTS]
        chosen, self.precision = self.precision, "fp32"
        self._release()  # the first layer's cached terms are in the run's precision
        try:
            exact = self._chunk_values(points, data)
        finally:
            self.precision = chosen
            self._release()
        deviation = max(float((values[s][0][:len(points)] - exact[s][0]).abs().max()) for s in data)
        self.precision_deviation = max(self.precision_deviation or 0.0, deviation)

    def evaluate(self, coords: torch.Tensor | Sequence[Sequence[float]], splits: Sequence[str] = ("val",),
                 *, progress: Progress | None = None, should_stop: ShouldStop | None = None,
                 on_chunk: Callable[[PointValues], None] | None = None) -> PointValues:
        """Loss and error at each row of ``coords`` ([G, k]); NaN where stopped before. Data stays on
        the device; each chunk's sums come back to the host once; ``on_chunk`` sees the values so far."""
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
                values = self._chunk_values(part, data)
                if self.precision != "fp32" and self.precision_deviation is None:
                    self._measure_deviation(part, data, values)
                for s, (losses, errors) in values.items():
                    loss[s][start:start + len(part)] = losses.cpu().numpy()
                    error[s][start:start + len(part)] = errors.cpu().numpy()
                if progress is not None:
                    progress(min(1.0, (start + len(part)) / len(coords)), f"{start + len(part)}/{len(coords)} points")
                if on_chunk is not None:
                    on_chunk(PointValues(loss, error))
        finally:
            self._release()
        return PointValues(loss, error)

    def _release(self) -> None:
        """Drop what is kept between calls: first-layer terms, the folded forward's chunk weights."""
        if self.first_layer is not None:
            self._affine.forget()
        if self.folded is not None:
            self.folded.release()


# ---- 2D grids -----------------------------------------------------------------------------
