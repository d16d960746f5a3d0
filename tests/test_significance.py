"""Significance: the exact McNemar test is scipy's binomial test on the discordant pairs; the
interval is the score test inverted (checked against the likelihood maximised numerically) and
covers 95% (computed exactly over the discordant counts); the comparisons shown beside soups are
consistent with the accuracies they explain."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.stats import binom, binomtest, norm

from soup_core.significance import compare, mcnemar_exact, score_interval
from tests.test_cli import ok_json


@pytest.mark.parametrize("a_only, b_only", [(0, 0), (0, 3), (3, 0), (5, 9), (12, 30), (100, 131), (7, 7)])
def test_mcnemars_p_value_is_the_binomial_test_on_the_discordant_counts(a_only, b_only):
    expected = 1.0 if a_only + b_only == 0 else binomtest(b_only, a_only + b_only, 0.5).pvalue
    assert mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_identical_predictions_are_no_difference_and_the_interval_is_centred_on_it():
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(1))
    c = compare("a", logits, "b", logits.clone(), labels, "test")
    assert (c.a_only, c.b_only, c.p_value, c.significant) == (0, 0, 1.0, False)
    low, high = c.interval
    assert low < 0 < high and low == pytest.approx(-high, abs=1e-12)


def constrained_score(a_only: int, b_only: int, n: int, delta: float, correction: float) -> float:
    """The score statistic from first principles: the restricted MLE of P(A only) found by maximising
    the trinomial likelihood numerically (not by the quadratic the library solves)."""
    rest = n - a_only - b_only
    lower, upper = max(0.0, -delta), (1 - delta) / 2

    def minus_log_likelihood(q: float) -> float:
        terms = [(a_only, q), (b_only, q + delta), (rest, 1 - 2 * q - delta)]
        return -sum(k * math.log(max(p, 1e-300)) for k, p in terms if k)
    q = minimize_scalar(minus_log_likelihood, bounds=(lower, upper), method="bounded",
                        options={"xatol": 1e-14}).x
    excess = b_only - a_only - n * delta
    excess = math.copysign(max(abs(excess) - correction, 0.0), excess)
    return excess / math.sqrt(n * (2 * q + delta * (1 - delta)))


@pytest.mark.parametrize("a_only, b_only, n", [(0, 4, 630), (3, 7, 630), (20, 35, 630), (1, 0, 269), (9, 2, 50)])
def test_the_interval_ends_where_the_score_test_starts_to_reject(a_only, b_only, n):
    low, high = score_interval(a_only, b_only, n)
    z = norm.ppf(0.975)
    assert constrained_score(a_only, b_only, n, low, 0.5) == pytest.approx(z, abs=1e-5)
    assert constrained_score(a_only, b_only, n, high, 0.5) == pytest.approx(-z, abs=1e-5)
    assert low < (b_only - a_only) / n < high


@pytest.mark.parametrize("a_only, b_only, n", [(10, 0, 10), (0, 10, 10), (1, 0, 1), (0, 1, 1), (0, 0, 1),
                                             (2, 8, 10), (0, 30, 40), (25, 0, 30)])
def test_an_interval_reaches_a_bound_only_where_the_score_test_cannot_reject_it(a_only, b_only, n):
    """Every image disagreeing one way (or only one image): the interval stops at −1 or +1 exactly where
    the score test does not reject a difference that close to the bound, and elsewhere ends where it
    starts to reject."""
    low, high = score_interval(a_only, b_only, n)
    z = norm.ppf(0.975)
    for end, bound, rejecting in ((low, -1.0, z), (high, 1.0, -z)):
        inside = bound - 1e-9 * bound  # just inside the bound
        if end == bound:
            assert abs(constrained_score(a_only, b_only, n, inside, 0.5)) <= z
        else:
            assert abs(end) < 1 and constrained_score(a_only, b_only, n, end, 0.5) == pytest.approx(rejecting, abs=1e-5)
    assert -1.0 <= low <= (b_only - a_only) / n <= high <= 1.0
    assert (low == -1.0, high == 1.0) == (a_only == n, b_only == n)  # on these counts: all one way


@pytest.mark.parametrize("correction", [0.0, 1.0])
def test_the_continuity_correction_is_the_one_asked_for(correction):
    low, high = score_interval(3, 7, 630, correction=correction)
    z = norm.ppf(0.975)
    assert constrained_score(3, 7, 630, low, correction) == pytest.approx(z, abs=1e-5)
    assert constrained_score(3, 7, 630, high, correction) == pytest.approx(-z, abs=1e-5)


def exact_coverage(p_a_only: float, p_b_only: float, n: int, correction: float) -> float:
    """P(interval holds the true difference), summed over every (a_only, b_only) the trinomial gives."""
    truth, total = p_b_only - p_a_only, 0.0
    b_max = int(binom.ppf(1 - 1e-10, n, p_b_only)) + 1 if p_b_only else 0
    for b in range(b_max + 1):
        q = p_a_only / (1 - p_b_only)
        a_max = int(binom.ppf(1 - 1e-10, n - b, q)) + 1 if q else 0
        for a in range(a_max + 1):
            low, high = score_interval(a, b, n, correction=correction)
            if low - 1e-12 <= truth <= high + 1e-12:
                total += binom.pmf(b, n, p_b_only) * (binom.pmf(a, n - b, q) if q else 1.0)
    return total


@pytest.mark.slow
def test_the_interval_covers_95_percent_at_every_count_of_disagreements_on_630_images():
    n = 630
    counts = [0.25, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 6.5, 8, 10, 12, 15, 16, 20, 25, 28.5, 30, 35, 40]
    shares = (0.0, 0.05, 0.1, 0.25, 0.5)  # of the expected disagreements, the share going A's way
    corrected = {(d, s): exact_coverage(s * d / n, (1 - s) * d / n, n, 0.5) for d in counts for s in shares}
    assert min(corrected.values()) >= 0.95, min(corrected.items(), key=lambda kv: kv[1])
    # Without the continuity correction Tango's interval falls short: the correction is what keeps 95%.
    assert min(exact_coverage(s * d / n, (1 - s) * d / n, n, 0.0) for d in (4, 4.5, 6.5) for s in shares) < 0.94


def test_the_interval_and_the_exact_test_disagree_only_at_the_margin():
    for a_only in range(41):
        for b_only in range(41):
            low, high = score_interval(a_only, b_only, 630)
            p = mcnemar_exact(a_only, b_only)
            if (low > 0 or high < 0) != (p < 0.05):
                assert 0.05 <= p < 0.065, (a_only, b_only, p, low, high)


def test_make_reports_the_soup_against_the_best_model_on_every_report_split():
    payload = ok_json("make", "greedy", "digits-finetune", "--device", "cpu")
    splits = [c["split"] for c in payload["significance"]]
    assert "val" not in splits and splits[0] == "test" and len(splits) == len(payload["metrics"]) - 1
    for c in payload["significance"]:
        assert c["accuracy_b"] == pytest.approx(payload["metrics"][c["split"]]["accuracy"], abs=1e-12)
        assert c["difference"] == pytest.approx((c["b_only"] - c["a_only"]) / c["predictions"], abs=1e-12)
        assert c["interval"][0] <= c["difference"] <= c["interval"][1]
        assert c["p_value"] == pytest.approx(mcnemar_exact(c["a_only"], c["b_only"]))
    assert ok_json("make", "best", "digits-finetune")["significance"] == []


def test_a_comparison_reads_as_points_p_and_a_verdict_in_a_sentence_and_in_a_table_cell():
    labels = torch.tensor([0] * 10)
    right = torch.tensor([[1.0, 0.0]] * 10)  # predicts 0: right
    wrong = torch.tensor([[0.0, 1.0]] * 10)
    # B wins 3 images A loses, loses none: +30 points; exact McNemar p = 2 × 0.5³ = 0.25
    a_logits, b_logits = torch.cat([wrong[:3], right[3:]]), right
    tied = compare("a", a_logits, "b", b_logits, labels, "test")
    assert tied.sentence() == "+30.0 points, p = 0.25: not significant on 10 images"
    assert tied.brief() == "+30.0 pts, p = 0.25"
    many = compare("a", torch.cat([wrong[:7], right[7:]]), "b", right, labels, "test")  # p = 2 × 0.5⁷ = 0.016
    assert many.brief() == "+70.0 pts, p = 0.016, significant"


def test_a_comparisons_json_names_what_was_compared_how_and_with_what_result():
    labels = torch.tensor([0] * 10)
    right, wrong = torch.tensor([[1.0, 0.0]] * 10), torch.tensor([[0.0, 1.0]] * 10)
    c = compare("best", torch.cat([wrong[:3], right[3:]]), "soup", right, labels, "test")
    data = c.to_json()
    assert {k: v for k, v in data.items() if k != "interval"} == {
        "a": "best", "b": "soup", "split": "test", "predictions": 10, "accuracy_a": 0.7, "accuracy_b": 1.0,
        "a_only": 0, "b_only": 3, "p_value": 0.25, "unit": "images", "difference": pytest.approx(0.3),
        "significant": False, "test": "exact McNemar (two-sided)",
        "interval_method": "Tango score interval, continuity-corrected, 95%"}
    low, high = data["interval"]  # the Tango interval itself is checked against scipy above
    assert isinstance(data["interval"], list) and low < 0 < 0.3 < high < 1
