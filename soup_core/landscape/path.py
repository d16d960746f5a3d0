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


def chord(alphas: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The straight line (1 − α)·value(0) + α·value(1) between the ends (``values``' last axis
    runs over ``alphas`` in [0, 1]; leading axes are kept, e.g. bootstrap resamples)."""
    return (1 - alphas) * values[..., :1] + alphas * values[..., -1:]


def barrier(alphas: np.ndarray, values: np.ndarray) -> float:
    """max over α ∈ [0, 1] of value(α) − ((1 − α)·value(0) + α·value(1)) (Frankle et al. 2020)."""
    inside = (alphas >= 0) & (alphas <= 1)
    a, v = alphas[inside], values[inside]
    return float(np.max(v - chord(a, v)))


def correct_along(evaluator: Evaluator, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                  split: str, alphas: np.ndarray) -> np.ndarray:
    """Which images of ``split`` (1) the model (1 − α)·a + α·b gets right, one row per α; point by
    point (too few points for the slice engine to pay), with BatchNorm statistics recomputed as
    the landscapes' default does when the model has them."""
    recompute = bool(batchnorm_keys(evaluator.model)) and evaluator.train is not None
    labels = evaluator.labels(split)
    rows = []
    for alpha in alphas:
        state = interpolate(a, b, float(alpha))
        state = recompute_batchnorm(evaluator, state) if recompute else state
        rows.append((evaluator.logits(state, split, cache=False).argmax(dim=1) == labels).numpy())
    return np.stack(rows)


def error_barrier(evaluator: Evaluator, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                  split: str, points: int = 11) -> float:
    """The error barrier between ``a`` and ``b`` on ``split`` from ``points`` evenly spaced α in [0, 1]."""
    alphas = np.linspace(0.0, 1.0, points)
    return barrier(alphas, 1.0 - correct_along(evaluator, a, b, split, alphas).mean(axis=1))


@dataclass(frozen=True)
class LineBarrier:
    """The error along (1 − α)·a + α·b for α in [0, 1], its barrier, and the barrier's bootstrap
    interval over the split's images."""

    alphas: np.ndarray
    error: np.ndarray
    barrier: float
    low: float
    high: float

    @property
    def chord(self) -> np.ndarray:
        """The straight line between the two ends' errors, from which the barrier is measured."""
        return chord(self.alphas, self.error)


def barrier_interval(evaluator: Evaluator, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                     split: str, points: int = 11, *, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> LineBarrier:
    """The error along the line from ``a`` to ``b`` on ``split``, its barrier and the barrier's
    bootstrap interval.

    Each resample draws the images with replacement (multinomial counts, seeded) and recomputes
    the error at every α and the barrier from them, so the interval says how much of the barrier
    the particular images could explain.
    """
    alphas = np.linspace(0.0, 1.0, points)
    correct = correct_along(evaluator, a, b, split, alphas).astype(np.float64)  # (points, images)
    n = correct.shape[1]
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)  # (resamples, images)
    errors = 1.0 - counts @ correct.T / n  # (resamples, points)
    low, high = np.quantile((errors - chord(alphas, errors)).max(axis=1), [(1 - level) / 2, (1 + level) / 2])
    error = 1.0 - correct.mean(axis=1)
    return LineBarrier(alphas, error, barrier(alphas, error), float(low), float(high))


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
