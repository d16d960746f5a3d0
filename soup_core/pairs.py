"""Pairs of fine-tuned models: angle vs interpolation advantage, soup vs ensemble, and the
paper's §4 approximation of their loss difference.

For every pair (θ1, θ2) of a zoo, on one report split:

* the angle φ between θ1 − θ0 and θ2 − θ0 and the *interpolation advantage*
  acc(½θ1 + ½θ2) − ½(acc θ1 + acc θ2) (paper Figure 3);
* the two-model soup's accuracy next to the two-model logit ensemble's (Figure 4);
* the measured β-calibrated loss difference L_soup − L_ens at α = ½ next to the approximation
  of §4, eq. (1) (derived in App. K.3):

      L_soup − L_ens ≈ α(1−α)/2 · ( −d²/dα² L_soup + β² E_x Var_{Y∼softmax(β f(x;θ_α))}[Δf_Y(x)] ),

  with Δf = f(x;θ2) − f(x;θ1). β is the temperature that calibrates the soup (App. K.4); it is
  fitted on the held-out ``val`` split, never on the report split.

The curvature d²L/dα² — a pitfall: at which scale? The paper expands the loss over the whole
segment from θ1 to θ2, so its curvature is the segment's: the second difference of L at α = 0, ½
and 1, 8·(mean(L0, L1) − L½) (``segment``, the default; exact for a quadratic L). Two local
scales are offered beside it. ``jvp``: forward-over-forward ``torch.func.jvp`` in float64, exact
at the point α = ½ for a smooth network (tanh, GELU, softmax attention); a ReLU network's loss
along a line is piecewise smooth with a kink wherever a unit switches, and jvp sees only the
linear region α = ½ sits in. ``fit``: a least-squares quadratic through L at α + kh, k = −2…2,
h = :data:`CURVATURE_STEP` (±0.05 around α = ½), the curve's own curvature at that scale.
``auto`` picks jvp for smooth networks and fit for networks with kinks. With the segment's
curvature the approximation is L½ − mean(L0, L1) + β²·Var/8: part of its agreement with the
measured L_soup − L_ens is by construction (both contain L_soup), which is why ``soup pairs`` also
reports each term alone: L½ − mean(L0, L1) against the measured difference, and the variance term
against the ensemble's gain mean(L0, L1) − L_ens. ``curvature_method`` in each pair
says which was used.

The correlations across pairs (angle vs advantage; approximation vs measured loss and error
differences) are what the paper reports.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.fx
from scipy.optimize import minimize_scalar
from torch.func import functional_call, jvp

from soup_core.errors import SoupError
from soup_core.evaluate import VAL, Evaluator, as_logits, predictions, scored
from soup_core.geometry import pairwise_angles
from soup_core.params import interpolate
from soup_core.policies import CURVATURE_METHODS, CURVATURE_WORDS
from soup_core.state import Progress, is_float


@dataclass(frozen=True)
class PairAnalysis:
    """One pair's numbers (accuracies are fractions; losses are β-calibrated mean cross-entropy)."""

    a: str
    b: str
    angle_deg: float | None
    accuracy_a: float
    accuracy_b: float
    soup_accuracy: float
    ensemble_accuracy: float
    interpolation_advantage: float
    beta: float
    soup_loss: float
    ensemble_loss: float
    loss_difference: float
    error_difference: float
    approximation: float
    curvature: float = 0.0
    curvature_method: str = "segment"
    endpoint_loss: float = 0.0  # mean(L0, L1): the two models' own β-calibrated losses
    variance_term: float = 0.0  # α(1 − α)/2 · β² E Var[Δf]: the approximation's ensemble part
    ensemble_gain: float = 0.0  # mean(L0, L1) − L_ens: what the variance term approximates
    soup_term: float = 0.0  # L½ − mean(L0, L1): the segment-curvature part, measured, not approximated


@dataclass(frozen=True)
class PairReport:
    split: str
    pairs: list[PairAnalysis]

    def correlation(self, x: str, y: str) -> float | None:
        """Pearson's r between two fields across pairs (None with < 3 pairs or a constant field)."""
        xs = [getattr(p, x) for p in self.pairs]
        ys = [getattr(p, y) for p in self.pairs]
        if len(xs) < 3 or None in xs or np.std(xs) == 0 or np.std(ys) == 0:
            return None
        return float(np.corrcoef(xs, ys)[0, 1])

    def sign_agreement(self) -> int:
        """Pairs whose approximation has the sign of the measured loss difference."""
        return sum(np.sign(p.approximation) == np.sign(p.loss_difference) for p in self.pairs)

    def to_json(self) -> dict:
        return {"split": self.split, "pairs": [asdict(p) for p in self.pairs], "correlations": {
            "angle_vs_interpolation_advantage": self.correlation("angle_deg", "interpolation_advantage"),
            "approximation_vs_loss_difference": self.correlation("approximation", "loss_difference"),
            "approximation_vs_error_difference": self.correlation("approximation", "error_difference"),
            "variance_term_vs_ensemble_gain": self.correlation("variance_term", "ensemble_gain"),
            "soup_term_vs_loss_difference": self.correlation("soup_term", "loss_difference")},
            "approximation_sign_agreement": int(self.sign_agreement())}


def _calibrated_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    return float(torch.nn.functional.cross_entropy(beta * logits.double(), labels))


def calibration_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """β > 0 minimising the cross-entropy of β·logits (searched over log β ∈ [−5, 5])."""
    result = minimize_scalar(lambda t: _calibrated_loss(logits, labels, math.exp(t)), bounds=(-5.0, 5.0),
                             method="bounded", options={"xatol": 1e-6})
    return math.exp(result.x)


CURVATURE_STEP = 0.025


def quadratic_fit_curvature(loss_at, alpha: float, step: float = CURVATURE_STEP) -> float:
    """Second derivative of the least-squares quadratic through ``loss_at`` at α + k·step, k = −2…2.

    Exact for a quadratic; for a piecewise-smooth curve, its curvature at the scale ±2·step.

    >>> quadratic_fit_curvature(lambda t: 3 * t ** 2 - t + 1, 0.5)
    6.0
    """
    offsets = np.arange(-2, 3) * step
    values = np.array([loss_at(alpha + o) for o in offsets], dtype=np.float64)
    return float(round(2 * np.polyfit(offsets, values, 2)[0], 12))


nn, F = torch.nn, torch.nn.functional
KINKED_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                  nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                  nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
KINKED_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.hardswish, F.hardsigmoid, F.threshold,
                    F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool2d, torch.clamp, torch.abs, torch.maximum,
                    torch.minimum}
KINKED_METHODS = {"relu", "relu_", "clamp", "clamp_", "clip", "abs", "maximum", "minimum"}


def curvature_method(model: torch.nn.Module) -> str:
    """``jvp`` for smooth networks; ``fit`` for networks with kinks or that torch.fx cannot read."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow, custom tracers: unknown, so not assumed smooth
        return "fit"
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), KINKED_MODULES):
            return "fit"
        if (node.op == "call_function" and node.target in KINKED_FUNCTIONS) or \
                (node.op == "call_method" and node.target in KINKED_METHODS):
            return "fit"
    return "jvp"


def loss_curvature(evaluator: Evaluator, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                   split: str, *, beta: float = 1.0, alpha: float = 0.5, method: str = "segment") -> float:
    """d²/dα² of the β-scaled mean cross-entropy at θ_α = (1 − α)·a + α·b (see the module's note).

    ``method``: ``segment`` (over α ∈ [0, 1], the paper's scale; :func:`segment_curvature`), ``fit``
    (the curve's own at ±0.05, :func:`quadratic_fit_curvature`), ``jvp`` (exact within α's linear
    region) or ``auto`` (:func:`curvature_method`: jvp or fit).
    """
    if method not in CURVATURE_METHODS:
        raise SoupError(f"curvature must be one of {', '.join(CURVATURE_METHODS)}, not {method!r}")
    if method == "auto":
        method = curvature_method(evaluator.model)
    labels = evaluator.labels(split)

    def loss_at(t: float) -> float:
        return _calibrated_loss(evaluator.logits(interpolate(a, b, t), split, cache=False), labels, beta)
    if method == "segment":
        return segment_curvature(loss_at(0.0), loss_at(0.5), loss_at(1.0))
    if method == "fit":
        return quadratic_fit_curvature(loss_at, alpha)
    return _jvp_curvature(evaluator, a, b, split, beta=beta, alpha=alpha)


def segment_curvature(at_start: float, at_middle: float, at_end: float) -> float:
    """The second difference of L over α ∈ [0, 1]: (L0 − 2·L½ + L1) / (½)² = 8·(mean(L0, L1) − L½).

    >>> segment_curvature(1.0, 0.5, 1.0)  # L(α) = 1 − 2α(1 − α): L'' = 4
    4.0
    """
    return 4.0 * (at_start - 2.0 * at_middle + at_end)


def _jvp_curvature(evaluator: Evaluator, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                   split: str, *, beta: float, alpha: float) -> float:
    """d²/dα² of the β-scaled mean cross-entropy at θ_α = (1 − α)·a + α·b, by jvp, in float64.

    The model runs in eval mode with every float tensor on the line, as a soup of the two would,
    except BatchNorm's running statistics, which are held at θ_α's values (PyTorch's batch_norm
    has no forward-mode derivative in them).
    """
    # A float64 copy: buffers the state dict does not carry must match float64 inputs, and the
    # evaluator's model is shared (the app caches it), so it is never converted in place.
    model = evaluator.model_copy().double()
    device = evaluator.device
    origin = {k: (t.to(device, torch.float64) if is_float(t) else t.to(device)) for k, t in a.items()}
    direction = {k: b[k].to(device, torch.float64) - origin[k] for k, t in a.items() if is_float(t)}
    data = [(x.to(torch.float64), y) for x, y in evaluator.batches(split)]
    count = sum(predictions(y) for _, y in data)
    # batch_norm has no forward derivative in its running statistics: hold them at θ_α's values.
    stats = {f"{name}.{buffer}" for name, m in model.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for buffer in ("running_mean", "running_var")}
    for key in stats & set(direction):
        origin[key] = origin[key] + alpha * direction.pop(key)

    def loss_at(t: torch.Tensor) -> torch.Tensor:
        params = {k: origin[k] + t * direction[k] if k in direction else origin[k] for k in origin}
        total = sum(torch.nn.functional.cross_entropy(*scored(beta * as_logits(functional_call(model, params, (x,)), y), y),
                                                      reduction="sum") for x, y in data)
        return total / count

    def slope(t: torch.Tensor) -> torch.Tensor:
        return jvp(loss_at, (t,), (torch.ones_like(t),))[1]

    point = torch.tensor(alpha, dtype=torch.float64, device=device)
    with torch.no_grad():
        return float(jvp(slope, (point,), (torch.ones_like(point),))[1])


def analyse_pair(evaluator: Evaluator, names: tuple[str, str], a: Mapping[str, torch.Tensor],
                 b: Mapping[str, torch.Tensor], split: str, angle_deg: float | None = None, *,
                 curvature: str = "segment") -> PairAnalysis:
    """All of the module docstring's numbers for one pair, at α = ½."""
    labels = evaluator.labels(split)
    soup = interpolate(a, b, 0.5)
    f_a, f_b = evaluator.logits(a, split).double(), evaluator.logits(b, split).double()
    f_soup = evaluator.logits(soup, split, cache=False).double()
    f_ens = (f_a + f_b) / 2
    beta = calibration_temperature(evaluator.logits(soup, VAL, cache=False), evaluator.labels(VAL))

    def accuracy(logits: torch.Tensor) -> float:
        return float((logits.argmax(dim=1) == labels).double().mean())

    acc_a, acc_b, acc_soup, acc_ens = accuracy(f_a), accuracy(f_b), accuracy(f_soup), accuracy(f_ens)
    soup_loss, ens_loss = _calibrated_loss(f_soup, labels, beta), _calibrated_loss(f_ens, labels, beta)
    p = torch.softmax(beta * f_soup, dim=1)
    delta = f_b - f_a
    variance = float(((p * delta ** 2).sum(1) - (p * delta).sum(1) ** 2).mean())
    endpoint_loss = (_calibrated_loss(f_a, labels, beta) + _calibrated_loss(f_b, labels, beta)) / 2
    method = curvature_method(evaluator.model) if curvature == "auto" else curvature
    if method == "segment":  # from the three losses already at hand
        second = segment_curvature(_calibrated_loss(f_a, labels, beta), soup_loss, _calibrated_loss(f_b, labels, beta))
    else:
        second = loss_curvature(evaluator, a, b, split, beta=beta, method=method)
    weight = 0.5 * 0.5 / 2  # α(1 − α)/2 at α = ½
    approximation = weight * (-second + beta ** 2 * variance)
    return PairAnalysis(names[0], names[1], angle_deg, acc_a, acc_b, acc_soup, acc_ens,
                        acc_soup - (acc_a + acc_b) / 2, beta, soup_loss, ens_loss, soup_loss - ens_loss,
                        (1 - acc_soup) - (1 - acc_ens), approximation, second, method, endpoint_loss,
                        weight * beta ** 2 * variance, endpoint_loss - ens_loss, soup_loss - endpoint_loss)


def pair_analyses(states: Mapping[str, Mapping[str, torch.Tensor]], evaluator: Evaluator, *,
                  base: Mapping[str, torch.Tensor] | None = None, split: str = "test",
                  pairs: Sequence[tuple[str, str]] | None = None, progress: Progress | None = None,
                  curvature: str = "segment") -> PairReport:
    """Every pair of ``states`` (or the given ``pairs``) analysed on ``split``.

    Angles need ``base`` (θ0); without it they are None and the other numbers still come.
    ``curvature`` chooses how d²L/dα² is measured (see the module's note; ``auto`` by default).
    """
    names = list(states)
    pairs = list(pairs) if pairs is not None else list(itertools.combinations(names, 2))
    angles = pairwise_angles([states[n] for n in names], base).angle_deg if base is not None else None
    index = {n: i for i, n in enumerate(names)}
    curvature = curvature_method(evaluator.model) if curvature == "auto" else curvature  # one trace, not one a pair
    out = []
    for i, (x, y) in enumerate(pairs):
        angle = float(angles[index[x], index[y]]) if angles is not None else None
        out.append(analyse_pair(evaluator, (x, y), states[x], states[y], split, angle, curvature=curvature))
        if progress is not None:
            progress((i + 1) / len(pairs), f"{x} × {y}")
    return PairReport(split, out)


def section_four_sentence(report: Mapping) -> str:
    """What §4's approximation shows on a :meth:`PairReport.to_json` (the Tour's words), or "" with
    too few pairs to correlate."""
    correlations, pairs = report["correlations"], len(report["pairs"])
    r, soup_only = correlations["approximation_vs_loss_difference"], correlations["soup_term_vs_loss_difference"]
    if r is None or soup_only is None:
        return ""
    scales = sorted({p["curvature_method"] for p in report["pairs"]})
    return (f"**Why soups trail ensembles** (paper §4). The paper approximates the soup − ensemble loss gap by the "
            f"curvature of the loss between two models and the ensemble's spread of predictions. With the curvature "
            f"{' and '.join(CURVATURE_WORDS[s] for s in scales)}, over these {pairs} pairs the approximation follows "
            f"the measured gap with r = {r:+.2f} (the same sign in {report['approximation_sign_agreement']} of "
            f"{pairs}); part of that is by construction, since the soup's own loss term alone gives r = "
            f"{soup_only:+.2f}. The Geometry page reports the same for the open zoo.")


def flattest_pair(states: Mapping[str, Mapping[str, torch.Tensor]], evaluator: Evaluator, *, split: str = VAL,
                  candidates: int = 6, points: int = 11) -> tuple[str, str, float]:
    """Among the ``candidates`` models best on ``split``, the two with the lowest error barrier
    between them on ``split`` (paper Figure 2's "one basin" pair), and that barrier (a fraction).

    Chosen on the held-out split only, so that a barrier reported on test is not picked to look
    good (see :func:`soup_core.landscape.path.error_barrier`).
    """
    from soup_core.landscape.path import error_barrier
    scores = {n: evaluator.accuracy(s, split) for n, s in states.items()}
    best = sorted(scores, key=lambda n: -scores[n])[:max(2, candidates)]
    barriers = {(x, y): error_barrier(evaluator, states[x], states[y], split, points)
                for x, y in itertools.combinations(best, 2)}
    (x, y), barrier = min(barriers.items(), key=lambda item: item[1])
    return x, y, barrier
