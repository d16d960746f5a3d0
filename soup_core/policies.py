"""Choices shared by the library, the ``soup`` command and the app, readable without importing torch.

``BN_POLICIES`` — what a landscape, a path or an exported point does with BatchNorm running
statistics at weights no one trained (see :mod:`soup_core.landscape`): ``recompute`` them on
training data (``torch.optim.swa_utils.update_bn``), ``interpolate`` them with the weights, or
``keep`` the origin's.

``CURVATURE_METHODS`` — how the §4 approximation measures the loss curve's curvature.

``PRECISIONS`` — the arithmetic of forward passes: ``fp32`` (exact, the default), ``tf32`` or
``bf16`` (faster on a GPU; see :mod:`soup_core.precision`).
"""

BN_POLICIES = ("recompute", "interpolate", "keep")

# How the §4 approximation measures d²L/dα² (see soup_core.pairs), at three scales: over the whole
# segment α ∈ [0, 1] (the paper's expansion; the default), by a quadratic fit of L(α) over ±0.05
# (local; networks with kinks), exactly by jvp (one point; smooth networks), or jvp/fit from the model.
CURVATURE_METHODS = ("segment", "fit", "jvp", "auto")
CURVATURE_WORDS = {"segment": "over the whole segment (the paper's scale)",  # in the app's sentences
                   "fit": "of a quadratic fit of L(α) over α = ½ ± 0.05",
                   "jvp": "exact at α = ½ by jvp"}

# The arithmetic of a landscape's (or a soup's) forward passes (see soup_core.precision):
# exact float32, TF32 tensor cores (CUDA), or bfloat16 autocast with its deviation measured.
PRECISIONS = ("fp32", "tf32", "bf16")
