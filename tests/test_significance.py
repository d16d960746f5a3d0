"""Significance: the exact McNemar test is scipy's binomial test on the discordant pairs; the
comparisons shown beside soups are consistent with the accuracies they explain."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest

from soup_core.significance import bootstrap_interval, compare, mcnemar_exact
from tests.test_cli import ok_json


@pytest.mark.parametrize("a_only, b_only", [(0, 0), (0, 3), (3, 0), (5, 9), (12, 30), (100, 131), (7, 7)])
def test_mcnemars_p_value_is_the_binomial_test_on_the_discordant_counts(a_only, b_only):
    expected = 1.0 if a_only + b_only == 0 else binomtest(b_only, a_only + b_only, 0.5).pvalue
    assert mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_identical_predictions_are_no_difference_and_the_interval_is_a_point():
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(1))
    c = compare("a", logits, "b", logits.clone(), labels, "test")
    assert (c.a_only, c.b_only, c.p_value, c.interval, c.significant) == (0, 0, 1.0, (0.0, 0.0), False)


def test_the_bootstrap_interval_holds_the_observed_difference_and_is_seeded():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(400, generator=g) < 0.8, torch.rand(400, generator=g) < 0.9
    low, high = bootstrap_interval(a, b)
    observed = float(b.double().mean() - a.double().mean())
    assert low < observed < high and (low, high) == bootstrap_interval(a, b)


def test_the_bootstrap_by_counts_is_the_bootstrap_over_images():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(300, generator=g) < 0.85, torch.rand(300, generator=g) < 0.9
    index = torch.randint(0, 300, (20_000, 300), generator=g)
    over_images = (b.double()[index] - a.double()[index]).mean(dim=1)
    expected = torch.quantile(over_images, torch.tensor([0.025, 0.975], dtype=torch.float64))
    low, high = bootstrap_interval(a, b, resamples=20_000)
    # Two Monte Carlo estimates of the same quantiles (each within ~0.2 image): equal to one image.
    assert low == pytest.approx(float(expected[0]), abs=1 / 300)
    assert high == pytest.approx(float(expected[1]), abs=1 / 300)


def test_make_reports_the_soup_against_the_best_model_on_every_report_split():
    payload = ok_json("make", "greedy", "digits-finetune", "--device", "cpu")
    splits = [c["split"] for c in payload["significance"]]
    assert "val" not in splits and splits[0] == "test" and len(splits) == len(payload["metrics"]) - 1
    for c in payload["significance"]:
        assert c["accuracy_b"] == pytest.approx(payload["metrics"][c["split"]]["accuracy"], abs=1e-12)
        assert c["difference"] == pytest.approx((c["b_only"] - c["a_only"]) / c["images"], abs=1e-12)
        assert c["interval"][0] <= c["difference"] <= c["interval"][1]
        assert c["p_value"] == pytest.approx(mcnemar_exact(c["a_only"], c["b_only"]))
    assert ok_json("make", "best", "digits-finetune")["significance"] == []
