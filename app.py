"""Model Soup Lab — Streamlit entry point: navigation over pages/ (each page draws the sidebar)."""

import streamlit as st

from soup_core.allocator import keep_freed_memory

keep_freed_memory()  # the server is this process: landscapes reuse freed memory (soup_core/allocator.py)
st.set_page_config(page_title="Model Soup Lab", page_icon="🥣", layout="wide")
navigation = st.navigation([
    st.Page("pages/ingredients.py", title="Ingredients", default=True),
    st.Page("pages/recipes.py", title="Recipes"),
    st.Page("pages/geometry.py", title="Geometry"),
    st.Page("pages/landscape.py", title="Landscape"),
    st.Page("pages/tour.py", title="Tour"),
    st.Page("pages/export.py", title="Export"),
])
navigation.run()
