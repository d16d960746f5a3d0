"""The session's workspace: one typed object for everything a participant chose (the zoo, the
ticked ingredients, the soup chosen for export, the landscape settings), kept in the session and
written to the URL after every change, so a link restores it on any page.

Under ``st.navigation`` a widget's own state does not survive a page switch, so each widget is
seeded from the workspace before it is drawn (:func:`seed`), and its ``on_change`` writes the
new value back into the workspace before the script runs again.

>>> ws = Workspace.from_query({"zoo": "digits-finetune", "use": "ft-03,ft-17", "export": "greedy"})
>>> ws.export.title(), ws.to_query()["use"]
('Greedy soup', 'ft-03,ft-17')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Mapping

import streamlit as st

from soup_core.errors import SoupError
from soup_core.export import Candidate, link_names, names_from_link
from soup_core.policies import BN_POLICIES, PRECISIONS
from soup_core.zoo import Zoo

DEFAULT_ZOO = "digits-finetune"
SESSION_KEY = "workspace"
ROOM_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}")  # what appkit.room.new_token makes; anything else is dropped


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
        return {"plane": link_names(self.points), "grid": str(self.grid), "margin": f"{self.margin:g}",
                "split": self.split, "bn": self.bn, "precision": self.precision}

    @classmethod
    def from_query(cls, query, default: LandscapeSettings, *, choices, splits) -> LandscapeSettings:
        """``default`` with every valid setting the URL gives (an invalid one is ignored)."""
        values = {}
        points = tuple(names_from_link(query.get("plane", "")))
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

    @classmethod
    def widget_keys(cls) -> list[str]:
        return [*cls.WIDGETS["points"], *(cls.WIDGETS[f] for f in ("grid", "margin", "split", "bn", "precision"))]

    @classmethod
    def from_widget_values(cls, values: Mapping[str, object]) -> LandscapeSettings:
        return cls(tuple(values[k] for k in cls.WIDGETS["points"]),
                   **{f: values[cls.WIDGETS[f]] for f in ("grid", "margin", "split", "bn", "precision")})


@dataclass(frozen=True)
class Workspace:
    """What a participant chose, and what a link shares (``?zoo=…&use=…&export=…&plane=…``).

    ``shown`` is the zoo the pages show (a sample zoo, or a server folder with its uploads);
    ``ticks`` holds each checkpoint's tick for every zoo shown so far; ``link`` is the query the
    session was opened with, which seeds what the participant has not set yet (the ticks of the
    zoo it names, the landscape settings until the Landscape page is opened)."""

    zoo: str = DEFAULT_ZOO
    folder: str = ""
    shown: str = ""
    ticks: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)  # zoo -> name -> ticked
    export: Candidate | None = None
    landscape: tuple[str, LandscapeSettings] | None = None  # (zoo, settings)
    link: Mapping[str, str] = field(default_factory=dict)
    me: str = ""  # the participant's room token (appkit.room): their link lets them replace their own entry

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Workspace:
        """The workspace a shared link describes; an unreadable export choice is dropped."""
        try:
            export = Candidate.from_query(query["export"]) if query.get("export") else None
        except SoupError:
            export = None
        me = query.get("me", "")
        return cls(zoo=query.get("zoo", DEFAULT_ZOO), folder=query.get("folder", ""), export=export,
                   link=dict(query), me=me if ROOM_TOKEN.fullmatch(me) else "")

    def ticked(self, zoo: Zoo) -> list[str]:
        """The ticked ingredients of ``zoo``. Before the zoo is first shown: the link's ``use=``,
        else all. After: as ticked, and a checkpoint added since (an upload) arrives unticked, so
        the soup on screen does not change until its owner ticks it."""
        if zoo.name in self.ticks:
            return [n for n in zoo.names if self.ticks[zoo.name].get(n, False)]
        from_link = {n for n in names_from_link(self.link.get("use", "")) if n in zoo.entries}
        return [n for n in zoo.names if n in from_link] if from_link else list(zoo.names)

    def with_zoo_shown(self, zoo: Zoo) -> Workspace:
        """The zoo the pages show, its ticks fixed from now on (the link's, else all)."""
        if zoo.name in self.ticks:
            return self if self.shown == zoo.name else replace(self, shown=zoo.name)
        chosen = set(self.ticked(zoo))
        return replace(self, shown=zoo.name, ticks={**self.ticks, zoo.name: {n: n in chosen for n in zoo.names}})

    def with_ticks(self, zoo: Zoo, names) -> Workspace:
        """Ticking changes the soup, so the export goes back to the ticked set."""
        chosen = set(names)
        return replace(self, ticks={**self.ticks, zoo.name: {n: n in chosen for n in zoo.names}}, export=None)

    def landscape_for(self, zoo: Zoo, default: LandscapeSettings, *, choices, splits) -> LandscapeSettings:
        """The zoo's last landscape settings (on ``default``'s split when theirs is no longer offered:
        test, hidden by the facilitator), else the link's (if valid), else ``default``."""
        if self.landscape is not None and self.landscape[0] == zoo.name:
            kept = self.landscape[1]
            return kept if kept.split in splits else replace(kept, split=default.split)
        return LandscapeSettings.from_query(self.link, default, choices=choices, splits=splits)

    def to_query(self) -> dict[str, str]:
        query = {"zoo": self.zoo}
        if self.folder:
            query["folder"] = self.folder
        if self.shown in self.ticks:
            query["use"] = link_names(n for n, on in self.ticks[self.shown].items() if on)
        elif self.link.get("use"):
            query["use"] = self.link["use"]
        if self.export is not None:
            query["export"] = self.export.to_query()
        if self.me:
            query["me"] = self.me
        if self.landscape is not None:
            query.update(self.landscape[1].to_query())
        else:  # a link's landscape settings stay in the URL until the Landscape page uses them
            query.update({k: self.link[k] for k in LandscapeSettings.QUERY if k in self.link})
        return query


QUERY_KEYS = ("zoo", "folder", "use", "export", "me", *LandscapeSettings.QUERY)


def workspace() -> Workspace:
    """This session's workspace; on its first run, the one its URL describes."""
    if SESSION_KEY not in st.session_state:
        st.session_state[SESSION_KEY] = Workspace.from_query(st.query_params.to_dict())
    return st.session_state[SESSION_KEY]


def update(**changes) -> Workspace:
    """Change the workspace and write it to the URL."""
    return store(replace(workspace(), **changes))


def store(ws: Workspace) -> Workspace:
    st.session_state[SESSION_KEY] = ws
    publish()
    return ws


def publish() -> None:
    """The workspace into the URL, touching only what changed (each change is a message)."""
    wanted = workspace().to_query()
    for key in QUERY_KEYS:
        if key not in wanted:
            if key in st.query_params:
                del st.query_params[key]
        elif st.query_params.get(key) != wanted[key]:
            st.query_params[key] = wanted[key]


def seed(widget_key: str, value) -> None:
    """Before a widget is drawn: its value from the workspace."""
    st.session_state[widget_key] = value


# --- ticks ----------------------------------------------------------------------------------


def tick_key(zoo: Zoo, name: str) -> str:
    return f"tick:{zoo.name}:{name}"


def ticked(zoo: Zoo) -> list[str]:
    """The ticked ingredients of the zoo the pages show, on any page."""
    return workspace().ticked(zoo)


def seed_ticks(zoo: Zoo) -> None:
    """Before the tick boxes are drawn: each box from the workspace."""
    chosen = set(ticked(zoo))
    for name in zoo.names:
        seed(tick_key(zoo, name), name in chosen)


def set_ticks(zoo: Zoo, names) -> None:
    """Tick exactly ``names`` (the boxes show it when they are drawn next, see ``seed_ticks``)."""
    store(workspace().with_ticks(zoo, names))


def tick_changed(zoo: Zoo, name: str) -> None:
    """``on_change`` of one tick box."""
    chosen = set(ticked(zoo))
    chosen = chosen | {name} if st.session_state[tick_key(zoo, name)] else chosen - {name}
    store(workspace().with_ticks(zoo, chosen))


# --- export ---------------------------------------------------------------------------------


def set_export(candidate: Candidate | None) -> None:
    """What the Export page offers besides the ticked set: a recipe's soup or a landscape point."""
    update(export=candidate)


def chosen_export() -> Candidate | None:
    return workspace().export


# --- landscape ------------------------------------------------------------------------------


def seed_landscape(zoo: Zoo, default: LandscapeSettings, *, choices, splits) -> None:
    """Before the Landscape widgets are drawn: each from the workspace (last state), else the
    link, else ``default``."""
    settings = workspace().landscape_for(zoo, default, choices=choices, splits=splits)
    for key, value in settings.widget_values().items():
        seed(key, value)


def landscape_changed(zoo: Zoo) -> None:
    """``on_change`` of a Landscape widget: the settings, as the widgets now hold them."""
    values = {key: st.session_state[key] for key in LandscapeSettings.widget_keys()}
    update(landscape=(zoo.name, LandscapeSettings.from_widget_values(values)))


def remember_landscape(zoo: Zoo, settings: LandscapeSettings) -> None:
    """After the widgets are drawn: the settings in the workspace and the URL."""
    if workspace().landscape != (zoo.name, settings):
        update(landscape=(zoo.name, settings))
