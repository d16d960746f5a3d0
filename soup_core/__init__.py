"""Model Soup Lab's library: checkpoints, state-dict algebra, recipes, geometry, landscapes.

Subpackages load on first use (``soup_core.zoo.open_zoo(...)`` works after ``import
soup_core``), so importing the package itself costs nothing: the ``soup`` command parses its
arguments before torch is imported. Never imports streamlit (the app is a thin layer over it).

>>> import soup_core
>>> soup_core.zoo.open_zoo("digits-scratch").names[:2]
('scratch-00', 'scratch-01')
"""

import importlib

__version__ = "0.1.0"

SUBMODULES = ("ablations", "allocator", "cli", "data", "errors", "evaluate", "export", "geometry", "io",
              "landscape", "models", "pairs", "params", "policies", "recipes", "state", "zoo")


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"soup_core.{name}")
    raise AttributeError(f"module 'soup_core' has no attribute {name!r}")
