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

# How the §4 approximation measures d²L/dα² (see soup_core.pairs): exactly by jvp (smooth
# networks), by a quadratic fit of the loss curve (networks with kinks), or chosen from the model.
CURVATURE_METHODS = ("auto", "jvp", "fit")

# The arithmetic of a landscape's (or a soup's) forward passes (see soup_core.precision):
# exact float32, TF32 tensor cores (CUDA), or bfloat16 autocast with its deviation measured.
PRECISIONS = ("fp32", "tf32", "bf16")
