"""Shared fixtures: tiny real models and checkpoints on disk, and a guard for user files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from soup_core.evaluate import Evaluator, Split

# Servers and AppTests started by the suite do not warm their caches in the background (it would
# compete with the tests for the 2 cores); tests/test_warm.py runs the warm-up itself.
os.environ.setdefault("SOUP_WARM", "0")
# AppTests run the pages inside the test process: their heavy work stays on its threads, and the
# process keeps its torch threads (appkit.workers.share_the_cores). tests/test_workers.py tests the
# worker processes themselves, and the Chromium tests' servers run with them (tests/test_app.py:_serve).
os.environ.setdefault("SOUP_WORKERS", "0")


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: proof that a command left files untouched."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]],
                  weight_map: dict[str, str] | None = None) -> Path:
    """A Hugging Face folder of safetensors shards and its ``model.safetensors.index.json``, which maps each
    tensor to the first shard holding it unless ``weight_map`` says otherwise; returns the index."""
    folder.mkdir(exist_ok=True)
    for name, tensors in shards.items():
        safetensors.torch.save_file(tensors, str(folder / name))
    if weight_map is None:
        weight_map = {}
        for name, tensors in shards.items():
            for key in tensors:
                weight_map.setdefault(key, name)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def tiny_evaluator() -> Evaluator:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return Evaluator(TinyNet, {"val": Split(x[:150], y[:150]), "test": Split(x[150:], y[150:]),
                               "shift": Split(x[150:] * 2, y[150:])}, device="cpu")


@pytest.fixture
def tiny_states() -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for i in range(5):
        torch.manual_seed(i)
        out[f"m{i}"] = TinyNet().state_dict()
    return out
