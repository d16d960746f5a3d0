"""Landscape: error and loss in the plane through three points (paper Figure 2)."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from appkit.admission import HEAVY_WORK
from appkit.board import board_recipes, chosen_on_val
from appkit.cache import board_made, board_result, computed_landscapes, export_plan, ray_cluster, recipe_result, zoo_key
from appkit.figures import LEGEND_ABOVE, html_text, label_points, plane_scale, scale_note, show
from appkit.interrupt import Interruptible
from appkit.plain import error, in_figure, percent
from appkit.room_controls import visible
from appkit.sidebar import sidebar
from appkit.timing import timed_fragment
from appkit.uploads import uploads_of
from appkit.workers import WorkerDied, heavy
from appkit.workspace import LandscapeSettings, landscape_changed, remember_landscape, seed_landscape, set_export
from soup_core import distributed
from soup_core.errors import SoupError
from soup_core.evaluate import shift_average
from soup_core.export import Candidate
from soup_core.policies import BN_POLICIES, PRECISIONS
from soup_core.recipes import RECIPES
from soup_core.zoo import BASE, Zoo, zoo_plane, zoo_point

zoo = sidebar()
st.title("Landscape")
st.caption("The plane through three points, origin at the first; axes in parameter-space L2 units. "
           "Every other checkpoint and the soups are projected onto it (distance off the plane in the hover).")
if zoo.evaluator is None:
    st.info("Landscapes need an evaluator (a model factory and data).")
    st.stop()

SOUPS = ["uniform", "greedy"]
RAY_WORKERS = 2
choices = ([BASE] if zoo.has_base else []) + list(zoo.names) + SOUPS


@st.cache_resource(show_spinner="Making the plane…", max_entries=32)
def plane_for(_zoo: Zoo, key: tuple, a: str, b: str, c: str, with_methods: bool = True):
    """The plane, and every other checkpoint, soup and (``with_methods``) merge method, as the board makes
    them, projected onto it."""
    plane = zoo_plane(_zoo, (a, b, c))
    others = [n for n in ([BASE] if _zoo.has_base else []) + list(_zoo.names) if n not in (a, b, c)]
    soups = [r.name for r in board_recipes(_zoo) if r.is_soup and r.name != "best" and r.name not in (a, b, c)
             and (with_methods or r.family == "soup")]
    return plane, ([plane.project(zoo_point(_zoo, n)[0], n) for n in others]
                   + [plane.project(board_result(_zoo, n).state_dict, n) for n in soups])


@st.cache_resource(show_spinner="Merging…", max_entries=128)
def method_point(_zoo: Zoo, key: tuple, plane_points: tuple[str, str, str], recipe: str, density: float):
    """A sparsifying merge method at ``density`` (λ chosen on val), projected onto the plane; its result."""
    result = recipe_result(_zoo, key, recipe, None, (*RECIPES[recipe].app_values, ("density", density)))
    return plane_for(_zoo, key, *plane_points)[0].project(result.state_dict, recipe), result


@st.fragment
@timed_fragment("Landscape")
def landscape_view() -> None:
    splits = visible(zoo.evaluator.split_names)
    default = LandscapeSettings(tuple(choices[:3]), split=splits[0])
    seed_landscape(zoo, default, choices=choices, splits=splits)  # the last settings, a shared link's, or these
    cols = st.columns(3)
    changed = {"on_change": landscape_changed, "args": (zoo,)}
    points = [col.selectbox(label, choices, key=key, **changed)
              for col, label, key in zip(cols, ("Origin A", "Point B", "Point C"), LandscapeSettings.WIDGETS["points"])]
    cols = st.columns(5)
    grid = cols[0].slider("Grid", 5, 41, step=2, key="land-grid", **changed)
    margin = cols[1].slider("Margin", 0.0, 1.0, key="land-margin", **changed)
    split = cols[2].selectbox("Split", splits, key="land-split", **changed)
    bn = cols[3].selectbox("BatchNorm", BN_POLICIES, key="land-bn", **changed)
    precision = cols[4].selectbox("Precision", PRECISIONS, key="land-precision", **changed,
                                  help="fp32 is exact. tf32 and bf16 are faster on a GPU (tf32 is fp32 on a CPU); "
                                       "their measured loss deviation from fp32 is shown with the result.")
    remember_landscape(zoo, LandscapeSettings(tuple(points), grid, margin, split, bn, precision))
    if len(set(points)) < 3:
        st.warning("Pick three different points.")
        return
    methods = [r.name for r in board_recipes(zoo) if r.is_soup and r.family == "merge"]
    # The merge methods are projected when the board has made them (the warm-up does on the sample zoos);
    # making them here, each with its λ chosen on val, is a participant's choice: slow on a big zoo.
    with_methods = all(board_made(zoo, m) for m in methods) or st.checkbox(
        f"Also project the {len(methods)} merge methods (each made as the Recipes board makes it, λ chosen on val; "
        "slow on a big zoo)", key="land-methods")
    key = (zoo_key(zoo), *points, grid, margin, split, bn, precision, with_methods)
    computed = computed_landscapes()  # shared by all sessions: the same inputs are never computed twice
    if st.button("Compute", key="land-compute", type="primary"):
        if key not in computed:
            try:
                _, projections = plane_for(zoo, zoo_key(zoo), *points, with_methods)
            except SoupError as exc:
                error(str(exc))
                return
            bar = st.progress(0.0, text="Waiting for a free slot…")
            cancel = st.empty()  # emptied once the computation is over: no stale Cancel stays on the page
            cancel.button("Cancel", key="land-cancel", help="Stop: what is computed so far is kept, and Compute "
                                                            "finishes it later (or give up the place in line)")
            run = Interruptible(lambda f, m: bar.progress(min(f, 1.0), text=m))
            queued = lambda ahead: bar.progress(0.0, text=f"In line: {ahead} landscape(s) or recipe(s) "  # noqa: E731
                                                          "ahead of this one on the server")
            partial = st.session_state.get("land-partial")
            with HEAVY_WORK.admitted(on_wait=queued):
                bar.progress(0.0, text="Computing…")
                ray = ray_cluster()
                if key in computed:  # another session computed it while this one waited in line
                    result = computed[key]
                elif ray is not None and not uploads_of(zoo.name):  # workers open the manifest: no uploads there
                    result = distributed.landscape(ray, zoo, points, grid=grid, margin=margin, splits=[split],
                                                   bn=bn, projections=projections, workers=RAY_WORKERS,
                                                   progress=run.progress, precision=precision)
                else:  # in the slot's worker process (appkit.workers): the server's ticks go on meanwhile
                    try:
                        result = heavy(zoo, "landscape", tuple(points), grid, margin, [split], bn, precision,
                                       projections, partial[1] if partial and partial[0] == key else None,
                                       progress=run.progress, should_stop=run.should_stop)
                    except WorkerDied as exc:
                        bar.empty()
                        cancel.empty()
                        error(str(exc))
                        return
            if result.complete:  # only finished planes are shared; a stopped one stays this session's
                computed[key] = result
                st.session_state.pop("land-partial", None)
            else:
                st.session_state["land-partial"] = (key, result)
            st.session_state["landscape"] = (key, result)
            run.raise_pending()
            bar.empty()
            cancel.empty()
        else:
            st.session_state["landscape"] = (key, computed[key])
    elif key in computed and st.session_state.get("landscape", (None,))[0] != key:
        st.session_state["landscape"] = (key, computed[key])  # on the server already (a shared link): shown at once
    if "landscape" not in st.session_state or st.session_state["landscape"][0][0] != key[0]:
        return  # nothing computed yet for this zoo
    shown_key, result = st.session_state["landscape"]
    if result.splits[0] not in splits:  # computed on test before the facilitator hid it
        st.caption(f"The landscape computed before is on {result.splits[0]}, hidden now: press Compute.")
        return
    if shown_key != key:
        st.caption("Settings changed: press Compute to update.")
    elif not result.complete:
        st.caption(f"Stopped after {int(result.done.sum())} of {result.done.size} points (the map below fills the "
                   "rest from the nearest computed point): press Compute to finish it.")
    s = result.splits[0]
    view = st.columns([3, 1])
    shown = view[0].radio("Show", ["error", "loss", "log10 loss"], horizontal=True, key="land-metric",
                          help="log10 loss separates the low region when a few far points have huge losses")
    surface = view[1].toggle("3D surface", key="land-3d")
    values = {"error": 100 * result.error[s], "loss": result.loss[s], "log10 loss": np.log10(result.loss[s])}[shown]
    unit = {"error": f"{s} error (%)", "loss": f"{s} loss", "log10 loss": f"log10 {s} loss"}[shown]
    best = np.unravel_index(np.nanargmin(values), values.shape)
    grid_curve = None  # the clickable trace's index (2D only)
    soups = [p for p in result.projections if p.name in RECIPES and RECIPES[p.name].family == "soup"]
    methods = [p for p in result.projections if p.name in RECIPES and RECIPES[p.name].family == "merge"]
    checkpoints = [p for p in result.projections if p.name not in RECIPES]
    if surface:
        figure = go.Figure(go.Surface(x=result.xs, y=result.ys, z=result.preview(values), colorscale="Viridis",
                                      colorbar={"title": unit}))
        figure.update_layout(height=650, scene={"xaxis_title": "x (L2)", "yaxis_title": "y (L2)", "zaxis_title": unit})
    else:
        figure = go.Figure(go.Contour(x=result.xs, y=result.ys, z=result.preview(values), colorscale="Viridis",
                                      colorbar={"title": unit}, ncontours=30, contours={"showlabels": True}))
        figure.add_trace(go.Scatter(
            x=[p.xy[0] for p in checkpoints], y=[p.xy[1] for p in checkpoints], mode="markers",
            marker={"color": "white", "size": 7, "line": {"width": 1, "color": "black"}}, name="other checkpoints",
            text=[f"{in_figure(p.name)}<br>off plane {p.off_plane:.3f}" for p in checkpoints], hoverinfo="text"))
        figure.add_trace(go.Scatter(  # named in the hover and the table below: labels here would overlap
            x=[p.xy[0] for p in soups], y=[p.xy[1] for p in soups], mode="markers", name="soups",
            marker={"color": "gold", "size": 11, "symbol": "diamond", "line": {"width": 1, "color": "black"}},
            hovertext=[f"{in_figure(p.name)}<br>off plane {p.off_plane:.3f}" for p in soups], hoverinfo="text"))
        figure.add_trace(go.Scatter(
            x=[p.xy[0] for p in methods], y=[p.xy[1] for p in methods], mode="markers", name="merge methods",
            marker={"color": "#c266ff", "size": 10, "symbol": "triangle-up", "line": {"width": 1, "color": "black"}},
            hovertext=[f"{RECIPES[p.name].pretty_name}<br>off plane {p.off_plane:.3f}" for p in methods],
            hoverinfo="text"))
        sparse = sparse_method_point(shown_key[1:4]) if shown_key[-1] else None
        if sparse is not None:
            figure.add_trace(go.Scatter(
                x=[sparse.xy[0]], y=[sparse.xy[1]], mode="markers", name=sparse.name, hoverinfo="text",
                hovertext=f"{sparse.name}<br>off plane {sparse.off_plane:.3f}",
                marker={"color": "#ff4fd8", "size": 15, "symbol": "triangle-up",
                        "line": {"width": 2, "color": "white"}}))
        figure.add_trace(go.Scatter(x=[result.xs[best[1]]], y=[result.ys[best[0]]], mode="markers",
                                    name=f"lowest {shown}", hoverinfo="name",  # under the stars, never over one
                                    marker={"color": "orange", "size": 14, "symbol": "x", "line": {"width": 1}}))
        figure.add_trace(go.Scatter(
            x=[a.xy[0] for a in result.anchors], y=[a.xy[1] for a in result.anchors], mode="markers",
            marker={"color": "red", "size": 12, "symbol": "star"}, name="the three points",
            hovertext=[in_figure(a.name) for a in result.anchors], hoverinfo="text"))
        marks = ["the red stars are the three points that span it"]  # the caption names what is drawn, only that
        marks += [f"{what} projected onto it (how far off the plane in the hover)" for what, shown_here in (
            ("white dots are the other checkpoints", checkpoints), ("gold diamonds the soups", soups),
            ("purple triangles the merge methods", methods)) if shown_here]
        marks += ["the pink triangle is the merge method at the density chosen above"] if sparse is not None else []
        marks += ["the orange × is the lowest point"]
        label_points(figure, [(a.name, a.xy) for a in result.anchors],
                     extent=((result.xs[0], result.xs[-1]), (result.ys[0], result.ys[-1])))
        # Contours return no click selection: an almost invisible scatter of the grid points does.
        gx, gy = np.meshgrid(result.xs, result.ys)
        grid_curve = len(figure.data)
        figure.add_trace(go.Scatter(x=gx.ravel(), y=gy.ravel(), mode="markers", name="grid points",
                                    marker={"size": 9, "opacity": 0.01, "color": "black"}, showlegend=False,
                                    customdata=np.stack([100 * result.error[s].ravel(), result.loss[s].ravel()], -1),
                                    hovertemplate="(%{x:.3f}, %{y:.3f})<br>error %{customdata[0]:.1f}%"
                                                  "<br>loss %{customdata[1]:.4f}<extra></extra>"))
        # Equal units on both axes unless the plane would then be a sliver of the page (appkit.figures).
        spans = float(np.ptp(result.xs)), float(np.ptp(result.ys))
        equal_scale, height = plane_scale(*spans)
        figure.update_layout(height=height, xaxis_title="x (L2 distance from the origin)", yaxis_title="y (L2)",
                             yaxis={"scaleanchor": "x"} if equal_scale else {}, legend=LEGEND_ABOVE,
                             margin={"t": 40, "b": 60})
        clicked = [p for p in ((st.session_state.get("land-chart") or {}).get("selection") or {}).get("points", [])
                   if p.get("curve_number") == grid_curve]
        if clicked:  # the click that caused this run: its ring is drawn now, not one run later
            st.session_state["land-picked"] = (shown_key, float(clicked[0]["x"]), float(clicked[0]["y"]))
        picked_before = st.session_state.get("land-picked")
        if picked_before and picked_before[0] == shown_key:
            figure.add_trace(go.Scatter(x=[picked_before[1]], y=[picked_before[2]], mode="markers",
                                        name="chosen point", hoverinfo="name",
                                        marker={"color": "cyan", "size": 14, "symbol": "circle-open",
                                                "line": {"width": 3}}))
    # A selection would dim every other marker (the plot "fades"): keep them as drawn.
    figure.update_traces(unselected={"marker": {"opacity": 1.0}}, selector={"type": "scatter"})
    if not surface:
        figure.data[grid_curve].update(unselected={"marker": {"opacity": 0.01}})
    show(figure, key="land-chart", on_select="ignore" if surface else "rerun", selection_mode="points")
    st.caption("How to read this: colour and height are the metric at each point of the plane (dark = low); the "
               "checkpoints, soups and merge methods are marked on the flat map: switch 3D off to see them and click "
               "a point." if surface else
               "How to read this: colour is the metric at each point of the plane (dark = low); "
               + "; ".join(marks) + ". Click a point to see its metrics." + scale_note(*spans))
    projected_table(soups + methods)
    lowest = f"{values[best]:.1f}%" if shown == "error" else f"{values[best]:.4f}"
    st.write(f"Lowest {s} {shown} {lowest} at ({result.xs[best[1]]:.3f}, {result.ys[best[0]]:.3f}); "
             f"BatchNorm: {result.bn}; precision: {result.precision}"
             + ("" if result.precision_deviation is None else
                f" (losses within {result.precision_deviation:.1e} of fp32 on the points checked)") + ".")
    downloads = st.columns(3)  # made when pressed, without a rerun
    downloads[0].download_button("Download grid (JSON)", lambda: json.dumps(result.to_json()), "landscape.json",
                                 "application/json", key="land-json", on_click="ignore")
    downloads[1].download_button("Download grid (CSV)", lambda: grid_csv(result), "landscape.csv", "text/csv",
                                 key="land-csv", on_click="ignore")
    downloads[2].download_button("Figure (HTML)", lambda: html_text(figure), "landscape.html", "text/html",
                                 key="land-html", on_click="ignore")
    if st.session_state.get("land-picked", (None,))[0] == shown_key:  # set from the click before the map was drawn
        _, x, y = st.session_state["land-picked"]
        # A point is exported with the policy the landscape used ("none": no BatchNorm to treat).
        point = Candidate.point(shown_key[1:4], (x, y), result.bn if result.bn != "none" else "interpolate")
        metrics = export_plan(zoo, point, tuple(uploads_of(zoo.name))).metrics
        cols = st.columns(4)
        cols[0].markdown(f"**Point ({x:.3f}, {y:.3f})**")
        shifts = zoo.evaluator.shift_names
        figures = {name: metrics[name].accuracy for name in visible(n for n in ("val", "test") if n in metrics)}
        if shifts:  # the mean over the shift splits, as every other page reports them
            figures["shifts"] = shift_average(metrics, shifts)
        for col, (name, accuracy) in zip(cols[1:], figures.items()):
            col.metric(f"point {name}", percent(accuracy))
        if st.button("Keep this point for export", key="land-keep"):
            set_export(point)
            st.success("Ready on the Export page.")

def sparse_method_point(plane_points: tuple[str, str, str]):
    """The density slider's merge method, made at that density and projected (None on a plane of soups
    only, or a zoo without θ0); shows its accuracy beside the slider."""
    sparse = [r for r in board_recipes(zoo) if r.is_soup and any(p.name == "density" for p in r.parameters)]
    if not sparse:
        return None
    cols = st.columns([2, 2, 3])
    recipe = cols[0].selectbox("Merge method", [r.name for r in sparse], key="land-sparse",
                               format_func=lambda n: RECIPES[n].pretty_name)
    density = cols[1].slider("Density", 0.1, 1.0, 0.5, 0.1, key="land-density",
                             help=RECIPES[recipe].parameter("density").help)
    try:
        projection, made = method_point(zoo, zoo_key(zoo), plane_points, recipe, density)
    except SoupError as exc:
        error(str(exc))
        return None
    m = made.metrics
    cols[2].caption(f"{RECIPES[recipe].pretty_name} at density {density:g}, {chosen_on_val(made)} (best on val): "
                    f"val {percent(m['val'].accuracy)}"
                    + (f", test {percent(m['test'].accuracy)}" if "test" in visible(m) else "")
                    + f"; {projection.off_plane:.3f} off the plane.")
    return replace(projection, name=f"{RECIPES[recipe].pretty_name}, density {density:g}")


def projected_table(projections) -> None:
    """Where each soup and merge method lies: coordinates, distance off the plane and val accuracy."""
    if not projections:
        return
    made = {p.name: board_result(zoo, p.name) for p in projections}
    rows = [{"soup or method": RECIPES[p.name].pretty_name, "x": p.xy[0], "y": p.xy[1], "off plane": p.off_plane,
             "chosen on val": chosen_on_val(made[p.name]), "val %": 100 * made[p.name].metrics["val"].accuracy}
            for p in projections]
    with st.expander("Soups and merge methods on this plane"):
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="land-projected",
                     column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("x", "y", "off plane")}
                     | {"val %": st.column_config.NumberColumn(format="%.1f")})


def grid_csv(result) -> str:
    """One row per computed grid point: x, y, then error and loss on each split."""
    gx, gy = np.meshgrid(result.xs, result.ys)
    columns = {"x": gx.ravel(), "y": gy.ravel()}
    for split in result.splits:
        columns[f"{split}_error"] = result.error[split].ravel()
        columns[f"{split}_loss"] = result.loss[split].ravel()
    return pd.DataFrame(columns).to_csv(index=False)


landscape_view()
