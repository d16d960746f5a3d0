"""Is a difference real? Exact McNemar tests on paired predictions, score intervals that keep 95%.

Two models scored on the same images disagree on some of them: ``a_only`` images only model A
gets right, ``b_only`` only B. Under "no difference" each disagreement is a fair coin, so the
exact McNemar test is a two-sided binomial test of ``b_only`` successes in ``a_only + b_only``
trials (McNemar 1947; the exact form for small counts, Edwards 1948). With 630 test images one
image is 0.16 points, so "+0.3" is two images — this module says whether that means anything.

The 95% interval of the accuracy difference is Tango's score interval for a difference of paired
proportions (Tango 1998) with a continuity correction of ½: every difference Δ whose score test
(the restricted maximum-likelihood variance of ``b_only − a_only`` under Δ) does not reject. It
keeps its coverage where the paired percentile bootstrap used before did not: with few
disagreements, and when one count is 0. Computed exactly over the trinomial of discordant counts
on 630 images, it covers at least 95% at every expected count from ¼ to 40 and every split
between the two directions tried; without the correction it falls below 94%
(``tests/test_significance.py``). The interval and the exact test are two procedures: where they
disagree on whether 0 is plausible, the exact p-value lies between 0.05 and 0.065 (tested for
counts up to 40).

>>> import torch
>>> from soup_core.significance import compare
>>> labels = torch.zeros(100, dtype=torch.long)
>>> a = torch.tensor([[1.0, 0.0]] * 90 + [[0.0, 1.0]] * 10)   # 90 right
>>> b = torch.tensor([[1.0, 0.0]] * 93 + [[0.0, 1.0]] * 7)    # 93 right, the same 90 and 3 more
>>> c = compare("a", a, "b", b, labels, "test")
>>> (c.a_only, c.b_only, round(c.p_value, 3))
(0, 3, 0.25)
>>> c.sentence()
'+3.0 points, p = 0.25: not significant on 100 images'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from scipy.optimize import brentq
from scipy.stats import binom, norm

from soup_core.errors import SoupError

LEVEL = 0.05
CONTINUITY = 0.5  # Tango's numerator moved ½ towards 0: coverage ≥ 95% at every count (see above)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(a_only, b_only), n, 0.5)))


def tango_score(a_only: int, b_only: int, n: int, delta: float, correction: float = CONTINUITY) -> float:
    """Tango's score statistic for H0: accuracy(B) − accuracy(A) = ``delta``.

    Under H0 the probabilities of "A only" (q) and "B only" (q + Δ) have a restricted MLE with q
    the positive root of 2n·q² + w·q − a·Δ(1 − Δ) = 0, w = Δ(2n − b + a) − (a + b); then
    Var(b − a) = n(2q + Δ(1 − Δ)). The numerator's distance from 0 shrinks by ``correction``."""
    w = delta * (2 * n - b_only + a_only) - (a_only + b_only)
    q = (-w + math.sqrt(w * w + 8 * n * a_only * delta * (1 - delta))) / (4 * n)
    variance = n * (2 * q + delta * (1 - delta))
    excess = b_only - a_only - n * delta
    excess = math.copysign(max(abs(excess) - correction, 0.0), excess)
    if variance <= 0:
        return 0.0 if excess == 0 else math.copysign(math.inf, excess)
    return excess / math.sqrt(variance)


def score_interval(a_only: int, b_only: int, n: int, *, level: float = 0.95,
                   correction: float = CONTINUITY) -> tuple[float, float]:
    """Tango's score interval (continuity-corrected) of accuracy(B) − accuracy(A), as fractions.

    >>> low, high = score_interval(0, 4, 630)  # B right on 4 more images, p = 0.125
    >>> low < 0 < high
    True
    """
    if n <= 0 or min(a_only, b_only) < 0 or a_only + b_only > n:
        raise SoupError(f"a paired interval needs 0 <= a_only + b_only <= n images, got {a_only} + {b_only} of {n}")
    z = float(norm.ppf((1 + level) / 2))
    estimate, edge = (b_only - a_only) / n, 1e-12

    def rejects_above(delta: float) -> float:  # > 0 while the difference is above delta's reach
        return tango_score(a_only, b_only, n, delta, correction) - z

    def rejects_below(delta: float) -> float:
        return tango_score(a_only, b_only, n, delta, correction) + z
    low = -1.0 if rejects_above(-1 + edge) <= 0 else brentq(rejects_above, -1 + edge, estimate, xtol=1e-12)
    high = 1.0 if rejects_below(1 - edge) >= 0 else brentq(rejects_below, estimate, 1 - edge, xtol=1e-12)
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """Model B against model A on one split: accuracies, discordant counts, p-value, interval."""

    a: str
    b: str
    split: str
    predictions: int
    accuracy_a: float
    accuracy_b: float
    a_only: int
    b_only: int
    p_value: float
    interval: tuple[float, float]
    unit: str = "images"  # what one prediction is: images, rows, texts, tokens

    @property
    def difference(self) -> float:
        return self.accuracy_b - self.accuracy_a

    @property
    def significant(self) -> bool:
        return self.p_value < LEVEL

    def sentence(self) -> str:
        """``+0.3 points, p = 0.41: not significant on 630 images``."""
        verdict = "significant" if self.significant else "not significant"
        return (f"{100 * self.difference:+.1f} points, p = {self.p_value:.2g}: {verdict} "
                f"on {self.predictions} {self.unit}")

    def brief(self) -> str:
        """``+0.3 pts, p = 0.41`` (``…, significant`` below the 5% level): a table's cell, whose caption
        names the split and how many predictions both models made."""
        verdict = ", significant" if self.significant else ""
        return f"{100 * self.difference:+.1f} pts, p = {self.p_value:.2g}{verdict}"

    def to_json(self) -> dict:
        return {**asdict(self), "interval": list(self.interval), "difference": self.difference,
                "significant": self.significant, "test": "exact McNemar (two-sided)",
                "interval_method": "Tango score interval, continuity-corrected, 95%"}


def compare(a: str, logits_a: torch.Tensor, b: str, logits_b: torch.Tensor, labels: torch.Tensor,
            split: str, unit: str = "images") -> Comparison:
    """B against A on the same predictions (their logits, in the same order); ``unit`` names one."""
    labels = labels.cpu()
    right_a = logits_a.cpu().argmax(dim=1) == labels
    right_b = logits_b.cpu().argmax(dim=1) == labels
    a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    return Comparison(a, b, split, len(labels), float(right_a.double().mean()), float(right_b.double().mean()),
                      a_only, b_only, mcnemar_exact(a_only, b_only), score_interval(a_only, b_only, len(labels)), unit)


def report_splits(split_names: tuple[str, ...] | list[str], choice_split: str = "val") -> list[str]:
    """The splits a comparison is reported on: every split but the one choices were made on."""
    return [s for s in split_names if s != choice_split]


def result_logits(result, ingredients, evaluator, split: str) -> torch.Tensor:
    """A recipe result's logits on ``split``: its soup's, or an ensemble's averaged logits."""
    from soup_core.evaluate import ensemble_logits
    if result.state_dict is not None:
        return evaluator.logits(result.state_dict, split)
    return ensemble_logits([evaluator.logits(ingredients[n], split) for n in result.ingredients])


def versus(reference, result, ingredients, evaluator, splits: list[str] | None = None, *,
           reference_name: str | None = None) -> list[Comparison]:
    """A recipe's ``result`` against another's (``reference``) on every report split (or on
    ``splits``, a subset of them), on the same images."""
    from soup_core.recipes import RECIPES
    name = reference_name or RECIPES[reference.recipe].pretty_name
    return [compare(name, result_logits(reference, ingredients, evaluator, split), RECIPES[result.recipe].pretty_name,
                    result_logits(result, ingredients, evaluator, split), evaluator.labels(split), split, evaluator.unit)
            for split in report_splits(evaluator.split_names) if splits is None or split in splits]


def versus_best(result, ingredients, evaluator, splits: list[str] | None = None) -> list[Comparison]:
    """A recipe's result against the best individual model (chosen on val) on every report split
    (or on ``splits``, a subset of them).

    Empty for the best individual itself. Ensembles are compared through their averaged logits.
    """
    from soup_core.recipes import RECIPES
    if result.recipe == "best" or evaluator is None:
        return []
    best = RECIPES["best"].make(ingredients, evaluator)
    name = f"best individual ({best.ingredients[0]})"
    return versus(best, result, ingredients, evaluator, splits, reference_name=name)
