"""How a chunk of weight points runs through the model: four strategies, one interface.

Each strategy answers three questions for the :class:`~soup_core.landscape.engine.SliceEvaluator`
that holds it: how many points per chunk (:meth:`Strategy.chunk_points`), how many samples per
call (:meth:`Strategy.batch_size`), and how a function of one point runs over a chunk
(:meth:`Strategy.run`, calling :meth:`Strategy.forward` for the model itself).

* :class:`Loop` — one point at a time on a private copy of the model, its weights written in
  place, in the evaluator's batch size: what loss-landscapes and tomgoldstein/loss-landscape
  do, and the reference every other strategy must agree with.
* :class:`BatchedLoop` — the same loop with samples batched as large as the memory budget
  allows and, on CUDA, convolutions in channels-last memory: a GPU is busy only with large calls.
* :class:`Vmap` — ``torch.vmap`` of ``functional_call`` over the chunk's stacked weights: one
  call for all points, for any model vmap can run.
* :class:`Fold` — the points folded into the channels of channels-last activations
  (:mod:`soup_core.landscape.folded`), for models built from standard layers.

Sizes come from the engine's ``budget`` (bytes a call may allocate: on CUDA from
``torch.cuda.mem_get_info()``, on a CPU a cache-sized working set) and ``activation_bytes``
(bytes per sample and point, measured on a probe call: the peak allocated on CUDA, the module
outputs on a CPU). A chunk's stacked weights and its activations together stay within the
budget (:meth:`Strategy.call_bytes`); the engine times the strategies on the spot and keeps
the fastest that agrees with :class:`Loop`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from torch.func import functional_call

if TYPE_CHECKING:
    from soup_core.evaluate import Evaluator
    from soup_core.landscape.folded import FoldedForward

Params = dict[str, torch.Tensor]


class SliceEngine(Protocol):
    """What a strategy reads from the engine that holds it (the
    :class:`~soup_core.landscape.engine.SliceEvaluator`): its model and sizes, never its methods."""

    device: torch.device
    evaluator: Evaluator
    model: nn.Module
    model_tensors: dict[str, torch.Tensor]  # the model's own tensors by state-dict key
    fixed: dict[str, torch.Tensor]  # values held at the origin's
    folded: FoldedForward | None
    parameter_count: int  # moving entries per point
    budget: int
    working_set: int
    weights_budget: int
    activation_bytes: int  # per sample and point
    largest_activation_bytes: int

MAX_CHUNK_POINTS = 256
# Samples per batched call: beyond this a call gains nothing on a CPU (bench_landscape.py
# --working-set); a GPU takes whatever fits its budget.
SAMPLES_PER_CALL = {"cpu": 256}
# Points per folded call on a CPU: oneDNN's grouped kernels gain from many groups, and each
# call has a fixed dispatch cost (`bench/bench_landscape.py --fold-points N` compares).
FOLD_POINTS = 32
# On a CPU the folded layout sizes its sample batches by its largest activation: glibc serves
# allocations above 32 MiB with fresh pages from the kernel every time (soup_core/allocator.py),
# and such page faults slow a call severalfold.
FOLD_LARGEST_TENSOR = 8 << 20
FOLD_SAMPLES_PER_CALL = 1024


def _even(samples: int, cap: int) -> int:
    """Samples per call at most ``cap``, made even (269 in batches of 256 would leave one of 13)."""
    batches = math.ceil(samples / max(1, cap))
    return int(max(1, math.ceil(samples / batches)))


class Strategy:
    """One way to run a chunk; subclasses set ``name`` and override what differs."""

    name = ""
    batched_batchnorm = False  # BatchNorm sees a leading point dimension (vmap)
    points_at_once = True  # activations of all the chunk's points are alive together

    def __init__(self, engine: SliceEngine) -> None:
        self.engine = engine

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def prepare(self) -> None:
        """Once chosen, before the run: adapt the engine's private model (a no-op by default)."""

    # ---- sizes -------------------------------------------------------------------------

    def live_points(self, points: int) -> int:
        """Points whose activations are alive together in one call."""
        return points if self.points_at_once else 1

    def samples_cap(self, points: int) -> int:
        """Most samples per call for ``points`` points: activations within the working set, and
        weights plus activations within the budget."""
        engine = self.engine
        per_sample = max(engine.activation_bytes * self.live_points(points), 1)
        room = min(engine.working_set, engine.budget - self.weight_bytes(points))
        limit = SAMPLES_PER_CALL.get(engine.device.type)
        return int(max(1, min(room // per_sample, limit) if limit else room // per_sample))

    def points_by_weights(self, cap: int) -> int:
        """Points whose stacked float32 weights the weights budget holds, at most ``cap``."""
        engine = self.engine
        return int(max(1, min(cap, engine.weights_budget // max(engine.parameter_count * 4, 1))))

    def chunk_points(self, samples: int) -> int:
        """Points per chunk: as many as the weights budget holds, while one call of (up to) a
        full batch of samples still fits."""
        engine = self.engine
        points = self.points_by_weights(MAX_CHUNK_POINTS)
        if not self.points_at_once:  # one point's activations at a time: only the weights count
            return points
        wanted = min(samples, SAMPLES_PER_CALL.get(engine.device.type, samples))
        while points > 1 and self.samples_cap(points) < wanted:
            points = min(points - 1, max(1, points * self.samples_cap(points) // wanted))
        return points

    def batch_size(self, points: int, samples: int) -> int:
        return _even(samples, self.samples_cap(points))

    def weight_bytes(self, points: int) -> int:
        """The chunk's stacked float32 weights (a loop writes one point at a time from them)."""
        return points * self.engine.parameter_count * 4

    def call_bytes(self, points: int, samples: int) -> int:
        """Bytes one call of ``points`` points on ``samples`` samples allocates (weights + activations)."""
        return self.weight_bytes(points) + self.live_points(points) * samples * self.engine.activation_bytes

    # ---- running -----------------------------------------------------------------------

    def forward(self, params: Params, x: torch.Tensor, points: int) -> torch.Tensor:
        """The model's logits at the point(s) ``params`` on ``x``."""
        return functional_call(self.engine.model, (params, self.engine.fixed), (x,))

    def run(self, function: Callable, params: Params, coefficients: torch.Tensor, x: torch.Tensor):
        """``function(params, coefficients, x)`` at every point of the chunk, stacked per point."""
        raise NotImplementedError


class Loop(Strategy):
    """One point at a time, weights written into a private copy, the evaluator's batch size."""

    name = "loop"
    points_at_once = False

    def samples_cap(self, points: int) -> int:
        return min(self.engine.evaluator.batch_size, super().samples_cap(points))

    def forward(self, params: Params, x: torch.Tensor, points: int) -> torch.Tensor:
        tensors = self.engine.model_tensors
        for key, value in params.items():
            tensors[key].copy_(value)
        return self.engine.model(x)

    def run(self, function: Callable, params: Params, coefficients: torch.Tensor, x: torch.Tensor):
        outputs = [function({k: v[i] for k, v in params.items()}, coefficients[i], x)
                   for i in range(len(coefficients))]
        if isinstance(outputs[0], torch.Tensor):
            return torch.stack(outputs)
        return [torch.stack(parts) for parts in zip(*outputs)]


class BatchedLoop(Loop):
    """The loop with samples batched to the memory budget; channels-last convolutions on CUDA."""

    name = "batched-loop"

    def __init__(self, engine: SliceEngine) -> None:
        super().__init__(engine)
        self.channels_last = engine.device.type == "cuda" and any(
            isinstance(m, torch.nn.Conv2d) for m in engine.model.modules())

    def samples_cap(self, points: int) -> int:
        return Strategy.samples_cap(self, points)

    def forward(self, params: Params, x: torch.Tensor, points: int) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(params, x, points)

    def prepare(self) -> None:
        """Put the private copy's convolution weights in channels-last memory (CUDA, conv nets)."""
        if self.channels_last:
            self.engine.model.to(memory_format=torch.channels_last)


class Vmap(Strategy):
    """One ``torch.vmap`` of ``functional_call`` over the chunk's stacked weights."""

    name = "vmap"
    batched_batchnorm = True

    def run(self, function: Callable, params: Params, coefficients: torch.Tensor, x: torch.Tensor):
        return torch.vmap(function, in_dims=(0, 0, None))(params, coefficients, x)


class Fold(Strategy):
    """The chunk's points folded into the channels of channels-last activations, one call."""

    name = "fold"

    def chunk_points(self, samples: int) -> int:
        if self.engine.device.type != "cpu":
            return super().chunk_points(samples)
        # On a CPU oneDNN's grouped kernels want many groups, whatever the working set.
        points = self.points_by_weights(FOLD_POINTS)
        while points > 1 and self.call_bytes(points, 1) > self.engine.budget:
            points //= 2
        return points

    def samples_cap(self, points: int) -> int:
        engine = self.engine
        if engine.device.type != "cpu":
            return super().samples_cap(points)
        # Sized by the largest activation instead of the working set: see FOLD_LARGEST_TENSOR.
        by_pages = FOLD_LARGEST_TENSOR // (engine.largest_activation_bytes * points)
        by_budget = (engine.budget - self.weight_bytes(points)) // max(engine.activation_bytes * points, 1)
        return int(max(1, min(FOLD_SAMPLES_PER_CALL, by_pages, by_budget)))

    def forward(self, params: Params, x: torch.Tensor, points: int) -> torch.Tensor:
        return self.engine.folded(params, self.engine.fixed, x, points=points)

    def run(self, function: Callable, params: Params, coefficients: torch.Tensor, x: torch.Tensor):
        return function(params, coefficients, x)


STRATEGY_TYPES: dict[str, type[Strategy]] = {s.name: s for s in (Fold, Vmap, BatchedLoop, Loop)}
STRATEGIES = ("auto", *STRATEGY_TYPES)
