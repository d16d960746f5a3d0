"""App speed: a toggle's server-side time, a tick in Chromium, and the first render after `make run`.

    python bench/bench_app.py [--toggles 40] [--starts 3] [--chromium-ticks 40]

* Toggle: untick/retick one ingredient on the Ingredients page of ``digits-finetune`` through
  ``streamlit.testing.v1.AppTest`` (the real script, run in-process; it reruns the whole page,
  an upper bound on the fragment rerun the browser triggers), and the core work alone
  (``live_soup``: uniform soup, best individual, logit ensemble, every split). Target: median
  under 150 ms.
* First render: start ``streamlit run app.py`` (as ``make run`` does) and time until Chromium
  shows the checkpoint count. Target: under 10 s.
* Tick in Chromium (first start only): click a tick box and time until the live soup's val
  number on screen changes; untick a checkpoint, then tick it back, ``--chromium-ticks`` times
  (half are new ticked sets). A click that leaves the number unchanged is not timed.
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


CHANGED = """(before) => {
  const m = [...document.querySelectorAll('[data-testid=stMetric]')].find(m => m.innerText.includes('soup val'));
  return m && !m.innerText.includes(before);
}"""


def chromium_tick_times(page, count: int) -> list[float]:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    soup_val = page.get_by_test_id("stMetric").filter(has_text="soup val").get_by_test_id("stMetricValue")
    times = []
    for i in range(count):
        name = f"ft-{(i // 2) % 32:02d}"  # untick it, then tick it back
        before = soup_val.inner_text()
        start = time.perf_counter()
        page.get_by_test_id("stCheckbox").filter(has_text=name).locator("label").click()
        try:
            page.wait_for_function(CHANGED, arg=before, timeout=10_000)
            times.append(time.perf_counter() - start)
        except PlaywrightTimeout:
            pass  # the same number for the new set: nothing to time
        page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')", timeout=60_000)
        page.wait_for_timeout(200)
    return times


def first_render_seconds(ticks: int = 0) -> tuple[float, list[float]]:
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
            tick_times = chromium_tick_times(page, ticks) if ticks else []
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return elapsed, tick_times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--toggles", type=int, default=40)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--chromium-ticks", type=int, default=40)
    args = parser.parse_args()
    page, core = toggle_times(args.toggles)
    ms = lambda xs: f"{1000 * statistics.median(xs):.0f} ms (p90 {1000 * sorted(xs)[int(0.9 * len(xs))]:.0f} ms)"
    print(f"toggle, whole page rerun (AppTest), median of {len(page)}: {ms(page)}")
    print(f"toggle, live soup work alone, median of {len(core)}: {ms(core)}")
    runs = [first_render_seconds(args.chromium_ticks if i == 0 else 0) for i in range(args.starts)]
    starts, ticks = [r[0] for r in runs], runs[0][1]
    if ticks:
        print(f"tick in Chromium until the soup's number changes, median of {len(ticks)}: {ms(ticks)}")
    print(f"first render after `streamlit run app.py`, median of {len(starts)}: {statistics.median(starts):.1f} s "
          f"(runs: {', '.join(f'{s:.1f}' for s in starts)})")


if __name__ == "__main__":
    main()
