"""Landscape: error and loss in the plane through three points (paper Figure 2)."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from appkit.workspace import load_zoo, sidebar
from soup_core.geometry import plane_basis
from soup_core.landscape import BN_POLICIES, plane_landscape
from soup_core.zoo import BASE, zoo_point

zoo = sidebar()
st.title("Landscape")
st.caption("The plane through three points, origin at the first; axes in parameter-space L2 units. "
           "Every other checkpoint and the soups are projected onto it (distance off the plane in the hover).")
if zoo.evaluator is None:
    st.info("Landscapes need an evaluator (a model factory and data).")
    st.stop()

SOUPS = ["uniform", "greedy"]
choices = ([BASE] if zoo.has_base else []) + list(zoo.names) + SOUPS


@st.cache_resource(show_spinner="Making the plane…")
def plane_for(zoo_name: str, a: str, b: str, c: str):
    z = load_zoo(zoo_name)
    plane = plane_basis(*(zoo_point(z, n)[0] for n in (a, b, c)), names=(a, b, c))
    others = [n for n in ([BASE] if z.has_base else []) + list(z.names) + SOUPS if n not in (a, b, c)]
    return plane, [plane.project(zoo_point(z, n)[0], n) for n in others]


@st.fragment
def landscape_view() -> None:
    cols = st.columns(3)
    defaults = [0, 1, 2] if not zoo.has_base else [0, 1, 2]
    points = [col.selectbox(label, choices, index=defaults[i], key=f"land-{label}")
              for i, (col, label) in enumerate(zip(cols, ("Origin A", "Point B", "Point C")))]
    cols = st.columns(4)
    grid = cols[0].slider("Grid", 5, 41, 15, step=2, key="land-grid")
    margin = cols[1].slider("Margin", 0.0, 1.0, 0.2, key="land-margin")
    split = cols[2].selectbox("Split", list(zoo.evaluator.split_names), key="land-split")
    bn = cols[3].selectbox("BatchNorm", BN_POLICIES, key="land-bn")
    if len(set(points)) < 3:
        st.warning("Pick three different points.")
        return
    key = (zoo.name, *points, grid, margin, split, bn)
    if st.button("Compute", key="land-compute", type="primary"):
        try:
            plane, projections = plane_for(zoo.name, *points)
        except ValueError as exc:
            st.error(str(exc))
            return
        bar = st.progress(0.0, text="Computing…")
        result = plane_landscape(zoo.evaluator, plane, grid=grid, margin=margin, splits=[split], bn=bn,
                                 projections=projections,
                                 progress=lambda f, m: bar.progress(min(f, 1.0), text=m))
        bar.empty()
        st.session_state["landscape"] = (key, result)
    if "landscape" not in st.session_state:
        return
    shown_key, result = st.session_state["landscape"]
    if shown_key != key:
        st.caption("Settings changed: press Compute to update.")
    s = result.splits[0]
    figure = go.Figure(go.Contour(x=result.xs, y=result.ys, z=100 * result.preview(result.error[s]),
                                  colorscale="Viridis", colorbar={"title": f"{s} error %"},
                                  contours={"showlabels": True}))
    figure.add_trace(go.Scatter(
        x=[p.xy[0] for p in result.projections], y=[p.xy[1] for p in result.projections], mode="markers",
        marker={"color": "white", "size": 7, "line": {"width": 1, "color": "black"}}, name="projections",
        text=[f"{p.name}<br>off plane {p.off_plane:.3f}" for p in result.projections], hoverinfo="text"))
    figure.add_trace(go.Scatter(
        x=[a.xy[0] for a in result.anchors], y=[a.xy[1] for a in result.anchors], mode="markers+text",
        marker={"color": "red", "size": 12, "symbol": "star"}, text=[a.name for a in result.anchors],
        textposition="top center", name="anchors"))
    figure.update_layout(height=600, xaxis_title="x (L2)", yaxis_title="y (L2)",
                         yaxis={"scaleanchor": "x"}, legend={"orientation": "h"})
    st.plotly_chart(figure, key="land-chart")
    best = np.unravel_index(np.nanargmin(result.error[s]), result.error[s].shape)
    st.write(f"Lowest {s} error {100 * result.error[s][best]:.2f}% at "
             f"({result.xs[best[1]]:.3f}, {result.ys[best[0]]:.3f}); BatchNorm: {result.bn}.")


landscape_view()
