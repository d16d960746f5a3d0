"""How every sample model is trained: one run's hyperparameters, augmentation, the training
loop and the linear probe (paper §3, LP-FT), shared by :mod:`sample_data.build` and
:mod:`sample_data.paper`. Deterministic on one processor (seeded), not bit-equal across
processors (see the README's "Sample zoos")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sample_data.digits import NUM_CLASSES

PRETRAIN_SEED = 1234
BATCH_SIZE = 32


@dataclass(frozen=True)
class HParams:
    """One fine-tuning run's hyperparameters (recorded in the manifest)."""

    lr: float
    weight_decay: float
    epochs: int
    label_smoothing: float
    augmentation: int  # 0 none, 1 translate ±1 px, 2 translate + rotate ±15° + noise
    optimizer: str  # "adamw" or "sgd" (momentum 0.9)
    seed: int


def augment(x: torch.Tensor, strength: int, generator: torch.Generator) -> torch.Tensor:
    """Random affine jitter on a batch of (N, 1, 8, 8) images."""
    if strength == 0:
        return x
    n = x.shape[0]
    shift = (torch.randint(-1, 2, (n, 2), generator=generator).float() * (2 / 8))
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(15) if strength > 1 else torch.zeros(n)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    if strength > 1:
        out = (out + 0.1 * torch.randn(out.shape, generator=generator)).clamp(0, 1)
    return out


def train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, hp: HParams,
          parameters: list[nn.Parameter] | None = None) -> nn.Module:
    """Mini-batch training with a cosine learning-rate schedule (paper App. J.2)."""
    torch.manual_seed(hp.seed)
    generator = torch.Generator().manual_seed(hp.seed)
    params = parameters if parameters is not None else list(model.parameters())
    if hp.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    steps = hp.epochs * math.ceil(len(labels) / BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(hp.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), BATCH_SIZE):
            idx = order[start:start + BATCH_SIZE]
            x = augment(inputs[idx], hp.augmentation, generator)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=hp.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def linear_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """Linear probe (paper §3, the "LP" of LP-FT): a fresh head fitted on frozen features of the
    target task's training images."""
    torch.manual_seed(PRETRAIN_SEED + 1)
    model.head.reset_parameters()
    with torch.no_grad():
        model.eval()
        features = model.body(x if isinstance(model.body[0], nn.Conv2d) else x.flatten(1))
    probe = nn.Linear(features.shape[1], NUM_CLASSES)
    probe.load_state_dict(model.head.state_dict())
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        loss = F.cross_entropy(probe(features), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.head.load_state_dict(probe.state_dict())
    return model.eval()
