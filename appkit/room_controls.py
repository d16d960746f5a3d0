"""The room in the app: the participant's "Submit to the room" (on Ingredients), the facilitator's
unlock, and the room's table as the Room page shows it (:mod:`appkit.room` keeps the data)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from appkit.cache import board_result, recipe_result, zoo_key
from appkit.plain import error
from appkit.room import MAX_NAME, Room, RoomError, Submission, default_path, is_facilitator, new_token
from appkit.workspace import update, workspace
from soup_core.evaluate import TEST, VAL
from soup_core.export import link_names
from soup_core.zoo import Zoo, sample_zoos

FACILITATOR_QUERY = "facilitator"
REFERENCES = (("greedy", "Greedy soup (reference)"), ("best", "Best model (reference)"),
              ("uniform", "Uniform soup of all (reference)"))


@st.cache_resource(show_spinner=False)
def _room_at(path: str) -> Room:
    return Room(Path(path))


def room() -> Room:
    """The server's room (``SOUP_ROOM_DB``); the same file for every session and process."""
    return _room_at(str(default_path()))


def unlock_facilitator() -> bool:
    """Whether this session holds the facilitator's token: from ``?facilitator=`` (taken out of the
    URL at once, so no link carries it) or the Room page's field. A wrong token changes nothing."""
    given = st.query_params.get(FACILITATOR_QUERY)
    if given is not None:
        del st.query_params[FACILITATOR_QUERY]
        if is_facilitator(given):
            st.session_state["room-facilitator"] = True
    return bool(st.session_state.get("room-facilitator"))


def test_hidden() -> bool:
    """Whether the facilitator hides test on every page until the reveal (:meth:`Room.hiding`)."""
    return room().hiding()


def visible(splits, hidden: bool | None = None) -> list[str]:
    """``splits`` as a page may show them: without test while the facilitator hides it (``hidden``:
    :func:`test_hidden` when a run already read it, so that a tick reads the room once)."""
    hidden = test_hidden() if hidden is None else hidden
    return [s for s in splits if not (hidden and s == TEST)]


HIDDEN_NOTE = ("Test is hidden until the facilitator reveals it: every page shows val (what every choice is made "
               "on) and the shifts only.")


def follow_the_presenter() -> str | None:
    """Before the Tour draws anything: a session that is not the facilitator's takes the zoo and
    step the presenter pinned (:meth:`Room.present`); returns that step, or None when no one presents."""
    if st.session_state.get("room-facilitator"):
        return None
    pinned = room().presented()
    if pinned is None:
        return None
    zoo, step = pinned
    if zoo != workspace().zoo and zoo in sample_zoos():
        update(zoo=zoo, folder="")
    return step


def present_the_tour(zoo: Zoo, step: str) -> None:
    """The facilitator's switch on the Tour: while on, every open Tour follows this zoo and step."""
    def switched() -> None:
        if not st.session_state.get("tour-present"):
            room().stop_presenting()
    if st.checkbox("Present: every participant's Tour follows my zoo and step", key="tour-present",
                   on_change=switched):
        if room().presented() != (zoo.name, step):
            room().present(zoo.name, step)


@st.fragment(run_every=3)
def watch_the_presenter(shown: tuple[str, str]) -> None:
    """A follower's Tour redraws when the presenter moves (polled every 3 s; one SQLite read)."""
    pinned = room().presented()
    if pinned is not None and (pinned[1] != shown[1] or pinned[0] != shown[0] and pinned[0] in sample_zoos()):
        st.rerun(scope="app")


def submit_to_room(zoo: Zoo, chosen: list[str]) -> None:
    """Name and button on Ingredients: records the uniform soup of the ticked set under the
    participant's token (made on the first submission and kept in their link as ``me=``)."""
    if zoo.evaluator is None or VAL not in zoo.evaluator.splits:
        return
    with st.expander("Submit to the room"):
        st.caption("The room's table ranks everyone's soups by val accuracy; test stays hidden until the "
                   "facilitator reveals it. Submitting again replaces your own entry.")
        name = st.text_input("Your name", key="room-name", max_chars=MAX_NAME)
        if not st.button("Submit to the room", key="room-submit"):
            return
        token = workspace().me or new_token()
        metrics = recipe_result(zoo, zoo_key(zoo), "uniform", tuple(chosen)).metrics
        try:
            room().submit(zoo.name, token, name, tuple(chosen), val=metrics[VAL].accuracy,
                          test=metrics[TEST].accuracy if TEST in metrics else None)
        except RoomError as exc:
            error(str(exc))
            return
        update(me=token)
        st.success(f"Submitted: the soup of {len(chosen)} ingredient(s), {100 * metrics[VAL].accuracy:.1f}% on val. "
                   "See it on the Room page.")


def restore_link(zoo: Zoo, ingredients: tuple[str, ...]) -> str:
    """A relative link that opens the zoo with these ingredients ticked."""
    from urllib.parse import urlencode
    return "./?" + urlencode({"zoo": zoo.name, "use": link_names(ingredients)})


def room_table(zoo: Zoo, entries: list[Submission], revealed: bool) -> pd.DataFrame:
    """The participants' rows, then the reference rows; test (and p against greedy) only when revealed."""
    from soup_core.significance import versus
    greedy = board_result(zoo, "greedy")
    rows = []
    for rank, s in enumerate(entries, 1):
        row = {"rank": str(rank), "name": s.name, "ingredients": len(s.ingredients), "val (%)": 100 * s.val}
        if revealed and s.test is not None:
            soup = recipe_result(zoo, zoo_key(zoo), "uniform", s.ingredients)
            comparison = versus(greedy, soup, zoo.ingredients(), zoo.evaluator, [TEST])[0]
            row |= {"test (%)": 100 * s.test, "p vs greedy (test)": comparison.p_value}
        rows.append(row | {"link": restore_link(zoo, s.ingredients)})
    for recipe, label in REFERENCES:
        result = board_result(zoo, recipe)
        row = {"rank": "—", "name": label, "ingredients": len(result.ingredients),
               "val (%)": 100 * result.metrics[VAL].accuracy}
        if revealed and TEST in result.metrics:
            row |= {"test (%)": 100 * result.metrics[TEST].accuracy}
        rows.append(row | {"link": restore_link(zoo, result.ingredients)})
    table = pd.DataFrame(rows)
    if not revealed:
        table.insert(4, "test", "hidden until revealed")
    return table
