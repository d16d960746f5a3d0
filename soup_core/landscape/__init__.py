"""Loss and error landscapes: many weight points per forward pass, exact at the anchors.

A slice is an affine subspace θ(c) = origin + Σ_k c_k d_k of weight space: a line (k = 1) for
interpolation paths and error barriers (paper App. J.1) or the θ0 → soup curve (WiSE-FT,
App. D); a plane (k = 2) for the paper's Figure 2 (see :func:`soup_core.geometry.plane_basis`)
or filter-normalised random slices. :class:`SliceEvaluator` scores many points c at once:

* **Stacked weights.** A chunk of G points becomes one batched state dict (one GEMM per
  tensor: origin + C·D) and runs in one pass instead of G Python-level forwards: through
  :class:`soup_core.landscape.folded.FoldedForward` (points folded into the channels of channels-last
  activations, for models built from standard layers) or one ``torch.vmap`` of
  ``torch.func.functional_call`` (any model vmap can run). A per-point loop on a private copy
  is the third way, and the same loop with samples batched to the memory budget the fourth
  (a GPU is busy only with large calls); the engine times them on the spot, on every device,
  and keeps the fastest that agrees with the loop (:mod:`~soup_core.landscape.strategies`).
* **The first layer is linear in its weights.** Its input does not depend on the point, so
  the layer runs once for the origin and once per direction, and each point only mixes those
  k + 1 outputs with its coefficients (exact: Linear/Conv are linear in (weight, bias)).
* **Bounded memory.** Points and data are chunked so that stacked weights and activations stay
  within a byte budget (on CUDA a share of ``torch.cuda.mem_get_info()``, with activations
  measured as the peak of a probe call); the evaluation data may be subsampled (a fixed, seeded subset, the same for every
  point — never chosen by results).
* **Progress and cancellation.** A callback reports progress; ``should_stop`` ends the run
  between chunks and what was computed is kept (NaN elsewhere), ordered coarse-to-fine so a
  cancelled grid is already a usable low-resolution map, and ``resume`` continues it.

* **Precision.** ``precision="fp32"`` (default, exact), ``"tf32"`` or ``"bf16"``
  (:mod:`soup_core.precision`); outside fp32 the first points are scored in fp32 as well and
  the largest loss difference is reported (``precision_deviation``).

BatchNorm — the pitfall users meet here — has its policies (``bn=``: recompute, interpolate,
keep) explained in :mod:`soup_core.landscape.batchnorm`.

The package: :mod:`~soup_core.landscape.engine` (the :class:`SliceEvaluator`),
:mod:`~soup_core.landscape.strategies` (how a chunk runs, and its sizes),
:mod:`~soup_core.landscape.first_layer`, :mod:`~soup_core.landscape.folded` (the folded
forward), :mod:`~soup_core.landscape.batchnorm`, :mod:`~soup_core.landscape.grid` (planes) and
:mod:`~soup_core.landscape.path` (lines).
"""

from soup_core.landscape.batchnorm import batchnorm_keys, point_weights, recompute_batchnorm
from soup_core.landscape.budget import device_budget
from soup_core.landscape.engine import SliceEvaluator
from soup_core.landscape.scores import PointValues
from soup_core.landscape.grid import Landscape, coarse_to_fine, grid_extent, plane_landscape
from soup_core.landscape.path import LineBarrier, Path, barrier_interval, interpolation_path, path_alphas
from soup_core.landscape.strategies import STRATEGIES
from soup_core.policies import BN_POLICIES

__all__ = ["BN_POLICIES", "STRATEGIES", "Landscape", "Path", "PointValues", "SliceEvaluator", "batchnorm_keys",
           "LineBarrier", "barrier_interval", "coarse_to_fine", "device_budget", "grid_extent", "interpolation_path", "path_alphas", "plane_landscape", "point_weights",
           "recompute_batchnorm"]
