"""What a point of a landscape scores: mean cross-entropy and error per split, summed on the device.

>>> import torch
>>> logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])  # one point, two samples
>>> loss, wrong = loss_and_wrong(logits, torch.tensor([0, 0]))
>>> round(float(loss), 4), int(wrong)  # −log σ(2) − log σ(−2)
(2.2539, 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from soup_core.evaluate import IGNORE_INDEX


@dataclass(frozen=True)
class PointValues:
    """Mean cross-entropy and error (1 − accuracy) per split, one entry per point."""

    loss: dict[str, np.ndarray]
    error: dict[str, np.ndarray]


def loss_and_wrong(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (float64) and count of wrong predictions per point of [G, N, C] logits
    (or a language model's [G, N, L, V] against labels [N, L]: positions labelled IGNORE_INDEX count for nothing)."""
    scored = labels != IGNORE_INDEX
    safe = labels.clamp_min(0).expand(logits.shape[:-1])
    # Cross-entropy as logsumexp − logit of the label; max gives argmax too.
    top, predicted = logits.max(dim=-1)
    lse = top + (logits - top.unsqueeze(-1)).exp().sum(-1).log()
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    loss = torch.where(scored, lse - picked, 0.0).flatten(1).sum(-1, dtype=torch.float64)
    return loss, ((predicted != labels) & scored).flatten(1).sum(-1)