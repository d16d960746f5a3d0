"""The session's workspace: the ticked ingredients (URL-shareable) and the export candidate.

Under ``st.navigation`` a widget's own state does not survive a page switch, so the workspace
keeps a copy of each widget's value under ``workspace:<key>`` (updated by :func:`keep` when the
user changes the widget) and seeds the widget from it (:func:`recall`) before it is drawn.
"""

from __future__ import annotations

import streamlit as st

from soup_core.export import Candidate
from soup_core.zoo import Zoo

EXPORT_KEY = "workspace:export"


def keep(widget_key: str) -> None:
    """``on_change`` of a workspace widget: copy its new value into the workspace."""
    st.session_state[f"workspace:{widget_key}"] = st.session_state[widget_key]


def recall(widget_key: str, default):
    """Seed a widget from the workspace's copy (else ``default``) before it is drawn."""
    value = st.session_state.setdefault(f"workspace:{widget_key}", default)
    st.session_state[widget_key] = value
    return value


def tick_key(zoo: Zoo, name: str) -> str:
    return f"tick:{zoo.name}:{name}"


def _tick_defaults(zoo: Zoo) -> None:
    """The workspace's ticks, where it has none yet: the URL's ``?use=a,b``, else all."""
    from_url = [n for n in st.query_params.get("use", "").split(",") if n in zoo.entries]
    initial = set(from_url) if from_url else set(zoo.names)
    for name in zoo.names:
        st.session_state.setdefault(f"workspace:{tick_key(zoo, name)}", name in initial)


def seed_ticks(zoo: Zoo) -> None:
    """Before the tick boxes are drawn: each box from the workspace (last state, URL, or all)."""
    _tick_defaults(zoo)
    for name in zoo.names:
        recall(tick_key(zoo, name), None)


def ticked(zoo: Zoo) -> list[str]:
    """The ticked ingredients, on any page (seeded from the URL on the first visit), also put in the URL."""
    _tick_defaults(zoo)
    chosen = [n for n in zoo.names if st.session_state[f"workspace:{tick_key(zoo, n)}"]]
    st.query_params["use"] = ",".join(chosen)
    return chosen


def set_export(candidate: Candidate | None) -> None:
    """What the Export page offers besides the ticked set: a recipe's soup or a landscape point."""
    st.session_state[EXPORT_KEY] = candidate


def chosen_export() -> Candidate | None:
    return st.session_state.get(EXPORT_KEY)
