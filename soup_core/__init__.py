"""Model Soup Lab's library: checkpoints, state-dict algebra, recipes, geometry, landscapes.

Never imports streamlit (the app is a thin layer over this package).
"""

__version__ = "0.1.0"
