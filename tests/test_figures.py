"""The files under every figure: an HTML copy for slides that opens offline."""

from __future__ import annotations

import plotly.graph_objects as go

from appkit.figures import html_text


def test_an_html_copy_holds_every_figure_and_plotly_itself_once():
    bars = go.Figure(go.Bar(x=["uniform soup"], y=[97.25]))
    line = go.Figure(go.Scatter(x=[0.5], y=[3.125]))
    html = html_text(bars, line)
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert html.count("Plotly.newPlot(") == 2  # both figures drawn
    assert "97.25" in html and "3.125" in html and "uniform soup" in html
    assert html.count("plotly.js v") == 1  # embedded once
    assert '<script src="http' not in html and "<script src='http" not in html  # nothing fetched from the network
