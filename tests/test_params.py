"""State-dict algebra, specified."""

import torch

from soup_core.params import RunningSum, interpolate, uniform_average, weighted_average


def state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"w": torch.randn(4, 3), "b": torch.randn(3), "bn.num_batches_tracked": torch.tensor(10 + seed)}


def test_a_uniform_soup_of_identical_checkpoints_is_that_checkpoint():
    a = state(0)
    soup = uniform_average([a, {k: v.clone() for k, v in a.items()}, a])
    for key in a:
        assert torch.equal(soup[key], a[key]) and soup[key].dtype == a[key].dtype


def test_uniform_soup_is_the_float64_mean_cast_back():
    states = [state(i) for i in range(3)]
    soup = uniform_average(states)
    expected = torch.stack([s["w"].double() for s in states]).mean(0).float()
    assert torch.equal(soup["w"], expected)


def test_integer_buffers_are_taken_from_the_reference_not_averaged():
    soup = uniform_average([state(0), state(1), state(2)])
    assert soup["bn.num_batches_tracked"].dtype == torch.int64
    assert int(soup["bn.num_batches_tracked"]) == 10


def test_adding_then_removing_an_ingredient_returns_to_the_same_soup():
    total = RunningSum()
    total.add("a", state(0))
    total.add("b", state(1))
    before = total.mean()
    total.add("c", state(2))
    total.remove("c")
    after = total.mean()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_candidates_do_not_change_the_running_sum():
    total = RunningSum()
    total.add("a", state(0))
    total.add("b", state(1))
    with_c = total.mean_with("c", state(2))
    assert torch.allclose(with_c["w"], uniform_average([state(0), state(1), state(2)])["w"], atol=0, rtol=0)
    without_b = total.mean_without("b")
    assert torch.equal(without_b["w"], state(0)["w"])
    assert total.names == ("a", "b")


def test_inputs_are_never_mutated():
    states = [state(0), state(1)]
    copies = [{k: v.clone() for k, v in s.items()} for s in states]
    uniform_average(states)
    weighted_average(states, [0.3, 0.7])
    total = RunningSum()
    total.add("a", states[0])
    total.remove("a")
    for s, c in zip(states, copies):
        assert all(torch.equal(s[k], c[k]) for k in s)


def test_weighted_average_matches_the_formula_and_takes_integers_from_the_heaviest():
    a, b = state(0), state(1)
    soup = weighted_average([a, b], [0.25, 0.75])
    assert torch.allclose(soup["w"], 0.25 * a["w"] + 0.75 * b["w"], atol=1e-7)
    assert int(soup["bn.num_batches_tracked"]) == 11


def test_interpolation_endpoints_are_the_models_and_it_extrapolates():
    a, b = state(0), state(1)
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(interpolate(a, b, 1.5)["w"], b["w"] + 0.5 * (b["w"] - a["w"]), atol=1e-6)


def test_tied_weights_are_averaged_once_and_stay_tied():
    def tied(seed):
        torch.manual_seed(seed)
        shared = torch.randn(3, 2)
        return {"embed": shared, "head": shared}
    soup = uniform_average([tied(0), tied(1)])
    assert soup["embed"] is soup["head"]
    assert torch.allclose(soup["embed"], (tied(0)["embed"] + tied(1)["embed"]) / 2)


def test_a_state_dict_is_hashed_once_until_it_changes(monkeypatch):
    import hashlib

    from soup_core import state as state_module
    state = {"a": torch.randn(100), "b": torch.arange(5)}
    first = state_module.state_dict_digest(state)
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(state_module.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    assert state_module.state_dict_digest(state) == first
    assert len(hashed) == 1  # the outer digest only: no tensor's bytes again
    assert state_module.state_dict_digest({k: t.clone() for k, t in state.items()}) == first  # content, not identity
    state["a"].add_(1.0)  # in place: the version counter moves, the bytes are hashed again
    assert state_module.state_dict_digest(state) != first


def test_moving_a_state_dict_to_another_device_keeps_ties():
    from soup_core.state import to_device
    shared = torch.ones(3)
    moved = to_device({"embed": shared, "head": shared, "bias": torch.zeros(3)}, "meta")
    assert moved["head"] is moved["embed"] and moved["bias"] is not moved["embed"]
    assert all(t.device.type == "meta" for t in moved.values())


def test_a_weighted_average_worked_by_hand_in_float64():
    """⅓·1 + ⅔·2 summed in float64 from float64 weights (float32 weights would miss by 1e-8); one state
    is its own average; tied tensors stay tied; integers come from the heaviest state."""
    from soup_core.params import weighted_average
    one, two = torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    states = [{"w": one, "tied": one, "n": torch.tensor(3)}, {"w": two, "tied": two, "n": torch.tensor(4)}]
    average = weighted_average(states, [1 / 3, 2 / 3])
    assert average["w"].tolist() == [1 / 3 * 1.0 + 2 / 3 * 2.0] and average["tied"] is average["w"]
    assert int(average["n"]) == 4
    assert weighted_average(states[:1], [1.0])["w"].tolist() == [1.0]


def test_a_candidate_moved_for_scoring_is_not_moved_again_when_it_joins(monkeypatch):
    """Greedy scores a candidate (``mean_with``) and then often adds it: on a sum held on another
    device the candidate is moved once and the add reuses that copy; another candidate, or the same
    name with other tensors, is moved afresh. (The ``meta`` device stands in for a GPU: nothing is
    computed there, only where tensors live.)"""
    moved: list[tuple[int, ...]] = []
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and str(args[0]) == "meta":
            moved.append(tuple(self.shape))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to)
    state = {name: {"w": torch.full((2, 3), float(i)), "b": torch.zeros(3)} for i, name in enumerate("abc")}
    soup = RunningSum("meta")
    soup.add("a", state["a"])
    moved.clear()
    soup.mean_with("b", state["b"])
    assert len(moved) == 2  # w and b, once each
    soup.add("b", state["b"])
    assert len(moved) == 2  # the copy made for scoring
    soup.mean_with("c", state["c"])
    soup.mean_with("c", {k: t.clone() for k, t in state["c"].items()})  # same name, other tensors
    soup.add("c", state["c"])
    assert len(moved) == 2 + 2 + 2 + 2
    soup.remove("a")
    assert len(moved) == 2 + 2 + 2 + 2 + 2 and soup.names == ("b", "c")
    soup.mean_with("a", state["a"])  # after a remove, a candidate is moved afresh
    assert len(moved) == 2 + 2 + 2 + 2 + 2 + 2
    assert RunningSum().nbytes == 0 and soup.nbytes == (6 + 3) * 8  # an empty sum holds nothing; w and b in float64


def test_a_sum_held_on_another_device_returns_every_tensor_there():
    """A running sum asked to live on a device (``meta`` here, standing in for a GPU) returns every mean
    there, integer buffers included, tied tensors still tied; without one it lives where the first
    ingredient's tensors are, and integer buffers come back as copies."""
    from soup_core.params import num_parameters

    def model(value: float) -> dict[str, torch.Tensor]:
        w = torch.full((2, 3), value)
        return {"w": w, "tied": w, "n": torch.tensor(7), "b": torch.full((3,), value)}
    a, b, c = model(1.0), model(2.0), model(4.0)
    soup = RunningSum("meta")
    alone = soup.mean_with("a", a)  # an empty soup: the candidate alone
    soup.add("a", a)
    soup.add("b", b)
    for mean in (alone, soup.mean(), soup.mean_with("c", c), soup.mean_without("a")):
        assert {k: t.device.type for k, t in mean.items()} == {"w": "meta", "b": "meta", "n": "meta", "tied": "meta"}
        assert mean["tied"] is mean["w"] and mean["w"].dtype == torch.float32 and mean["n"].dtype == torch.int64
    assert uniform_average([a, b], device="meta")["n"].device.type == "meta"
    here = RunningSum()
    here.add("a", a)
    assert here.device == torch.device("cpu")
    copied = here.mean()
    assert copied["n"] is not a["n"] and int(copied["n"]) == 7
    assert list(copied) == ["w", "n", "b", "tied"]  # the ingredient's order, tied names re-tied after it
    assert num_parameters(a) == 6 + 3  # w once (tied), b; not the integer counter
