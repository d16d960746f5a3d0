"""``digits-soup``: a fine-tuning zoo under the paper's own conditions (Wortsman et al. 2022, §3).

The paper's soups work when three things hold: a strong pretrained model whose features
transfer, fine-tuning that starts from a linear probe (LP-FT, §3), and a hyperparameter sweep
whose runs are mostly good (App. J.2.1 sweeps around working settings). ``digits-finetune``
deliberately breaks the last one (too-high learning rates, to show uniform soups fail); this
zoo keeps all three, at a size two CPU cores build in about a minute.

Protocol — fixed before any test number was looked at; every choice is made on val:

* **Source task** (pretraining): the training images only, each re-rendered 24 times with
  heavy random affine jitter — rotation up to ±20°, scale 0.85–1.15, shift up to one pixel —
  plus pixel noise: 21,552 images of a related but different distribution. Val and test
  images are never seen before fine-tuning.
* **θ0**: the sample MLP (64 → 128 → 128 → 10) trained on the source for 8 epochs (AdamW, lr
  3e-3), then a linear-probe head fitted on frozen features of the clean training images.
* **Fine-tuning sweep**: 32 runs end to end from θ0 (AdamW, cosine schedule), each with a
  random learning rate log-uniform in [3e-5, 3e-4], weight decay log-uniform in [1e-4, 1e-1],
  epochs in {10, 20}, label smoothing in {0, 0.1}, augmentation strength in {0, 1, 2} and a
  seed; the ranges are those that fine-tune θ0 without leaving its basin, as the paper's are.
* **Splits**: the sample zoos' fixed splits (train 898 / val 269 / test 630 and the four
  shifts), so that results compare across zoos.
* **Results**: ``python -m sample_data.results --zoo digits-soup`` over 5 sweep seeds, mean ±
  std, each recipe against the best individual model by an exact McNemar test.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from sample_data.training import PRETRAIN_SEED, HParams, linear_probe, train
from sample_data.digits import load_splits, make_mlp
from soup_core.state import StateDict

SOURCE_COPIES = 24


def render_source(images: torch.Tensor, copies: int = SOURCE_COPIES, seed: int = PRETRAIN_SEED) -> torch.Tensor:
    """``copies`` heavily jittered re-renderings of each (N, 1, 8, 8) image (deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    x = images.repeat(copies, 1, 1, 1)
    n = len(x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(20)
    scale = 0.85 + 0.3 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 / 8)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    out = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    return (out + 0.05 * torch.randn(out.shape, generator=generator)).clamp(0, 1)


def pretrain_on_source() -> nn.Module:
    """θ0: pretraining on the re-rendered source, then a linear probe on the clean images (LP)."""
    splits = load_splits()
    x, y = splits["train"].inputs, splits["train"].labels
    torch.manual_seed(PRETRAIN_SEED)
    model = make_mlp()
    train(model, render_source(x), y.repeat(SOURCE_COPIES), HParams(3e-3, 1e-4, 8, 0.0, 0, "adamw", PRETRAIN_SEED))
    return linear_probe(model, x, y)

def sample_good_hparams(rng: random.Random, index: int, sweep_seed: int) -> HParams:
    """The sweep around working settings (see the module's protocol)."""
    return HParams(lr=float(f"{10 ** rng.uniform(math.log10(3e-5), math.log10(3e-4)):.3g}"),
                   weight_decay=float(f"{10 ** rng.uniform(-4.0, -1.0):.3g}"),
                   epochs=rng.choice([10, 20]),
                   label_smoothing=rng.choice([0.0, 0.1]),
                   augmentation=rng.choice([0, 1, 2]),
                   optimizer="adamw",
                   seed=sweep_seed * 1000 + index)


def good_sweep(theta0: nn.Module, count: int, sweep_seed: int) -> dict[str, tuple[StateDict, HParams]]:
    """``count`` LP-FT runs from θ0 with :func:`sample_good_hparams`."""
    splits = load_splits()
    rng = random.Random(sweep_seed)
    out = {}
    for i in range(count):
        hp = sample_good_hparams(rng, i, sweep_seed)
        model = make_mlp()
        model.load_state_dict(theta0.state_dict())
        train(model, splits["train"].inputs, splits["train"].labels, hp)
        out[f"soup-{i:02d}"] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, hp)
    return out
