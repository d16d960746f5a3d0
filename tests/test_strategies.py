"""The landscape engine on any device: strategies agree with the loop, memory stays in budget,
precision is a choice with its cost in digits reported."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from soup_core.errors import SoupError
from soup_core.evaluate import Evaluator, Split
from soup_core.geometry import plane_basis
from soup_core.landscape import STRATEGIES, SliceEvaluator, plane_landscape
from soup_core.zoo import open_zoo

CONCRETE = [s for s in STRATEGIES if s != "auto"]
# bf16 keeps 8 bits of mantissa: on these models a point's mean loss moves by less than this.
BF16_LOSS_TOLERANCE = 0.05


class TinyTransformer(nn.Module):
    """A ViT-shaped classifier for 8×8 digits: 8 row tokens, one pre-norm attention block."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(torch.randn(8, width) * 0.1)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.view(-1, 8, 8)) + self.position
        q, k, v = self.qkv(self.norm1(tokens)).unflatten(-1, (3, self.heads, -1)).unbind(-3)
        q, k, v = (t.transpose(-2, -3) for t in (q, k, v))  # [N, heads, tokens, dim]
        attention = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        tokens = tokens + self.proj(attention.transpose(-2, -3).flatten(-2))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(self.norm(tokens).mean(-2))


@pytest.fixture(scope="module")
def transformer_plane():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    torch.manual_seed(0)
    theta0 = TinyTransformer().state_dict()
    labels = TinyTransformer().eval()
    labels.load_state_dict(theta0)
    with torch.no_grad():  # labels from θ0's own predictions: finite, comparable losses
        y = labels(x).argmax(-1)
    ev = Evaluator(TinyTransformer, {"val": Split(x[:300], y[:300]), "test": Split(x[300:600], y[300:600])},
                   device="cpu", batch_size=128)
    generator = torch.Generator().manual_seed(1)
    ends = [{k: t + 0.05 * torch.randn(t.shape, generator=generator) for k, t in theta0.items()} for _ in range(2)]
    return ev, plane_basis(theta0, *ends, ("θ0", "a", "b"))


@pytest.fixture(scope="module")
def mlp_zoo():
    return open_zoo("digits-finetune", device="cpu")


COORDS = torch.tensor([[0.3, 0.1], [-0.5, 2.0], [4.0, -1.0], [1.0, 1.0], [0.0, 0.5]], dtype=torch.float64)


@pytest.mark.parametrize("strategy", CONCRETE)
def test_every_strategy_agrees_with_the_loop_on_a_transformer_to_1e5(transformer_plane, strategy):
    ev, plane = transformer_plane
    reference = SliceEvaluator(ev, plane.origin, plane.directions, strategy="loop").evaluate(COORDS, ["test"])
    try:
        engine = SliceEvaluator(ev, plane.origin, plane.directions, strategy=strategy)
    except SoupError as exc:  # the folded layout runs standard layers only, and says so
        assert strategy == "fold" and "cannot run this model" in str(exc)
        return
    values = engine.evaluate(COORDS, ["test"])
    np.testing.assert_allclose(values.loss["test"], reference.loss["test"], atol=1e-5)
    np.testing.assert_array_equal(values.error["test"], reference.error["test"])


def test_the_transformer_landscape_at_the_anchors_is_each_models_own_loss(transformer_plane):
    ev, plane = transformer_plane
    engine = SliceEvaluator(ev, plane.origin, plane.directions)
    values = engine.evaluate([a.xy for a in plane.anchors], ["val"])
    for i, anchor in enumerate(plane.anchors):
        own = ev.evaluate(plane.point(*anchor.xy), ["val"])["val"]
        assert values.loss["val"][i] == pytest.approx(own.loss, abs=1e-5)


@pytest.mark.parametrize("strategy", CONCRETE)
@pytest.mark.parametrize("budget_mib", [0.25, 1, 4, 64])
def test_chunks_never_exceed_the_memory_budget(mlp_zoo, strategy, budget_mib):
    ev = mlp_zoo.evaluator
    names = mlp_zoo.names
    plane = plane_basis(mlp_zoo.base, mlp_zoo.state_dict(names[0]), mlp_zoo.state_dict(names[1]))
    budget = int(budget_mib * 2**20)
    engine = SliceEvaluator(ev, plane.origin, plane.directions, strategy=strategy, memory_budget=budget)
    plan = engine._strategy
    for splits in (["val"], ["val", "test"]):
        samples = max(len(ev.splits[s]) for s in splits)
        points = engine.chunk_for(splits)
        assert 1 <= points
        assert plan.call_bytes(points, plan.batch_size(points, samples)) <= budget
    # and a larger budget never gives smaller calls
    roomy = SliceEvaluator(ev, plane.origin, plane.directions, strategy=strategy, memory_budget=budget * 16)
    assert roomy.chunk_for(["val"]) >= engine.chunk_for(["val"])


def test_a_budget_below_one_point_is_a_clear_error(mlp_zoo):
    names = mlp_zoo.names
    plane = plane_basis(mlp_zoo.base, mlp_zoo.state_dict(names[0]), mlp_zoo.state_dict(names[1]))
    with pytest.raises(SoupError, match=r"one point on one sample needs .* MiB .* budget of .* MiB"):
        SliceEvaluator(mlp_zoo.evaluator, plane.origin, plane.directions, memory_budget=64 << 10)


def test_auto_times_every_strategy_and_keeps_one_that_agrees(transformer_plane):
    ev, plane = transformer_plane
    engine = SliceEvaluator(ev, plane.origin, plane.directions)
    assert engine.strategy in CONCRETE
    reference = SliceEvaluator(ev, plane.origin, plane.directions, strategy="loop").evaluate(COORDS, ["val"])
    np.testing.assert_allclose(engine.evaluate(COORDS, ["val"]).loss["val"], reference.loss["val"], atol=1e-5)


def test_fp32_reports_no_deviation_and_tf32_is_fp32_on_a_cpu(mlp_zoo):
    names = mlp_zoo.names
    plane = plane_basis(mlp_zoo.base, mlp_zoo.state_dict(names[0]), mlp_zoo.state_dict(names[1]))
    exact = SliceEvaluator(mlp_zoo.evaluator, plane.origin, plane.directions)
    tf32 = SliceEvaluator(mlp_zoo.evaluator, plane.origin, plane.directions, precision="tf32",
                          strategy=exact.strategy)
    a, b = exact.evaluate(COORDS, ["val"]), tf32.evaluate(COORDS, ["val"])
    assert exact.precision_deviation is None
    np.testing.assert_array_equal(a.loss["val"], b.loss["val"])
    assert tf32.precision_deviation == 0.0


@pytest.mark.parametrize("strategy", CONCRETE)
def test_bf16_stays_within_its_stated_tolerance_and_reports_its_deviation(transformer_plane, strategy):
    ev, plane = transformer_plane
    exact = SliceEvaluator(ev, plane.origin, plane.directions, strategy="loop").evaluate(COORDS, ["val"])
    try:
        engine = SliceEvaluator(ev, plane.origin, plane.directions, strategy=strategy, precision="bf16")
    except SoupError:
        assert strategy == "fold"
        return
    values = engine.evaluate(COORDS, ["val"])
    difference = np.abs(values.loss["val"] - exact.loss["val"])
    assert difference.max() < BF16_LOSS_TOLERANCE
    assert difference.max() > 0  # it really ran in bf16
    # the reported deviation is the measured one on the run's first points
    first = min(4, len(COORDS))
    assert engine.precision_deviation == pytest.approx(difference[:first].max(), abs=1e-5)


def test_a_landscape_records_its_precision_and_deviation(transformer_plane):
    ev, plane = transformer_plane
    result = plane_landscape(ev, plane, grid=3, precision="bf16")
    data = result.to_json()
    assert data["precision"] == "bf16" and 0 < data["precision_deviation"] < BF16_LOSS_TOLERANCE
    assert plane_landscape(ev, plane, grid=3).to_json()["precision_deviation"] is None

