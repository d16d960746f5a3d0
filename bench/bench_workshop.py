"""A workshop against one server: N concurrent sessions run a scripted visit, on loopback.

The server is started as `make run` starts it (`streamlit run app.py`, the repository's
.streamlit/config.toml, the warm-up on), with its timing hook on (``SOUP_TIMING_LOG``: one JSON
line per script run with its page, the widgets that changed and its duration). After the warm-up,
N clients each:

1. open the app (Ingredients) until the checkpoint count shows;
2. untick their own checkpoint (session i unticks ft-{i mod 32}) until the run is over, and
   check the live soup's val accuracy against the library's uniform soup of the same set;
3. replay the greedy soup on their ticks;
4. open the Tour and step forward twice;
5. open the Landscape page and compute the default plane (shared by all: computed once);
6. open Export until the download button shows;
7. (protocol clients) submit their soup to the room and open the Room page.

With ``--heavy K``, sessions 0…K−1 instead compute three landscapes of their own, one after the
other (planes no other session asks for, grid 41, through a shared link's settings), while the
others tick: the heavy work's cost to everyone else's ticks.

Reported: each action's client-observed latency (p50/p90/max), the server's own run durations
from the timing hook, exceptions shown, wrong numbers, server RSS before/after, and the CPU
seconds of the server and of the browsers with the load average, so that server cost can be
told from client cost (on one machine the browsers compete with the server for the cores).

Two kinds of client do the same visit:

- ``--client chromium``: a context each in one real Chromium, as participants' browsers;
- ``--client protocol``: ``bench/protocol_client.py``, which speaks the browser's WebSocket
  protocol to the same server (the same messages, so the same server work per action) without
  rendering, so the machine's cores go to the server and its runs measure the server.

With ``--clients-nice 19`` the clients run at the lowest CPU priority: on one machine, the
server then gets the cores first, as it would if the browsers were on the participants' laptops.

    python bench/bench_workshop.py [--sessions 10] [--client protocol|chromium] [--think 0]
                                   [--clients-nice 0] [--stagger 0.25] [--heavy 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ZOO = "digits-finetune"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def browser_cpu_seconds() -> float:
    total = 0.0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"chromium" in (proc / "cmdline").read_bytes():
                    total += cpu_seconds(int(proc.name))
            except (OSError, IndexError, ValueError):
                pass
    return total


def expected_soup_vals() -> dict[str, str]:
    """For each checkpoint: the library's uniform soup of all the others on val, as the app shows it."""
    from soup_core.recipes import RECIPES
    from soup_core.zoo import open_zoo
    zoo = open_zoo(ZOO, device="cpu")
    out = {}
    for unticked in zoo.names:
        soup = RECIPES["uniform"].make(zoo.ingredients([n for n in zoo.names if n != unticked]), zoo.evaluator)
        out[unticked] = f"{100 * soup.metrics['val'].accuracy:.1f}%"
    return out


async def settle(page) -> None:
    await page.wait_for_timeout(200)
    await page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')",
                                 timeout=600_000)


async def visit(browser, url: str, index: int, expected: dict[str, str], timings: dict, problems: list,
                think: float) -> None:
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(600_000)  # 30 browsers on 2 cores load the page slowly: measure, do not fail
    context.set_default_navigation_timeout(600_000)
    page = await context.new_page()
    pause = pauses(index, think)

    async def action(name: str, coroutine) -> None:
        await asyncio.sleep(next(pause))
        start = time.perf_counter()
        await coroutine
        timings.setdefault(name, []).append(time.perf_counter() - start)
        shown = await page.get_by_test_id("stException").count()
        if shown:
            problems.append(f"session {index}, {name}: {shown} exception(s) shown")

    async def open_app():
        await page.goto(url)
        await page.get_by_test_id("stMetricValue").first.wait_for(timeout=600_000)
        await settle(page)

    soup_val = page.get_by_test_id("stMetric").filter(has_text="soup val").get_by_test_id("stMetricValue")

    async def untick():
        name = list(expected)[index % len(expected)]
        await page.get_by_test_id("stCheckbox").filter(has_text=name).locator("label").click()
        # Done when the live soup shows the library's number for the new set (the number may
        # also be the old one: then the settled run decides).
        try:
            await page.wait_for_function(
                "([wanted]) => [...document.querySelectorAll('[data-testid=stMetric]')]"
                ".some(m => m.innerText.includes('soup val') && m.innerText.includes(wanted))",
                arg=[expected[name]], timeout=300_000)
        finally:
            await settle(page)
        shown = await soup_val.inner_text()
        if shown != expected[name]:
            problems.append(f"session {index}: soup val {shown} after unticking {name}, the library says "
                            f"{expected[name]}")

    async def go(title: str, heading: str):
        await page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
        await page.get_by_role("heading", name=heading).wait_for(timeout=600_000)
        await settle(page)

    async def replay():
        await page.get_by_role("button", name="Run").click()
        await page.get_by_test_id("stSlider").first.wait_for(timeout=600_000)
        await settle(page)

    async def next_step():
        await page.get_by_role("button", name="Next →").click()
        await settle(page)

    async def landscape():
        await page.get_by_role("button", name="Compute").click()
        await page.get_by_text("Lowest val error").wait_for(timeout=600_000)
        await settle(page)

    await action("open", open_app())
    await action("tick", untick())
    await action("replay greedy", replay())
    await action("Tour", go("Tour", "Guided tour"))
    await action("Tour next", next_step())
    await action("Tour next", next_step())
    await action("Landscape page", go("Landscape", "Landscape"))
    await action("Landscape compute", landscape())
    await action("Export", go("Export", "Export"))
    await context.close()


HEAVY_GRID, HEAVY_PLANES = 41, 3


async def compute_own_landscape(url: str, index: int, timings: dict, problems: list) -> None:
    """A heavy session: HEAVY_PLANES planes, one after the other, that no other session computes
    (θ0 and two checkpoints of its own each), at the largest grid the page offers."""
    from protocol_client import ProtocolSession
    for plane in range(HEAVY_PLANES):
        a, b = 6 * index + 2 * plane + 1, 6 * index + 2 * plane + 2
        async with ProtocolSession(url) as s:
            await s.open(f"plane=base,ft-{a:02d},ft-{b:02d}&grid={HEAVY_GRID}")
            await s.goto("Landscape")
            start = time.perf_counter()
            await s.click("Compute")
            timings.setdefault("own landscape (heavy)", []).append(time.perf_counter() - start)
            if "Lowest val error" not in s.text():
                problems.append(f"session {index}: its own landscape did not show")
            problems.extend(f"session {index}: {shown}" for shown in s.exceptions)


async def visit_over_protocol(url: str, index: int, expected: dict[str, str], timings: dict,
                              problems: list, think: float, heavy: int = 0) -> None:
    """The same visit as ``visit``, as the browser's messages without a browser."""
    from protocol_client import ProtocolSession
    if index < heavy:
        return await compute_own_landscape(url, index, timings, problems)
    pause = pauses(index, think)
    async with ProtocolSession(url) as s:
        async def action(name: str, coroutine, check=None) -> None:
            await asyncio.sleep(next(pause))
            start = time.perf_counter()
            await coroutine
            timings.setdefault(name, []).append(time.perf_counter() - start)
            if check is not None and not check():
                problems.append(f"session {index}, {name}: the page did not show what it should")

        name = list(expected)[index % len(expected)]
        await action("open", s.open(), lambda: s.has("metric", "soup val"))
        await action("tick", s.set_checkbox(name, False), lambda: s.metric("soup val") == expected[name])
        await action("replay greedy", s.click("Run"), lambda: s.has("slider", "Step"))
        await action("Tour", s.goto("Tour"))
        await action("Tour next", s.click("Next →"))
        await action("Tour next", s.click("Next →"))
        await action("Landscape page", s.goto("Landscape"))
        await action("Landscape compute", s.click("Compute"), lambda: "Lowest val error" in s.text())
        await action("Export", s.goto("Export"), lambda: s.has("download_button"))
        await s.goto("Ingredients")
        await s.set_text("Your name", f"participant {index}")
        await action("Room submit", s.click("Submit to the room"), lambda: "Submitted" in s.text())
        await action("Room page", s.goto("Room"), lambda: f"participant {index}" in s.text())
        problems.extend(f"session {index}: {shown}" for shown in s.exceptions)


def pauses(index: int, think: float):
    """A participant's pauses before each action: none before the first, then ``think`` seconds
    ± 50% (uniform, seeded by the session), the time to read a result and reach for the next
    control. ``think = 0`` is a burst: every click as soon as the page has settled."""
    rng = random.Random(index)
    yield 0.0
    while True:
        yield rng.uniform(0.5, 1.5) * think


async def crowd(url: str, sessions: int, stagger: float, expected: dict[str, str],
                client: str, think: float = 0.0, heavy: int = 0) -> tuple[dict, list, float]:
    """Every session's visit; returns latencies, problems and the clients' CPU seconds."""
    timings: dict[str, list[float]] = {}
    problems: list[str] = []

    async def delayed(i, run_visit):
        await asyncio.sleep(i * stagger)
        try:
            await run_visit(i)
        except Exception as exc:  # noqa: BLE001 - a failed session is a result to report
            problems.append(f"session {i}: {type(exc).__name__}: {(str(exc) or repr(exc)).splitlines()[0]}")

    if client == "protocol":
        clients_cpu = time.process_time()
        await asyncio.gather(*(delayed(i, lambda i: visit_over_protocol(url, i, expected, timings, problems, think,
                                                                                heavy))
                               for i in range(sessions)))
        return timings, problems, time.process_time() - clients_cpu

    from playwright.async_api import async_playwright
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        clients_cpu = browser_cpu_seconds()
        await asyncio.gather(*(delayed(i, lambda i: visit(browser, url, i, expected, timings, problems, think))
                               for i in range(sessions)))
        clients_cpu = browser_cpu_seconds() - clients_cpu  # before the processes go
        await browser.close()
    return timings, problems, clients_cpu


def percentiles(values) -> str:
    a = np.asarray(values)
    return f"{np.percentile(a, 50):.2f} | {np.percentile(a, 90):.2f} | {a.max():.2f} | {len(a)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--stagger", type=float, default=0.25, help="seconds between session starts")
    parser.add_argument("--clients-nice", type=int, default=0,
                        help="run the clients at this niceness (19: the server keeps the cores first, as it "
                             "would with participants' browsers on their own machines)")
    parser.add_argument("--think", type=float, default=0.0,
                        help="seconds a participant pauses between actions (± 50%%; 0: a burst)")
    parser.add_argument("--heavy", type=int, default=0,
                        help="sessions that each compute a landscape of their own while the others tick "
                             "(protocol clients)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--client", choices=["protocol", "chromium"], default="chromium",
                        help="who plays the participants (see the module's docstring)")
    args = parser.parse_args()
    expected = expected_soup_vals()
    port = args.port or _free_port()
    log = Path(tempfile.mkdtemp()) / "runs.jsonl"
    server_log = log.with_name("server.log")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SOUP_TIMING_LOG": str(log), "SOUP_WARM": "1",
           "SOUP_ROOM_DB": str(log.with_name("room.sqlite"))}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port",
                               str(port), "--server.headless", "true"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=server_log.open("w"))
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_first_visit(url, args.client))  # the server imports and starts its warm-up on the first session
        start = time.perf_counter()
        while "warm-up done" not in server_log.read_text():
            if "warm-up failed" in server_log.read_text() or time.perf_counter() - start > 900:
                raise SystemExit(f"the warm-up did not finish: see {server_log}")
            time.sleep(1)
        warm_line = next(line for line in server_log.read_text().splitlines() if "warm-up done" in line)
        log.write_text("")  # only the crowd's runs from here
        if args.clients_nice:
            os.nice(args.clients_nice)  # this process and the clients it starts from now; the server keeps 0
        rss_before, server_cpu = rss_mb(server.pid), cpu_seconds(server.pid)
        load_before = os.getloadavg()[0]
        wall = time.perf_counter()
        if args.heavy and args.client != "protocol":
            raise SystemExit("--heavy needs --client protocol")
        timings, problems, clients_cpu = asyncio.run(crowd(url, args.sessions, args.stagger, expected, args.client,
                                                             args.think, args.heavy))
        wall = time.perf_counter() - wall
        server_cpu = cpu_seconds(server.pid) - server_cpu
        rss_after, load_after = rss_mb(server.pid), os.getloadavg()[0]
    finally:
        server.terminate()
        server.wait(timeout=30)
    runs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    print((f"{args.heavy} of them computing {HEAVY_PLANES} landscapes of their own (grid {HEAVY_GRID}); "
           if args.heavy else "")
          + f"{args.sessions} {args.client} sessions started {args.stagger} s apart, pausing "
          f"{args.think} s ± 50% between actions (clients at nice {args.clients_nice}), against one server on 127.0.0.1, "
          f"{os.cpu_count()} cores; {warm_line.split('warm-up done')[-1].strip()} of warm-up before\n")
    print("Client-observed latency (s), from the action to the settled page:\n")
    print("| action | p50 | p90 | max | n |\n|---|---:|---:|---:|---:|")
    for name, values in timings.items():
        print(f"| {name} | {percentiles(values)} |")
    print("\nServer-side script runs (s), from the timing hook:\n")
    print("| run | p50 | p90 | max | n |\n|---|---:|---:|---:|---:|")
    groups: dict[str, list[float]] = {}
    for run in runs:
        what = run["page"] + (" · tick" if any(k.startswith("tick:") for k in run["changed"]) else
                              f" · {', '.join(run['changed'][:2])}" if run["changed"] else " · load")
        groups.setdefault(what, []).append(run["seconds"])
    for what, values in sorted(groups.items()):
        print(f"| {what} | {percentiles(values)} |")
    errors = [r for r in runs if r["outcome"] == "error"]
    print(f"\nwall {wall:.1f} s; server CPU {server_cpu:.1f} s; clients' CPU ({args.client}) {clients_cpu:.1f} s; load average {load_before:.1f} → {load_after:.1f}; server RSS "
          f"{rss_before:.0f} → {rss_after:.0f} MB; server runs that raised: {len(errors)}; problems seen by "
          f"clients: {len(problems)}")
    for problem in problems[:20]:
        print(f"- {problem}")


async def _first_visit(url: str, client: str) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1).close()
            break
        except OSError:
            await asyncio.sleep(0.3)
    if client == "protocol":
        from protocol_client import ProtocolSession
        async with ProtocolSession(url) as s:
            await s.open()
        return
    from playwright.async_api import async_playwright
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page()
        await page.goto(url)
        await page.get_by_test_id("stMetricValue").first.wait_for(timeout=600_000)
        await browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
