"""Model Soup Lab — Streamlit entry point: navigation over pages/ (each page draws the sidebar)."""

import streamlit as st

from appkit.timing import timed_run
from appkit.uploads import start_sweeper, sweep_dead_servers
from appkit.warm import start_warming
from soup_core.allocator import keep_freed_memory


@st.cache_resource
def start_server() -> None:
    """Once per server process: keep freed memory (the server is this process; landscapes reuse
    it, see soup_core/allocator.py), remove upload folders that killed servers left behind,
    sweep closed sessions' folders from now on, and warm the shared caches (appkit/warm.py)."""
    keep_freed_memory()
    sweep_dead_servers()
    start_sweeper()
    start_warming()


start_server()
st.set_page_config(page_title="Model Soup Lab", page_icon="🥣", layout="wide")
navigation = st.navigation([
    st.Page("pages/ingredients.py", title="Ingredients", default=True),
    st.Page("pages/recipes.py", title="Recipes"),
    st.Page("pages/geometry.py", title="Geometry"),
    st.Page("pages/landscape.py", title="Landscape"),
    st.Page("pages/tour.py", title="Tour"),
    st.Page("pages/export.py", title="Export"),
    st.Page("pages/room.py", title="Room"),
])
timed_run(navigation.run, navigation.title)  # logged only with SOUP_TIMING_LOG set
