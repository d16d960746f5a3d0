"""The sample zoos' data, models and evaluator — built only from scikit-learn's bundled digits.

Splits are fixed and seeded (``SPLIT_SEED``): ``train`` (fine-tuning), ``val`` (held out;
drives every recipe choice), ``test`` (in-distribution report), and four shift sets derived
from ``test`` that play the role of the paper's distribution shifts (§3.1): Gaussian noise,
rotation, translation and blur. Nothing is downloaded.

The zoo manifests name these functions as ``sample_data.digits:make_mlp`` and so on.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage
from sklearn.datasets import load_digits
from torch import nn

from soup_core.evaluate import Evaluator, Split

SPLIT_SEED = 0
SHIFT_SEED = 1
TRAIN_FRACTION, VAL_FRACTION = 0.5, 0.15
NUM_CLASSES = 10


class DigitsMLP(nn.Module):
    """64 → 128 → 128 → 10. ``body`` is what pretraining learns; ``head`` is re-initialised."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.head = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


class DigitsBNCNN(nn.Module):
    """Two 3×3 conv + BatchNorm + ReLU blocks, a 2×2 max-pool, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Linear(32 * 4 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_mlp() -> nn.Module:
    return DigitsMLP()


def make_bn_cnn() -> nn.Module:
    return DigitsBNCNN()


def _shift_sets(images: np.ndarray) -> dict[str, np.ndarray]:
    """Four corrupted copies of the test images (deterministic, ``SHIFT_SEED``)."""
    rng = np.random.default_rng(SHIFT_SEED)
    n = len(images)
    noise = np.clip(images + rng.normal(0.0, 0.35, images.shape), 0.0, 1.0)
    angles = rng.choice([-1.0, 1.0], n) * rng.uniform(15.0, 30.0, n)
    rotate = np.stack([ndimage.rotate(img, a, reshape=False, order=1, mode="constant")
                       for img, a in zip(images, angles)])
    offsets = rng.choice([-1, 1], (n, 2)) * rng.integers(1, 2, (n, 2))
    translate = np.stack([ndimage.shift(img, off, order=0, mode="constant")
                          for img, off in zip(images, offsets)])
    blur = np.stack([ndimage.gaussian_filter(img, 0.9) for img in images])
    blur = blur / np.maximum(blur.max(axis=(1, 2), keepdims=True), 1e-8)
    return {"shift-noise": noise, "shift-rotate": np.clip(rotate, 0, 1),
            "shift-translate": translate, "shift-blur": blur}


@lru_cache(maxsize=1)
def load_splits() -> dict[str, Split]:
    """``train``, ``val``, ``test`` and the four shift sets, as (N, 1, 8, 8) floats in [0, 1]."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_train = int(TRAIN_FRACTION * len(labels))
    n_val = int(VAL_FRACTION * len(labels))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    arrays = {name: images[idx] for name, idx in parts.items()}
    targets = {name: labels[idx] for name, idx in parts.items()}
    for name, shifted in _shift_sets(arrays["test"]).items():
        arrays[name], targets[name] = shifted.astype(np.float32), targets["test"]
    return {name: Split(torch.from_numpy(arr).unsqueeze(1), torch.from_numpy(targets[name]))
            for name, arr in arrays.items()}


def make_evaluator(model_factory, device: str | None = None) -> Evaluator:
    """val, test and the shift sets; ``train`` is kept aside for BatchNorm statistics."""
    splits = load_splits()
    return Evaluator(model_factory, {k: v for k, v in splits.items() if k != "train"},
                     device=device, train=splits["train"],
                     info={"data": "sklearn digits", "unit": "images", "split_seed": SPLIT_SEED, "shift_seed": SHIFT_SEED})
