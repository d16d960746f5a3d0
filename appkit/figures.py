"""What every figure gets under it: a line on how to read it, its data as CSV and JSON, and the
figure itself as an HTML file for slides (interactive, offline). The HTML loads ``plotly.min.js``
from its own folder rather than holding it: a figure is kilobytes, not 4.8 MB of plotly.js each;
the sidebar offers plotly.min.js once (:func:`plotly_js`), to save beside the figures.

>>> import pandas as pd
>>> csv_text(pd.DataFrame({"alpha": [0.0, 1.0], "val error (%)": [3.2, 4.1]})).splitlines()[0]
'alpha,val error (%)'
"""

from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st


# A wide figure's plot area at 1400 px wide: between the y axis and a colour bar.
PLOT_AREA_PX = 760
# The legend in a row above the plot, where it covers neither the data nor the x axis's title.
LEGEND_ABOVE = {"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0}


# Okabe & Ito's palette: told apart under every common colour-vision deficiency. For markers, not text:
# its orange, sky blue and yellow are faint on white, so markers drawn in them get a dark outline.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
BLUE, GREEN, VERMILION = PALETTE[0], PALETTE[2], PALETTE[5]  # the ones pages name: ticked/kept/rejected
SYMBOLS = ("star", "diamond", "square", "triangle-up")
# The figures' text (ticks, titles, legends, colour bars): Streamlit's own text colour, 12:1 on the white
# plot (the theme's faded grey is 3.7:1; WCAG asks 4.5:1). The app's theme is light (.streamlit/config.toml).
INK = "#31333F"


def series_style(i: int) -> dict:
    """The ``i``-th series' marker colour and symbol: a palette colour, then the next symbol after
    every eight, so that up to 32 series differ in more than colour."""
    return {"color": PALETTE[i % len(PALETTE)], "symbol": SYMBOLS[i // len(PALETTE) % len(SYMBOLS)]}


def show(figure: go.Figure, key: str, where=None, **kwargs):
    """Every figure reaches the page through here: the palette, its text in :data:`INK`, and a top
    margin that fits its title (no empty band above a figure without one); ``where`` is a column,
    else the page."""
    margin = figure.layout.margin
    top = 70 if figure.layout.title.text else 30
    figure.update_layout(colorway=PALETTE, margin={"t": top if margin.t is None else margin.t}, font_color=INK,
                         legend_font_color=INK, title_font_color=INK)
    figure.update_xaxes(tickfont_color=INK, title_font_color=INK)
    figure.update_yaxes(tickfont_color=INK, title_font_color=INK)
    figure.update_scenes({f"{a}axis": {"tickfont_color": INK, "title_font_color": INK} for a in "xyz"})
    figure.update_traces({"colorbar": {"tickfont_color": INK, "title_font_color": INK}},
                         selector=lambda trace: trace.type in ("heatmap", "contour", "surface"))
    return (where or st).plotly_chart(figure, key=key, **kwargs)


# Where a point's name may go: its side, the shift in pixels and the anchor, and the label's centre
# in units of the plot's width and height (a label is about 8% of a plot wide and 5% high).
LABEL_SIDES = {"above": ({"yshift": 20}, (0.0, 0.05)), "below": ({"yshift": -20}, (0.0, -0.05)),
               "right": ({"xshift": 10, "xanchor": "left"}, (0.06, 0.0)),
               "left": ({"xshift": -10, "xanchor": "right"}, (-0.06, 0.0))}


def label_points(figure: go.Figure, points: list[tuple[str, tuple[float, float]]],
                 extent: tuple[tuple[float, float], tuple[float, float]] | None = None) -> None:
    """A name beside each ``(name, (x, y))`` on a white box, readable on any colour of a map: above it,
    unless another marker of the figure (or a label placed before) sits there; then below, right
    or left, whichever side is clearest. ``extent`` is the plot's ((x0, x1), (y0, y1)), else the
    markers' own."""
    from appkit.plain import in_figure
    markers = [(float(x), float(y)) for trace in figure.data
               if trace.type == "scatter" and "markers" in (trace.mode or "")
               and (trace.marker.opacity is None or trace.marker.opacity >= 0.2)
               for x, y in zip(trace.x or (), trace.y or ()) if x is not None and y is not None]
    if extent is None:
        everything = markers + [xy for _, xy in points]
        extent = ((min(x for x, _ in everything), max(x for x, _ in everything)),
                  (min(y for _, y in everything), max(y for _, y in everything)))
    (x0, x1), (y0, y1) = extent
    width, height = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    taken = [((x - x0) / width, (y - y0) / height) for x, y in markers]

    def clearance(u: float, v: float, side: str) -> float:
        cu, cv = u + LABEL_SIDES[side][1][0], v + LABEL_SIDES[side][1][1]
        if not (0.0 <= cu <= 1.0 and 0.0 <= cv <= 1.0):
            return 0.0  # a label outside the plot area is cut off
        return min((max(abs(mu - cu) / 0.06, abs(mv - cv) / 0.04) for mu, mv in taken
                    if (mu, mv) != (u, v)), default=float("inf"))
    for name, (x, y) in points:
        u, v = (x - x0) / width, (y - y0) / height
        side = max(LABEL_SIDES, key=lambda s: (min(clearance(u, v, s), 1.0), s == "above"))
        figure.add_annotation(x=x, y=y, text=in_figure(name), showarrow=False, **LABEL_SIDES[side][0],
                              bgcolor="rgba(255, 255, 255, 0.85)", font={"color": "black", "size": 12})
        taken.append((u + LABEL_SIDES[side][1][0], v + LABEL_SIDES[side][1][1]))


def scale_note(x_span: float, y_span: float) -> str:
    """What a plane's caption says when :func:`plane_scale` draws its axes apart ("" when it does not).

    >>> scale_note(10.0, 16.0)
    ' The axes are drawn at different scales: the plane is 1.6 times longer along y than along x (in L2 units), and drawn to fill the width.'
    """
    if plane_scale(x_span, y_span)[0]:
        return ""
    tall = y_span / max(x_span, 1e-12)
    longer, shorter = ("y", "x") if tall > 1 else ("x", "y")
    return (f" The axes are drawn at different scales: the plane is {max(tall, 1 / tall):.1f} times longer along "
            f"{longer} than along {shorter} (in L2 units), and drawn to fill the width.")


def plane_scale(x_span: float, y_span: float, width_px: int = PLOT_AREA_PX) -> tuple[bool, int]:
    """``(equal, height)`` for a map of a plane ``x_span`` by ``y_span`` (L2 units): one unit as long
    on both axes when, at a height between 450 and 800 px, the plane then fills at least 80% of the
    plot's width; otherwise the axes are scaled apart (a caption must say so) at 600 px.

    >>> plane_scale(10.0, 10.0)  # square: 760 px tall would be best, 700 px of it fits (92%)
    (True, 800)
    >>> plane_scale(10.0, 16.0)  # tall: equal units would fill 700/1.6 = 438 px of 760 (58%)
    (False, 600)
    """
    tall = y_span / max(x_span, 1e-12)
    height = int(min(800, max(450, width_px * tall + 100)))
    equal = (height - 100) / tall >= 0.8 * width_px
    return equal, height if equal else 600


def csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


PLOTLY_JS = "plotly.min.js"
# Shown by a figure's HTML file until plotly.js has loaded: what to put beside it.
NEEDS_PLOTLY = (f'<p id="needs-plotly">This figure draws with {PLOTLY_JS}: save it from the Model Soup Lab '
                f'sidebar ("{PLOTLY_JS} for saved figures") into this file\'s folder, then open this file again.</p>')


def html_text(*figures: go.Figure) -> str:
    """The figures as one HTML page that opens offline with ``plotly.min.js`` beside it (loaded once)."""
    parts = [f.to_html(include_plotlyjs="directory" if i == 0 else False, full_html=False)
             for i, f in enumerate(figures)]
    body = "\n".join(parts)
    found = "<script>if (window.Plotly) document.getElementById('needs-plotly').remove();</script>"
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n{NEEDS_PLOTLY}\n{body}\n'
            f'{found}\n</body></html>\n')


def plotly_js() -> str:
    """The installed plotly's own plotly.js, which every saved figure loads from its folder."""
    from plotly.offline import get_plotlyjs
    return get_plotlyjs()


def figure_footer(key: str, how_to_read: str, data: pd.DataFrame | None = None, *, raw: object = None,
                  figure: go.Figure | tuple[go.Figure, ...] | None = None) -> None:
    """A caption on how to read the figure above; its data (``data`` as CSV and JSON, or ``raw``
    as JSON) for notebooks; ``figure`` as HTML for slides. The figure's own toolbar exports PNG.

    The files are made when a button is pressed (callables), and pressing one does not rerun
    the page."""
    st.caption(f"How to read this: {how_to_read}")
    row = st.container(horizontal=True)  # buttons as wide as their labels, side by side
    if data is not None:
        row.download_button("Data (CSV)", lambda: csv_text(data), f"{key}.csv", "text/csv",
                            key=f"{key}-csv", on_click="ignore")
    if data is not None or raw is not None:
        payload = (lambda: data.to_dict(orient="records")) if raw is None else (lambda: raw)
        row.download_button("Data (JSON)", lambda: json.dumps(payload(), indent=1, default=float),
                            f"{key}.json", "application/json", key=f"{key}-json", on_click="ignore")
    if figure is not None:
        figures = figure if isinstance(figure, tuple) else (figure,)
        row.download_button("Figure (HTML)", lambda: html_text(*figures), f"{key}.html", "text/html",
                            key=f"{key}-html", on_click="ignore")
