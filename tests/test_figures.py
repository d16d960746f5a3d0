"""The files under every figure: an HTML copy for slides that opens offline."""

from __future__ import annotations

import re

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs_version as plotly_js_version

from appkit.figures import html_text, plotly_js


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
