"""The files under every figure: an HTML copy for slides that opens offline."""

from __future__ import annotations

import re

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs_version as plotly_js_version

from appkit.figures import PALETTE, html_text, label_points, plotly_js, series_style


def test_an_html_copy_holds_every_figure_and_loads_plotly_once_from_its_own_folder():
    bars = go.Figure(go.Bar(x=["uniform soup"], y=[97.25]))
    line = go.Figure(go.Scatter(x=[0.5], y=[3.125]))
    html = html_text(bars, line)
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert html.count("Plotly.newPlot(") == 2  # both figures drawn
    assert "97.25" in html and "3.125" in html and "uniform soup" in html
    assert re.findall(r"<script[^>]* src=[^>]*>", html) == ['<script charset="utf-8" src="plotly.min.js">']
    assert "plotly.js v" not in html and len(html.encode()) < 1 << 20  # kilobytes, not plotly.js each time
    assert 'id="needs-plotly"' in html  # says what to put beside it, until plotly.js has loaded


def test_the_plotly_js_offered_once_is_the_installed_plotlys_own():
    from plotly.offline import get_plotlyjs
    assert plotly_js() == get_plotlyjs() and f"plotly.js v{plotly_js_version()}" in plotly_js()[:200]


def _side(annotation) -> str:
    if annotation.yshift:
        return "above" if annotation.yshift > 0 else "below"
    return "right" if annotation.xshift > 0 else "left"


def test_a_points_name_goes_above_it_unless_a_marker_or_the_edge_is_there():
    figure = go.Figure(go.Scatter(x=[0.5, 0.5], y=[0.5, 0.54], mode="markers"))  # a marker just above (0.5, 0.5)
    figure.add_trace(go.Scatter(x=[0.2], y=[0.2], mode="markers"))
    figure.add_trace(go.Scatter(x=[0.2], y=[0.26], mode="markers", marker={"opacity": 0.01}))  # invisible: ignored
    label_points(figure, [("crowded", (0.5, 0.5)), ("alone", (0.2, 0.2)), ("top", (0.8, 1.0))],
                 extent=((0.0, 1.0), (0.0, 1.0)))
    assert [(a.text, _side(a)) for a in figure.layout.annotations] == [("crowded", "below"), ("alone", "above"),
                                                                       ("top", "below")]


def test_series_differ_in_colour_then_in_symbol_from_a_colour_blind_safe_palette():
    styles = [series_style(i) for i in range(17)]
    assert len({(s["color"], s["symbol"]) for s in styles}) == 17
    assert [s["color"] for s in styles[:8]] == list(PALETTE) and styles[8]["color"] == PALETTE[0]
    assert {s["symbol"] for s in styles[:8]} == {"star"} and styles[8]["symbol"] == "diamond"
