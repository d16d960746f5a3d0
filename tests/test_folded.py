"""The folded forward: G weight points in one pass equal G plain forwards, layer by layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from soup_core.allocator import keep_freed_memory
from soup_core.evaluate import Evaluator, Split
from soup_core.landscape.folded import FoldedForward, Unsupported
from soup_core.landscape import SliceEvaluator


def _points(model: nn.Module, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` weight points near the model's own: every float tensor, statistics included."""
    generator = torch.Generator().manual_seed(seed)
    points = []
    for _ in range(count):
        point = {}
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            noise = 0.3 * torch.randn(value.shape, generator=generator)
            point[key] = value.abs() + 0.5 + noise.abs() if key.endswith("running_var") else value + noise
        points.append(point)
    return points


def seeded(seed: int = 0) -> torch.Generator:
    """Inputs drawn from a seeded generator: a failure here reproduces."""
    return torch.Generator().manual_seed(seed)


def _assert_folded_equals_plain(model: nn.Module, x: torch.Tensor, count: int = 3) -> None:
    model.eval()
    points = _points(model, count)
    stacked = {k: torch.stack([p[k] for p in points]) for k in points[0]}
    folded = FoldedForward(model)(stacked, {}, x)
    assert folded.shape[:2] == (count, len(x))
    for g, point in enumerate(points):
        torch.testing.assert_close(folded[g], functional_call(model, point, (x,)), atol=1e-4, rtol=1e-4)


def test_an_mlp_at_three_points_is_three_plain_forwards():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 5))
    _assert_folded_equals_plain(model, torch.randn(7, 3, 4, generator=seeded()))


class _Cnn(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = nn.functional.relu(self.bn2(self.conv2(h)))
        h = h + self.grouped(h)  # a residual connection
        h = self.pool(h.relu())  # a ReLU the folded forward moves after the pool
        return self.head(torch.flatten(h, 1))


@pytest.mark.parametrize("in_channels", [1, 3])
def test_a_batchnorm_cnn_with_strides_groups_residuals_and_pooling_matches(in_channels):
    _assert_folded_equals_plain(_Cnn(in_channels), torch.randn(5, in_channels, 8, 8, generator=seeded()))


def test_batchnorm_in_collect_mode_records_each_points_batch_statistics():
    class Collecting(nn.BatchNorm2d):
        collect: list | None = None

    model = nn.Sequential(nn.Conv2d(2, 4, 3), Collecting(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    model[1].collect = []
    points = _points(model, 2)
    stacked = {k: torch.stack([p[k] for p in points]) for k in points[0]}
    x = torch.randn(9, 2, 6, 6, generator=seeded())
    FoldedForward(model, batchnorms=(Collecting,))(stacked, {}, x)
    (mean, var), = model[1].collect
    for g, point in enumerate(points):
        h = nn.functional.conv2d(x, point["0.weight"], point["0.bias"])
        torch.testing.assert_close(mean[g], h.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(var[g], h.var((0, 2, 3), correction=1), atol=1e-5, rtol=1e-5)


class _Concatenates(nn.Module):
    """Two heads side by side: torch.cat is not on the folded forward's list."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


def test_operations_outside_the_list_are_unsupported_with_the_reason():
    with pytest.raises(Unsupported, match="cat"):
        FoldedForward(_Concatenates())

    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else -self.a(x)  # data-dependent: no trace

    with pytest.raises(Unsupported, match="trace"):
        FoldedForward(Branches())


def test_the_slice_evaluator_falls_back_when_the_model_cannot_be_folded():
    ev = Evaluator(_Concatenates, {"val": Split(torch.randn(6, 3, generator=seeded()), torch.tensor([0, 1, 2, 3, 0, 1]))}, device="cpu")
    origin = _Concatenates().state_dict()
    direction = {k: torch.randn(v.shape, dtype=torch.float64, generator=seeded()) for k, v in origin.items()}
    engine = SliceEvaluator(ev, origin, [direction])
    assert engine.strategy in ("vmap", "loop") and "cat" in engine.fold_unsupported
    with pytest.raises(ValueError, match="strategy='fold' cannot run this model"):
        SliceEvaluator(ev, origin, [direction], strategy="fold")


def test_keeping_freed_memory_takes_effect_on_glibc():
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory() is True
