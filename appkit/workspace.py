"""The session's workspace: the ticked ingredients and the landscape settings (both in the URL,
shareable) and the export candidate.

Under ``st.navigation`` a widget's own state does not survive a page switch, so the workspace
keeps a copy of each widget's value under ``workspace:<key>`` (updated by :func:`keep` when the
user changes the widget) and seeds the widget from it (:func:`recall`) before it is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import streamlit as st

from soup_core.errors import SoupError
from soup_core.export import Candidate
from soup_core.policies import BN_POLICIES, PRECISIONS
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
    """What the Export page offers besides the ticked set: a recipe's soup or a landscape point
    (also in the URL as ``?export=``, so a link shares it)."""
    st.session_state[EXPORT_KEY] = candidate
    share_export()


def chosen_export() -> Candidate | None:
    return st.session_state.get(EXPORT_KEY)


def share_export() -> None:
    """On every page: the session's export choice into the URL; or, on a session's first run, a
    shared link's ``?export=`` read into the workspace (an unreadable one is dropped)."""
    if EXPORT_KEY not in st.session_state:
        st.session_state[EXPORT_KEY] = None
        text = st.query_params.get("export")
        if text:
            try:
                st.session_state[EXPORT_KEY] = Candidate.from_query(text)
            except SoupError:
                pass
    candidate = st.session_state[EXPORT_KEY]
    if candidate is None:
        st.query_params.pop("export", None)
    else:
        st.query_params["export"] = candidate.to_query()


@dataclass(frozen=True)
class LandscapeSettings:
    """The Landscape page's settings, kept in the session's workspace and in the URL
    (``?plane=base,ft-17,ft-22&grid=21&margin=0.2&split=test&bn=keep&precision=bf16``)."""

    points: tuple[str, str, str]
    grid: int = 15
    margin: float = 0.2
    split: str = "val"
    bn: str = "recompute"
    precision: str = "fp32"

    QUERY = ("plane", "grid", "margin", "split", "bn", "precision")
    WIDGETS = {"points": ("land-Origin A", "land-Point B", "land-Point C"), "grid": "land-grid",
               "margin": "land-margin", "split": "land-split", "bn": "land-bn", "precision": "land-precision"}

    def to_query(self) -> dict[str, str]:
        return {"plane": ",".join(self.points), "grid": str(self.grid), "margin": f"{self.margin:g}",
                "split": self.split, "bn": self.bn, "precision": self.precision}

    @classmethod
    def from_query(cls, query, default: LandscapeSettings, *, choices, splits) -> LandscapeSettings:
        """``default`` with every valid setting the URL gives (an invalid one is ignored)."""
        values = {}
        points = tuple(p for p in str(query.get("plane", "")).split(",") if p)
        if len(points) == 3 and len(set(points)) == 3 and all(p in choices for p in points):
            values["points"] = points
        try:
            grid = int(query.get("grid", default.grid))
            if 5 <= grid <= 41 and grid % 2:
                values["grid"] = grid
            margin = float(query.get("margin", default.margin))
            if 0.0 <= margin <= 1.0:
                values["margin"] = margin
        except ValueError:
            pass
        for name, allowed in (("split", splits), ("bn", BN_POLICIES), ("precision", PRECISIONS)):
            if query.get(name) in allowed:
                values[name] = query[name]
        return replace(default, **values)

    def widget_values(self) -> dict[str, object]:
        out = dict(zip(self.WIDGETS["points"], self.points))
        out.update({self.WIDGETS[f]: getattr(self, f) for f in ("grid", "margin", "split", "bn", "precision")})
        return out


LANDSCAPE_KEY = "workspace:landscape"
LANDSCAPE_QUERY_KEY = "workspace:landscape-link"  # a shared link's settings, until the Landscape page reads them


def seed_landscape(zoo: Zoo, default: LandscapeSettings, *, choices, splits) -> None:
    """Before the Landscape widgets are drawn: each from the workspace (last state), else the URL,
    else ``default``."""
    saved = st.session_state.get(LANDSCAPE_KEY)
    if saved is None or saved[0] != zoo.name:
        query = st.session_state.get(LANDSCAPE_QUERY_KEY) or st.query_params.to_dict()
        settings = LandscapeSettings.from_query(query, default, choices=choices, splits=splits)
        for key, value in settings.widget_values().items():
            st.session_state[f"workspace:{key}"] = value
    for key, value in default.widget_values().items():
        recall(key, value)


def remember_landscape(zoo: Zoo, settings: LandscapeSettings) -> None:
    """After the widgets: the settings in the workspace and in the URL."""
    st.session_state[LANDSCAPE_KEY] = (zoo.name, settings)
    share_landscape()


def share_landscape() -> None:
    """On every page: the workspace's landscape settings into the URL (so a link keeps them); or,
    before the Landscape page was visited, a shared link's settings kept for when it is."""
    saved = st.session_state.get(LANDSCAPE_KEY)
    if saved is not None:
        for name, value in saved[1].to_query().items():
            st.query_params[name] = value
    elif "plane" in st.query_params and LANDSCAPE_QUERY_KEY not in st.session_state:
        st.session_state[LANDSCAPE_QUERY_KEY] = {k: st.query_params[k] for k in LandscapeSettings.QUERY
                                                 if k in st.query_params}
        for name, value in st.session_state[LANDSCAPE_QUERY_KEY].items():
            st.query_params[name] = value
