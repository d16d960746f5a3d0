"""Metrics and the evaluator, specified."""

import pytest
import torch

from soup_core.evaluate import Evaluator, Split, ensemble_logits, expected_calibration_error, metrics_from_logits
from tests.conftest import TinyNet


def test_metrics_of_perfect_confident_logits():
    labels = torch.tensor([0, 1, 2])
    metrics = metrics_from_logits(torch.eye(3) * 100, labels)
    assert metrics.accuracy == 1.0 and metrics.loss < 1e-30 and metrics.ece < 1e-12


def test_ece_by_hand():
    # Two samples at confidence 0.9 (one right), one at 0.6 (right): bins 14 and 9.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    expected = (2 / 3) * abs(0.5 - 0.9) + (1 / 3) * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-12)


def test_accuracy_equals_a_plain_forward_pass(tiny_evaluator, tiny_states):
    state = tiny_states["m0"]
    model = TinyNet()
    model.load_state_dict(state)
    split = tiny_evaluator.splits["test"]
    with torch.no_grad():
        expected = (model(split.inputs).argmax(1) == split.labels).sum().item() / len(split)
    assert tiny_evaluator.evaluate(state)["test"].accuracy == pytest.approx(expected, abs=1e-12)


def test_results_are_cached_by_content(tiny_evaluator, tiny_states):
    first = tiny_evaluator.logits(tiny_states["m1"], "val")
    again = tiny_evaluator.logits({k: v.clone() for k, v in tiny_states["m1"].items()}, "val")
    assert again is first


def test_ensemble_logits_are_the_mean():
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(ensemble_logits([a, b]).float(), (a + b) / 2)


def test_an_evaluator_needs_a_val_split():
    with pytest.raises(ValueError, match="held-out 'val'"):
        Evaluator(TinyNet, {"test": Split(torch.randn(2, 4), torch.zeros(2))})


def test_unknown_split_is_named(tiny_evaluator, tiny_states):
    with pytest.raises(ValueError, match="unknown split 'nope'"):
        tiny_evaluator.logits(tiny_states["m0"], "nope")


def test_concurrent_sessions_never_see_each_others_weights(tiny_evaluator, tiny_states):
    # The app shares one Evaluator between sessions (threads); functional_call swaps the shared
    # model's tensors, so unguarded calls could score one session's soup with another's weights.
    from concurrent.futures import ThreadPoolExecutor
    states = list(tiny_states.values())
    expected = [tiny_evaluator.logits(s, "val", cache=False) for s in states]

    def score(i: int):
        return i % len(states), tiny_evaluator.logits(states[i % len(states)], "val", cache=False)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for i, logits in pool.map(score, range(200)):
            assert torch.equal(logits, expected[i])
