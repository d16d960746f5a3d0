"""Choices shared by the library, the ``soup`` command and the app, readable without importing torch.

``BN_POLICIES`` — what a landscape, a path or an exported point does with BatchNorm running
statistics at weights no one trained (see :mod:`soup_core.landscape`): ``recompute`` them on
training data (``torch.optim.swa_utils.update_bn``), ``interpolate`` them with the weights, or
``keep`` the origin's.
"""

BN_POLICIES = ("recompute", "interpolate", "keep")
