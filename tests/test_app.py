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

from soup_core.zoo import open_zoo

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


def test_the_app_renders_the_default_sample_zoo():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert at.metric[0].value == str(len(open_zoo("digits-finetune").names))
    at.sidebar.selectbox(key="zoo").set_value("digits-bn").run()
    assert not at.exception and at.metric[0].value == "12"


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
        page.get_by_text("Model Soup Lab").first.wait_for(timeout=60_000)
        metric = page.get_by_test_id("stMetricValue").first
        metric.wait_for(timeout=60_000)
        assert metric.inner_text() == str(len(open_zoo("digits-finetune").names))
        page.get_by_test_id("stDataFrame").first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "overview.png"))
        browser.close()
