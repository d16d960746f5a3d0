"""Geometry of fine-tuned solutions: a streaming float64 Gram matrix, angles, norms, distances.

The paper measures the angle φ between θ1 − θ0 and θ2 − θ0, "the initialization treated as
the origin" (Figure 3). All of it follows from the Gram matrix G_ij = <δ_i, δ_j> of the
deltas: cos φ_ij = G_ij / √(G_ii G_jj), ‖δ_i − δ_j‖² = G_ii + G_jj − 2 G_ij.

G is accumulated one tensor (and one chunk of it) at a time in float64, so memory stays at
k × chunk floats however large the models are, and the result does not depend on the order
of the tensors beyond float64 rounding.

The plane through three points (paper Figure 2, after Garipov et al. 2018) gets an
orthonormal float64 basis by Gram–Schmidt; any other state dict has coordinates in it and a
distance from it. Random directions for slices around one model are filter-normalised
(Li et al. 2018).

>>> import torch
>>> from soup_core.geometry import gram_matrix, angles_from_gram
>>> a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}
>>> angles_from_gram(gram_matrix([a, b])).angle_deg.tolist()
[[0.0, 90.0], [90.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from soup_core.errors import SoupError
from soup_core.state import Progress, is_float, is_statistic, tied_aliases

GRAM_DTYPE = torch.float64
CHUNK_ELEMENTS = 1 << 18  # per checkpoint: 256K float64 = 2 MiB, cache-friendly
# On a GPU a chunk is one GEMM launch and one copy per checkpoint: larger chunks amortise them
# (4M float64 = 32 MiB per checkpoint; chosen, not tuned: no GPU measured this).
CUDA_CHUNK_ELEMENTS = 1 << 22


def gram_matrix(
    states: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    progress: Progress | None = None,
    chunk_elements: int | None = None,
    include_buffers: bool = False,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """k×k float64 Gram matrix of θ_i − θ0 (or of θ_i when ``base`` is None), on the CPU.

    Over the parameters, as the paper and the landscape peers measure: BatchNorm's running
    statistics are left out unless ``include_buffers`` (they are estimates of activations, not
    weights, and on a BatchNorm network they can dominate the distances). Integer buffers never
    take part (they are counters); tied tensors count once.

    The products run on ``device`` (default: where the first state dict's tensors are), in
    float64 chunks of ``chunk_elements`` per checkpoint. The state dicts and ``base`` may live
    on any devices, each its own: a chunk is copied to ``device`` and widened to float64 there,
    which is exact (every float32/16 is a float64), so the result does not depend on the device
    beyond float64 rounding. Nothing is copied whole: memory is the k chunks.

    >>> import torch
    >>> a, b = {"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([4.0, -3.0])}
    >>> gram_matrix([a, b], device="cpu").tolist()
    [[25.0, 0.0], [0.0, 25.0]]
    """
    k = len(states)
    if k == 0:
        raise SoupError("need at least one state dict")
    reference = states[0]
    device = torch.device(device) if device is not None else next(
        (t.device for t in reference.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    if chunk_elements is None:
        chunk_elements = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    aliases = tied_aliases(reference)
    keys = [key for key, t in reference.items() if is_float(t) and key not in aliases
            and (include_buffers or not is_statistic(key))]
    gram = torch.zeros(k, k, dtype=GRAM_DTYPE, device=device)
    total = sum(reference[key].numel() for key in keys) or 1
    largest = max((reference[key].numel() for key in keys), default=1)
    # One reused float64 buffer: no per-chunk allocations (they cost page faults, not FLOPs).
    buffer = torch.empty(k, min(chunk_elements, largest), dtype=GRAM_DTYPE, device=device)
    done = 0
    for key in keys:
        flat = [s[key].reshape(-1) for s in states]
        origin = base[key].reshape(-1) if base is not None else None
        size = flat[0].numel()
        for start in range(0, size, buffer.shape[1]):
            stop = min(start + buffer.shape[1], size)
            rows = buffer[:, : stop - start]
            for row, tensor in zip(rows, flat):
                row.copy_(tensor[start:stop])  # exact: every float32/16 is a float64
            if origin is not None:
                rows.sub_(origin[start:stop].to(device, GRAM_DTYPE))
            gram.addmm_(rows, rows.T)
        done += size
        if progress is not None:
            progress(done / total, key)
    return gram.cpu()


@dataclass(frozen=True)
class Angles:
    """Pairwise geometry of k deltas: cosine, angle in degrees, L2 distance, and norms."""

    cosine: torch.Tensor
    angle_deg: torch.Tensor
    distance: torch.Tensor
    norm: torch.Tensor
    over: str = "parameters"  # or "parameters and buffers"

    def to_json(self, names: Sequence[str]) -> dict:
        return {"names": list(names), "cosine": self.cosine.tolist(), "angle_deg": self.angle_deg.tolist(),
                "distance": self.distance.tolist(), "norm": self.norm.tolist(), "precision": "float64",
                "over": self.over}


def angles_from_gram(gram: torch.Tensor) -> Angles:
    """Cosines, angles and distances from a Gram matrix (zero vectors get cosine 0)."""
    norm = gram.diagonal().clamp_min(0).sqrt()
    outer = norm[:, None] * norm[None, :]
    cosine = torch.where(outer > 0, gram / outer.where(outer > 0, torch.ones_like(outer)),
                         torch.zeros_like(gram)).clamp(-1.0, 1.0)
    # Each delta with itself: exactly cosine 1 (angle 0) unless it is the zero vector.
    cosine.diagonal().copy_((norm > 0).to(GRAM_DTYPE))
    angle = torch.rad2deg(torch.arccos(cosine))
    angle.diagonal().zero_()
    sq = gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram
    distance = sq.clamp_min(0).sqrt()
    distance.diagonal().zero_()
    return Angles(cosine, angle, distance, norm)


def pairwise_angles(states: Sequence[Mapping[str, torch.Tensor]],
                    base: Mapping[str, torch.Tensor] | None = None,
                    *, progress: Progress | None = None, include_buffers: bool = False,
                    device: str | torch.device | None = None) -> Angles:
    """Angles between θ_i − θ0 for every pair (paper Figure 3's φ), streamed in float64, over the
    parameters (and BatchNorm's running statistics too with ``include_buffers``), computed on
    ``device`` (see :func:`gram_matrix`)."""
    angles = angles_from_gram(gram_matrix(states, base, progress=progress, include_buffers=include_buffers,
                                          device=device))
    return replace(angles, over="parameters and buffers" if include_buffers else "parameters")


# ---- the plane through three points -------------------------------------------------------

Direction = dict[str, torch.Tensor]


def plane_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The coordinates of a state dict as a point: float tensors, tied tensors once."""
    aliases = tied_aliases(state)
    return [key for key, t in state.items() if is_float(t) and key not in aliases]


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: Sequence[str]) -> float:
    return float(sum(torch.dot(a[k].reshape(-1).to(GRAM_DTYPE), b[k].reshape(-1).to(GRAM_DTYPE))
                     for k in keys))


def _delta(state: Mapping[str, torch.Tensor], origin: Mapping[str, torch.Tensor], keys: Sequence[str]) -> Direction:
    return {k: state[k].to(GRAM_DTYPE) - origin[k].to(GRAM_DTYPE) for k in keys}


@dataclass(frozen=True)
class Projection:
    """Where a state dict lies relative to a plane: in-plane coordinates and distance off it."""

    name: str
    xy: tuple[float, float]
    off_plane: float

    def to_json(self) -> dict:
        return {"name": self.name, "xy": list(self.xy), "off_plane": self.off_plane}


@dataclass(frozen=True)
class Plane:
    """origin + x·u + y·v, with u, v float64 unit vectors orthogonal to each other.

    Coordinates are in the parameter space's own L2 units. ``anchors`` are the three points
    that defined the plane, at their exact coordinates: the origin at (0, 0), the second point
    on the x axis, the third above it.
    """

    origin: Mapping[str, torch.Tensor]
    u: Direction
    v: Direction
    anchors: tuple[Projection, ...] = field(default=())

    @property
    def keys(self) -> list[str]:
        return list(self.u)

    @property
    def directions(self) -> tuple[Direction, Direction]:
        return self.u, self.v

    def project(self, state: Mapping[str, torch.Tensor], name: str = "") -> Projection:
        """Coordinates of ``state`` in the plane and its float64 distance from the plane."""
        x = y = residual = 0.0
        for k in self.keys:
            d = state[k].reshape(-1).to(GRAM_DTYPE) - self.origin[k].reshape(-1).to(GRAM_DTYPE)
            x += float(torch.dot(d, self.u[k].reshape(-1)))
            y += float(torch.dot(d, self.v[k].reshape(-1)))
        for k in self.keys:  # second pass: the residual itself, not ‖d‖² − x² − y² (cancellation)
            d = state[k].to(GRAM_DTYPE) - self.origin[k].to(GRAM_DTYPE)
            residual += float(((d - x * self.u[k] - y * self.v[k]) ** 2).sum())
        return Projection(name, (x, y), residual ** 0.5)

    def point(self, x: float, y: float) -> dict[str, torch.Tensor]:
        """The state dict at (x, y), in the origin's dtypes (integer buffers from the origin)."""
        out = {}
        for key, t in self.origin.items():
            if key in self.u:
                out[key] = (t.to(GRAM_DTYPE) + x * self.u[key] + y * self.v[key]).to(t.dtype)
            else:
                out[key] = t
        for alias, target in tied_aliases(self.origin).items():
            out[alias] = out[target]
        return out


def plane_basis(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                c: Mapping[str, torch.Tensor], names: Sequence[str] = ("A", "B", "C")) -> Plane:
    """The plane through ``a``, ``b`` and ``c`` with origin ``a`` (Gram–Schmidt in float64).

    u = (b − a)/‖b − a‖; v = the part of (c − a) orthogonal to u, normalised. This is the
    construction of Garipov et al. (2018) used for the paper's Figure 2 with a = θ0.

    >>> import torch
    >>> p = plane_basis({"w": torch.zeros(3)}, {"w": torch.tensor([2., 0, 0])}, {"w": torch.tensor([1., 1, 0])})
    >>> [anchor.xy for anchor in p.anchors]
    [(0.0, 0.0), (2.0, 0.0), (1.0, 1.0)]
    """
    keys = plane_keys(a)
    db, dc = _delta(b, a, keys), _delta(c, a, keys)
    norm_b = _dot(db, db, keys) ** 0.5
    if norm_b == 0.0:
        raise SoupError(f"{names[0]} and {names[1]} are the same point; a plane needs three distinct, "
                        "non-collinear points")
    u = {k: t / norm_b for k, t in db.items()}
    cx = _dot(dc, u, keys)
    # Gram–Schmidt twice ("twice is enough", Giraud et al. 2005): orthogonal to 1e-16, not 1e-8.
    w = {k: dc[k] - cx * u[k] for k in keys}
    correction = _dot(w, u, keys)
    w = {k: w[k] - correction * u[k] for k in keys}
    cy = _dot(w, w, keys) ** 0.5
    # float32 checkpoints carry ~1e-7 relative rounding: closer than 1e-6 is on the line.
    if cy <= 1e-6 * max(norm_b, _dot(dc, dc, keys) ** 0.5):
        raise SoupError(f"{', '.join(names)} are collinear; pick a third point off the line "
                        "through the first two")
    v = {k: t / cy for k, t in w.items()}
    anchors = (Projection(names[0], (0.0, 0.0), 0.0), Projection(names[1], (norm_b, 0.0), 0.0),
               Projection(names[2], (cx, cy), 0.0))
    return Plane(a, u, v, anchors)


def random_directions(state: Mapping[str, torch.Tensor], count: int = 2, *, seed: int = 0,
                      ignore_1d: bool = True) -> list[Direction]:
    """Filter-normalised Gaussian directions around ``state`` (Li et al. 2018, §4).

    Each filter (a slice along dim 0 of a weight with ≥ 2 dims) of a random direction is scaled
    to the norm of the same filter of ``state``, so that plots of differently scaled networks
    compare. One-dimensional tensors (biases, norm gains, BatchNorm statistics) get zero
    direction when ``ignore_1d`` — Li et al.'s ``ignore='biasbn'`` — and are otherwise
    normalised as one filter. Seeded, so the same seed gives the same slice.
    """
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        direction: Direction = {}
        for key in plane_keys(state):
            t = state[key].to(GRAM_DTYPE)
            d = torch.randn(t.shape, generator=generator, dtype=GRAM_DTYPE)
            if t.dim() <= 1:
                if ignore_1d:
                    d.zero_()
                else:
                    d.mul_(t.norm() / d.norm().clamp_min(1e-30))
            else:
                filters, dirs = t.reshape(t.shape[0], -1), d.view(t.shape[0], -1)
                dirs.mul_(filters.norm(dim=1, keepdim=True) / dirs.norm(dim=1, keepdim=True).clamp_min(1e-30))
            direction[key] = d
        out.append(direction)
    return out
