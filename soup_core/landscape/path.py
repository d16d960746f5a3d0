"""Lines: loss and error along (1 − α)·a + α·b and the barrier between the ends (paper App. J.1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from soup_core.evaluate import Evaluator
from soup_core.geometry import plane_keys
from soup_core.landscape.batchnorm import batchnorm_keys, recompute_batchnorm
from soup_core.landscape.engine import SliceEvaluator
from soup_core.params import interpolate
from soup_core.state import Progress


def barrier(alphas: np.ndarray, values: np.ndarray) -> float:
    """max over α ∈ [0, 1] of value(α) − ((1 − α)·value(0) + α·value(1)) (Frankle et al. 2020)."""
    inside = (alphas >= 0) & (alphas <= 1)
    a, v = alphas[inside], values[inside]
    return float(np.max(v - ((1 - a) * v[0] + a * v[-1])))


def error_barrier(evaluator: Evaluator, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                  split: str, points: int = 11) -> float:
    """The error barrier between ``a`` and ``b`` on ``split`` from ``points`` evenly spaced α in
    [0, 1], point by point (too few points for the slice engine to pay), with BatchNorm statistics
    recomputed as the landscapes' default does when the model has them."""
    alphas = np.linspace(0.0, 1.0, points)
    recompute = bool(batchnorm_keys(evaluator.model)) and evaluator.train is not None

    def error(alpha: float) -> float:
        state = interpolate(a, b, alpha)
        return 1.0 - evaluator.accuracy(recompute_batchnorm(evaluator, state) if recompute else state, split,
                                        cache=False)

    return barrier(alphas, np.array([error(float(t)) for t in alphas]))


@dataclass
class Path:
    """Loss and error along (1 − α)·a + α·b for each α, with the barrier between the ends."""

    names: tuple[str, str]
    alphas: np.ndarray
    loss: dict[str, np.ndarray]
    error: dict[str, np.ndarray]
    bn: str
    precision: str = "fp32"
    precision_deviation: float | None = None  # largest |loss − fp32 loss| measured (bf16/tf32)

    def barrier(self, values: np.ndarray) -> float:
        return barrier(self.alphas, values)

    def to_json(self) -> dict:
        return {"names": list(self.names), "alphas": self.alphas.tolist(), "bn": self.bn,
                "precision": self.precision, "precision_deviation": self.precision_deviation,
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
                       progress: Progress | None = None, precision: str | None = None) -> Path:
    """Loss and error on the line through ``a`` and ``b``, past both ends (paper App. J.1).

    With ``a`` = θ0 and ``b`` a soup or fine-tuned model this is the WiSE-FT curve (App. D).
    """
    alphas = path_alphas() if alphas is None else np.asarray(alphas, dtype=np.float64)
    keys = plane_keys(a)
    direction = {k: b[k].to(torch.float64) - a[k].to(torch.float64) for k in keys}
    engine = SliceEvaluator(evaluator, a, [direction], bn=bn, max_samples=max_samples, precision=precision)
    values = engine.evaluate(torch.tensor(alphas).reshape(-1, 1), splits, progress=progress)
    return Path(names, alphas, values.loss, values.error, engine.bn, engine.precision, engine.precision_deviation)
