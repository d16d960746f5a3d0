"""Weight-only merges as per-tensor functions, run by the engine for every tensor of a model.

A :class:`TensorMethod` is what mergekit writes as one ``@merge_method`` function: a pure
function of one tensor's ingredient values (and θ0's), here in float64. The engine
(:mod:`soup_core.merge.engine`) does the reading, the blocks, the dtypes and the writing, so a
method is a few lines and can be checked on a 2×2 example:

>>> import torch
>>> blocks = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 6.0], dtype=torch.float64)]
>>> mean_of().combine(blocks, None, None).tolist()
[2.0, 4.0]
>>> linear([0.75, 0.25]).combine(blocks, None, None).tolist()
[1.5, 3.0]

An *elementwise* method sees any block of a tensor's elements (the engine bounds memory by
block size, not tensor size). A method that needs a whole-tensor quantity first (Model Stock's
angle) declares a ``statistic``: computed on each block, summed over the tensor's blocks, turned
into a value by ``summary`` and given to ``combine`` — two passes over the tensor, one block at
a time. A method that is not elementwise (TIES' magnitude threshold) sees whole tensors. The
task-vector methods (task arithmetic, TIES, DARE, Breadcrumbs) are in
:mod:`soup_core.merge.task_vectors`, SLERP in :mod:`soup_core.merge.slerp`, LiNeS in
:mod:`soup_core.merge.lines`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from soup_core.errors import RecipeError

Blocks = Sequence[torch.Tensor]  # one block per ingredient (its own dtype), same elements of one tensor
ACCUMULATE_DTYPE = torch.float64


def widen(block: torch.Tensor) -> torch.Tensor:
    """A block in float64 (the accumulation dtype; exact for every float input dtype)."""
    return block.to(ACCUMULATE_DTYPE)


@dataclass(frozen=True)
class TensorMethod:
    """``combine(blocks, base_block, summary) -> merged float64 block`` for every block of every float
    tensor; blocks come in their own dtype and are widened to float64 by the method."""

    name: str
    combine: Callable[[Blocks, torch.Tensor | None, Any], torch.Tensor]
    statistic: Callable[[Blocks, torch.Tensor | None], torch.Tensor] | None = None
    summary: Callable[[torch.Tensor], Any] | None = None
    needs_base: bool = False
    elementwise: bool = True
    keyed: bool = False  # combine also takes ``key=`` the tensor's name (DARE seeds its drop with it)
    layout: bool = False  # combine also takes ``layout=`` every output tensor's name (LiNeS reads depth from it)


def mean_of() -> TensorMethod:
    """(Σ θ_i) / k, summed in float64 in ingredient order, then rounded once to the tensor's dtype.

    For 16-bit inputs the float64 sum is exact (8 or 11 significant bits, 53 to hold them) unless
    the values of one element span more than about 2^40 — so for k a power of two the result is
    the correctly rounded mean (``bench/bench_merge.py`` checks it element by element)."""
    def combine(blocks: Blocks, base, summary) -> torch.Tensor:
        total = widen(blocks[0]).clone() if blocks[0].dtype == ACCUMULATE_DTYPE else widen(blocks[0])
        for block in blocks[1:]:
            total.add_(widen(block))
        return total.div_(len(blocks))
    return TensorMethod("mean", combine)


def linear(weights: Sequence[float]) -> TensorMethod:
    """Σ w_i θ_i with the weights as given (mergekit's ``linear`` with ``normalize: false``;
    pass weights that sum to one for an average)."""
    weights = [float(w) for w in weights]

    def combine(blocks: Blocks, base, summary) -> torch.Tensor:
        if len(blocks) != len(weights):
            raise RecipeError(f"linear: {len(weights)} weights for {len(blocks)} ingredients; give one weight each")
        total = widen(blocks[0]).mul(weights[0])
        for weight, block in zip(weights[1:], blocks[1:]):
            total.add_(widen(block), alpha=weight)
        return total
    return TensorMethod("linear", combine)


def wise_ft(alpha: float) -> TensorMethod:
    """WiSE-FT (Wortsman et al. 2022b): (1 − α)·θ0 + α·mean(θ_i), the fine-tuned soup pulled back
    towards θ0 — α = 0 is θ0, α = 1 the uniform soup; one ingredient is WiSE-FT of that model."""
    alpha = float(alpha)

    def combine(blocks: Blocks, base: torch.Tensor, summary) -> torch.Tensor:
        return mean_of().combine(blocks, None, None).mul_(alpha).add_(widen(base), alpha=1 - alpha)
    return TensorMethod("wise-ft", combine, needs_base=True)


def model_stock_ratio_from_gram(gram: torch.Tensor) -> tuple[float, float]:
    """(mean pairwise cosine, interpolation ratio t) from the Gram matrix of k deltas θ_i − θ0.

    t = k·cos / (1 + (k − 1)·cos) (Jang et al. 2024, eq. 3, with cos the mean over pairs); t = 0
    (keep θ0) when cos ≤ 0, when a delta is zero, or for a single delta, where no angle exists.
    """
    k = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    if k < 2 or bool((norms == 0).any()):
        return 0.0, 0.0
    cosines = gram / (norms[:, None] * norms[None, :])
    cos = float((cosines.sum() - cosines.diagonal().sum()) / (k * (k - 1)))
    if cos <= 0:
        return cos, 0.0
    return cos, k * cos / (1 + (k - 1) * cos)


def model_stock() -> TensorMethod:
    """Model Stock, per tensor: merged = t·mean(θ_i) + (1 − t)·θ0, t from the deltas' angle."""
    def statistic(blocks: Blocks, base: torch.Tensor) -> torch.Tensor:
        theta0 = base.reshape(-1).to(ACCUMULATE_DTYPE)
        deltas = torch.stack([block.reshape(-1).to(ACCUMULATE_DTYPE) - theta0 for block in blocks])
        return deltas @ deltas.T

    def combine(blocks: Blocks, base: torch.Tensor, t: float) -> torch.Tensor:
        return mean_of().combine(blocks, None, None).mul_(t).add_(widen(base), alpha=1 - t)
    return TensorMethod("model-stock", combine, statistic, summary=lambda gram: model_stock_ratio_from_gram(gram)[1],
                        needs_base=True)
