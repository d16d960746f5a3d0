"""Planes, projections and landscapes: exact at the anchors, batched equals one-by-one, BatchNorm policies."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

from soup_core.errors import SoupError
from soup_core.evaluate import Evaluator, Split
from soup_core.geometry import gram_matrix, plane_basis, random_directions
from soup_core.landscape import (STRATEGIES, Landscape, SliceEvaluator, coarse_to_fine, interpolation_path,
                                 plane_landscape)
from soup_core.params import interpolate
from soup_core.zoo import open_zoo


@pytest.fixture(scope="module")
def mlp_zoo():
    return open_zoo("digits-finetune", device="cpu")


@pytest.fixture(scope="module")
def bn_zoo():
    return open_zoo("digits-bn", device="cpu")


def _plane(zoo, i=0, j=1):
    names = zoo.names
    return plane_basis(zoo.base, zoo.state_dict(names[i]), zoo.state_dict(names[j]),
                       ("base", names[i], names[j]))


def _dot(a, b):
    return sum(float(torch.dot(a[k].reshape(-1), b[k].reshape(-1))) for k in a)


def test_plane_basis_is_orthonormal_to_1e10(mlp_zoo):
    plane = _plane(mlp_zoo)
    assert abs(_dot(plane.u, plane.u) - 1) < 1e-10
    assert abs(_dot(plane.v, plane.v) - 1) < 1e-10
    assert abs(_dot(plane.u, plane.v)) < 1e-10


def test_each_anchor_projects_to_its_exact_coordinates(mlp_zoo):
    plane = _plane(mlp_zoo)
    for anchor, state in zip(plane.anchors, (mlp_zoo.base, mlp_zoo.state_dict(mlp_zoo.names[0]),
                                             mlp_zoo.state_dict(mlp_zoo.names[1]))):
        projection = plane.project(state)
        scale = max(1.0, *map(abs, anchor.xy))
        assert projection.xy == pytest.approx(anchor.xy, abs=1e-10 * scale)
        assert projection.off_plane < 1e-6 * scale  # float32 weights: 1e-7 relative per entry


def test_off_plane_distance_matches_the_gram_matrix(mlp_zoo):
    plane = _plane(mlp_zoo)
    other = mlp_zoo.state_dict(mlp_zoo.names[5])
    projection = plane.project(other)
    d_sq = float(gram_matrix([other], mlp_zoo.base)[0, 0])
    x, y = projection.xy
    assert projection.off_plane == pytest.approx((d_sq - x * x - y * y) ** 0.5, rel=1e-6)


def test_a_point_built_in_the_plane_projects_back_onto_it(mlp_zoo):
    plane = _plane(mlp_zoo)
    projection = plane.project(plane.point(1.5, -0.25))
    assert projection.xy == pytest.approx((1.5, -0.25), abs=1e-5)


def test_collinear_points_are_refused_with_advice(mlp_zoo):
    a, b = mlp_zoo.base, mlp_zoo.state_dict(mlp_zoo.names[0])
    with pytest.raises(ValueError, match="collinear"):
        plane_basis(a, b, interpolate(a, b, 0.5))
    with pytest.raises(ValueError, match="same point"):
        plane_basis(a, a, b)


def test_landscape_at_the_anchors_equals_the_models_own_loss_and_error(mlp_zoo):
    ev = mlp_zoo.evaluator
    plane = _plane(mlp_zoo)
    engine = SliceEvaluator(ev, plane.origin, plane.directions)
    values = engine.evaluate([a.xy for a in plane.anchors], ["val", "test"])
    states = (mlp_zoo.base, mlp_zoo.state_dict(mlp_zoo.names[0]), mlp_zoo.state_dict(mlp_zoo.names[1]))
    for i, state in enumerate(states):
        own = ev.evaluate(state, ["val", "test"])
        for split in ("val", "test"):
            assert values.loss[split][i] == pytest.approx(own[split].loss, abs=1e-5)
            assert values.error[split][i] == pytest.approx(1 - own[split].accuracy, abs=1e-5)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "auto"])
def test_batched_and_one_point_at_a_time_agree(mlp_zoo, strategy):
    ev = mlp_zoo.evaluator
    plane = _plane(mlp_zoo, 3, 7)
    coords = torch.tensor([[0.3, 0.1], [-0.5, 2.0], [4.0, -1.0], [1.0, 1.0], [0.0, 0.5]], dtype=torch.float64)
    values = SliceEvaluator(ev, plane.origin, plane.directions, strategy=strategy).evaluate(coords, ["test"])
    for i, (x, y) in enumerate(coords.tolist()):
        own = ev.evaluate(plane.point(x, y), ["test"])["test"]
        assert values.loss["test"][i] == pytest.approx(own.loss, abs=1e-5)
        assert values.error["test"][i] == pytest.approx(1 - own.accuracy, abs=1e-5)


def test_first_layer_reuse_and_chunking_change_nothing(mlp_zoo):
    ev = mlp_zoo.evaluator
    plane = _plane(mlp_zoo)
    coords = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fast = SliceEvaluator(ev, plane.origin, plane.directions, strategy="vmap")
    plain = SliceEvaluator(ev, plane.origin, plane.directions, strategy="vmap", reuse_first_layer=False,
                           working_set=1)  # one point and one sample per call
    assert fast.first_layer is not None and plain.first_layer is None
    assert plain.chunk_points(269) == 1
    a, b = fast.evaluate(coords, ["val"]), plain.evaluate(coords, ["val"])
    np.testing.assert_allclose(a.loss["val"], b.loss["val"], atol=1e-5)
    np.testing.assert_array_equal(a.error["val"], b.error["val"])


def _with_buffers(point, source):
    out = dict(point)
    for key in point:
        if "running_" in key:
            out[key] = source[key]
    return out


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "auto"])
def test_batchnorm_recompute_is_update_bn_at_every_point(bn_zoo, strategy):
    ev = bn_zoo.evaluator
    plane = _plane(bn_zoo)
    coords = [(0.4, 0.3), (1.2, -0.2)]
    values = SliceEvaluator(ev, plane.origin, plane.directions, bn="recompute", strategy=strategy).evaluate(coords, ["val"])
    for i, (x, y) in enumerate(coords):
        model = copy.deepcopy(ev.model)
        model.load_state_dict(plane.point(x, y))
        update_bn(torch.utils.data.DataLoader(ev.train.inputs, batch_size=ev.batch_size), model)
        reference = Evaluator(lambda m=model: m, {"val": ev.splits["val"]}, device="cpu")
        own = reference.evaluate(model.state_dict(), ["val"])["val"]
        assert values.loss["val"][i] == pytest.approx(own.loss, abs=1e-5)
        assert values.error["val"][i] == pytest.approx(1 - own.accuracy, abs=1e-5)


def test_batchnorm_interpolate_and_keep_do_what_they_say(bn_zoo):
    ev = bn_zoo.evaluator
    plane = _plane(bn_zoo)
    x, y = 0.7, 0.4
    point = plane.point(x, y)  # every float tensor, statistics included, follows the plane
    interpolated = SliceEvaluator(ev, plane.origin, plane.directions, bn="interpolate").evaluate([(x, y)], ["val"])
    kept = SliceEvaluator(ev, plane.origin, plane.directions, bn="keep").evaluate([(x, y)], ["val"])
    assert interpolated.loss["val"][0] == pytest.approx(ev.evaluate(point, ["val"])["val"].loss, abs=1e-5)
    keep_own = ev.evaluate(_with_buffers(point, plane.origin), ["val"])["val"]
    assert kept.loss["val"][0] == pytest.approx(keep_own.loss, abs=1e-5)
    assert kept.loss["val"][0] != pytest.approx(interpolated.loss["val"][0], abs=1e-3)


def test_recompute_without_training_data_says_what_to_do(bn_zoo):
    ev = bn_zoo.evaluator
    no_train = Evaluator(ev.model_factory, {"val": ev.splits["val"]}, device="cpu")
    plane = _plane(bn_zoo)
    with pytest.raises(ValueError, match="bn='interpolate'"):
        SliceEvaluator(no_train, plane.origin, plane.directions, bn="recompute")


def test_models_without_batchnorm_report_no_policy(mlp_zoo):
    plane = _plane(mlp_zoo)
    assert SliceEvaluator(mlp_zoo.evaluator, plane.origin, plane.directions, bn="keep").bn == "none"


def test_coarse_to_fine_visits_every_point_once_corners_first():
    order = coarse_to_fine(31)
    assert sorted(order) == list(range(31 * 31))
    assert set(order[:4]) == {0, 30, 30 * 31, 31 * 31 - 1}


def test_a_cancelled_grid_is_usable_and_resumes_to_the_full_result(mlp_zoo):
    ev = mlp_zoo.evaluator
    plane = _plane(mlp_zoo)
    engine = SliceEvaluator(ev, plane.origin, plane.directions, working_set=1 << 20, strategy="vmap")
    chunk = engine.chunk_points(len(ev.splits["val"]))
    calls = []

    def stop_after_the_four_corners() -> bool:
        calls.append(1)
        return (len(calls) - 1) * chunk >= 4

    partial = plane_landscape(ev, plane, grid=9, engine=engine, should_stop=stop_after_the_four_corners)
    assert 0 < partial.done.sum() < 81 and not partial.complete
    assert partial.done[0, 0] and partial.done[-1, -1]  # the coarse lattice came first
    preview = partial.preview(partial.loss["val"])
    assert not np.isnan(preview).any()
    restored = Landscape.from_json(partial.to_json())  # what the CLI's --resume reads back
    finished = plane_landscape(ev, plane, grid=9, engine=engine, resume=restored)
    full = plane_landscape(ev, plane, grid=9, engine=engine)
    assert finished.complete
    np.testing.assert_allclose(finished.loss["val"], full.loss["val"], atol=1e-12)


@pytest.mark.parametrize("edit, said", [
    (lambda d: d["loss"]["val"][0].pop(), "loss.val[0] must be a list of 3 finite numbers"),
    (lambda d: d["axes"].update(x=["a", "b", "c"]), "axes.x must be a list of finite numbers"),
    (lambda d: d["error"].pop("val"), "it has no 'val' field"),
    (lambda d: d["loss"]["val"][1].__setitem__(2, float("inf")), "loss.val[1] must be"),
    (lambda d: d["axes"]["x"].__setitem__(0, 10**400), "axes.x must be a list of finite numbers"),  # no float
    (lambda d: d["anchors"][0].update(xy=["a", 1]), "'s xy must be a list of 2 finite numbers"),
])
def test_a_resume_file_edited_by_hand_is_refused_by_the_field_that_is_wrong(mlp_zoo, edit, said):
    written = plane_landscape(mlp_zoo.evaluator, _plane(mlp_zoo), grid=3).to_json()
    edit(written)
    with pytest.raises(ValueError, match=re.escape(said)):
        Landscape.from_json(written)


def test_a_resume_file_over_another_extent_is_refused_not_mixed_in(mlp_zoo):
    plane = _plane(mlp_zoo)
    written = plane_landscape(mlp_zoo.evaluator, plane, grid=3).to_json()
    written["axes"]["x"] = [-1e308, 0.0, 1e308]  # points this run never asked for
    with pytest.raises(SoupError, match="covers another extent"):
        plane_landscape(mlp_zoo.evaluator, plane, grid=3, resume=Landscape.from_json(written))
    with pytest.raises(SoupError, match="covers another extent"):  # or the same grid with another margin
        plane_landscape(mlp_zoo.evaluator, plane, grid=3, margin=0.5,
                        resume=Landscape.from_json(plane_landscape(mlp_zoo.evaluator, plane, grid=3).to_json()))


def test_grid_covers_the_anchors_with_a_margin(mlp_zoo):
    plane = _plane(mlp_zoo)
    land = plane_landscape(mlp_zoo.evaluator, plane, grid=5, margin=0.1)
    for anchor in plane.anchors:  # strictly inside: the margin is on every side
        assert land.xs[0] < anchor.xy[0] < land.xs[-1]
        assert land.ys[0] < anchor.xy[1] < land.ys[-1]
    payload = land.to_json()
    assert np.array(payload["loss"]["val"]).shape == (5, 5)
    assert [a["name"] for a in payload["anchors"]] == ["base", *mlp_zoo.names[:2]]


def test_random_directions_are_filter_normalised_and_seeded(mlp_zoo):
    state = mlp_zoo.state_dict(mlp_zoo.names[0])
    d1, d2 = random_directions(state, 2, seed=3)
    again, _ = random_directions(state, 2, seed=3)
    assert all(torch.equal(d1[k], again[k]) for k in d1)
    assert not torch.equal(d1["body.0.weight"], d2["body.0.weight"])
    w = state["body.0.weight"].double()
    torch.testing.assert_close(d1["body.0.weight"].norm(dim=1), w.norm(dim=1))
    assert d1["body.0.bias"].abs().sum() == 0  # Li et al.'s ignore='biasbn'


def test_path_ends_are_the_models_and_a_line_of_one_model_has_no_barrier(mlp_zoo):
    ev = mlp_zoo.evaluator
    a, b = mlp_zoo.base, mlp_zoo.state_dict(mlp_zoo.names[2])
    path = interpolation_path(ev, a, b, [-0.5, 0.0, 0.25, 1.0, 1.5], splits=["test"])
    for alpha, state in ((0.0, a), (1.0, b), (0.25, interpolate(a, b, 0.25))):
        i = list(path.alphas).index(alpha)
        own = ev.evaluate(state, ["test"])["test"]
        assert path.loss["test"][i] == pytest.approx(own.loss, abs=1e-5)
    flat = interpolation_path(ev, a, a, [0.0, 0.5, 1.0], splits=["test"])
    assert flat.barrier(flat.error["test"]) == pytest.approx(0.0, abs=1e-12)
    assert path.to_json()["barrier"]["test"]["error"] >= 0.0


def test_a_paths_json_is_what_it_measured_with_barriers_worked_by_hand():
    """α = 0, ½, 1 with errors .1, .3, .2: the chord at ½ is .15, so the barrier is .15; losses
    1, 3, 2 give 3 − 1.5 = 1.5."""
    from soup_core.landscape.path import Path
    path = Path(("base", "ft-00"), np.array([0.0, 0.5, 1.0]), {"val": np.array([1.0, 3.0, 2.0])},
                {"val": np.array([0.1, 0.3, 0.2])}, "keep", "bf16", 0.25)
    assert path.to_json() == {
        "names": ["base", "ft-00"], "alphas": [0.0, 0.5, 1.0], "bn": "keep", "precision": "bf16",
        "precision_deviation": 0.25, "loss": {"val": [1.0, 3.0, 2.0]}, "error": {"val": [0.1, 0.3, 0.2]},
        "barrier": {"val": {"loss": 1.5, "error": pytest.approx(0.15, abs=1e-15)}}}


def test_a_path_by_default_runs_from_minus_a_half_to_one_and_a_half_through_both_ends(mlp_zoo):
    from soup_core.landscape.path import path_alphas
    assert path_alphas().tolist() == pytest.approx(np.linspace(-0.5, 1.5, 41).tolist(), abs=1e-15)
    assert path_alphas(4, 0.1, 0.7).tolist() == pytest.approx([0.0, 0.1, 0.3, 0.5, 0.7, 1.0])  # ends added
    ev = mlp_zoo.evaluator
    path = interpolation_path(ev, mlp_zoo.base, mlp_zoo.state_dict(mlp_zoo.names[0]), max_samples=50)
    assert path.alphas.tolist() == path_alphas().tolist() and path.bn == "none"  # the MLP has no BatchNorm


def test_a_path_through_batchnorm_models_keeps_the_policy_asked_for(bn_zoo):
    """keep and recompute give other BatchNorm statistics, so other losses, in the middle of the line."""
    ev = bn_zoo.evaluator
    a, b = bn_zoo.state_dict(bn_zoo.names[0]), bn_zoo.state_dict(bn_zoo.names[1])
    kept = interpolation_path(ev, a, b, [0.0, 0.5, 1.0], bn="keep", max_samples=200)
    recomputed = interpolation_path(ev, a, b, [0.0, 0.5, 1.0], bn="recompute", max_samples=200)
    assert (kept.bn, recomputed.bn) == ("keep", "recompute") and kept.to_json()["bn"] == "keep"
    assert kept.loss["val"][1] != pytest.approx(recomputed.loss["val"][1], abs=1e-4)


def test_which_images_a_line_gets_right_recomputes_batchnorm_at_each_point_as_update_bn_does(bn_zoo):
    """The reference: at each α, interpolate, re-estimate BatchNorm with update_bn on the training
    data, and compare the argmax with the labels."""
    from soup_core.landscape.path import correct_along
    ev = bn_zoo.evaluator
    a, b = bn_zoo.state_dict(bn_zoo.names[0]), bn_zoo.state_dict(bn_zoo.names[1])
    alphas = np.array([0.0, 0.5])
    rows = correct_along(ev, a, b, "val", alphas)
    for alpha, row in zip(alphas, rows):
        model = copy.deepcopy(ev.model)
        model.load_state_dict(interpolate(a, b, float(alpha)))
        loader = torch.utils.data.DataLoader(ev.train.inputs, batch_size=ev.batch_size)
        update_bn(loader, model)
        model.eval()
        with torch.no_grad():
            right = (model(ev.splits["val"].inputs).argmax(dim=1) == ev.labels("val")).numpy()
        assert (row == right).all()
    assert rows.shape == (2, len(ev.labels("val")))


def test_tiny_linear_slice_doc_example():
    ev = Evaluator(lambda: torch.nn.Linear(2, 2), {"val": Split(torch.eye(2), torch.tensor([0, 1]))}, device="cpu")
    origin = {"weight": torch.eye(2), "bias": torch.zeros(2)}
    flip = {"weight": torch.tensor([[-2.0, 2.0], [2.0, -2.0]], dtype=torch.float64),
            "bias": torch.zeros(2, dtype=torch.float64)}
    values = SliceEvaluator(ev, origin, [flip]).evaluate(torch.tensor([[0.0], [1.0]]))
    assert values.error["val"].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("bn", ["recompute", "interpolate", "keep"])
def test_exported_point_weights_score_what_the_landscape_showed(bn_zoo, bn):
    from soup_core.landscape import point_weights
    ev = bn_zoo.evaluator
    plane = _plane(bn_zoo)
    shown = SliceEvaluator(ev, plane.origin, plane.directions, bn=bn).evaluate([(0.9, 0.6)], ["test"])
    own = ev.evaluate(point_weights(ev, plane, 0.9, 0.6, bn), ["test"])["test"]
    assert shown.loss["test"][0] == pytest.approx(own.loss, abs=1e-5)


def test_the_barrier_interval_holds_the_barrier_and_is_a_point_for_a_model_with_itself():
    from soup_core.landscape import barrier_interval
    from soup_core.landscape.path import error_barrier
    zoo = open_zoo("digits-finetune")
    a, b = zoo.state_dict("ft-17"), zoo.state_dict("ft-22")
    line = barrier_interval(zoo.evaluator, a, b, "test")
    assert line.barrier == error_barrier(zoo.evaluator, a, b, "test") and line.low <= line.barrier <= line.high
    assert line.barrier == pytest.approx(float(np.max(line.error - line.chord)))
    again = barrier_interval(zoo.evaluator, a, b, "test")
    assert (again.low, again.high) == (line.low, line.high)  # seeded
    itself = barrier_interval(zoo.evaluator, a, a, "test")
    assert (itself.barrier, itself.low, itself.high) == (0.0, 0.0, 0.0)  # no line, no barrier


def test_a_path_keeps_the_alphas_precision_and_sample_it_was_asked_for(tiny_evaluator, tiny_states):
    """Integer α are read as floats; bf16 is recorded with its measured deviation from fp32; a
    subsample of the split is scored when asked; progress is reported."""
    from soup_core.landscape import interpolation_path
    a, b = tiny_states["m0"], tiny_states["m1"]
    seen: list[float] = []
    full = interpolation_path(tiny_evaluator, a, b, [0, 1], progress=lambda fraction, *_: seen.append(fraction))
    assert full.alphas.dtype == np.float64 and full.alphas.tolist() == [0.0, 1.0]
    assert (full.precision, full.precision_deviation) == ("fp32", None) and seen and seen[-1] == 1.0
    assert full.loss["val"][0] == pytest.approx(tiny_evaluator.evaluate(a, ["val"])["val"].loss, rel=1e-6)
    half = interpolation_path(tiny_evaluator, a, b, [0, 1], precision="bf16")
    assert half.precision == "bf16" and isinstance(half.precision_deviation, float)
    sample = interpolation_path(tiny_evaluator, a, b, [0, 1], max_samples=20)
    assert not np.allclose(sample.loss["val"], full.loss["val"])
