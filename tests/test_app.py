"""The app shell: renders with AppTest, and serves in a real Chromium (Playwright)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from soup_core.params import uniform_average
from soup_core.recipes import SoupOptions
from soup_core.zoo import make_soup, open_zoo

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


def _app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_the_app_renders_the_default_sample_zoo_and_switches_zoo():
    at = _app()
    assert not at.exception
    assert _metric(at, "Checkpoints") == str(len(open_zoo("digits-finetune").names))
    at.sidebar.selectbox(key="zoo").set_value("digits-bn").run()
    assert not at.exception and _metric(at, "Checkpoints") == "12"


def test_toggling_ingredients_shows_soup_cores_own_numbers():
    at = _app()
    zoo = open_zoo("digits-finetune")
    keep = ["ft-03", "ft-17"]
    for name in zoo.names:
        if name not in keep:
            at.checkbox(key=f"tick:digits-finetune:{name}").uncheck()
    at.run()
    assert not at.exception
    ev = zoo.evaluator
    soup = ev.evaluate(uniform_average([zoo.state_dict(n) for n in keep]))
    assert _metric(at, "soup val") == f"{100 * soup['val'].accuracy:.2f}%"
    assert _metric(at, "soup test") == f"{100 * soup['test'].accuracy:.2f}%"
    best = max(keep, key=lambda n: zoo.metrics(n)["val"].accuracy)
    assert _metric(at, "best test") == f"{100 * zoo.metrics(best)['test'].accuracy:.2f}%"
    assert at.query_params["use"] == ["ft-03,ft-17"] or at.query_params["use"] == "ft-03,ft-17"


def test_ticks_survive_a_page_switch():
    at = _app()
    at.checkbox(key="tick:digits-finetune:ft-00").uncheck().run()
    at.switch_page("pages/landscape.py").run()
    at.switch_page("pages/ingredients.py").run()
    assert not at.exception
    assert at.checkbox(key="tick:digits-finetune:ft-00").value is False
    assert at.checkbox(key="tick:digits-finetune:ft-01").value is True


def test_greedy_replay_steps_through_the_trace():
    at = _app()
    at.button(key="replay-run").click().run()
    assert not at.exception
    trace = make_soup(open_zoo("digits-finetune"), "greedy", SoupOptions()).trace
    slider = at.slider(key="replay-step:greedy")
    assert slider.max == len(trace)
    slider.set_value(2).run()
    step = trace[1]
    assert any(f"{step.action} {step.candidate}" in m.value for m in at.markdown)


def test_landscape_page_computes_and_draws_a_plane():
    at = _app()
    at.switch_page("pages/landscape.py").run()
    assert not at.exception
    at.slider(key="land-grid").set_value(5).run()
    at.button(key="land-compute").click().run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == 1
    assert any("Lowest val error" in m.value for m in at.markdown)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
                             "--server.port", str(port), "--server.headless", "true"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="make test installs Debian's chromium")
def test_the_app_serves_the_sample_zoo_in_chromium(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(server)
        page.get_by_text("Ingredients").first.wait_for(timeout=60_000)
        metric = page.get_by_test_id("stMetricValue").first
        metric.wait_for(timeout=60_000)
        assert metric.inner_text() == str(len(open_zoo("digits-finetune").names))
        page.get_by_test_id("stDataFrame").first.wait_for(timeout=60_000)
        soup_val = page.get_by_test_id("stMetric").filter(has_text="soup val").get_by_test_id("stMetricValue")
        soup_val.wait_for(timeout=60_000)
        before = soup_val.inner_text()
        page.screenshot(path=str(ARTIFACTS / "ingredients.png"), full_page=True)
        for name in ("ft-00", "ft-01"):  # untick two ingredients: the soup changes
            page.get_by_test_id("stCheckbox").filter(has_text=name).locator("label").click()
            page.wait_for_timeout(500)
        page.wait_for_function(
            "([before]) => [...document.querySelectorAll('[data-testid=stMetric]')]"
            ".some(m => m.innerText.includes('soup val') && !m.innerText.includes(before))", arg=[before],
            timeout=60_000)
        assert "ft-00" not in page.url.split("use=")[-1].split("&")[0].split("%2C")
        page.screenshot(path=str(ARTIFACTS / "ingredients-toggled.png"), full_page=True)
        browser.close()
