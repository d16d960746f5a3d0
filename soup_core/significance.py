"""Is a difference real? Exact McNemar tests on paired predictions, bootstrap intervals.

Two models scored on the same images disagree on some of them: ``a_only`` images only model A
gets right, ``b_only`` only B. Under "no difference" each disagreement is a fair coin, so the
exact McNemar test is a two-sided binomial test of ``b_only`` successes in ``a_only + b_only``
trials (McNemar 1947; the exact form for small counts, Edwards 1948). With 630 test images one
image is 0.16 points, so "+0.3" is two images — this module says whether that means anything.

The 95% interval of the accuracy difference is a paired bootstrap over images (seeded, 2,000
resamples): resampling pairs keeps the correlation between the two models' errors. A pair is one of
three kinds (only A right, only B right, the same), so a resample is a multinomial draw of those
three counts: the same distribution as drawing images, in O(resamples) instead of O(resamples × n).

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

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import binom

LEVEL = 0.05
RESAMPLES = 2000


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(a_only, b_only), n, 0.5)))


def bootstrap_interval(a_correct: torch.Tensor, b_correct: torch.Tensor, *, resamples: int = RESAMPLES,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Paired bootstrap interval of accuracy(b) − accuracy(a) (fractions).

    Each resample draws n pairs with replacement; only the counts of "B right, A wrong" and
    "A right, B wrong" among them matter, and those are one multinomial draw."""
    n = len(a_correct)
    a_correct, b_correct = a_correct.bool(), b_correct.bool()
    b_only = int((b_correct & ~a_correct).sum())
    a_only = int((a_correct & ~b_correct).sum())
    counts = np.random.default_rng(seed).multinomial(n, [b_only / n, a_only / n, (n - a_only - b_only) / n],
                                                     size=resamples)
    difference = (counts[:, 0] - counts[:, 1]) / n
    low, high = np.quantile(difference, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """Model B against model A on one split: accuracies, discordant counts, p-value, interval."""

    a: str
    b: str
    split: str
    images: int
    accuracy_a: float
    accuracy_b: float
    a_only: int
    b_only: int
    p_value: float
    interval: tuple[float, float]

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
                f"on {self.images} images")

    def to_json(self) -> dict:
        return {**asdict(self), "interval": list(self.interval), "difference": self.difference,
                "significant": self.significant, "test": "exact McNemar (two-sided)",
                "interval_method": f"paired bootstrap, {RESAMPLES} resamples, 95%"}


def compare(a: str, logits_a: torch.Tensor, b: str, logits_b: torch.Tensor, labels: torch.Tensor,
            split: str) -> Comparison:
    """B against A on the same images (their logits, in the same order)."""
    labels = labels.cpu()
    right_a = logits_a.cpu().argmax(dim=1) == labels
    right_b = logits_b.cpu().argmax(dim=1) == labels
    a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    return Comparison(a, b, split, len(labels), float(right_a.double().mean()), float(right_b.double().mean()),
                      a_only, b_only, mcnemar_exact(a_only, b_only), bootstrap_interval(right_a, right_b))


def report_splits(split_names: tuple[str, ...] | list[str], choice_split: str = "val") -> list[str]:
    """The splits a comparison is reported on: every split but the one choices were made on."""
    return [s for s in split_names if s != choice_split]


def versus_best(result, ingredients, evaluator, splits: list[str] | None = None) -> list[Comparison]:
    """A recipe's result against the best individual model (chosen on val) on every report split
    (or on ``splits``, a subset of them).

    Empty for the best individual itself. Ensembles are compared through their averaged logits.
    """
    from soup_core.evaluate import ensemble_logits
    from soup_core.recipes import RECIPES
    if result.recipe == "best" or evaluator is None:
        return []
    name = RECIPES["best"].make(ingredients, evaluator).ingredients[0]
    out = []
    for split in report_splits(evaluator.split_names):
        if splits is not None and split not in splits:
            continue
        if result.state_dict is not None:
            logits = evaluator.logits(result.state_dict, split)
        else:
            logits = ensemble_logits([evaluator.logits(ingredients[n], split) for n in result.ingredients])
        out.append(compare(f"best individual ({name})", evaluator.logits(ingredients[name], split),
                           RECIPES[result.recipe].pretty_name, logits, evaluator.labels(split), split))
    return out
