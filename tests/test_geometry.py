"""Angles and distances between fine-tuned solutions, specified."""

import math

import pytest
import torch

from soup_core.errors import SoupError
from soup_core.io import open_checkpoint, save_state_dict
from soup_core.geometry import angles_from_gram, gram_matrix, pairwise_angles


def states(k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(50, 7, generator=g), "b": torch.randn(13, generator=g),
             "n": torch.tensor(3)} for _ in range(k)]


def flat(s, base=None):
    return torch.cat([(s[k].double() - (base[k].double() if base else 0)).reshape(-1) for k in ("a", "b")])


def test_the_angle_of_a_delta_with_itself_is_zero():
    base, (a,) = states(1, 1)[0], states(1, 2)
    angles = pairwise_angles([a, a], base)
    assert angles.angle_deg.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert angles.distance.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_orthogonal_deltas_are_ninety_degrees_apart():
    base = {"w": torch.zeros(2)}
    angles = pairwise_angles([{"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}], base)
    assert angles.angle_deg[0, 1].item() == 90.0
    assert angles.distance[0, 1].item() == pytest.approx(5.0, abs=1e-12)
    assert angles.norm.tolist() == [3.0, 4.0]


def test_gram_matches_a_float64_reference_and_ignores_integer_buffers():
    s, base = states(), states(1, 9)[0]
    reference = torch.stack([flat(x, base) for x in s])
    assert torch.allclose(gram_matrix(s, base), reference @ reference.T, rtol=1e-13, atol=0)


def test_streaming_in_small_chunks_gives_the_same_gram():
    s = states()
    assert torch.allclose(gram_matrix(s, chunk_elements=17), gram_matrix(s), rtol=1e-14, atol=1e-12)


def test_cosines_and_angles_agree():
    angles = angles_from_gram(gram_matrix(states()))
    assert torch.allclose(torch.cos(torch.deg2rad(angles.angle_deg)), angles.cosine, atol=1e-12)


def test_lazy_safetensors_give_the_same_angles_as_loaded_ones(tmp_path):
    s = states(3)
    paths = [save_state_dict(x, tmp_path / f"{i}.safetensors") for i, x in enumerate(s)]
    lazy = pairwise_angles([open_checkpoint(p) for p in paths])
    eager = pairwise_angles(s)
    assert torch.equal(lazy.cosine, eager.cosine)


def test_progress_reaches_one():
    seen = []
    gram_matrix(states(), progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert not math.isnan(seen[0])


def test_angles_are_over_parameters_unless_buffers_are_asked_for():
    """As the paper and the landscape peers measure; BatchNorm statistics only with include_buffers."""
    import math

    from soup_core.zoo import open_zoo
    zoo = open_zoo("digits-bn")
    base, a = zoo.base, zoo.state_dict("bn-00")
    params = [k for k in a if a[k].is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    by_hand = math.sqrt(sum(float(((a[k].double() - base[k].double()) ** 2).sum()) for k in params))
    angles = pairwise_angles([a, zoo.state_dict("bn-01")], base)
    with_buffers = pairwise_angles([a, zoo.state_dict("bn-01")], base, include_buffers=True)
    assert float(angles.norm[0]) == pytest.approx(by_hand, rel=1e-12) and angles.over == "parameters"
    assert float(with_buffers.norm[0]) > float(angles.norm[0]) and with_buffers.over == "parameters and buffers"


def _exact_gram(states, base=None):
    """The Gram matrix in float64 the plain way: whole vectors, one dot per pair."""
    flat = [torch.cat([(s[k].double() - (base[k].double() if base else 0)).reshape(-1) for k in sorted(s)])
            for s in states]
    return torch.stack([torch.stack([a @ b for b in flat]) for a in flat])


DEVICES = ["cpu", torch.device("cpu")] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_base", [False, True])
def test_gram_matrix_on_any_device_is_exact_and_comes_back_on_the_cpu(device, with_base):
    generator = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(300, 7, generator=generator), "b": torch.randn(11, generator=generator).half()}
              for _ in range(4)]
    base = {"w": torch.randn(300, 7, generator=generator), "b": torch.randn(11, generator=generator).half()} \
        if with_base else None
    # the states on the device, the base left where it is: each tensor may live anywhere
    on_device = [{k: t.to(device) for k, t in s.items()} for s in states]
    gram = gram_matrix(on_device, base, device=device, chunk_elements=100)
    assert gram.device.type == "cpu" and gram.dtype == torch.float64
    torch.testing.assert_close(gram, _exact_gram(states, base), rtol=1e-12, atol=1e-9)
    # by default the products run where the states are, with the same result
    torch.testing.assert_close(gram_matrix(on_device, base), gram, rtol=1e-12, atol=1e-9)


def test_angles_and_distances_of_five_vectors_worked_by_hand():
    """a = (2, 0), b = (0, ½), c = (1, 1), z = 0, e = −a: a ⟂ b (90°), a and c 45°, b and c 45°, a and e
    opposite (cosine −1, 180°), c and e 135°; z has cosine 0 (90°) with every vector and with itself, but
    its angle with itself is 0, as every diagonal's (the figures show no angle of a model with itself);
    distances |a − b| = √4.25, |a − c| = √2, |b − c| = √1.25, |b − z| = ½, |c − e| = √10."""
    vectors = torch.tensor([[2.0, 0.0], [0.0, 0.5], [1.0, 1.0], [0.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)
    got = angles_from_gram(vectors @ vectors.T)
    s, r = 2 ** -0.5, math.sqrt
    expect = {
        "norm": [2.0, 0.5, r(2), 0.0, 2.0],
        "cosine": [[1, 0, s, 0, -1], [0, 1, s, 0, 0], [s, s, 1, 0, -s], [0, 0, 0, 0, 0], [-1, 0, -s, 0, 1]],
        "angle_deg": [[0, 90, 45, 90, 180], [90, 0, 45, 90, 90], [45, 45, 0, 90, 135], [90, 90, 90, 0, 90],
                  [180, 90, 135, 90, 0]],
        "distance": [[0, r(4.25), r(2), 2, 4], [r(4.25), 0, r(1.25), 0.5, r(4.25)], [r(2), r(1.25), 0, r(2), r(10)],
                     [2, 0.5, r(2), 0, 2], [4, r(4.25), r(10), 2, 0]]}
    for field, values in expect.items():
        torch.testing.assert_close(getattr(got, field), torch.tensor(values, dtype=torch.float64),
                                   atol=1e-6 if field == "angle_deg" else 1e-12, rtol=0, msg=field)


def test_a_plane_through_three_points_worked_by_hand():
    """A = (1, 1, 1), B = A + (2, 0, 0), C = A + (1, 1, 0): u along AB, v the part of AC off it; the
    anchors sit at (0, 0), (2, 0) and (1, 1), on the plane; a point 3 above C projects onto C."""
    from soup_core.geometry import plane_basis
    a = {"w": torch.tensor([1.0, 1.0, 1.0])}
    b = {"w": torch.tensor([3.0, 1.0, 1.0])}
    c = {"w": torch.tensor([2.0, 2.0, 1.0])}
    plane = plane_basis(a, b, c, names=("A", "B", "C"))
    assert plane.u["w"].tolist() == [1.0, 0.0, 0.0] and plane.v["w"].tolist() == [0.0, 1.0, 0.0]
    assert [p.to_json() for p in plane.anchors] == [{"name": "A", "xy": [0.0, 0.0], "off_plane": 0.0},
                                                    {"name": "B", "xy": [2.0, 0.0], "off_plane": 0.0},
                                                    {"name": "C", "xy": [1.0, 1.0], "off_plane": 0.0}]
    above = plane.project({"w": torch.tensor([2.0, 2.0, 4.0])}, "D")
    assert (above.name, above.xy, above.off_plane) == ("D", (1.0, 1.0), 3.0)
    assert plane.point(0.5, 2.0)["w"].tolist() == [1.5, 3.0, 1.0]


def test_random_directions_are_gaussian_with_each_filter_at_the_weights_norm():
    """Li et al. 2018's filter normalisation, checked against the generator drawn by hand: two directions
    by default, seed 0; each row of a weight scaled to that row's norm (rows of one element too, whose
    Gaussian draw is often below 1); a 1-d tensor zero, or scaled as one filter when asked."""
    from soup_core.geometry import random_directions
    state = {"w": torch.tensor([[3.0], [-0.5], [0.25], [2.0]]), "b": torch.tensor([1.0, 2.0, 2.0])}
    generator = torch.Generator().manual_seed(0)
    draws = [(torch.randn(4, 1, generator=generator, dtype=torch.float64),
              torch.randn(3, generator=generator, dtype=torch.float64)) for _ in range(2)]
    directions = random_directions(state)
    assert len(directions) == 2
    for direction, (w, _) in zip(directions, draws):
        expected = w * (torch.tensor([[3.0], [0.5], [0.25], [2.0]], dtype=torch.float64) / w.abs())
        torch.testing.assert_close(direction["w"], expected, rtol=1e-15, atol=0)
        assert direction["b"].tolist() == [0.0, 0.0, 0.0]
    with_biases = random_directions(state, 1, ignore_1d=False)[0]
    w, b = draws[0]
    torch.testing.assert_close(with_biases["b"], b * (3.0 / b.norm()), rtol=1e-15, atol=0)  # ‖(1, 2, 2)‖ = 3
    assert not torch.equal(random_directions(state, 1, seed=1)[0]["w"], directions[0]["w"])


def test_the_gram_matrix_leaves_running_statistics_out_by_default_and_reports_progress_by_elements():
    """Deltas over the parameters only (BatchNorm's running mean is an estimate, not a weight) unless
    buffers are asked for; progress is the share of elements done after each tensor, with its name."""
    base = {"w": torch.zeros(3), "bn.running_mean": torch.zeros(1)}
    states = [{"w": torch.tensor([1.0, 0.0, 0.0]), "bn.running_mean": torch.tensor([5.0])},
              {"w": torch.tensor([0.0, 2.0, 0.0]), "bn.running_mean": torch.tensor([5.0])}]
    seen: list[tuple[float, str]] = []
    angles = pairwise_angles(states, base, progress=lambda fraction, key: seen.append((fraction, key)))
    assert angles.norm.tolist() == [1.0, 2.0] and angles.angle_deg[0, 1].item() == 90.0
    assert seen == [(1.0, "w")]
    with_buffers = pairwise_angles(states, base, include_buffers=True, progress=lambda f, k: seen.append((f, k)))
    assert with_buffers.norm.tolist() == [26 ** 0.5, 29 ** 0.5] and with_buffers.over == "parameters and buffers"
    assert seen[1:] == [(0.75, "w"), (1.0, "bn.running_mean")]
    assert gram_matrix(states, base, chunk_elements=1).tolist() == [[1.0, 0.0], [0.0, 4.0]]


def test_a_projection_is_unnamed_unless_named():
    from soup_core.geometry import plane_basis
    plane = plane_basis({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])})
    assert plane.project({"w": torch.tensor([0.5, 0.5])}).name == ""


def test_a_third_point_this_close_to_the_line_is_collinear_relative_to_the_spread():
    """C is refused when its height above the line AB is below 1e-6 of the larger of |AB| and |AC|:
    with |AC| = 100, a height of 1e-3 makes a plane and 1e-5 does not."""
    from soup_core.geometry import plane_basis
    a, b = {"w": torch.zeros(2, dtype=torch.float64)}, {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    plane = plane_basis(a, b, {"w": torch.tensor([100.0, 1e-3], dtype=torch.float64)})
    assert plane.anchors[2].xy == pytest.approx((100.0, 1e-3), rel=1e-9)
    with pytest.raises(SoupError, match="collinear"):
        plane_basis(a, b, {"w": torch.tensor([100.0, 1e-5], dtype=torch.float64)})


def test_a_gram_matrix_of_models_without_float_tensors_is_zero():
    assert gram_matrix([{"n": torch.tensor(1)}, {"n": torch.tensor(2)}]).tolist() == [[0.0, 0.0], [0.0, 0.0]]
