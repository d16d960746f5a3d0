"""Pair analyses (paper Figures 3 and 4, §4): definitions hold exactly on real checkpoints."""

from __future__ import annotations

import pytest
import torch

from soup_core.evaluate import ensemble_logits
from soup_core.pairs import analyse_pair, calibration_temperature, loss_curvature, pair_analyses
from soup_core.params import interpolate
from soup_core.zoo import open_zoo


@pytest.fixture(scope="module")
def zoo():
    return open_zoo("digits-finetune", device="cpu")


def test_a_pair_matches_its_definitions(zoo):
    ev = zoo.evaluator
    a, b = zoo.state_dict("ft-03"), zoo.state_dict("ft-09")
    pair = analyse_pair(ev, ("ft-03", "ft-09"), a, b, "test")
    assert pair.soup_accuracy == pytest.approx(ev.evaluate(interpolate(a, b, 0.5), ["test"])["test"].accuracy)
    ens = ensemble_logits([ev.logits(a, "test"), ev.logits(b, "test")])
    assert pair.ensemble_accuracy == pytest.approx(float((ens.argmax(1) == ev.labels("test")).double().mean()))
    assert pair.loss_difference == pytest.approx(pair.soup_loss - pair.ensemble_loss)


def test_a_model_paired_with_itself_has_no_difference_and_no_approximated_gap(zoo):
    ev = zoo.evaluator
    a = zoo.state_dict("ft-05")
    pair = analyse_pair(ev, ("ft-05", "ft-05"), a, a, "test")
    assert pair.interpolation_advantage == 0 and pair.error_difference == 0
    assert pair.loss_difference == pytest.approx(0, abs=1e-6)
    assert pair.approximation == pytest.approx(0, abs=1e-12)  # no curvature along a zero line, Δf = 0


def test_curvature_of_a_quadratic_line_is_exact():
    # A linear model's logits are linear in α along any line; CE's second derivative is then
    # E_x[Δzᵀ (diag p − p pᵀ) Δz], which we compute by hand.
    from soup_core.evaluate import Evaluator, Split
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 3, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    ev = Evaluator(lambda: torch.nn.Linear(3, 4), {"val": Split(x, y)}, device="cpu")
    a = {"weight": torch.randn(4, 3, generator=gen), "bias": torch.zeros(4)}
    b = {"weight": torch.randn(4, 3, generator=gen), "bias": torch.ones(4)}
    mid = {k: (a[k].double() + b[k].double()) / 2 for k in a}
    p = torch.softmax(x.double() @ mid["weight"].T + mid["bias"], dim=1)
    dz = x.double() @ (b["weight"] - a["weight"]).double().T + (b["bias"] - a["bias"]).double()
    expected = ((p * dz ** 2).sum(1) - (p * dz).sum(1) ** 2).mean()
    assert loss_curvature(ev, a, b, "val", method="jvp") == pytest.approx(float(expected), rel=1e-6)
    # The segment's curvature is the second difference of the same losses, computed here by hand.
    ce = [torch.nn.functional.cross_entropy(x.double() @ w.double().T + c.double(), y).item()
          for w, c in ((a["weight"], a["bias"]), (mid["weight"], mid["bias"]), (b["weight"], b["bias"]))]
    assert loss_curvature(ev, a, b, "val") == pytest.approx(4 * (ce[0] - 2 * ce[1] + ce[2]), rel=1e-6)


def test_temperature_calibrates():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (400,), generator=gen)
    logits = torch.randn(400, 5, generator=gen) + 3 * torch.nn.functional.one_hot(labels, 5)
    beta = calibration_temperature(logits, labels)
    assert calibration_temperature(logits * 10, labels) == pytest.approx(beta / 10, rel=1e-4)
    loss = torch.nn.functional.cross_entropy
    for other in (beta * 0.9, beta * 1.1):
        assert loss(beta * logits, labels) < loss(other * logits, labels)


def test_report_correlations_need_three_pairs(zoo):
    report = pair_analyses(zoo.ingredients(["ft-00", "ft-01"]), zoo.evaluator, base=zoo.base)
    assert len(report.pairs) == 1 and report.correlation("angle_deg", "interpolation_advantage") is None


def test_a_relu_networks_curvature_is_the_curve_s_own_not_one_linear_region_s(zoo):
    """jvp differentiates inside the linear region α = ½ sits in; the curve L(α) has kinks.
    The fit agrees with an independent quadratic fit over a denser grid of ±0.05."""
    import numpy as np

    from soup_core.pairs import _calibrated_loss, curvature_method
    ev = zoo.evaluator
    a, b = zoo.state_dict("ft-17"), zoo.state_dict("ft-22")
    assert curvature_method(ev.model) == "fit"
    fitted = loss_curvature(ev, a, b, "test", method="auto")
    labels = ev.labels("test")
    alphas = np.linspace(0.45, 0.55, 21)
    losses = [_calibrated_loss(ev.logits(interpolate(a, b, t), "test", cache=False), labels, 1.0) for t in alphas]
    dense = 2 * np.polyfit(alphas - 0.5, losses, 2)[0]
    assert fitted == pytest.approx(dense, rel=0.15)
    assert loss_curvature(ev, a, b, "test", method="jvp") != pytest.approx(fitted, rel=0.5)


def test_smooth_networks_keep_the_exact_jvp_curvature():
    from soup_core.pairs import curvature_method
    smooth = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    kinked = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    assert curvature_method(smooth) == "jvp" and curvature_method(kinked) == "fit"


def test_with_the_segment_s_curvature_the_approximation_is_its_closed_form(zoo):
    """α(1−α)/2·(−L'' + β²Var) at α = ½ with L'' = 8·(mean(L0, L1) − L½) is L½ − mean(L0, L1) + β²Var/8:
    every term computed here from the logits, independently of analyse_pair."""
    ev = zoo.evaluator
    a, b = zoo.state_dict("ft-03"), zoo.state_dict("ft-09")
    pair = analyse_pair(ev, ("ft-03", "ft-09"), a, b, "test")
    assert pair.curvature_method == "segment"
    labels = ev.labels("test")
    f_a, f_b = ev.logits(a, "test").double(), ev.logits(b, "test").double()
    f_soup = ev.logits(interpolate(a, b, 0.5), "test", cache=False).double()
    beta = pair.beta

    def loss(f):
        return torch.nn.functional.cross_entropy(beta * f, labels).item()
    p = torch.softmax(beta * f_soup, dim=1)
    variance = ((p * (f_b - f_a) ** 2).sum(1) - (p * (f_b - f_a)).sum(1) ** 2).mean().item()
    endpoints = (loss(f_a) + loss(f_b)) / 2
    assert pair.approximation == pytest.approx(loss(f_soup) - endpoints + beta ** 2 * variance / 8, rel=1e-9)
    assert pair.ensemble_gain == pytest.approx(endpoints - loss((f_a + f_b) / 2), rel=1e-9)
    assert pair.variance_term == pytest.approx(beta ** 2 * variance / 8, rel=1e-9)
    assert pair.soup_term == pytest.approx(loss(f_soup) - endpoints, rel=1e-9)
