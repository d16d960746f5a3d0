"""After the warm-up, a participant's first visit to every page and Tour step computes nothing."""

from __future__ import annotations

from pathlib import Path
from streamlit.testing.v1 import AppTest

import appkit.cache as cache
from appkit.warm import warm

PAGES = ["ingredients", "recipes", "geometry", "tour"]
TOUR_STEPS = ["1 · One basin", "2 · Angles", "3 · Uniform soups", "4 · Greedy and pruned soups",
              "5 · Scratch models and alignment", "6 · BatchNorm"]
HEAVY = ["make_soup", "plane_landscape", "interpolation_path", "pair_analyses", "flattest_pair", "pairwise_angles",
         "barrier_table"]


def test_after_the_warm_up_no_page_or_tour_step_computes(monkeypatch):
    warm()
    computed = []
    for name in HEAVY:
        real = getattr(cache, name)
        monkeypatch.setattr(cache, name, lambda *a, _name=name, _real=real, **k: computed.append(_name) or _real(*a, **k))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60).run()
    for page in PAGES:
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, page
    for step in TOUR_STEPS:
        at.radio(key="tour-step").set_value(step).run()
        assert not at.exception, step
    assert computed == []
