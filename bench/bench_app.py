"""App speed: a toggle's server-side time, and the first render after `make run`.

    python bench/bench_app.py [--toggles 40] [--starts 3]

* Toggle: untick/retick one ingredient on the Ingredients page of ``digits-finetune`` through
  ``streamlit.testing.v1.AppTest`` (the real script, run in-process; it reruns the whole page,
  an upper bound on the fragment rerun the browser triggers), and the core work alone
  (``live_soup``: uniform soup, best individual, logit ensemble, every split). Target: median
  under 150 ms.
* First render: start ``streamlit run app.py`` (as ``make run`` does) and time until Chromium
  shows the checkpoint count. Target: under 10 s.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def toggle_times(count: int) -> tuple[list[float], list[float]]:
    from streamlit.testing.v1 import AppTest
    from appkit import cache

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    box = at.checkbox(key="tick:digits-finetune:ft-04")
    page_times = []
    for i in range(count):
        start = time.perf_counter()
        (box.uncheck() if i % 2 == 0 else box.check()).run()
        page_times.append(time.perf_counter() - start)
        assert not at.exception
    zoo = cache.load_zoo("digits-finetune")
    core_times = []
    for i in range(count):
        names = [n for j, n in enumerate(zoo.names) if j != i % len(zoo.names)]
        start = time.perf_counter()
        cache.live_soup(zoo, names)
        core_times.append(time.perf_counter() - start)
    return page_times, core_times


def first_render_seconds() -> float:
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port",
                             str(port), "--server.headless", "true"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page()
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}", timeout=2000)
                    break
                except Exception:
                    time.sleep(0.1)
            page.get_by_test_id("stMetricValue").first.wait_for(timeout=60_000)
            elapsed = time.perf_counter() - start
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--toggles", type=int, default=40)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    page, core = toggle_times(args.toggles)
    ms = lambda xs: f"{1000 * statistics.median(xs):.0f} ms (p90 {1000 * sorted(xs)[int(0.9 * len(xs))]:.0f} ms)"
    print(f"toggle, whole page rerun (AppTest), median of {len(page)}: {ms(page)}")
    print(f"toggle, live soup work alone, median of {len(core)}: {ms(core)}")
    starts = [first_render_seconds() for _ in range(args.starts)]
    print(f"first render after `streamlit run app.py`, median of {len(starts)}: {statistics.median(starts):.1f} s "
          f"(runs: {', '.join(f'{s:.1f}' for s in starts)})")


if __name__ == "__main__":
    main()
