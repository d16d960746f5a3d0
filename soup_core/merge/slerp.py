"""SLERP: spherical linear interpolation between two models, per tensor (Shoemake 1985; the
common two-model merge, mergekit's ``slerp``).

For one tensor with flattened values a (the first ingredient, t = 0) and b (the second, t = 1),
and θ the angle between them, cos θ = a·b / (‖a‖‖b‖):

    slerp(a, b; t) = sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b

Nearly parallel (or antiparallel) tensors, |cos θ| > 0.9995, fall back to the straight line
(1 − t)·a + t·b, where sin θ → 0 makes the formula unstable; a zero tensor counts as norm 1
(mergekit's guards, so the two agree). The angle is a whole-tensor quantity: it is summed over
a tensor's blocks first (``statistic``), so SLERP streams like every other method.

>>> import torch
>>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
>>> method = slerp(0.5)
>>> [round(v, 6) for v in method.combine([a, b], None, method.summary(method.statistic([a, b], None))).tolist()]
[0.707107, 0.707107]
"""

from __future__ import annotations

import math

import torch

from soup_core.errors import RecipeError
from soup_core.merge.methods import ACCUMULATE_DTYPE, Blocks, TensorMethod, widen

PARALLEL = 0.9995  # |cos θ| above which the line replaces the arc (mergekit's dot_threshold)
ZERO_NORM = 1e-8  # a norm below this is taken as 1 (mergekit's eps)


def slerp_coefficients(t: float, squared_a: float, squared_b: float, dot: float) -> tuple[float, float]:
    """(coefficient of a, coefficient of b) from ‖a‖², ‖b‖² and a·b."""
    norm_a, norm_b = math.sqrt(max(squared_a, 0.0)), math.sqrt(max(squared_b, 0.0))
    norm_a, norm_b = (norm_a if norm_a > ZERO_NORM else 1.0), (norm_b if norm_b > ZERO_NORM else 1.0)
    cos = min(1.0, max(-1.0, dot / (norm_a * norm_b)))
    if abs(cos) > PARALLEL:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(t: float) -> TensorMethod:
    """SLERP from the first of two ingredients (t = 0) to the second (t = 1)."""
    t = float(t)

    def statistic(blocks: Blocks, base) -> torch.Tensor:
        if len(blocks) != 2:
            raise RecipeError(f"SLERP interpolates between exactly two ingredients, not {len(blocks)}")
        a, b = (widen(block).reshape(-1) for block in blocks)
        return torch.stack([a @ a, b @ b, a @ b]).cpu()

    def combine(blocks: Blocks, base, coefficients: tuple[float, float]) -> torch.Tensor:
        a, b = blocks
        return widen(a).mul(coefficients[0]).add_(widen(b), alpha=coefficients[1])

    return TensorMethod("slerp", combine, statistic,
                        summary=lambda sums: slerp_coefficients(t, *(float(v) for v in sums.to(ACCUMULATE_DTYPE))))
