"""Planes: an R×R grid of a plane through three points, computed coarse to fine (paper Figure 2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from soup_core.errors import SoupError
from soup_core.evaluate import Evaluator
from soup_core.geometry import Plane, Projection
from soup_core.landscape.engine import SliceEvaluator
from soup_core.landscape.scores import PointValues
from soup_core.state import Progress, ShouldStop, finite_number


def coarse_to_fine(size: int) -> list[int]:
    """Flat indices of a size×size grid, coarsest lattice first (stride halves each level).

    Every level includes the last row and column, so each prefix covers the whole extent.
    """
    order: list[int] = []
    seen = np.zeros(size * size, dtype=bool)
    stride = 1 << max(0, math.ceil(math.log2(max(size - 1, 1))))
    while stride >= 1:
        lattice = sorted(set(range(0, size, stride)) | {size - 1})
        for iy in lattice:
            for ix in lattice:
                flat = iy * size + ix
                if not seen[flat]:
                    seen[flat] = True
                    order.append(flat)
        stride //= 2
    return order


def grid_extent(points: Sequence[tuple[float, float]], margin: float = 0.2) -> tuple[tuple[float, float], tuple[float, float]]:
    """The anchors' bounding box widened by ``margin`` × its larger side on every side."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span = max(max(xs) - min(xs), max(ys) - min(ys), 1e-12)
    pad = margin * span
    return (min(xs) - pad, max(xs) + pad), (min(ys) - pad, max(ys) + pad)


@dataclass
class Landscape:
    """Loss and error over an R×R grid of a plane. Arrays are indexed [row = y, column = x]
    (Plotly's ``z`` convention); NaN marks points not computed yet (a cancelled run)."""

    xs: np.ndarray
    ys: np.ndarray
    splits: tuple[str, ...]
    loss: dict[str, np.ndarray]
    error: dict[str, np.ndarray]
    bn: str
    anchors: list[Projection] = field(default_factory=list)
    projections: list[Projection] = field(default_factory=list)
    max_samples: int | None = None
    precision: str = "fp32"
    precision_deviation: float | None = None  # largest |loss − fp32 loss| measured (bf16/tf32)

    @property
    def done(self) -> np.ndarray:
        return ~np.isnan(self.loss[self.splits[0]])

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def preview(self, values: np.ndarray) -> np.ndarray:
        """A partial grid filled from the nearest computed point (for drawing while computing)."""
        done = ~np.isnan(values)
        if done.all() or not done.any():
            return values
        from scipy.ndimage import distance_transform_edt
        _, (iy, ix) = distance_transform_edt(~done, return_indices=True)
        return values[iy, ix]

    def to_json(self) -> dict:
        def grid(a: np.ndarray) -> list:
            return [[None if math.isnan(v) else float(v) for v in row] for row in a]
        return {"axes": {"x": self.xs.tolist(), "y": self.ys.tolist()}, "bn": self.bn,
                "max_samples": self.max_samples, "splits": list(self.splits), "complete": self.complete,
                "precision": self.precision, "precision_deviation": self.precision_deviation,
                "loss": {s: grid(a) for s, a in self.loss.items()},
                "error": {s: grid(a) for s, a in self.error.items()},
                "anchors": [{"name": a.name, "xy": list(a.xy)} for a in self.anchors],
                "projections": [p.to_json() for p in self.projections]}

    @classmethod
    def from_json(cls, data: Mapping) -> Landscape:
        """What :meth:`to_json` wrote; anything else is a ``ValueError`` naming the first field that
        is wrong (short rows, text where numbers belong, a bad anchor) or missing (a split without
        its grid)."""
        try:
            return cls._read(data)
        except KeyError as exc:
            raise ValueError(f"it has no {exc} field") from None
        except (TypeError, AttributeError) as exc:  # a list or a number where a table belongs
            raise ValueError(f"its fields are not what soup landscape writes ({exc})") from None

    @classmethod
    def _read(cls, data: Mapping) -> Landscape:
        def numbers(values: Any, what: str, size: int | None = None, missing: bool = False) -> list:
            if not isinstance(values, list) or (size is not None and len(values) != size) or not all(
                    (missing and v is None) or finite_number(v) for v in values):
                raise ValueError(f"{what} must be a list of {f'{size} ' if size else ''}finite numbers")
            return values
        xs = numbers(data["axes"]["x"], "axes.x")
        ys = numbers(data["axes"]["y"], "axes.y", len(xs))
        if len(xs) < 2 or not isinstance(data["splits"], list) or not data["splits"]:
            raise ValueError("a landscape has two points per side and at least one split")

        def array(rows: Any, what: str) -> np.ndarray:
            if not isinstance(rows, list) or len(rows) != len(ys):
                raise ValueError(f"{what} must have {len(ys)} rows")
            checked = [numbers(row, f"{what}[{i}]", len(xs), missing=True) for i, row in enumerate(rows)]
            return np.array([[np.nan if v is None else v for v in row] for row in checked], dtype=np.float64)
        for i, point in enumerate([*data["anchors"], *data["projections"]]):
            if not isinstance(point, Mapping) or not isinstance(point.get("name"), str):
                raise ValueError(f"anchor or projection {i + 1} must have a name")
            numbers(point.get("xy"), f"{point['name']}'s xy", 2)
        return cls(np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64), tuple(data["splits"]),
                   {s: array(data["loss"][s], f"loss.{s}") for s in data["splits"]},
                   {s: array(data["error"][s], f"error.{s}") for s in data["splits"]},
                   data["bn"], [Projection(a["name"], tuple(a["xy"]), 0.0) for a in data["anchors"]],
                   [Projection(p["name"], tuple(p["xy"]), p["off_plane"]) for p in data["projections"]],
                   data.get("max_samples"), data.get("precision", "fp32"), data.get("precision_deviation"))


def plane_landscape(evaluator: Evaluator, plane: Plane, *, grid: int = 21, margin: float = 0.2,
                    splits: Sequence[str] = ("val",), bn: str = "recompute",
                    extent: tuple[tuple[float, float], tuple[float, float]] | None = None,
                    projections: Sequence[Projection] = (), max_samples: int | None = None,
                    resume: Landscape | None = None, progress: Progress | None = None,
                    should_stop: ShouldStop | None = None, engine: SliceEvaluator | None = None,
                    precision: str | None = None, checkpoint: Callable[[Landscape], None] | None = None) -> Landscape:
    """Loss and error on a grid×grid lattice of ``plane`` (paper Figure 2).

    The extent is the anchors' bounding box plus ``margin`` unless given. Points run coarse to
    fine; ``should_stop`` keeps what was done and ``resume`` (a partial result of the same grid)
    computes only the rest. ``precision`` is ``"fp32"`` (exact), ``"tf32"`` or ``"bf16"``
    (:mod:`soup_core.precision`; default: the evaluator's); outside fp32 the result carries
    its measured deviation. ``checkpoint(result)`` sees the partial result after every chunk
    (``soup landscape --resume`` saves it).
    """
    engine = engine or SliceEvaluator(evaluator, plane.origin, plane.directions, bn=bn, max_samples=max_samples,
                                      precision=precision)
    result, todo, coords = grid_plan(plane, engine, grid=grid, margin=margin, splits=splits, extent=extent,
                                     projections=projections, resume=resume)
    def chunk_done(values: PointValues) -> None:
        fill(result, todo, values)
        checkpoint(result)

    fill(result, todo, engine.evaluate(coords, splits, progress=progress, should_stop=should_stop,
                                       on_chunk=chunk_done if checkpoint is not None else None))
    result.precision_deviation = engine.precision_deviation
    return result


def grid_plan(plane: Plane, engine: SliceEvaluator, *, grid: int, margin: float, splits: Sequence[str],
              extent: tuple[tuple[float, float], tuple[float, float]] | None = None,
              projections: Sequence[Projection] = (), resume: Landscape | None = None,
              ) -> tuple[Landscape, list[int], torch.Tensor]:
    """The result to fill (``resume``, or an empty grid), the flat indices still to compute in
    coarse-to-fine order, and their plane coordinates."""
    if grid < 2:
        raise SoupError(f"grid must be at least 2 points per side, got {grid}")
    if resume is not None:
        # Mixing two runs is only right when they computed the same function on the same plane.
        same_plane = [a.name for a in resume.anchors] == [a.name for a in plane.anchors] and np.allclose(
            [a.xy for a in resume.anchors], [a.xy for a in plane.anchors], rtol=1e-9, atol=1e-12)
        if (len(resume.xs) != grid or tuple(resume.splits) != tuple(splits) or resume.bn != engine.bn
                or resume.max_samples != engine.max_samples or resume.precision != engine.precision
                or not same_plane):
            raise SoupError("the partial landscape to resume was made with other settings (plane, grid, splits, "
                            "BatchNorm policy, samples or precision); start a new one")
    (x0, x1), (y0, y1) = extent or grid_extent([a.xy for a in plane.anchors], margin)
    xs, ys = np.linspace(x0, x1, grid), np.linspace(y0, y1, grid)
    if resume is not None:
        same = {"rtol": 1e-9, "atol": 1e-12}
        if not (np.allclose(resume.xs, xs, **same) and np.allclose(resume.ys, ys, **same)):
            raise SoupError("the partial landscape to resume covers another extent (its axes differ from this "
                            "run's margin or extent); start a new one")
        xs, ys = resume.xs, resume.ys
    result = resume or Landscape(xs, ys, tuple(splits), {s: np.full((grid, grid), np.nan) for s in splits},
                                 {s: np.full((grid, grid), np.nan) for s in splits}, engine.bn,
                                 max_samples=engine.max_samples, precision=engine.precision)
    result.anchors, result.projections = list(plane.anchors), list(projections)
    todo = [f for f in coarse_to_fine(grid) if not result.done.reshape(-1)[f]]
    coords = torch.tensor([[xs[f % grid], ys[f // grid]] for f in todo], dtype=torch.float64).reshape(-1, 2)
    return result, todo, coords


def fill(result: Landscape, indices: Sequence[int], values: PointValues) -> None:
    """Write computed points (flat indices, in the order of ``values``) into ``result``."""
    for s in result.splits:
        result.loss[s].reshape(-1)[list(indices)] = values.loss[s]
        result.error[s].reshape(-1)[list(indices)] = values.error[s]
