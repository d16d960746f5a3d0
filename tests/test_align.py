"""Permutation alignment (Git Re-Basin weight matching), specified as facts."""

from __future__ import annotations

import pytest
import torch

from soup_core.align import (AlignmentError, align, barrier_table, permutation_groups, permute, units_moved,
                             weight_matching)
from soup_core.zoo import open_zoo
from tests.test_cli import ok_json


@pytest.fixture(scope="module", params=["digits-scratch", "digits-bn"])
def zoo(request):
    return open_zoo(request.param, device="cpu")


def example(zoo):
    return zoo.evaluator.splits["val"].inputs[:2]


def test_aligning_a_model_to_itself_is_the_identity(zoo):
    state = zoo.state_dict(zoo.names[0])
    aligned = align(state, state, zoo.evaluator.model, example(zoo))
    assert all(torch.equal(aligned[k], state[k]) for k in state)


def test_a_permuted_copy_aligns_back_exactly(zoo):
    model, state = zoo.evaluator.model, zoo.state_dict(zoo.names[1])
    groups = permutation_groups(model, example(zoo))
    perms = [torch.randperm(g.size, generator=torch.Generator().manual_seed(i)) for i, g in enumerate(groups)]
    shuffled = permute(state, groups, perms)
    assert any(not torch.equal(shuffled[k], state[k]) for k in state)
    # The permutation back moves exactly the units the shuffle did not leave in place.
    displaced = [int((p != torch.arange(len(p))).sum()) for p in perms]
    back_perms = weight_matching(state, shuffled, groups)
    assert [m for m, _ in units_moved(groups, back_perms).values()] == displaced
    back = align(state, shuffled, model, example(zoo))
    assert all(torch.allclose(back[k], state[k], atol=1e-6) for k in state)
    for split in ("val", "test"):
        assert torch.allclose(zoo.evaluator.logits(back, split), zoo.evaluator.logits(state, split), atol=1e-5)


def test_an_aligned_model_computes_the_same_function(zoo):
    reference, other = (zoo.state_dict(n) for n in zoo.names[:2])
    aligned = align(reference, other, zoo.evaluator.model, example(zoo))
    moved = any(not torch.equal(aligned[k], other[k]) for k in other)
    # Models fine-tuned from one θ0 are already aligned; models trained from scratch are not.
    assert moved == (zoo.name == "digits-scratch")
    assert torch.allclose(zoo.evaluator.logits(aligned, "test"), zoo.evaluator.logits(other, "test"), atol=1e-5)


def test_alignment_never_raises_the_barrier_between_models_trained_from_scratch():
    zoo = open_zoo("digits-scratch", device="cpu")
    table = barrier_table(zoo, zoo.aligned("scratch-00"), zoo.evaluator, "val")
    assert len(table) == 28 and all(row["after"] <= row["before"] for row in table)


def test_groups_come_from_the_graph_and_unsupported_operations_are_named():
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.head(h + torch.relu(self.b(h)))

    groups = permutation_groups(Residual(), torch.zeros(2, 4))
    assert len(groups) == 1 and ("b.weight", 1, 1) in groups[0].axes and ("head.weight", 1, 1) in groups[0].axes

    class Concatenates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(16, 2)

        def forward(self, x):
            h = self.a(x)
            return self.head(torch.cat([h, h], dim=1))

    with pytest.raises(AlignmentError, match="cat is not supported"):
        permutation_groups(Concatenates(), torch.zeros(2, 4))


def test_the_command_line_aligns_and_soups_the_aligned_checkpoints(tmp_path):
    payload = ok_json("align", "digits-scratch", "--to", "scratch-00", "--out", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"scratch-0{i}.safetensors" for i in range(8)]
    assert sorted(payload["units_moved"]) == [f"scratch-0{i}" for i in range(1, 8)]
    assert all(0 < layer["moved"] <= layer["units"] for layers in payload["units_moved"].values()
               for layer in layers.values())
    before, after = payload["uniform_soup_accuracy"]["before"], payload["uniform_soup_accuracy"]["after"]
    soup = ok_json("make", "uniform", "digits-scratch", "--align", "scratch-00", "--out", str(tmp_path / "s.safetensors"))
    assert soup["metrics"]["test"]["accuracy"] == pytest.approx(after) and after > before
    from soup_core.io import read_provenance
    provenance = read_provenance(tmp_path / "s.safetensors")
    assert provenance["aligned_to"] == "scratch-00" and "--align scratch-00" in provenance["command"]
