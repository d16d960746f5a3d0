"""LiNeS (Wang et al. 2024, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
Model Merging"): the task vector scaled by depth, little at the shallow layers (which hold general
features) and more at the deep ones.

With τ the weighted mean task vector Σ w_i (θ_i − θ0) / Σ w_i and the numbered blocks of the
model ℓ = 0 … L − 1 (a transformer's layers, a ``Sequential``'s modules):

    θ = θ0 + (α + β · ℓ / (L − 1)) · τ    in block ℓ,     θ0 + α · τ    outside the blocks

α = 1, β = 0 is the uniform soup; α scales the shallowest block, α + β the deepest. The paper
writes the multi-task merge on the *sum* of the T task vectors with α = 1/T (for task
arithmetic); on the mean that is α = 1 and the paper's β times T. Tensors outside the numbered
blocks (embeddings, final norms, heads) take α, as the authors' code scales them.

The blocks are found from the tensors' names (:func:`block_depths`): the dotted prefix followed
by an integer (``encoder.layer.7.``, ``model.layers.7.``, ``body.2.``) that carries the most
distinct integers; ℓ is an integer's rank among them, so a ``Sequential`` whose weights sit at
0, 2 and 4 has blocks 0, 1 and 2.

>>> block_depths(["body.0.weight", "body.0.bias", "body.2.weight", "body.4.weight", "head.weight"])
{'body.0.weight': 0.0, 'body.0.bias': 0.0, 'body.2.weight': 0.5, 'body.4.weight': 1.0, 'head.weight': 0.0}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache

import torch

from soup_core.merge.methods import ACCUMULATE_DTYPE, Blocks, TensorMethod, widen


def numbered_block(key: str) -> tuple[str, int] | None:
    """``(prefix, integer)`` of the first dotted component of ``key`` that is an integer
    (``"model.layers.3.mlp.experts.7.w"`` → ``("model.layers", 3)``), or None."""
    parts = key.split(".")
    for position, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:position]), int(part)
    return None


@lru_cache(maxsize=8)
def _depths(keys: tuple[str, ...]) -> dict[str, float]:
    indices: dict[str, set[int]] = defaultdict(set)
    found = {key: numbered_block(key) for key in keys}
    for block in found.values():
        if block is not None:
            indices[block[0]].add(block[1])
    if not indices:
        return dict.fromkeys(keys, 0.0)
    prefix = max(indices, key=lambda p: (len(indices[p]), -list(indices).index(p)))  # most blocks; first on ties
    rank = {index: r for r, index in enumerate(sorted(indices[prefix]))}
    last = max(len(rank) - 1, 1)
    return {key: rank[block[1]] / last if block is not None and block[0] == prefix else 0.0
            for key, block in found.items()}


def block_depths(keys: Sequence[str]) -> dict[str, float]:
    """Each tensor's depth ℓ / (L − 1) in [0, 1]: 0 for the first numbered block and for every
    tensor outside the blocks, 1 for the last block."""
    return dict(_depths(tuple(keys)))


def lines(weights: Sequence[float], alpha: float, beta: float) -> TensorMethod:
    """LiNeS on the weighted mean task vector: θ0 + (α + β·depth) · Σ w_i δ_i / Σ w_i."""
    weights = [float(w) for w in weights]
    total = sum(weights)
    alpha, beta = float(alpha), float(beta)

    def combine(blocks: Blocks, base: torch.Tensor, summary, layout: tuple[str, ...], key: str) -> torch.Tensor:
        theta0 = base.to(ACCUMULATE_DTYPE, copy=True)  # the result is built in place: never the caller's θ0
        tau = torch.zeros_like(theta0)
        for weight, block in zip(weights, blocks):
            tau.add_(widen(block) - theta0, alpha=weight / total)
        return theta0.add_(tau, alpha=alpha + beta * _depths(layout)[key])
    return TensorMethod("lines", combine, needs_base=True, keyed=True, layout=True)
