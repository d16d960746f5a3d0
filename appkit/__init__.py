"""Streamlit-side helpers shared by the pages: the workspace sidebar and cached loaders.

Pages stay thin: every number comes from ``soup_core``; this package only caches and lays out.
"""
