"""The Karcher mean: the weighted Riemannian centre of several models on the sphere, per tensor
(Karcher 1977; mergekit's ``karcher``), the multi-model generalisation of SLERP.

Per tensor, with unit directions u_i = θ_i/‖θ_i‖ and weights α_i (uniform): start from the
normalised weighted mean direction m and repeat, at most ``max_iter`` times, the step along the
sphere's tangent

    v = Σ α_i · θ_i/sin θ_i · (u_i − cos θ_i · m),  θ_i = arccos(m·u_i),
    m ← cos ‖v‖ · m + sin ‖v‖ · v/‖v‖

until ‖v‖ < ``tol``; the merged tensor is m scaled by the weighted mean of the norms Σ α_i ‖θ_i‖.
Zero tensors (norm ≤ ``tol``) take no part in the direction, as in mergekit. A whole-tensor method
(the norms and angles are over the tensor), computed in float64.

>>> import torch
>>> method = karcher()
>>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
>>> [round(v, 6) for v in method.combine([a, b], None, None).tolist()]  # SLERP's midpoint for two
[0.707107, 0.707107]
"""

from __future__ import annotations

import math

import torch

from soup_core.merge.methods import Blocks, TensorMethod, widen


def karcher_mean(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The uniformly weighted Karcher mean of flattened float64 ``tensors`` (see the module)."""
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [float(torch.linalg.vector_norm(t)) for t in tensors]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = {i: tensors[i] / norms[i] for i in valid}
    weights = {i: alphas[i] / sum(alphas[j] for j in valid) for i in valid}
    mean = sum(weights[i] * units[i] for i in valid)
    length = float(torch.linalg.vector_norm(mean))
    mean = units[valid[0]].clone() if length < tol else mean / length
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            cos = min(1.0, max(-1.0, float(mean @ units[i])))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent += weights[i] * (theta / math.sin(theta)) * (units[i] - cos * mean)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * (tangent / step)
        length = float(torch.linalg.vector_norm(mean))
        if length > tol:
            mean = mean / length
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def karcher(max_iter: int = 10, tol: float = 1e-5) -> TensorMethod:
    """The Karcher mean of every ingredient, per tensor."""
    def combine(blocks: Blocks, base, summary) -> torch.Tensor:
        if len(blocks) == 1:
            return widen(blocks[0])
        merged = karcher_mean([widen(b).reshape(-1) for b in blocks], max_iter, tol)
        return merged.reshape(blocks[0].shape)
    return TensorMethod("karcher", combine, elementwise=False)
