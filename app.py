"""Model Soup Lab — Streamlit entry point: navigation over pages/ (each page draws the sidebar)."""

import streamlit as st

from appkit.timing import timed_run
from appkit.uploads import start_sweeper, sweep_dead_servers
from appkit.warm import start_warming
from appkit.workers import share_the_cores
from soup_core.allocator import keep_freed_memory


@st.cache_resource
def start_server() -> None:
    """Once per server process: keep freed memory (the server is this process; landscapes reuse
    it, see soup_core/allocator.py), remove upload folders that killed servers left behind,
    sweep closed sessions' folders from now on, give the heavy work's worker processes their share
    of the cores (appkit/workers.py) and warm the shared caches (appkit/warm.py)."""
    keep_freed_memory()
    share_the_cores()
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
