"""Recipes: every recipe on one board (paper Table 3 and Figure 1) and the reproduction's ablations."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from appkit.board import board_recipes, chosen_on_val
from appkit.cache import board_result, cached_ablations, recipe_significance, zoo_key
from appkit.controls import recipe_controls
from appkit.figures import BLUE, INK, VERMILION, figure_footer, series_style, show
from appkit.plain import in_figure
from appkit.room_controls import HIDDEN_NOTE, test_hidden, visible
from appkit.sidebar import sidebar
from appkit.workspace import set_export
from soup_core.evaluate import TEST, shift_average
from soup_core.export import Candidate
from soup_core.recipes import RECIPES


def export_picker(soups) -> None:
    """Pick a soup recipe, set its declared parameters, and make it the soup to export."""
    st.subheader("Pick a soup for export")
    choice = st.selectbox("Soup to export", [r.name for r in soups], format_func=lambda n: RECIPES[n].pretty_name,
                          key="recipes-export")
    splits = [s for s in (zoo.evaluator.split_names if zoo.evaluator is not None else ())
              if s != TEST and s not in zoo.evaluator.shift_names]  # held-out: never a split that reports
    params = recipe_controls(RECIPES[choice], splits, key=f"recipes-param:{choice}", names=zoo.names) \
        if RECIPES[choice].parameters else {}
    if st.button("Use for export", key="recipes-use"):
        set_export(Candidate.of_recipe(choice, **params))
        st.success(f"{RECIPES[choice].pretty_name} is ready on the Export page.")


zoo = sidebar()
st.title("Recipes")
if zoo.evaluator is None:
    st.info("Weights only: the uniform soup and Model Stock (with a base) can be made and exported; every other "
            "recipe chooses or weighs ingredients by held-out accuracy and needs an evaluator.")
    export_picker([r for r in board_recipes(zoo) if not r.needs_evaluator])
    st.stop()
evaluator = zoo.evaluator
shifts = evaluator.shift_names
if "test" not in evaluator.splits:
    st.info("This zoo's data has no test split: the board needs val and test.")
    st.stop()
available = board_recipes(zoo)
with st.spinner("Cooking…"):
    results = {r.name: board_result(zoo, r.name) for r in available}


hidden = test_hidden()
if hidden:
    st.info(HIDDEN_NOTE + " Table 3 leaves out its test columns; Figure 1 (it plots test) waits for the reveal.")


def on_test(recipe: str, against: str) -> str:
    versus = {c["split"]: c for c in recipe_significance(zoo, zoo_key(zoo), recipe, against)}
    return versus["test"]["brief"] if "test" in versus else "—"


rows = []
for recipe in available:
    result = results[recipe.name]
    m = result.metrics
    versus_columns = {} if hidden else {"test vs best": on_test(recipe.name, "best"),
                                        "test vs greedy": on_test(recipe.name, "greedy")}
    rows.append({"recipe": recipe.pretty_name, "ingredients": len(result.ingredients),
                 "chosen on val": chosen_on_val(result), "val": 100 * m["val"].accuracy,
                 **({} if hidden else {"test": 100 * m["test"].accuracy}),
                 "avg shifts": 100 * (shift_average(m, shifts) or float("nan")),
                 **{s: 100 * m[s].accuracy for s in shifts}, **versus_columns, "reference": recipe.reference})
st.subheader("Table 3, on this zoo, with the merge methods")
st.caption("Every choice is made on val; test and the shifts are reports (accuracy, %). \"test vs best\" and "
           "\"test vs greedy\" compare each row with the best individual model and with the greedy soup on the same "
           f"{len(evaluator.labels('test'))} test {evaluator.unit} (points of accuracy; exact McNemar test): a "
           "difference with p ≥ 0.05 is no evidence that they differ. Task "
           "arithmetic, TIES, DARE and Breadcrumbs add the mean task vector to θ0 scaled by the λ that is best on "
           "val, LiNeS scales it by depth with the β that is best on val, as their papers choose them (\"chosen on "
           "val\"). Ensembles cost one forward pass per ingredient at inference; soups cost one.")
st.dataframe(pd.DataFrame(rows), hide_index=True, key="recipes-table", height=35 * (len(rows) + 1) + 3,
             column_config={c: st.column_config.NumberColumn(format="%.1f")
                            for c in ("val", "test", "avg shifts", *shifts)})


def figure_1() -> None:
    """Test against the shifts' mean: each model and each recipe (paper Figure 1)."""
    individual = {n: zoo.metrics(n) for n in zoo.names}
    figure = go.Figure(go.Scatter(
        x=[100 * m["test"].accuracy for m in individual.values()],
        y=[100 * (shift_average(m, shifts) or float("nan")) for m in individual.values()], mode="markers",
        name="individual models", marker={"color": "lightgray", "size": 8, "line": {"width": 1, "color": "gray"}},
        text=[in_figure(n) for n in individual],
        hovertemplate="%{text}<br>test %{x:.1f}%<br>shifts %{y:.1f}%<extra></extra>"))
    for i, recipe in enumerate(r for r in available if r.name != "best"):
        m = results[recipe.name].metrics
        figure.add_trace(go.Scatter(x=[100 * m["test"].accuracy], y=[100 * (shift_average(m, shifts) or float("nan"))],
                                    mode="markers", name=recipe.pretty_name,
                                    marker={"size": 14, **series_style(i), "line": {"width": 1, "color": INK}}))
    figure.update_layout(xaxis_title="test accuracy (%)", yaxis_title="avg. shift accuracy (%)",
                         height=max(520, 60 + 21 * len(figure.data)))  # the legend's every row in view
    show(figure, key="recipes-figure1")
    figure_footer("figure1", "each grey dot is one fine-tuned model, each coloured marker a recipe (the legend names "
                  "them); right is better on test, up is better under distribution shift (mean over the shift splits). "
                  "Markers above the grey cloud are recipes more robust than any single model.",
                  pd.DataFrame([{"name": n, "test %": 100 * m["test"].accuracy,
                                 "avg shift %": 100 * (shift_average(m, shifts) or float("nan"))}
                                for n, m in {**individual, **{r.pretty_name: results[r.name].metrics for r in available
                                                              if r.name != "best"}}.items()]), figure=figure)


st.subheader("Figure 1, on this zoo")
if hidden:
    st.caption("Figure 1 plots test accuracy: it is drawn once the facilitator reveals test.")
else:
    figure_1()

export_picker([r for r in available if r.is_soup] + [r for r in RECIPES.values() if r.by_hand])

st.subheader("Ablations (reproduction)")
if st.toggle("Compute the ablations (5 random orders; a few seconds)", key="recipes-ablations"):
    greedy_rows, pruned_rows = cached_ablations(zoo, zoo_key(zoo))
    left, right = st.columns(2)
    ks = [r["models_considered"] for r in greedy_rows]
    greedy_fig = fig = go.Figure()
    for split, color in zip(visible(("val", "test")), (BLUE, VERMILION)):
        values = np.array([r[split] for r in greedy_rows]) * 100
        fig.add_trace(go.Scatter(x=ks, y=values.mean(1), error_y={"array": values.std(1)}, name=split,
                                 mode="lines+markers", line={"color": color}))
    fig.update_layout(title="Greedy soup vs models considered (mean ± std, 5 orders)", height=400,
                      xaxis={"type": "log", "tickvals": ks, "ticktext": [str(k) for k in ks],
                             "title": "models considered"}, yaxis_title="accuracy (%)")
    show(fig, key="ablation-greedy", where=left)
    fig = go.Figure()
    for split in visible(("val", "test")):
        fig.add_trace(go.Scatter(x=[r["passes"] for r in pruned_rows], y=[100 * r[split] for r in pruned_rows],
                                 name=split, mode="lines+markers"))
    fig.update_layout(title="Pruned soup vs passes", xaxis_title="passes", yaxis_title="accuracy (%)", height=400)
    show(fig, key="ablation-pruned", where=right)
    figure_footer("ablations", "left, the greedy soup's accuracy when only the first k models (random orders) are "
                  "offered; right, the pruned soup after each extra pass of removals.",
                  raw={"greedy_vs_models_considered": [{k: v for k, v in r.items() if k != "test" or not hidden}
                                                       for r in greedy_rows],
                       "pruned_vs_passes": [{k: v for k, v in r.items() if k != "test" or not hidden}
                                            for r in pruned_rows]},
                  figure=(greedy_fig, fig))
