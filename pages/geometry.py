"""Geometry: angles between fine-tuned solutions, Figures 3 and 4, and 1D interpolation paths."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from appkit.cache import cached_angles, cached_pairs, cached_path, path_policy, zoo_key
from appkit.figures import figure_footer, show
from appkit.plain import in_figure
from appkit.room_controls import visible
from appkit.sidebar import sidebar
from soup_core.policies import BN_POLICIES, CURVATURE_WORDS
from soup_core.zoo import BASE

zoo = sidebar()
st.title("Geometry")
if not zoo.has_base:
    st.info("Angles are measured between θi − θ0 and need the base checkpoint θ0 (`base = ...` in zoo.toml); "
            "this zoo has none, so they are taken between the weights themselves.")
angles = cached_angles(zoo, zoo_key(zoo))
names = list(zoo.names)
shown = [in_figure(n) for n in names]  # names drawn as typed (Plotly reads tags in labels)
every = {"tickmode": "array", "tickvals": shown, "ticktext": shown}  # every checkpoint labelled, not every other
heatmap = go.Figure(go.Heatmap(z=angles["angle_deg"], x=shown, y=shown, colorscale="Viridis",
                               colorbar={"title": "angle (°)"}, hovertemplate="%{y} vs %{x}: %{z:.1f}°<extra></extra>"))
heatmap.update_layout(title="Angle between θi − θ0 and θj − θ0", height=max(560, 160 + 20 * len(names)),
                      xaxis={**every, "title": "checkpoint j"},
                      yaxis={**every, "title": "checkpoint i", "autorange": "reversed"})
show(heatmap, key="geometry-angles")  # each figure the page's width: every checkpoint's label has room
norms = go.Figure(go.Bar(x=shown, y=angles["norm"]))
norms.update_layout(title="‖θi − θ0‖ (L2)", height=380, xaxis={**every, "title": "checkpoint"},
                    yaxis_title="L2 distance from θ0")
show(norms, key="geometry-norms")
figure_footer("angles", "each cell is the angle between two checkpoints' fine-tuning updates θ − θ0 (90° = "
              "orthogonal); the bars are how far each checkpoint moved from θ0. Over the parameters only.",
              pd.DataFrame([{"i": a, "j": b, "angle_deg": angles["angle_deg"][i][j], "cosine": angles["cosine"][i][j],
                             "distance": angles["distance"][i][j]} for i, a in enumerate(names)
                            for j, b in enumerate(names)]), figure=(heatmap, norms))

if zoo.evaluator is None:
    st.stop()

st.subheader("Figures 3 and 4: pairs of models")
default = names[: min(10, len(names))]
chosen = st.multiselect("Checkpoints to pair (every pair is analysed)", names, default=default, key="geometry-pairs")
report_splits = visible(zoo.evaluator.split_names)
split = st.selectbox("Report split", report_splits, index=report_splits.index("test") if "test" in report_splits else 0,
                     key="geometry-split")
if len(chosen) >= 2 and st.button(f"Analyse {len(chosen) * (len(chosen) - 1) // 2} pairs", key="geometry-run"):
    st.session_state["geometry:pairs"] = (tuple(chosen), split)
if "geometry:pairs" in st.session_state:
    chosen_pairs, pair_split = st.session_state["geometry:pairs"]
    if pair_split not in report_splits:  # analysed on test before the facilitator hid it
        pair_split = split
    report = cached_pairs(zoo, zoo_key(zoo), chosen_pairs, pair_split)
    pairs = report["pairs"]
    labels = [f"{in_figure(p['a'])} × {in_figure(p['b'])}" for p in pairs]
    c1, c2 = st.columns(2)
    shown = []
    if zoo.has_base:
        r = report["correlations"]["angle_vs_interpolation_advantage"]
        fig3 = go.Figure(go.Scatter(
            x=[p["angle_deg"] for p in pairs], y=[100 * p["interpolation_advantage"] for p in pairs], mode="markers",
            text=labels, hovertemplate="%{text}<br>%{x:.1f}°, %{y:+.1f} pts<extra></extra>"))
        fig3.update_layout(title=f"Interpolation advantage vs angle (r = {r or float('nan'):+.2f})",
                           xaxis_title="angle φ (degrees)", yaxis_title=f"advantage on {pair_split} (points)", height=420)
        show(fig3, key="geometry-fig3", where=c1)
        shown.append(fig3)
    lo = min(min(p["soup_accuracy"], p["ensemble_accuracy"]) for p in pairs) * 100
    hi = max(max(p["soup_accuracy"], p["ensemble_accuracy"]) for p in pairs) * 100
    fig4 = go.Figure([go.Scatter(
        x=[100 * p["ensemble_accuracy"] for p in pairs], y=[100 * p["soup_accuracy"] for p in pairs], mode="markers",
        text=labels, name="pairs", hovertemplate="%{text}<br>ensemble %{x:.1f}%, soup %{y:.1f}%<extra></extra>"),
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dot", "color": "gray"}, name="y = x")])
    fig4.update_layout(title="Two-model soup vs two-model ensemble", xaxis_title=f"ensemble {pair_split} accuracy (%)",
                       yaxis_title=f"soup {pair_split} accuracy (%)", height=420)
    show(fig4, key="geometry-fig4", where=c2)
    shown.append(fig4)
    figure_footer("pairs", "left, one dot per pair: how much averaging the two gains over their mean accuracy "
                  "against the angle between them (paper Figure 3); right, the two-model soup against the two-model "
                  "ensemble (Figure 4): dots above the dotted line are pairs where the soup wins.",
                  pd.DataFrame(pairs).drop(columns=[c for c in ("curve",) if c in pairs[0]]), figure=tuple(shown))
    r_loss = report["correlations"]["approximation_vs_loss_difference"]
    how = " and ".join(CURVATURE_WORDS[m] for m in sorted({p["curvature_method"] for p in pairs}))
    strength = ("n/a" if r_loss is None else
                f"{r_loss:+.2f}: " + ("the approximation tracks the measured difference" if r_loss >= 0.5 else
                                      "the approximation does not track the measured difference here"))
    r_var = report["correlations"]["variance_term_vs_ensemble_gain"]
    st.caption(f"§4 approximation of the soup − ensemble loss difference vs the measured one over {len(pairs)} "
               f"pairs: r = {strength}; same sign in {report['approximation_sign_agreement']}/{len(pairs)} pairs. "
               f"Curvature {how}; β fitted on val. Its ensemble term alone against the ensemble's gain over the "
               f"two models' mean loss: r = {'n/a' if r_var is None else f'{r_var:+.2f}'}.")

st.subheader("Interpolation between two points")
points = ([BASE] if zoo.has_base else []) + names + ["uniform", "greedy"]
c1, c2, c3 = st.columns(3)
a = c1.selectbox("From", points, index=0, key="geometry-a")
b = c2.selectbox("To", points, index=min(1, len(points) - 1), key="geometry-b")
if path_policy(zoo) != "keep":
    bn = path_policy(zoo, c3.selectbox("BatchNorm", BN_POLICIES, key="geometry-bn"))
else:  # nothing to choose: a policy shown here would do nothing
    bn = path_policy(zoo)
    c3.caption("BatchNorm: none in this model, so there are no running statistics to choose a policy for.")
if a != b:
    path = cached_path(zoo, zoo_key(zoo), a, b, bn)
    path_splits = visible(path["error"])
    fig = go.Figure()
    for s in path_splits:
        fig.add_trace(go.Scatter(x=path["alphas"], y=100 * np.array(path["error"][s]), name=f"{s} error",
                                 mode="lines+markers"))
    fig.add_vline(x=0, line_dash="dot")
    fig.add_vline(x=1, line_dash="dot")
    fig.update_layout(title=f"(1 − α)·{in_figure(a)} + α·{in_figure(b)}", xaxis_title="α", yaxis_title="error (%)", height=420)
    show(fig, key="geometry-path")
    figure_footer("path", f"error along the straight line from {a} (α = 0) to {b} (α = 1), past both ends; a bump "
                  "above the straight line between the ends is a barrier between two basins.",
                  pd.DataFrame({"alpha": path["alphas"], **{f"{s} error": path["error"][s] for s in path_splits},
                                **{f"{s} loss": path["loss"][s] for s in path_splits}}), figure=fig)
    last = path_splits[-1]
    st.write(f"Error barrier on {last}: {100 * path['barrier'][last]['error']:.1f} points; "
             f"loss barrier {path['barrier'][last]['loss']:.4f} (paper App. J.1). BatchNorm: {path['bn']}.")
