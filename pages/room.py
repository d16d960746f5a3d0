"""Room: the soups the participants submitted, ranked on val; test hidden until the facilitator reveals it."""

import html
import os

import plotly.graph_objects as go
import streamlit as st

from appkit.figures import BLUE, VERMILION, figure_footer, show
from appkit.room import FACILITATOR_ENV, is_facilitator
from appkit.room_controls import room, room_table, unlock_facilitator
from appkit.sidebar import sidebar

zoo = sidebar()
st.title("Room")
st.caption("Everyone's soups on this zoo, submitted from the Ingredients page, ranked by **val** accuracy (the "
           "split every choice is made on). **Test** stays hidden until the facilitator reveals it: then the room "
           "sees how well choosing on val carried over to data no one chose on.")
facilitator = unlock_facilitator()
if os.environ.get(FACILITATOR_ENV) and not facilitator:
    with st.expander("Facilitator"):
        given = st.text_input("Facilitator token", type="password", key="room-token-field")
        if st.button("Unlock", key="room-unlock") and is_facilitator(given):
            st.session_state["room-facilitator"] = True
            st.rerun()

if zoo.evaluator is None:
    st.info("This zoo has no held-out data, so the room has nothing to rank; open a zoo with val and test data.")
    st.stop()


@st.fragment(run_every=5)
def leaderboard() -> None:
    """The table and the chart, redrawn every few seconds as submissions arrive."""
    shared = room()
    revealed = shared.revealed()
    entries = shared.submissions(zoo.name)
    st.subheader(f"{len(entries)} submission(s)" + (" · test revealed" if revealed else ""))
    table = room_table(zoo, entries, revealed)
    st.dataframe(table, hide_index=True, key="room-table", column_config={
        "val (%)": st.column_config.NumberColumn(format="%.1f"), "test (%)": st.column_config.NumberColumn(format="%.1f"),
        "p vs greedy (test)": st.column_config.NumberColumn(format="%.2g"),
        "link": st.column_config.LinkColumn("link", display_text="open")})
    people, references = table[table["rank"] != "—"], table[table["rank"] == "—"]
    x, title = ("test (%)", "test accuracy (%)") if revealed else ("ingredients", "number of ingredients")
    fig = go.Figure()  # names in hover text escaped: Plotly reads <a>, <b>… in it
    fig.add_trace(go.Scatter(x=people[x], y=people["val (%)"], mode="markers", name="participants",
                             text=[html.escape(n) for n in people["name"]], marker={"size": 11, "color": BLUE},
                             hovertemplate="%{text}<br>" + title + " %{x}<br>val %{y:.1f}%<extra></extra>"))
    fig.add_trace(go.Scatter(x=references[x], y=references["val (%)"], mode="markers", name="references",
                             text=[html.escape(n) for n in references["name"]], marker={"size": 13, "symbol": "diamond", "color": VERMILION},
                             hovertemplate="%{text}<br>" + title + " %{x}<br>val %{y:.1f}%<extra></extra>"))
    fig.update_layout(xaxis_title=title, yaxis_title="val accuracy (%)", height=420,
                      legend={"orientation": "h", "y": -0.2})
    show(fig, key="room-chart")
    how = ("each dot is one soup: its val accuracy (chosen on) against its test accuracy (never chosen on); "
           "diamonds are the references" if revealed else
           "each dot is one soup: its val accuracy against how many checkpoints it averages; diamonds are the "
           "references (greedy soup, best model, uniform soup of all)")
    figure_footer("room", how, table.drop(columns=["link"]), figure=fig)
    if facilitator:
        controls(shared, revealed, len(entries))


def controls(shared, revealed: bool, count: int) -> None:
    st.subheader("Facilitator")
    left, middle, right = st.columns(3)
    if left.button("Hide test" if revealed else "Reveal test", key="room-reveal"):
        shared.reveal(not revealed)
        st.rerun()
    middle.download_button("Room as CSV", shared.csv(zoo.name), file_name=f"room-{zoo.name}.csv",
                           mime="text/csv", key="room-submissions-csv")
    hiding = shared.hiding()  # the key follows the room's state, which another facilitator may change
    wanted = left.checkbox("Hide test on every page until revealed", value=hiding, disabled=revealed,
                           key=f"room-hide-everywhere:{hiding}", help="Every page then shows val and the shifts "
                           "only; revealing test shows it everywhere again.")
    if wanted != hiding:
        shared.hide_everywhere(wanted)
        st.rerun()
    sure = right.checkbox(f"Remove all {count} submission(s)", key="room-reset-sure")
    if right.button("Reset the room", key="room-reset", disabled=not sure):
        shared.reset(zoo.name)
        st.rerun()


leaderboard()
