"""Geometry of fine-tuned solutions: a streaming float64 Gram matrix, angles, norms, distances.

The paper measures the angle φ between θ1 − θ0 and θ2 − θ0, "the initialization treated as
the origin" (Figure 3). All of it follows from the Gram matrix G_ij = <δ_i, δ_j> of the
deltas: cos φ_ij = G_ij / √(G_ii G_jj), ‖δ_i − δ_j‖² = G_ii + G_jj − 2 G_ij.

G is accumulated one tensor (and one chunk of it) at a time in float64, so memory stays at
k × chunk floats however large the models are, and the result does not depend on the order
of the tensors beyond float64 rounding.

>>> import torch
>>> from soup_core.geometry import gram_matrix, angles_from_gram
>>> a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}
>>> angles_from_gram(gram_matrix([a, b])).angle_deg.tolist()
[[0.0, 90.0], [90.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from soup_core.checkpoints import is_float
from soup_core.params import tied_aliases

GRAM_DTYPE = torch.float64
CHUNK_ELEMENTS = 1 << 18  # per checkpoint: 256K float64 = 2 MiB, cache-friendly

Progress = Callable[[float, str], None]


def gram_matrix(
    states: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    progress: Progress | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """k×k float64 Gram matrix of θ_i − θ0 (or of θ_i when ``base`` is None).

    Only float tensors take part (integer buffers are counters); tied tensors count once.
    """
    k = len(states)
    if k == 0:
        raise ValueError("need at least one state dict")
    reference = states[0]
    aliases = tied_aliases(reference)
    keys = [key for key, t in reference.items() if is_float(t) and key not in aliases]
    gram = torch.zeros(k, k, dtype=GRAM_DTYPE)
    total = sum(reference[key].numel() for key in keys) or 1
    largest = max((reference[key].numel() for key in keys), default=1)
    # One reused float64 buffer: no per-chunk allocations (they cost page faults, not FLOPs).
    buffer = torch.empty(k, min(chunk_elements, largest), dtype=GRAM_DTYPE)
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
                rows.sub_(origin[start:stop].to(GRAM_DTYPE))
            gram.addmm_(rows, rows.T)
        done += size
        if progress is not None:
            progress(done / total, key)
    return gram


@dataclass(frozen=True)
class Angles:
    """Pairwise geometry of k deltas: cosine, angle in degrees, L2 distance, and norms."""

    cosine: torch.Tensor
    angle_deg: torch.Tensor
    distance: torch.Tensor
    norm: torch.Tensor

    def to_json(self, names: Sequence[str]) -> dict:
        return {"names": list(names), "cosine": self.cosine.tolist(), "angle_deg": self.angle_deg.tolist(),
                "distance": self.distance.tolist(), "norm": self.norm.tolist(), "precision": "float64"}


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
                    *, progress: Progress | None = None) -> Angles:
    """Angles between θ_i − θ0 for every pair (paper Figure 3's φ), streamed in float64."""
    return angles_from_gram(gram_matrix(states, base, progress=progress))
