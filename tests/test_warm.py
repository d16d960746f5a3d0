"""After the warm-up, a participant's first visit to every page and Tour step computes nothing."""

from __future__ import annotations

from pathlib import Path
from streamlit.testing.v1 import AppTest

import appkit.cache as cache
from appkit.warm import warm

PAGES = ["ingredients", "recipes", "geometry", "landscape", "export", "room", "tour"]
# Every computation a page can start: the live soup's recipes (make_soup), the heavy work (recipes,
# landscapes, paths, pairs, barriers and their intervals, angles, ablations: appkit.workers.heavy) and
# the alignment's barrier table.
HEAVY = ["make_soup", "heavy", "barrier_table"]
TOUR_STEPS = ["1 · One basin", "2 · Angles", "3 · Uniform soups", "4 · Greedy and pruned soups",
              "5 · Scratch models and alignment", "6 · BatchNorm", "7 · Soups and merge methods",
              "8 · Language models and adapters"]


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


def test_the_warm_up_thread_does_not_fill_the_terminal_with_context_warnings(monkeypatch, caplog):
    """Each cached call outside a session warns "missing ScriptRunContext"; from the warm-up thread,
    where that is the point, the warning is dropped; from any other thread it still shows."""
    import logging
    import threading

    from appkit import warm
    monkeypatch.setenv("SOUP_WARM", "1")
    monkeypatch.setattr(warm, "warm", lambda: 0.0)
    monkeypatch.setattr(warm, "freeze_the_heap", lambda: None)
    warm.start_warming().join()
    logger = logging.getLogger(warm.CONTEXT_LOGGER)

    def warn_from(name: str) -> None:
        thread = threading.Thread(target=lambda: logger.warning("Thread %r: missing ScriptRunContext!", name), name=name)
        thread.start()
        thread.join()
    with caplog.at_level(logging.WARNING, logger=warm.CONTEXT_LOGGER):
        warn_from(warm.WARM_THREAD)
        warn_from("a-session")
    assert [r.threadName for r in caplog.records if "ScriptRunContext" in r.getMessage()] == ["a-session"]
