"""Task-vector merges, per tensor: task arithmetic, TIES, DARE and Model Breadcrumbs.

Each works on the task vectors δ_i = θ_i − θ0 of one tensor (Ilharco et al. 2023), in float64:

1. **sparsify** each δ_i (optional): keep the ``density`` share of largest magnitudes (TIES,
   Yadav et al. 2023, "trim"); keep each entry with probability ``density`` (DARE, Yu et al. 2024,
   "drop"), then rescale; or drop the ``gamma`` share of largest magnitudes and the smallest
   until ``density`` remain (Model Breadcrumbs, Davari & Belilovsky 2024);
2. **weight** each δ_i by its ingredient's weight w_i;
3. **elect signs** (optional, TIES): per entry, the sign of Σ w_i δ_i (0 counts as +); only the
   entries of each δ_i that agree with it are merged ("disjoint merge");
4. **sum** Σ w_i δ_i over the merged entries, divided by Σ w_i over the same entries where
   ``normalize`` (TIES' disjoint mean), times ``lambda``, added to θ0.

This is mergekit's generalized task arithmetic, step for step, so a mergekit YAML maps one to
one (``tests/test_merge_methods.py`` compares tensors with mergekit's on the same folders).
Where the papers and mergekit differ it is a parameter: DARE's ``rescale`` is mergekit's
``l1`` by default (restore each δ_i's L1 norm after the drop; :func:`rescaled`) or the
paper's ``density`` (divide by the keep probability, unbiased in expectation).

DARE's drop is seeded per tensor and per ingredient position (``seed``, the tensor's name), so a
merge is the same whichever order the engine meets the tensors in, in memory or streamed.

>>> import torch
>>> base = torch.zeros(4, dtype=torch.float64)
>>> blocks = [torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([-3.0, -1.0, 0.5, 0.0])]
>>> ties = task_vector_method("ties", [1.0, 1.0], sparsify="magnitude", density=0.5, consensus=True, normalize=True)
>>> ties.combine(blocks, base, None, key="w").tolist()  # trims to [1, -2, 0, 0] and [-3, -1, 0, 0]
[-3.0, -1.5, 0.0, 0.0]
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from soup_core.errors import RecipeError
from soup_core.merge.methods import ACCUMULATE_DTYPE, Blocks, TensorMethod, widen

SPARSIFIERS = ("magnitude", "random", "magnitude_outliers")
RESCALES = ("none", "l1", "density")
NORM_EPS = 1e-7  # below this L1 norm a task vector is not rescaled (mergekit's eps)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The ``density`` share of entries with the largest |δ| (at least one): TIES' trim."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    if density > 0 and delta.numel():
        keep = max(1, int(density * delta.numel()))
        mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:keep]] = True
    return mask.reshape(delta.shape)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` share of largest |δ|, then the smallest, keeping ``density``.
    When ``density + gamma > 1`` fewer outliers are dropped, so that ``density`` remain."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    count = delta.numel()
    keep, top = int(density * count), int(gamma * count)
    bottom = max(0, count - keep - top)
    mask = torch.zeros(count, dtype=torch.bool, device=delta.device)
    mask[torch.sort(delta.abs().reshape(-1)).indices[bottom:bottom + keep]] = True
    return mask.reshape(delta.shape)


def random_mask(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE's drop: each entry kept with probability ``density``, from a generator seeded by ``seed``
    (drawn on the CPU, so a seed gives the same mask on every device)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(delta.shape, generator=generator, dtype=ACCUMULATE_DTYPE) < density).to(delta.device)


def rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: str, density: float) -> torch.Tensor:
    """The kept entries of ``delta``, rescaled: ``l1`` restores the L1 norm it had (mergekit), ``density``
    divides by the keep probability (DARE's paper), ``none`` leaves them."""
    kept = delta * mask
    if rescale == "density" and 0 < density < 1:
        return kept / density
    if rescale == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
        if before >= NORM_EPS and after >= NORM_EPS:
            return kept * (before / after)
    return kept


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES' elected sign: which entries of each (weighted) δ_i agree with the sign of their sum."""
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == elected


def tensor_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit seed for one ingredient's drop mask on one tensor."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()[:8], "little") >> 1


def task_vector_method(name: str, weights: Sequence[float], *, sparsify: str | None = None, density: float = 1.0,
                       gamma: float = 0.01, consensus: bool = False, normalize: bool = False, scale: float = 1.0,
                       rescale: str = "none", seed: int = 0) -> TensorMethod:
    """θ0 + λ · merge of the weighted, sparsified task vectors (the module's steps 1–4)."""
    if sparsify not in (None, *SPARSIFIERS):
        raise RecipeError(f"{name}: unknown sparsification {sparsify!r}; one of {', '.join(SPARSIFIERS)}")
    if rescale not in RESCALES:
        raise RecipeError(f"{name}: rescale must be one of {', '.join(RESCALES)}, not {rescale!r}")
    weights = [float(w) for w in weights]

    def combine(blocks: Blocks, base: torch.Tensor, summary, key: str = "") -> torch.Tensor:
        if len(blocks) != len(weights):
            raise RecipeError(f"{name}: {len(weights)} weights for {len(blocks)} ingredients; give one weight each")
        theta0 = widen(base)
        deltas = torch.empty((len(blocks), *theta0.shape), dtype=ACCUMULATE_DTYPE, device=theta0.device)
        for index, block in enumerate(blocks):
            delta = widen(block) - theta0
            if sparsify == "magnitude":
                delta = rescaled(delta, magnitude_mask(delta, density), rescale, density)
            elif sparsify == "magnitude_outliers":
                delta = rescaled(delta, outlier_mask(delta, density, gamma), rescale, density)
            elif sparsify == "random":
                delta = rescaled(delta, random_mask(delta, density, tensor_seed(seed, key, index)), rescale, density)
            deltas[index] = delta
        w = torch.tensor(weights, dtype=ACCUMULATE_DTYPE, device=theta0.device).reshape(-1, *[1] * theta0.dim())
        deltas.mul_(w)
        if consensus:
            mask = sign_consensus(deltas)
            mixed, divisor = (deltas * mask).sum(dim=0), (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed, divisor = deltas.sum(dim=0), w.sum(dim=0).expand(theta0.shape).clone()
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed /= divisor
        return theta0 + scale * mixed

    # ranks, norms and drop masks are taken over whole tensors; plain task arithmetic goes by blocks
    return TensorMethod(name, combine, needs_base=True, elementwise=sparsify is None, keyed=True)
