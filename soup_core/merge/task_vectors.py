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

**Ties at the trim threshold.** In bfloat16 checkpoints a task vector takes few distinct values,
so many entries can share the magnitude at TIES' threshold; which of them are kept is the paper's
"top k%" left open. We keep the first by
position, the same on every device; mergekit keeps whatever its sort puts first, which differs
between CPU and GPU. On such inputs the two TIES merges differ in those entries; on inputs
without ties they are equal (``tests/test_merge_methods.py``).

**λ chosen on val** (:mod:`soup_core.recipes.tuning`) makes the same merge at 20 values of λ,
which scales the merged update last. Inside :func:`one_update_for_every_scale` a sparsified
method keeps each tensor's merged update (float64, before λ) the first time and applies the
next λ to that same tensor, with the same operations: every soup is bit for bit the one made
alone, and the masks, sorts and sign elections run once. It keeps at most
:data:`REUSED_UPDATE_BYTES`; tensors past that are merged again as usual.

Memory: per tensor, two float64 accumulators, one task vector and one copy of its magnitudes at a
time — the sign election asks for each weighted task vector twice (it is the same tensor both
times) rather than keeping all k, and θ0 is added in its own dtype a slice at a time.

>>> import torch
>>> base = torch.zeros(4, dtype=torch.float64)
>>> blocks = [torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([-3.0, -1.0, 0.5, 0.0])]
>>> ties = task_vector_method("ties", [1.0, 1.0], sparsify="magnitude", density=0.5, consensus=True, normalize=True)
>>> ties.combine(blocks, base, None, key="w").tolist()  # trims to [1, -2, 0, 0] and [-3, -1, 0, 0]
[-3.0, -1.5, 0.0, 0.0]
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from soup_core.errors import RecipeError
from soup_core.merge.methods import ACCUMULATE_DTYPE, Blocks, TensorMethod, widen

SPARSIFIERS = ("magnitude", "random", "magnitude_outliers")
RESCALES = ("none", "l1", "density")
NORM_EPS = 1e-7  # below this L1 norm a task vector is not rescaled (mergekit's eps)
IN_PLACE_CHUNK = 1 << 22  # elements converted at a time by in_chunks (32 MB of float64)
REUSED_UPDATE_BYTES = 2 << 30  # merged updates kept across the scales of one λ search, at most

_reused: contextvars.ContextVar[dict | None] = contextvars.ContextVar("reused_updates", default=None)


@contextlib.contextmanager
def one_update_for_every_scale() -> Iterator[None]:
    """Within: sparsified merges that differ only in ``scale`` (λ) share each tensor's merged update."""
    token = _reused.set({"bytes": 0})
    try:
        yield
    finally:
        _reused.reset(token)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The ``density`` share of entries with the largest |δ| (at least one): TIES' trim. The
    threshold is found by selection, not a sort; among entries equal to it, the first are kept."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    count = delta.numel()
    if density <= 0 or count == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    keep = max(1, int(density * count))
    threshold = kth_largest_magnitude(delta, keep)
    mask = (delta > threshold) | (delta < -threshold)
    short = keep - int(mask.sum())
    if short > 0:
        equal = ((delta == threshold) | (delta == -threshold)).reshape(-1)
        mask.reshape(-1)[equal.nonzero().reshape(-1)[:short]] = True
    return mask


def kth_largest_magnitude(delta: torch.Tensor, k: int) -> float:
    """The k-th largest |δ|: on a CPU by partitioning one copy of |δ| in place (``numpy``'s
    introselect: no index array, one tensor's bytes), elsewhere with ``torch.kthvalue``."""
    return (kth_largest_by_partition if delta.device.type == "cpu" else kth_largest_by_kthvalue)(delta, k)


def kth_largest_by_partition(delta: torch.Tensor, k: int) -> float:
    """The k-th largest |δ| of a CPU tensor, by numpy's in-place partition of one copy."""
    magnitude = delta.detach().abs().reshape(-1).numpy()
    position = magnitude.size - k
    magnitude.partition(position)
    return float(magnitude[position])


def kth_largest_by_kthvalue(delta: torch.Tensor, k: int) -> float:
    """The k-th largest |δ| on any device, by ``torch.kthvalue`` (the (n − k + 1)-th smallest)."""
    return float(torch.kthvalue(delta.abs().reshape(-1), delta.numel() - k + 1).values)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` share of largest |δ|, then the smallest, keeping ``density``.
    When ``density + gamma > 1`` fewer outliers are dropped, so that ``density`` remain."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    count = delta.numel()
    keep, top = int(density * count), int(gamma * count)
    bottom = max(0, count - keep - top)
    mask = torch.zeros(count, dtype=torch.bool, device=delta.device)
    mask[torch.sort(delta.abs().reshape(-1), stable=True).indices[bottom:bottom + keep]] = True
    return mask.reshape(delta.shape)


def random_mask(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE's drop: each entry kept with probability ``density``, from a generator seeded by ``seed``
    (drawn on the CPU, so a seed gives the same mask on every device)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(delta.shape, generator=generator, dtype=ACCUMULATE_DTYPE) < density).to(delta.device)


def rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: str, density: float, *,
             in_place: bool = False) -> torch.Tensor:
    """The kept entries of ``delta``, rescaled: ``l1`` restores the L1 norm it had (mergekit), ``density``
    divides by the keep probability (DARE's paper), ``none`` leaves them. ``in_place`` reuses
    ``delta``'s memory (a whole tensor's worth of float64 fewer at the peak)."""
    before = torch.linalg.vector_norm(delta, ord=1) if rescale == "l1" else None
    kept = delta.masked_fill_(~mask, 0) if in_place else delta * mask
    if rescale == "density" and 0 < density < 1:
        return kept.div_(density)
    if before is not None:
        after = torch.linalg.vector_norm(kept, ord=1)
        if before >= NORM_EPS and after >= NORM_EPS:
            return kept.mul_(before / after)
    return kept


def in_chunks(target: torch.Tensor, other: torch.Tensor, apply: Callable[[torch.Tensor, torch.Tensor], Any]) -> None:
    """``apply(target part, other part in target's dtype)`` over flat slices of 4M elements: an
    in-place operation with another dtype converts a slice at a time, not a whole tensor's copy."""
    for start in range(0, target.numel(), IN_PLACE_CHUNK):
        apply(target[start:start + IN_PLACE_CHUNK], other[start:start + IN_PLACE_CHUNK].to(target.dtype))


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

    def weighted_delta(index: int, block: torch.Tensor, base: torch.Tensor, key: str) -> torch.Tensor:
        """w_i · sparsify(θ_i − θ0), flat: the same tensor every time it is asked for (masks are
        deterministic, drops seeded), so the sign election can ask twice instead of keeping all."""
        delta = widen(block).reshape(-1)
        delta = delta.clone() if delta.data_ptr() == block.data_ptr() else delta  # never the caller's tensor
        in_chunks(delta, base.reshape(-1), torch.Tensor.sub_)
        if sparsify == "magnitude":
            delta = rescaled(delta, magnitude_mask(delta, density), rescale, density, in_place=True)
        elif sparsify == "magnitude_outliers":
            delta = rescaled(delta, outlier_mask(delta, density, gamma), rescale, density, in_place=True)
        elif sparsify == "random":
            mask = random_mask(delta, density, tensor_seed(seed, key, index))
            delta = rescaled(delta, mask, rescale, density, in_place=True)
        return delta.mul_(weights[index])

    def combine(blocks: Blocks, base: torch.Tensor, summary, key: str = "") -> torch.Tensor:
        if len(blocks) != len(weights):
            raise RecipeError(f"{name}: {len(weights)} weights for {len(blocks)} ingredients; give one weight each")
        reused = _reused.get() if sparsify is not None else None  # whole tensors only: blocks have no names
        memo_key = (name, tuple(weights), sparsify, density, gamma, consensus, normalize, rescale, seed, key,
                    tuple(b.data_ptr() for b in blocks), base.data_ptr())
        if reused is not None and memo_key in reused:
            mixed = reused[memo_key].clone()
        else:
            mixed = merged_update(blocks, base, key)
            if reused is not None and reused["bytes"] + mixed.nbytes <= REUSED_UPDATE_BYTES:
                reused[memo_key] = mixed.clone()
                reused["bytes"] += mixed.nbytes
        in_chunks(mixed.mul_(scale), base.reshape(-1), torch.Tensor.add_)
        return mixed.reshape(base.shape)

    def merged_update(blocks: Blocks, base: torch.Tensor, key: str) -> torch.Tensor:
        """Σ w_i δ_i over the merged entries (÷ the weights where ``normalize``), flat, float64: all but λ."""
        if not consensus:
            mixed = weighted_delta(0, blocks[0], base, key)
            for index in range(1, len(blocks)):
                mixed += weighted_delta(index, blocks[index], base, key)
            total_weight = sum(weights)
            divisor: torch.Tensor | float = total_weight if abs(total_weight) >= 1e-8 else 1.0
        else:  # the elected sign is that of Σ w_i δ_i; an entry of δ_i joins where its sign agrees
            total = weighted_delta(0, blocks[0], base, key)
            for index in range(1, len(blocks)):
                total += weighted_delta(index, blocks[index], base, key)
            positive = total >= 0
            del total
            mixed = torch.zeros(base.numel(), dtype=ACCUMULATE_DTYPE, device=base.device)
            divisor = torch.zeros_like(mixed)
            for index, block in enumerate(blocks):
                delta = weighted_delta(index, block, base, key)
                agree = torch.where(positive, delta > 0, delta < 0)
                mixed += delta.masked_fill_(~agree, 0)
                del delta
                in_chunks(divisor, agree, lambda part, other, w=weights[index]: part.add_(other, alpha=w))
            divisor[divisor == 0] = 1
        if normalize:
            mixed /= divisor
        return mixed

    # ranks, norms and drop masks are taken over whole tensors; plain task arithmetic goes by blocks
    return TensorMethod(name, combine, needs_base=True, elementwise=sparsify is None, keyed=True)
