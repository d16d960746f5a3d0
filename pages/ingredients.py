"""Ingredients: the checkpoints, a tick box each, and the live soup of the ticked set."""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from appkit.cache import checkpoint_table, live_soup, recipe_result, zoo_key
from appkit.figures import BLUE, GREEN, LEGEND_ABOVE, VERMILION, figure_footer, show
from appkit.plain import in_figure, literal, percent
from appkit.room_controls import HIDDEN_NOTE, submit_to_room, test_hidden, visible
from appkit.sidebar import sidebar
from appkit.timing import timed_fragment
from appkit.workspace import seed_ticks, set_ticks, tick_changed, tick_key, ticked

zoo = sidebar()
st.title("Ingredients")
st.caption("Each row is one checkpoint fine-tuned from θ0: its hyperparameters, then its accuracy (%) on **val** "
           "(the held-out split every recipe chooses on), **test** (reported, never chosen on) and **shifts** (the "
           "mean over the distribution-shift splits: the same test images blurred, noised, shifted…). Sort by a "
           "column's header to read it; tick checkpoints below (one box each), or select points in the "
           "hyperparameter view and tick or untick them together.")
st.metric("Checkpoints", len(zoo.names))
if test_hidden():
    st.info(HIDDEN_NOTE)
table = checkpoint_table(zoo)
table = table.drop(columns=[c for c in ("test",) if c in table and c not in visible(table.columns)])
if "val" in table and len(table) > 1:
    bounds = (float(table["val"].min()), float(table["val"].max()))
    if bounds[0] < bounds[1]:
        low, high = st.slider("Show the checkpoints whose val accuracy (%) is between", *bounds, bounds, step=0.1,
                              format="%.1f", key="ingredients-val-range")
        table = table[(table["val"] >= low - 1e-9) & (table["val"] <= high + 1e-9)].reset_index(drop=True)
# One way to tick (the boxes below): the table selects nothing of its own, so it is never out of step with them.
st.dataframe(table, hide_index=True, key="ingredients-table",
             column_config={s: st.column_config.NumberColumn(f"{s} (%)", format="%.1f")
                            for s in ("val", "test", "shifts")})
selected: list[str] = []


def tick_these(names, value: bool) -> None:
    """``on_click``: tick (or untick) ``names``, leaving the other boxes as they are."""
    chosen = set(ticked(zoo))
    set_ticks(zoo, chosen | set(names) if value else chosen - set(names))


hparams = [c for c in table.columns if c not in ("checkpoint", "val", "test", "shifts")
           and pd.api.types.is_numeric_dtype(table[c]) and table[c].nunique() > 1]
if hparams and "val" in table:
    with st.expander("Hyperparameter view: which settings gave the good models?"):
        x = st.selectbox("Hyperparameter", hparams, key="hparam-x")
        chosen_now = set(ticked(zoo))
        values = table[x].astype(float)
        log = bool((values > 0).all() and values.max() / values.min() >= 10)
        view = go.Figure(go.Scatter(
            x=values, y=table["val"], mode="markers", customdata=table["checkpoint"], text=table["checkpoint"].map(in_figure),
            marker={"size": 10, "color": [BLUE if n in chosen_now else "lightgray" for n in table["checkpoint"]],
                    "line": {"width": 1, "color": "black"}},
            hovertemplate="%{text}<br>" + x + " %{x}<br>val %{y:.1f}%<extra></extra>"))
        view.update_layout(height=380, xaxis={"title": x + (" (log scale)" if log else ""),
                                              "type": "log" if log else "linear"},
                           yaxis_title="val accuracy (%)", margin={"t": 20})
        event = show(view, key="hparam-chart", on_select="rerun", selection_mode=("points", "box", "lasso"))
        st.caption("How to read this: one dot per checkpoint shown in the table, blue when ticked; select dots "
                   "(click, box or lasso) to tick or untick them together.")
        selected += [p["customdata"] for p in (event["selection"]["points"] if event else []) if "customdata" in p]
selected = list(dict.fromkeys(selected))
if selected:
    left, right, _ = st.columns([1, 1, 3])
    left.button(f"Tick the {len(selected)} selected", key="tick-selected", on_click=tick_these, args=(selected, True))
    right.button(f"Untick the {len(selected)} selected", key="untick-selected", on_click=tick_these,
                 args=(selected, False))


def top_by_val(k: int) -> list[str]:
    """The k best checkpoints on val (the held-out split: choosing on test would flatter the soup)."""
    table = checkpoint_table(zoo)
    return list(table.sort_values("val", ascending=False, kind="stable")["checkpoint"][:k]) if "val" in table else []


@st.fragment
@timed_fragment("Ingredients")
def soup_of_the_ticked_set() -> None:
    st.subheader("Your soup")
    seed_ticks(zoo)
    buttons = st.columns(4)
    buttons[0].button("Tick all", key="tick-all", on_click=set_ticks, args=(zoo, zoo.names))
    buttons[1].button("Tick none", key="tick-none", on_click=set_ticks, args=(zoo, ()))
    if zoo.evaluator is not None:
        k = min(5, len(zoo.names))
        buttons[2].button(f"Tick the top {k} on val", key="tick-top", on_click=set_ticks,
                          args=(zoo, top_by_val(k)))
    columns = st.columns(8)
    for i, name in enumerate(zoo.names):
        columns[i % 8].checkbox(literal(name), key=tick_key(zoo, name), on_change=tick_changed, args=(zoo, name))
    chosen = ticked(zoo)
    if not chosen:
        st.warning("Tick at least one ingredient.")
        return
    if zoo.evaluator is None:
        st.info(f"The uniform soup of {len(chosen)} ingredient(s) is ready on the Export page; scoring it "
                "needs an evaluator.")
        return
    live = live_soup(zoo, chosen)
    hidden = test_hidden()  # the room is read once a tick
    for label, key in ((f"Uniform soup of {len(chosen)}", "soup"),
                       (f"Best individual ({live['best_name']})", "best"), ("Logit ensemble", "ensemble")):
        cols = st.columns([2, 1, 1, 1])
        cols[0].markdown(f"**{label}**")
        for col, split in zip(cols[1:], visible(live[key], hidden)):
            col.metric(f"{key} {split}", percent(live[key][split]))
    ties = live["best_ties_on_val" if hidden else "best_ties"]
    if ties:
        st.caption(literal(ties))  # checkpoint names, shown as typed
    for label, key in (("Uniform soup", "uniform"), ("Logit ensemble", "ensemble")):
        versus = live["versus"][key]
        if versus is not None and versus.split in visible([versus.split], hidden):
            st.caption(f"{label} vs the {literal(versus.a)} on {versus.split}: {versus.sentence()} "
                       f"(exact McNemar test; 95% interval {100 * versus.interval[0]:+.1f} to "
                       f"{100 * versus.interval[1]:+.1f} points).")
    submit_to_room(zoo, chosen)


@st.fragment
@timed_fragment("Ingredients")
def replay() -> None:
    if zoo.evaluator is None:
        return
    st.subheader("Watch a recipe")
    st.caption("Greedy soup (paper Recipe 1) and pruned soup (reproduction, Algorithm 2) on the ticked "
               "checkpoints, choices made on val.")
    recipe = st.radio("Recipe", ["greedy", "pruned"], horizontal=True, key="replay-recipe")
    if not st.button("Run", key="replay-run") and f"replayed:{zoo.name}:{recipe}" not in st.session_state:
        return
    st.session_state[f"replayed:{zoo.name}:{recipe}"] = True
    chosen = ticked(zoo)
    if not chosen:
        st.warning("Tick at least one ingredient to replay a recipe on.")
        return
    with st.spinner("Cooking…"):
        result = recipe_result(zoo, zoo_key(zoo), recipe, tuple(chosen))
    if st.button(f"Tick this soup's {len(result.ingredients)} ingredient(s)", key="replay-apply"):
        # The tick boxes live in another fragment: set the workspace, then redraw the whole page.
        set_ticks(zoo, result.ingredients)
        st.rerun(scope="app")
    steps = [s.to_dict() for s in result.trace]
    step = st.slider("Step", 1, len(steps), len(steps), key=f"replay-step:{recipe}")
    current = steps[step - 1]
    verdict = "accepted" if current["accepted"] else "rejected"
    st.markdown(f"Step {step}: **{current['action']} {literal(current['candidate'])}** → "
                f"val {percent(current['score'])} "
                f"({verdict}); soup now {len(current['ingredients'])} ingredient(s).")
    frame = pd.DataFrame(steps[:step])
    frame.insert(0, "step", range(1, len(frame) + 1))
    frame["val %"] = 100 * frame["score"]
    frame["soup val %"] = frame["val %"].where(frame["accepted"]).ffill()  # the soup after each step
    # The axis spans the soup's progress; a candidate far below it sits on the floor, its score in the hover.
    kept = frame["soup val %"].dropna()
    floor = float((kept.min() if len(kept) else frame["val %"].min()) - 1.0)
    top = float(frame["val %"].max() + 0.5)
    below = frame["val %"] < floor
    chart = go.Figure([
        go.Scatter(x=frame["step"], y=frame["soup val %"], mode="lines", name="the soup after each step",
                   line={"color": BLUE, "width": 3, "shape": "hv"}, hoverinfo="skip"),
        go.Scatter(x=frame["step"], y=frame["val %"].clip(lower=floor), mode="markers", name="each step's candidate",
                   marker={"color": [GREEN if a else VERMILION for a in frame["accepted"]], "size": 10,
                           "symbol": ["triangle-down" if b else "circle" for b in below]},
                   customdata=frame["val %"], text=frame["candidate"].map(in_figure),
                   hovertemplate="step %{x}: %{text}<br>val %{customdata:.1f}%<extra></extra>")])
    chart.update_layout(height=320, xaxis_title="step (as on the slider)", yaxis_title="val accuracy (%)",
                        yaxis={"range": [floor - 0.3, top]}, xaxis={"dtick": 1 if len(frame) <= 20 else None},
                        legend=LEGEND_ABOVE, margin={"t": 40})
    show(chart, key=f"replay-chart:{recipe}")
    figure_footer(f"replay-{recipe}", "the blue line is the soup's val accuracy after each step; each dot is that "
                  "step's candidate soup: green kept (the line moves to it), orange rejected (the line stays). The "
                  "axis spans the soup's progress, so small differences show"
                  + (f"; {int(below.sum())} rejected candidate(s) scored below it, drawn as ▼ on its floor (their "
                     "score in the hover and the table)." if below.any() else "."),
                  frame[["step", "candidate", "action", "val %", "accepted", "soup val %"]], figure=chart)
    st.dataframe(frame[["step", "candidate", "action", "val %", "accepted", "soup val %"]], hide_index=True,
                 column_config={c: st.column_config.NumberColumn(format="%.1f") for c in ("val %", "soup val %")})


soup_of_the_ticked_set()
replay()
