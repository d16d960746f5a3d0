"""Choices shared by the library, the ``soup`` command and the app, readable without importing torch.

``BN_POLICIES`` — what a landscape, a path or an exported point does with BatchNorm running
statistics at weights no one trained (see :mod:`soup_core.landscape`): ``recompute`` them on
training data (``torch.optim.swa_utils.update_bn``), ``interpolate`` them with the weights, or
``keep`` the origin's.

``CURVATURE_METHODS`` — how the §4 approximation measures the loss curve's curvature.
"""

BN_POLICIES = ("recompute", "interpolate", "keep")

# How the §4 approximation measures d²L/dα² (see soup_core.pairs): exactly by jvp (smooth
# networks), by a quadratic fit of the loss curve (networks with kinks), or chosen from the model.
CURVATURE_METHODS = ("auto", "jvp", "fit")
