"""The sidebar every page draws: pick a sample zoo or a server folder, add uploads, report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

from appkit.cache import load_zoo
from appkit.figures import PLOTLY_JS, plotly_js
from appkit.plain import error, literal
from appkit.room_controls import unlock_facilitator
from appkit.uploads import add_uploads, uploads_of, with_uploads
from appkit.warm import PROGRESS
from appkit.workspace import DEFAULT_ZOO, SESSION_KEY, seed, store, update, workspace
from soup_core.errors import SoupError
from soup_core.params import num_parameters
from soup_core.zoo import ALLOWED_ROOTS_ENV, Zoo, allowed_roots_from_env, sample_root, sample_zoos


def app_allowed_roots() -> list[Path]:
    """Folders the app may open: ``SOUP_ALLOWED_ROOTS``, else only the built-in sample zoos."""
    return allowed_roots_from_env() or [sample_root()]


def _open_folder() -> Zoo | None:
    roots = tuple(app_allowed_roots())
    seed("folder", workspace().folder)
    folder = st.sidebar.text_input("Folder on this server (zoo.toml or checkpoint files)", key="folder",
                                   on_change=lambda: update(folder=st.session_state["folder"]),
                                   help="Allowed: " + ", ".join(map(str, roots)) + f" (set {ALLOWED_ROOTS_ENV})")
    if not folder:
        return None
    try:
        zoo = load_zoo(folder, roots)
    except (SoupError, OSError) as exc:
        error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, st.sidebar)
        return None
    return zoo


def run_under_navigation() -> None:
    """A fresh server whose first visitor opens a page's own URL (``/geometry?…``, a shared
    link) runs that page alone, as a Streamlit app with a ``pages/`` folder of its own (v1
    multipage apps), without ``app.py``'s navigation or set-up. On a session's first run,
    switch that off and run again: the rerun goes through ``app.py`` and lands on the same page
    (same URL path). Only a first run: a rerun later would drop the trigger of a pressed button."""
    if PagesManager.uses_pages_directory and SESSION_KEY not in st.session_state:
        PagesManager.uses_pages_directory = False
        st.rerun()


def preparing() -> None:
    """The warm-up's banner, redrawn every 2 s; when it is done, the page runs once more without it."""
    if not PROGRESS["running"]:
        st.rerun(scope="app")
    st.info(f"Preparing… ({PROGRESS['done']} of {PROGRESS['total']}): the server is computing what the pages show, "
            "so that nobody waits later. Everything works meanwhile; some pages take longer until it is done.")


def reset_workspace() -> None:
    """``on_click``: back to the defaults (sample zoo, every checkpoint ticked, no export choice, the
    landscape's defaults); uploads and the facilitator's unlock stay."""
    kept = ("upload", "room-facilitator")
    for key in [k for k in st.session_state if not str(k).startswith(kept)]:
        del st.session_state[key]
    st.query_params.clear()


def sidebar() -> Zoo:
    """Open a sample zoo (default; the URL's ``?zoo=``) or a server folder; add uploads; report."""
    run_under_navigation()
    unlock_facilitator()  # a ?facilitator= token leaves the URL on whichever page it arrives
    if PROGRESS["running"]:
        st.fragment(run_every=2)(preparing)()
    names = list(sample_zoos())
    seed("zoo", workspace().zoo if workspace().zoo in names else DEFAULT_ZOO)
    name = st.sidebar.selectbox("Sample zoo", names, key="zoo", on_change=lambda: update(zoo=st.session_state["zoo"]))
    folder_zoo = _open_folder()
    if folder_zoo is not None:  # the folder wins over the sample zoo chosen above: say so
        st.sidebar.caption(literal(f"Showing the folder {folder_zoo.root}, not the sample zoo; clear the folder "
                                   "box to go back."))
    opened = folder_zoo or load_zoo(name)
    whole_folder = st.sidebar.toggle("Upload a whole folder", key="upload-folder")
    limit_mb = int(st.get_option("server.maxUploadSize"))
    files = st.sidebar.file_uploader(f"Add checkpoints (.safetensors, .pt, .pth, .bin; up to {limit_mb} MB each)",
                                     accept_multiple_files="directory" if whole_folder else True,
                                     key=f"upload:{opened.name}:{whole_folder}")
    for problem in add_uploads(opened, files, limit_mb << 20, skip_other_files=whole_folder):
        error(problem, st.sidebar)
    for upload in uploads_of(opened.name).values():
        if upload["note"]:
            st.sidebar.info(literal(upload["note"]))
    zoo = with_uploads(opened)
    store(replace(workspace(), zoo=name).with_zoo_shown(zoo))  # on a first run, also the link's workspace into the URL
    st.sidebar.caption(literal(zoo.description))
    base = " + base θ0" if zoo.has_base else " (no base θ0)"
    st.sidebar.write(f"**{len(zoo.names)} checkpoints**{base}, "
                     f"{num_parameters(zoo.state_dict(zoo.names[0])):,} parameters each")
    if zoo.evaluator is None:
        st.sidebar.info("Weights only (no model or data in the manifest): angles, uniform and Model Stock "
                        "soups and export work; scores, greedy/pruned/learned soups and landscapes need an "
                        "evaluator.")
    st.sidebar.button("Reset my workspace", key="reset-workspace", on_click=reset_workspace,
                      help="Back to the sample zoo, every checkpoint ticked, the default settings; uploads stay.")
    st.sidebar.download_button(f"{PLOTLY_JS} for saved figures", plotly_js, PLOTLY_JS, "text/javascript",
                               key="plotly-js", on_click="ignore", help="A figure saved as HTML (under each figure) "
                               "draws with this file: save it once into the same folder.")
    report = zoo.validation
    for message in report.errors:
        error(message, st.sidebar)
    for message in report.warnings:
        st.sidebar.warning(literal(message))
    return zoo
