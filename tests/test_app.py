"""The app shell: renders with AppTest, and serves in a real Chromium (Playwright)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import torch
from streamlit.testing.v1 import AppTest

from appkit.plain import as_read
from soup_core.export import Candidate, plan_export
from soup_core.io import load_state_dict, read_provenance
from soup_core.params import uniform_average
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
    assert _metric(at, "soup val") == f"{100 * soup['val'].accuracy:.1f}%"
    assert _metric(at, "soup test") == f"{100 * soup['test'].accuracy:.1f}%"
    best = max(keep, key=lambda n: zoo.metrics(n)["val"].accuracy)
    assert _metric(at, "best test") == f"{100 * zoo.metrics(best)['test'].accuracy:.1f}%"
    assert at.query_params["use"] == ["ft-03,ft-17"] or at.query_params["use"] == "ft-03,ft-17"


def test_ticks_survive_a_page_switch():
    at = _app()
    at.checkbox(key="tick:digits-finetune:ft-00").uncheck().run()
    at.switch_page("pages/landscape.py").run()
    at.switch_page("pages/ingredients.py").run()
    assert not at.exception
    assert at.checkbox(key="tick:digits-finetune:ft-00").value is False
    assert at.checkbox(key="tick:digits-finetune:ft-01").value is True


def _plotly_values(values):
    """A trace's numbers as a list, whether Plotly wrote them as a list or as typed binary data."""
    if isinstance(values, dict) and "bdata" in values:
        import base64
        import numpy as np
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).tolist()
    return list(values)


def test_greedy_replay_steps_through_the_trace():
    at = _app()
    at.button(key="replay-run").click().run()
    assert not at.exception
    trace = make_soup(open_zoo("digits-finetune"), "greedy").trace
    slider = at.slider(key="replay-step:greedy")
    assert slider.max == len(trace)
    slider.set_value(2).run()
    step = trace[1]
    assert any(f"{step.action} {step.candidate}" in m.value for m in at.markdown)
    slider.set_value(len(trace)).run()
    chart = next(spec for spec in (json.loads(c.proto.spec) for c in at.get("plotly_chart"))
                 if any(t.get("name") == "the soup after each step" for t in spec["data"]))
    line = next(t for t in chart["data"] if t["name"] == "the soup after each step")
    progress = _plotly_values(line["y"])
    assert round(float(progress[-1]), 2) == 97.77  # `soup make greedy digits-finetune`: val 97.77%
    assert all(later >= earlier for earlier, later in zip(progress, progress[1:]))  # greedy never lets val drop


def test_landscape_page_computes_and_draws_a_plane():
    at = _app()
    at.switch_page("pages/landscape.py").run()
    assert not at.exception
    at.slider(key="land-grid").set_value(5).run()
    at.button(key="land-compute").click().run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == 1
    assert any("Lowest val error" in m.value and "precision: fp32." in m.value for m in at.markdown)
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = [t.get("name") for t in figure["data"]]
    assert names.index("lowest error") < names.index("the three points")  # marked, under the stars
    assert {a["text"] for a in figure["layout"]["annotations"]} == {"base", "ft-00", "ft-01"}  # labelled on boxes
    # this plane is 1.6 times taller than wide: equal units would leave most of the width empty
    assert "scaleanchor" not in figure["layout"].get("yaxis", {})
    assert any("drawn at different scales" in c.value for c in at.caption)
    at.radio(key="land-metric").set_value("loss").run()  # contours of loss instead of error
    assert not at.exception and len(at.get("plotly_chart")) == 1
    # the figure's three files, and the sidebar's plotly.min.js that a saved figure loads
    assert {d.key for d in at.get("download_button")} == {"land-json", "land-csv", "land-html", "plotly-js"}
    at.selectbox(key="land-precision").set_value("bf16").run()
    at.button(key="land-compute").click().run()
    assert not at.exception
    deviation = [m.value for m in at.markdown if "precision: bf16" in m.value]
    assert deviation and "of fp32 on the points checked" in deviation[0]


PAGES = ["ingredients", "recipes", "geometry", "landscape", "tour", "export", "room"]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exception(page):
    at = _app()
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception
    assert at.title[0].value


def test_every_tour_step_renders():
    at = _app()
    at.switch_page("pages/tour.py").run()
    for step in at.radio(key="tour-step").options:
        at.radio(key="tour-step").set_value(step).run()
        assert not at.exception, step


def test_geometry_pairs_and_recipe_ablations_render():
    at = _app()
    at.switch_page("pages/geometry.py").run()
    at.button(key="geometry-run").click().run()
    assert not at.exception and len(at.get("plotly_chart")) >= 5
    at.switch_page("pages/recipes.py").run()
    at.toggle(key="recipes-ablations").set_value(True).run()
    assert not at.exception and len(at.get("plotly_chart")) == 3


def test_an_uploaded_checkpoint_joins_the_zoo():
    zoo = open_zoo("digits-finetune")
    at = _app()
    at.file_uploader(key="upload:digits-finetune:False").set_value(
        [("my-model.safetensors", zoo.path("ft-05").read_bytes(), "application/octet-stream")]).run()
    assert not at.exception and not at.error
    assert _metric(at, "Checkpoints") == str(len(zoo.names) + 1)
    # It arrives unticked, so the soup on screen does not change until the user ticks it.
    before = _metric(at, "soup val")
    box = at.checkbox(key="tick:digits-finetune:my-model")
    assert box.value is False
    box.check().run()
    assert not at.exception
    ev = zoo.evaluator
    soup = ev.evaluate(uniform_average([zoo.state_dict(n) for n in (*zoo.names, "ft-05")]))
    assert _metric(at, "soup val") == f"{100 * soup['val'].accuracy:.1f}%" != before


@pytest.mark.parametrize("name, data, message", [
    ("truncated.safetensors", None, "truncated"),
    ("other.safetensors", "mismatch", "shape"),
    ("notes.pt", b"not a checkpoint at all", "notes.pt"),
])
def test_a_bad_upload_shows_an_error_and_the_app_keeps_serving(tmp_path, name, data, message):
    import safetensors.torch
    import torch
    zoo = open_zoo("digits-finetune")
    if data is None:
        data = zoo.path("ft-05").read_bytes()[:5000]
    elif data == "mismatch":
        data = safetensors.torch.save({k: torch.zeros(3) for k in zoo.state_dict("ft-05")})
    at = _app()
    at.file_uploader(key="upload:digits-finetune:False").set_value([(name, data, "application/octet-stream")]).run()
    assert not at.exception
    assert at.sidebar.error and any(name in as_read(e.value) for e in at.sidebar.error)
    assert message.lower() in " ".join(as_read(e.value) for e in at.sidebar.error).lower()
    assert _metric(at, "Checkpoints") == str(len(zoo.names))


def test_export_offers_the_ticked_soup_then_a_chosen_recipe():
    at = _app()
    at.switch_page("pages/export.py").run()
    assert not at.exception
    assert "soup make uniform digits-finetune" in at.code[0].value
    at.switch_page("pages/recipes.py").run()
    form_select = next(s for s in at.selectbox if s.label == "Soup to export")
    form_select.set_value("greedy")
    next(b for b in at.button if b.label == "Use for export").click().run()
    at.switch_page("pages/export.py").run()
    assert at.code[0].value.startswith("soup make greedy digits-finetune")
    greedy = make_soup(open_zoo("digits-finetune"), "greedy")
    assert _metric(at, "test accuracy") == f"{100 * greedy.metrics['test'].accuracy:.1f}%"


def test_a_weighted_soup_is_set_by_hand_on_the_recipes_page_and_shared_by_link():
    at = _app()
    at.switch_page("pages/recipes.py").run()
    next(s for s in at.selectbox if s.label == "Soup to export").set_value("weighted").run()
    at.number_input(key="recipes-param:weighted:weights:ft-00").set_value(0.0)
    at.number_input(key="recipes-param:weighted:weights:ft-05").set_value(3.0)
    next(b for b in at.button if b.label == "Use for export").click().run()
    assert at.query_params["export"] in (["weighted;weights=ft-00=0,ft-05=3"], "weighted;weights=ft-00=0,ft-05=3")
    at.switch_page("pages/export.py").run()
    assert not at.exception
    assert at.code[0].value.startswith("soup make weighted digits-finetune --weights ft-00=0,ft-05=3")


@pytest.mark.parametrize("candidate, argv", [
    (Candidate.point(("base", "ft-00", "ft-01"), (1.0, 0.5), "interpolate"),
     ["point", "digits-finetune", "--plane", "base", "ft-00", "ft-01", "--xy", "1", "0.5", "--bn", "interpolate",
      "--out", "point.safetensors"]),
    (Candidate.of_recipe("greedy", tie="gt"), ["make", "greedy", "digits-finetune", "--tie", "gt",
                                              "--out", "greedy.safetensors"]),
    (Candidate.of_recipe("weighted", weights="ft-00=0,ft-05=2.5"),
     ["make", "weighted", "digits-finetune", "--weights", "ft-00=0,ft-05=2.5", "--out", "weighted.safetensors"]),
])
def test_the_app_and_the_cli_export_the_same_bytes(tmp_path, monkeypatch, candidate, argv):
    from soup_core.cli import main
    at = _app()
    at.session_state["workspace"] = replace(at.session_state["workspace"], export=candidate)
    at.switch_page("pages/export.py").run()
    assert not at.exception
    assert at.code[0].value == "soup " + " ".join(argv)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    # What the page's download buttons serve: the plan it drew, for this session's (upload-free) zoo.
    from appkit.cache import export_plan
    plan = export_plan(open_zoo("digits-finetune"), candidate, ())
    assert plan.safetensors_bytes() == (tmp_path / argv[-1]).read_bytes()
    card = (tmp_path / argv[-1]).with_suffix(".md").read_text()
    assert plan.model_card() == card and "soup " + " ".join(argv) in card
    metrics = open_zoo("digits-finetune").evaluator.evaluate(load_state_dict(tmp_path / argv[-1]))
    assert _metric(at, "val accuracy") == f"{100 * metrics['val'].accuracy:.1f}%"


def test_export_returns_to_the_ticked_set_when_ticks_change():
    at = _app()
    at.session_state["workspace"] = replace(at.session_state["workspace"], export=Candidate.of_recipe("greedy"))
    at.switch_page("pages/export.py").run()
    assert at.code[0].value.startswith("soup make greedy")
    at.radio(key="export-choice").set_value(0).run()
    assert at.code[0].value.startswith("soup make uniform digits-finetune --ingredients")
    at.switch_page("pages/ingredients.py").run()
    at.checkbox(key="tick:digits-finetune:ft-00").uncheck().run()
    at.switch_page("pages/export.py").run()
    assert not at.exception and len(at.radio(key="export-choice").options) == 1
    assert "ft-00," not in at.code[0].value and "--ingredients ft-01," in at.code[0].value


def test_a_shared_link_restores_the_ticks_on_the_export_page():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params["use"] = "ft-17,ft-22,ft-24"
    at.switch_page("pages/export.py").run()
    assert not at.exception and not at.error
    assert at.code[0].value == ("soup make uniform digits-finetune --ingredients ft-17,ft-22,ft-24 "
                                "--out uniform.safetensors")
    assert at.query_params["use"] in (["ft-17,ft-22,ft-24"], "ft-17,ft-22,ft-24")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    yield from _serve()


@pytest.fixture
def fresh_server():
    """A server no one has visited yet."""
    yield from _serve()


def _serve(env: dict[str, str] | None = None):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
                             "--server.port", str(port), "--server.headless", "true"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "SOUP_WORKERS": "1", **(env or {})})
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
    from playwright.sync_api import expect, sync_playwright

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
            box = page.get_by_test_id("stCheckbox").filter(has_text=name)
            box.locator("label").click()
            expect(box.locator("input")).not_to_be_checked(timeout=60_000)
        page.wait_for_function(
            "([before]) => [...document.querySelectorAll('[data-testid=stMetric]')]"
            ".some(m => m.innerText.includes('soup val') && !m.innerText.includes(before))", arg=[before],
            timeout=60_000)
        assert "ft-00" not in page.url.split("use=")[-1].split("&")[0].split("%2C")
        page.screenshot(path=str(ARTIFACTS / "ingredients-toggled.png"), full_page=True)
        browser.close()


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM,
                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])


def _settle(page) -> None:
    """Wait until Streamlit has finished the current run (its "Running…" status is gone)."""
    page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')", timeout=120_000)


def _open_page(page, server: str, title: str) -> None:
    page.goto(server)
    page.get_by_test_id("stMetricValue").first.wait_for(timeout=60_000)
    _settle(page)
    if title != "Ingredients":  # the default page
        page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    page.get_by_role("heading", name=title if title != "Tour" else "Guided tour").wait_for(timeout=60_000)
    _settle(page)


def _download(page, button: str, target: Path) -> Path:
    """Press a download button and save what it gives to ``target``."""
    with page.expect_download(timeout=60_000) as info:
        page.get_by_role("button", name=button).click()
    info.value.save_as(target)
    return target


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="make test installs Debian's chromium")
def test_landscape_upload_and_export_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    zoo = open_zoo("digits-finetune")
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})

        # An uploaded checkpoint appears among the ingredients.
        _open_page(page, server, "Ingredients")
        page.get_by_role("heading", name="Your soup").wait_for(timeout=60_000)
        upload = tmp_path / "my-upload.safetensors"
        upload.write_bytes(zoo.path("ft-07").read_bytes())
        page.locator("input[type=file]").set_input_files(str(upload))
        _settle(page)
        page.get_by_test_id("stCheckbox").filter(has_text="my-upload").wait_for(timeout=60_000)
        assert page.get_by_test_id("stMetricValue").first.inner_text() == str(len(zoo.names) + 1)

        # The export downloads a file that loads back and equals the soup it shows.
        page.get_by_test_id("stSidebarNav").get_by_text("Export", exact=True).click()
        button = page.get_by_role("button", name="Download safetensors")
        button.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "export.png"), full_page=True)
        with page.expect_download(timeout=60_000) as info:
            button.click()
        ticked = tmp_path / "ticked.safetensors"
        info.value.save_as(ticked)

        # A landscape is computed and drawn; a clicked grid point is kept and exported.
        page.get_by_test_id("stSidebarNav").get_by_text("Landscape", exact=True).click()
        page.get_by_role("button", name="Compute").click()
        page.locator(".js-plotly-plot .contour").first.wait_for(timeout=120_000)
        page.get_by_text("Lowest val error").wait_for(timeout=60_000)
        # the clickable grid points: the scatter trace with the most points (grid × grid)
        traces = page.locator(".js-plotly-plot .scatterlayer .trace")
        grid = max(range(traces.count()), key=lambda i: traces.nth(i).locator(".point").count())
        traces.nth(grid).locator(".point").nth(40).click(force=True)
        page.get_by_text("Keep this point for export").wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "landscape.png"), full_page=True)
        page.get_by_role("button", name="Keep this point for export").click()
        page.get_by_text("Ready on the Export page.").wait_for(timeout=60_000)
        page.get_by_test_id("stSidebarNav").get_by_text("Export", exact=True).click()
        page.get_by_role("code").filter(has_text="soup point digits-finetune --plane base ft-00 ft-01") \
            .wait_for(timeout=60_000)
        point = _download(page, "Download safetensors", tmp_path / "point.safetensors")
        browser.close()
    state = load_state_dict(ticked)
    expected = uniform_average([zoo.state_dict(n) for n in zoo.names])
    assert [i["name"] for i in read_provenance(ticked)["ingredients"]] == list(zoo.names)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert read_provenance(point)["recipe"] == "landscape-point"
    assert load_state_dict(point).keys() == expected.keys()


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="make test installs Debian's chromium")
def test_a_merge_method_from_the_board_exports_with_its_mergekit_configuration_in_chromium(server, tmp_path):
    """TIES as the board makes it (λ best on val) goes to Export: its command chooses λ again, its
    mergekit configuration carries the λ chosen."""
    import yaml
    from playwright.sync_api import sync_playwright

    zoo = open_zoo("digits-finetune")
    chosen = make_soup(zoo, "ties", normalize=True, **{"lambda": "val"}).options["lambda"]
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _open_page(page, server, "Recipes")
        picker = page.get_by_test_id("stSelectbox").filter(has_text="Soup to export")
        picker.wait_for(timeout=300_000)  # under the board, which waits for the server's warm-up
        picker.click()
        page.keyboard.type("TIES merging")  # the list is long: filter it as a user would
        page.get_by_role("option", name="TIES merging", exact=True).click()
        _settle(page)
        assert page.get_by_role("checkbox", name="lambda: best on val").is_checked()
        page.get_by_role("button", name="Use for export").click()
        page.get_by_text("TIES merging is ready on the Export page.").wait_for(timeout=60_000)
        page.get_by_test_id("stSidebarNav").get_by_text("Export", exact=True).click()
        page.get_by_role("code").filter(has_text="soup make ties digits-finetune").filter(has_text="--lambda val") \
            .wait_for(timeout=120_000)
        target = _download(page, "Download the mergekit configuration", tmp_path / "ties.yml")
        browser.close()
    config = yaml.safe_load(target.read_text())
    assert config["merge_method"] == "ties" and config["parameters"]["lambda"] == chosen
    assert len(config["models"]) == len(zoo.names)


SCREENS = [*(("page", title) for title in ("Ingredients", "Recipes", "Geometry", "Landscape", "Export", "Room")),
           *(("step", str(step)) for step in range(1, 9))]  # the Tour's eight steps, each by its link
FIGURE_LAYOUT = (ROOT / "tests" / "figure_layout.js").read_text()


def _full_page_screenshot(page, path: Path) -> None:
    """The whole page: Streamlit scrolls its main area itself, so the window is made as tall as it."""
    width, height = page.viewport_size["width"], page.viewport_size["height"]
    tall = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": width, "height": max(height, int(tall))})
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].every(p => p._fullLayout)")
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": width, "height": height})


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="make test installs Debian's chromium")
def test_every_page_and_tour_step_reads_well_at_two_window_sizes(server):
    """Each figure spans its container, titles every axis, keeps its labels off each other and off its
    markers and its legend off the data, and writes its text at 4.5:1 or more on white; no Cancel
    button outlives its computation. The full-page screenshots go to test-artifacts/screenshots
    (``make screenshots`` copies them to docs/screenshots)."""
    from playwright.sync_api import sync_playwright

    shots = ARTIFACTS / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    problems = []
    with sync_playwright() as p:
        browser = _browser(p)
        for width, height in ((1400, 1000), (1024, 768)):
            page = browser.new_page(viewport={"width": width, "height": height})
            for kind, name in SCREENS:  # each by its own address: a fresh session, as a shared link opens it
                path = f"tour?step={name}" if kind == "step" else "" if name == "Ingredients" else name.lower()
                page.goto(f"{server}/{path}")
                page.get_by_role("heading", name="Guided tour" if kind == "step" else name).wait_for(timeout=120_000)
                _settle(page)
                if name == "Landscape" and not page.locator(".js-plotly-plot").count():
                    page.get_by_role("button", name="Compute").click()
                    page.locator(".js-plotly-plot").first.wait_for(timeout=300_000)
                    _settle(page)
                where = f"{name if kind == 'page' else 'Tour step ' + name} at {width}×{height}"
                assert not page.get_by_test_id("stException").count(), where
                if page.get_by_role("button", name="Cancel").count():
                    problems.append(f"{where}: a Cancel button after the computation finished")
                for i, figure in enumerate(page.evaluate(FIGURE_LAYOUT)):
                    if figure["width"] < 0.9 * figure["container"]:
                        problems.append(f"{where}, figure {i + 1}: {figure['width']:.0f} of "
                                        f"{figure['container']:.0f} px")
                    problems += [f"{where}, figure {i + 1}: {axis} has no title" for axis, title in figure["axes"]
                                 if not title]
                    problems += [f"{where}, figure {i + 1}: {a!r} overlaps {b!r}" for a, b in figure["clashes"]]
                    if figure["legendOverPlot"] > 0:
                        problems.append(f"{where}, figure {i + 1}: the legend covers the plotting area")
                    if figure["contrast"] < 4.5:  # ticks, axis titles, legend and colour bar on white (WCAG AA)
                        problems.append(f"{where}, figure {i + 1}: text at {figure['contrast']:.1f}:1 on white")
                file = f"{name.lower() if kind == 'page' else 'tour-step-' + name}-{width}.png"
                _full_page_screenshot(page, shots / file)
            page.close()
        browser.close()
    assert not problems, "\n".join(problems)


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="make test installs Debian's chromium")
def test_a_shared_link_restores_the_workspace_on_every_page_and_figures_download_in_chromium(fresh_server, tmp_path):
    from playwright.sync_api import sync_playwright

    link = "zoo=digits-finetune&use=ft-03,ft-17&export=greedy&plane=base,ft-17,ft-22&grid=9"
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # The server's first visitor opens a page's own URL, on a page that shows none of the link.
        page.goto(f"{fresh_server}/geometry?{link}")
        page.get_by_role("heading", name="Geometry").wait_for(timeout=60_000)
        _settle(page)
        nav = page.get_by_test_id("stSidebarNav")
        assert [t.strip() for t in nav.get_by_role("link").all_inner_texts()] == [
            "Ingredients", "Recipes", "Geometry", "Landscape", "Tour", "Export", "Room"]  # app.py's navigation
        shared = {k: v[0] for k, v in parse_qs(urlsplit(page.url).query).items()}
        assert {k: shared.get(k) for k in ("use", "export", "plane", "grid")} == {
            "use": "ft-03,ft-17", "export": "greedy", "plane": "base,ft-17,ft-22", "grid": "9"}

        # Each figure's data and an HTML copy download (made when pressed).
        with page.expect_download(timeout=60_000) as info:
            page.get_by_role("button", name="Data (CSV)").first.click()
        assert info.value.suggested_filename == "angles.csv"
        info.value.save_as(tmp_path / "angles.csv")
        assert (tmp_path / "angles.csv").read_text().splitlines()[0] == "i,j,angle_deg,cosine,distance"
        with page.expect_download(timeout=60_000) as info:
            page.get_by_role("button", name="Figure (HTML)").first.click()
        saved = tmp_path / "figures"
        saved.mkdir()
        info.value.save_as(saved / "angles.html")
        assert (saved / "angles.html").read_text().count("Plotly.newPlot(") == 2
        assert (saved / "angles.html").stat().st_size < 1 << 20
        offline = page.context.browser.new_page()
        offline.goto((saved / "angles.html").as_uri())  # without plotly.min.js beside it: says what to do
        assert offline.get_by_text("save it from the Model Soup Lab sidebar").count() == 1
        with page.expect_download(timeout=60_000) as info:
            page.get_by_role("button", name="plotly.min.js for saved figures").click()
        info.value.save_as(saved / "plotly.min.js")
        offline.goto((saved / "angles.html").as_uri())  # with it: both figures drawn, the notice gone
        offline.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= 2",
                                  timeout=60_000)
        assert offline.get_by_text("save it from the Model Soup Lab sidebar").count() == 0
        offline.close()

        # Export offers the link's choice, and switches back to the link's ticked set.
        page.get_by_test_id("stSidebarNav").get_by_text("Export", exact=True).click()
        page.get_by_role("code").filter(has_text="soup make greedy digits-finetune").wait_for(timeout=60_000)
        page.get_by_text("Uniform soup of the 2 ticked ingredient(s)").click()
        page.get_by_role("code").filter(has_text="--ingredients ft-03,ft-17").wait_for(timeout=60_000)

        # The Landscape page opens on the link's plane and grid.
        page.get_by_test_id("stSidebarNav").get_by_text("Landscape", exact=True).click()
        page.get_by_role("heading", name="Landscape").wait_for(timeout=60_000)
        _settle(page)
        grid = page.get_by_test_id("stSlider").filter(has_text="Grid").get_by_test_id("stSliderThumbValue")
        assert grid.inner_text() == "9"
        # The page writes what its widgets hold back into the URL: the link's plane and grid.
        written = parse_qs(urlsplit(page.url).query)
        assert (written["plane"], written["grid"], written["split"]) == (["base,ft-17,ft-22"], ["9"], ["val"])
        assert not page.get_by_test_id("stException").count()
        browser.close()


def test_the_session_upload_folder_goes_away_with_the_session():
    import gc
    from appkit.uploads import SessionFolder
    folder = SessionFolder()
    path = folder.path
    (path / "upload.safetensors").write_bytes(b"x")
    del folder
    gc.collect()
    assert not path.exists()


@pytest.mark.parametrize("file_name, joins_as", [("base.safetensors", "base-upload"), ("greedy.pt", "greedy-upload"),
                                                 ("ft-00", "ft-00-upload")])
def test_an_upload_never_takes_a_name_the_zoo_uses(file_name, joins_as):
    zoo = open_zoo("digits-finetune")
    at = _app()
    at.file_uploader(key="upload:digits-finetune:False").set_value(
        [(file_name, zoo.path("ft-05").read_bytes(), "application/octet-stream")]).run()
    assert not at.exception and not at.error
    assert at.checkbox(key=f"tick:digits-finetune:{joins_as}").value is False
    assert any(f"joined as '{joins_as}'" in i.value for i in at.sidebar.info)
    for page in ("landscape", "export", "geometry"):
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, page


def test_an_upload_of_another_architecture_named_like_the_reference_is_refused():
    import safetensors.torch
    at = _app()
    blob = safetensors.torch.save({"other.weight": torch.zeros(3)})
    at.file_uploader(key="upload:digits-finetune:False").set_value([("ft-00", blob, "application/octet-stream")]).run()
    assert not at.exception and "missing keys" in at.sidebar.error[0].value
    assert _metric(at, "Checkpoints") == "32"


def test_removing_a_file_from_the_uploader_removes_its_checkpoint():
    zoo = open_zoo("digits-finetune")
    at = _app()
    uploader = at.file_uploader(key="upload:digits-finetune:False")
    uploader.set_value([("mine.safetensors", zoo.path("ft-05").read_bytes(), "application/octet-stream")]).run()
    assert _metric(at, "Checkpoints") == "33"
    at.file_uploader(key="upload:digits-finetune:False").set_value([]).run()
    assert not at.exception and _metric(at, "Checkpoints") == "32"


def test_a_new_server_sweeps_the_upload_folders_of_dead_ones(tmp_path):
    from appkit.uploads import FOLDER_PREFIX, sweep_dead_servers
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{FOLDER_PREFIX}{dead.stdout.strip()}-abc"
    live = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "x.safetensors").write_bytes(b"x")
    assert sweep_dead_servers(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


def test_the_live_soup_says_whether_it_beats_the_best_model_and_how_surely():
    from appkit.plain import literal
    from soup_core.recipes.best_individual import tie_sentence
    from soup_core.significance import versus_best
    at = _app()
    zoo = open_zoo("digits-finetune")
    for name in zoo.names:
        if name not in ("ft-03", "ft-17"):
            at.checkbox(key=f"tick:digits-finetune:{name}").uncheck()
    at.run()
    uniform = make_soup(zoo, "uniform", ["ft-03", "ft-17"])
    expected = versus_best(uniform, zoo.ingredients(["ft-03", "ft-17"]), zoo.evaluator)[0]
    captions = " ".join(as_read(c.value) for c in at.caption)
    assert f"Uniform soup vs the {expected.a} on test: {expected.sentence()}" in captions
    assert not any("tie on val" in c.value for c in at.caption)  # ft-03 and ft-17 do not tie
    at.checkbox(key="tick:digits-finetune:ft-20").check().run()  # ft-17 and ft-20 do
    tie = tie_sentence(make_soup(zoo, "best", ["ft-03", "ft-17", "ft-20"]))
    assert tie.startswith("2 models tie on val") and literal(tie) in [c.value for c in at.caption]
    at.switch_page("pages/recipes.py").run()
    assert not at.exception
    table = at.dataframe[0].value
    greedy = make_soup(zoo, "greedy")
    row = table[table["recipe"] == "Greedy soup"].iloc[0]
    assert row["test vs best"] == versus_best(greedy, zoo.ingredients(), zoo.evaluator)[0].brief()


def test_the_tour_says_what_its_own_data_shows():
    """Every claim is measured on the zoo the step shows: the pair, its barrier, each comparison."""
    import numpy as np

    from soup_core.landscape import barrier_interval, interpolation_path
    from soup_core.pairs import flattest_pair, pair_analyses
    from soup_core.significance import versus_best
    zoo = open_zoo("digits-finetune")
    at = _app()
    at.switch_page("pages/tour.py").run()
    text = " ".join(as_read(m.value) for m in at.markdown)
    a, b, _ = flattest_pair(zoo.ingredients(), zoo.evaluator)
    line = interpolation_path(zoo.evaluator, zoo.state_dict(a), zoo.state_dict(b), np.linspace(0, 1, 11),
                              splits=["test"])
    barrier = 100 * line.barrier(line.error["test"])
    assert f"**{a}** and **{b}**" in text and f"{barrier:.1f} points" in text
    # The verdict follows the interval over the test images, not the point estimate alone.
    interval = barrier_interval(zoo.evaluator, zoo.state_dict(a), zoo.state_dict(b), "test")
    low, high = interval.low, interval.high
    assert f"(95% interval {100 * low:.1f} to {100 * high:.1f} points over the" in text
    verdict = "stays in the basin" if high < 0.01 else "different basins" if low >= 0.01 else "cannot tell"
    assert verdict in text
    # The figure under the words shows the same barrier, on the same line.
    drawn = json.loads(next(c.proto.spec for c in at.get("plotly_chart") if "tour-basin-line" in c.proto.id))
    assert drawn["layout"]["annotations"][0]["text"] == f"barrier {barrier:.1f} points"
    assert drawn["data"][0]["y"] == pytest.approx(100 * np.array(line.error["test"]))
    at.button(key="tour-next").click().run()
    assert at.radio(key="tour-step").value.startswith("2")
    report = pair_analyses(zoo.ingredients(zoo.names[:10]), zoo.evaluator, base=zoo.base, split="test")
    r = report.correlation("approximation", "loss_difference")
    soup_only = report.correlation("soup_term", "loss_difference")
    text = " ".join(as_read(m.value) for m in at.markdown)
    assert (f"follows the measured gap with r = {r:+.2f} (the same sign in {report.sign_agreement()} of 45)" in text
            and f"alone gives r = {soup_only:+.2f}" in text and "over the whole segment" in text)
    at.button(key="tour-next").click().run()
    assert at.radio(key="tour-step").value.startswith("3")
    uniform = versus_best(make_soup(zoo, "uniform"), zoo.ingredients(), zoo.evaluator)[0]
    assert uniform.sentence() in " ".join(as_read(m.value) for m in at.markdown)
    at.button(key="tour-next").click().run()
    text = " ".join(as_read(m.value) for m in at.markdown)
    # `soup make greedy digits-finetune`: -1.0 points against ft-17, p = 0.29, not significant on 630 images
    assert ("Greedy soup: 1.0 points below the best individual (ft-17) on test; not significant, so these 630 images "
            "cannot tell the two apart (exact McNemar test, p = 0.29).") in text
    assert "fix it" not in text
    at.button(key="tour-back").click().run()
    assert at.radio(key="tour-step").value.startswith("3") and not at.exception


def test_the_tours_language_model_step_reports_the_lm_zoos_own_comparisons():
    from soup_core.significance import versus_best
    lm = open_zoo("code-lm")
    at = _app()
    at.switch_page("pages/tour.py").run()
    at.radio(key="tour-step").set_value("8 · Language models and adapters").run()
    text = " ".join(as_read(m.value) for m in at.markdown)
    comparisons = {c.split: c for c in versus_best(make_soup(lm, "uniform"), lm.ingredients(), lm.evaluator)}
    assert f"on test, {comparisons['test'].sentence()}" in text and "tokens" in comparisons["test"].sentence()
    for shift in ("email", "json"):
        assert f"on the shift {shift}, {comparisons[shift].sentence()}" in text
    assert "of its 16 fine-tunings, 13 are LoRA adapters" in text and "3 are full fine-tunings" in text


def test_the_tours_scratch_step_reports_what_alignment_measures():
    import numpy as np

    from soup_core.align import barrier_table
    zoo = open_zoo("digits-scratch")
    aligned = zoo.aligned("scratch-00")
    table = barrier_table(zoo, aligned, zoo.evaluator, "test")
    at = _app()
    at.switch_page("pages/tour.py").run()
    at.radio(key="tour-step").set_value(next(s for s in at.radio(key="tour-step").options if s.startswith("5"))).run()
    text = " ".join(as_read(m.value) for m in at.markdown)
    assert not at.exception
    assert f"**{100 * np.mean([r['before'] for r in table]):.1f} points**" in text
    assert f"**{100 * np.mean([r['after'] for r in table]):.1f} points**" in text
    soup = make_soup(aligned, "uniform").metrics["test"].accuracy
    assert f"aligned models scores {100 * soup:.1f}%" in text


def test_ticking_from_buttons_and_applying_a_replayed_soup():
    zoo = open_zoo("digits-finetune")
    at = _app()
    at.button(key="tick-none").click().run()
    assert not any(at.checkbox(key=f"tick:digits-finetune:{n}").value for n in zoo.names)
    at.button(key="tick-top").click().run()
    top = sorted(zoo.names, key=lambda n: -zoo.metrics(n)["val"].accuracy)[:5]
    assert {n for n in zoo.names if at.checkbox(key=f"tick:digits-finetune:{n}").value} == set(top)
    at.button(key="replay-run").click().run()
    greedy = make_soup(zoo, "greedy", [n for n in zoo.names if n in top])
    assert at.slider(key="replay-step:greedy").max == len(greedy.trace)  # replayed on the ticked set
    at.button(key="replay-apply").click().run()
    assert not at.exception
    assert {n for n in zoo.names if at.checkbox(key=f"tick:digits-finetune:{n}").value} == set(greedy.ingredients)
    at.button(key="tick-all").click().run()
    assert all(at.checkbox(key=f"tick:digits-finetune:{n}").value for n in zoo.names)


def test_the_same_landscape_is_computed_once_for_the_whole_server(monkeypatch):
    import appkit.workers as workers
    calls = []
    real = workers.heavy

    def counted(zoo, task, *args, **kwargs):  # what the page hands to the heavy work (its worker process)
        calls.append(task)
        return real(zoo, task, *args, **kwargs)

    monkeypatch.setattr(workers, "heavy", counted)
    first, second = _app(), _app()
    for at in (first, second):  # two sessions, the same settings, Compute pressed twice in the first
        at.switch_page("pages/landscape.py").run()
        at.slider(key="land-grid").set_value(7).run()
        at.button(key="land-compute").click().run()
        assert not at.exception and any("Lowest val error" in m.value for m in at.markdown)
    first.button(key="land-compute").click().run()
    assert calls.count("landscape") == 1 and not first.exception
    third = _app()  # a shared link's recipient: the plane is on the server, so it is drawn without Compute
    third.switch_page("pages/landscape.py").run()
    third.slider(key="land-grid").set_value(7).run()
    assert any("Lowest val error" in m.value for m in third.markdown) and calls.count("landscape") == 1


def test_no_cancel_button_stays_after_a_landscape_is_computed():
    at = _app()
    at.switch_page("pages/landscape.py").run()
    at.slider(key="land-grid").set_value(5).run()
    at.button(key="land-compute").click().run()
    assert not at.exception and any("Lowest val error" in m.value for m in at.markdown)
    assert [b.key for b in at.button if b.key == "land-cancel"] == []


def test_closed_sessions_upload_folders_are_swept_after_a_grace_period(tmp_path):
    from appkit.uploads import FOLDER_PREFIX, sweep_closed_sessions
    closed = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-closedsession-x1"
    connected = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-livesession-x2"
    for folder in (closed, connected):
        folder.mkdir()
        (folder / "mine.safetensors").write_bytes(b"x")
    clock = [1000.0]
    open_sessions = {"livesession"}
    sweep = lambda: sweep_closed_sessions(lambda sid: sid in open_sessions, tmp_path, grace_seconds=300,  # noqa: E731
                                          now=lambda: clock[0])
    assert sweep() == [] and closed.exists()  # gone only just now: it may reconnect
    clock[0] += 299
    assert sweep() == [] and closed.exists()
    clock[0] += 2
    assert sweep() == [closed] and not closed.exists() and connected.exists()


def test_the_servers_upload_budget_refuses_what_does_not_fit_and_says_what_to_do(monkeypatch):
    monkeypatch.setenv("SOUP_UPLOAD_BUDGET_MB", "0.05")  # 50 KiB for every participant together
    at = _app()
    zoo = open_zoo("digits-finetune")
    uploader = at.file_uploader(key="upload:digits-finetune:False")
    uploader.set_value([("mine.safetensors", zoo.path("ft-05").read_bytes(), "application/octet-stream")]).run()
    assert not at.exception and _metric(at, "Checkpoints") == "32"
    errors = " ".join(as_read(e.value) for e in at.error)
    assert "keeps at most 0.05 MB (SOUP_UPLOAD_BUDGET_MB)" in errors and "remove an upload" in errors


def _timed_page() -> None:
    import streamlit as st

    from appkit.timing import timed_run
    timed_run(lambda: st.checkbox("a box", key="box"), "Demo")


def test_the_timing_hook_logs_each_run_with_its_page_and_the_widget_that_caused_it(monkeypatch, tmp_path):
    log = tmp_path / "runs.jsonl"
    monkeypatch.setenv("SOUP_TIMING_LOG", str(log))
    at = AppTest.from_function(_timed_page, default_timeout=60).run()
    at.checkbox(key="box").check().run()
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["page"] for r in runs] == ["Demo", "Demo"]
    assert runs[0]["changed"] == [] and runs[1]["changed"] == ["box"]
    assert all(r["outcome"] == "ok" and r["seconds"] >= 0 for r in runs)
    monkeypatch.delenv("SOUP_TIMING_LOG")
    at.checkbox(key="box").uncheck().run()  # off unless asked
    assert len(log.read_text().splitlines()) == 2


def test_landscape_settings_live_in_the_url_and_a_shared_link_restores_them_on_any_page():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params.update({"plane": "base,ft-17,ft-22", "grid": "7", "bn": "keep", "split": "test",
                            "precision": "bf16", "margin": "nonsense"})
    at.run()
    at.switch_page("pages/export.py").run()  # opened on another page first: kept for later
    at.switch_page("pages/landscape.py").run()
    assert not at.exception
    assert [at.selectbox(key=k).value for k in ("land-Origin A", "land-Point B", "land-Point C")] == \
        ["base", "ft-17", "ft-22"]
    assert at.slider(key="land-grid").value == 7 and at.slider(key="land-margin").value == 0.2  # invalid: default
    assert (at.selectbox(key="land-bn").value, at.selectbox(key="land-split").value,
            at.selectbox(key="land-precision").value) == ("keep", "test", "bf16")
    at.slider(key="land-grid").set_value(9).run()
    assert at.query_params["grid"] in ("9", ["9"])
    at.switch_page("pages/geometry.py").run()
    at.switch_page("pages/landscape.py").run()  # the session's own settings survive a page switch
    assert at.slider(key="land-grid").value == 9 and at.selectbox(key="land-Point C").value == "ft-22"


def _download_keys(at) -> set[str]:
    return {d.key for d in at.get("download_button")}


def _footer(key: str) -> set[str]:
    return {f"{key}-csv", f"{key}-json", f"{key}-html"}


def test_every_figure_has_a_how_to_read_line_its_data_and_an_html_copy_to_download():
    at = _app()
    at.button(key="replay-run").click().run()
    assert _footer("replay-greedy") <= _download_keys(at)
    at.switch_page("pages/geometry.py").run()
    assert not at.exception
    assert _footer("angles") | _footer("path") <= _download_keys(at)
    at.switch_page("pages/recipes.py").run()
    assert _footer("figure1") <= _download_keys(at)
    for page in ("geometry", "recipes"):
        at.switch_page(f"pages/{page}.py").run()
        assert any(c.value.startswith("How to read this:") for c in at.caption), page
    at.switch_page("pages/tour.py").run()
    for number in range(1, 7):
        assert not at.exception and _footer(f"tour-{number}") <= _download_keys(at), number
        assert any(c.value.startswith("How to read this:") for c in at.caption), number
        if number < 6:
            at.button(key="tour-next").click().run()


def test_the_landscape_shows_log_loss_and_a_3d_surface():
    at = _app()
    at.switch_page("pages/landscape.py").run()
    at.slider(key="land-grid").set_value(5).run()
    at.button(key="land-compute").click().run()
    at.radio(key="land-metric").set_value("log10 loss").run()
    assert not at.exception and any("Lowest val log10 loss" in m.value for m in at.markdown)
    at.toggle(key="land-3d").set_value(True).run()
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert not at.exception and figure["data"][0]["type"] == "surface"
    caption = next(c.value for c in at.caption if c.value.startswith("How to read this"))
    assert "switch 3D off to see them" in caption and "red stars" not in caption  # no markers are drawn in 3D


def test_a_clicked_point_is_ringed_at_once_and_reports_the_shift_average():
    from soup_core.evaluate import shift_average
    at = _app()
    at.switch_page("pages/landscape.py").run()
    at.slider(key="land-grid").set_value(5).run()
    at.button(key="land-compute").click().run()
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    grid = next(i for i, t in enumerate(figure["data"]) if t.get("name") == "grid points")
    lowest = next(t for t in figure["data"] if t.get("name") == "lowest error")
    x, y = lowest["x"][0], lowest["y"][0]  # a grid point
    at.session_state["land-chart"] = {"selection": {"points": [{"curve_number": grid, "x": x, "y": y}],
                                                    "point_indices": [0], "box": [], "lasso": []}}
    at.run()  # the run the click causes
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    ring = next(t for t in figure["data"] if t.get("name") == "chosen point")
    assert (ring["x"], ring["y"]) == ([x], [y])
    zoo = open_zoo("digits-finetune")
    metrics = {m.label: m.value for m in at.metric}
    point = plan_export(zoo, Candidate.point(("base", "ft-00", "ft-01"), (x, y), "interpolate")).metrics
    assert metrics["point shifts"] == f"{100 * shift_average(point, zoo.evaluator.shift_names):.1f}%"


@pytest.mark.parametrize("link, title", [
    ("greedy;passes=2", "Greedy soup"),
    ("point:base,ft-00,ft-01@0.5,0.25;bn=interpolate", "Landscape point (0.500, 0.250) of the plane base, ft-00, ft-01"),
])
def test_a_shared_link_restores_the_export_choice_on_any_page(link, title):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params["export"] = link
    at.run()
    at.switch_page("pages/export.py").run()
    assert not at.exception
    assert at.radio(key="export-choice").options[-1] == title and at.radio(key="export-choice").value == 1
    assert at.query_params["export"] in (link, [link])  # still shareable from here


def test_an_unreadable_export_link_is_ignored_and_choosing_puts_the_choice_in_the_url():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params["export"] = "greedy;passes=many"
    at.run()
    assert not at.exception and "export" not in at.query_params
    at.switch_page("pages/recipes.py").run()
    at.button(key="recipes-use").click().run()
    assert not at.exception and "export" in at.query_params
    at.switch_page("pages/ingredients.py").run()
    at.checkbox(key="tick:digits-finetune:ft-00").uncheck().run()  # ticking makes the ticked set the choice
    assert "export" not in at.query_params


def test_points_selected_in_the_hyperparameter_view_can_be_ticked_and_unticked_together():
    at = _app()
    assert not at.dataframe[0].proto.selection_mode  # the table selects nothing: the boxes are the one way to tick
    selection = {"selection": {"points": [{"customdata": "ft-00"}, {"customdata": "ft-02"}],
                               "point_indices": [0, 2], "box": [], "lasso": []}}
    at.session_state["hparam-chart"] = selection  # what a box drawn around two dots sends
    at.run()
    at.button(key="untick-selected").click().run()
    assert not at.exception
    ticks = {n: at.checkbox(key=f"tick:digits-finetune:{n}").value for n in ("ft-00", "ft-01", "ft-02")}
    assert ticks == {"ft-00": False, "ft-01": True, "ft-02": False}
    assert "ft-00" not in str(at.query_params["use"]).split(",")
    at.session_state["hparam-chart"] = selection
    at.run()
    at.button(key="tick-selected").click().run()
    assert at.checkbox(key="tick:digits-finetune:ft-02").value is True


def test_the_hyperparameter_view_plots_val_accuracy_against_a_hyperparameter_on_a_log_axis_when_it_spans_decades():
    at = _app()
    at.selectbox(key="hparam-x").set_value("lr").run()
    chart = next(c for c in at.get("plotly_chart") if json.loads(c.proto.spec)["data"][0].get("customdata"))
    layout = json.loads(chart.proto.spec)["layout"]
    assert layout["xaxis"]["type"] == "log" and layout["yaxis"]["title"]["text"] == "val accuracy (%)"


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="make test installs Debian's chromium")
def test_a_language_model_zoo_opens_scores_tokens_and_its_tour_step_links_in_chromium(server):
    from playwright.sync_api import sync_playwright

    from soup_core.params import uniform_average
    zoo = open_zoo("code-lm", device="cpu")
    soup_val = zoo.evaluator.evaluate(uniform_average([zoo.state_dict(n) for n in zoo.names]), ["val"])["val"]
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{server}/?zoo=code-lm")
        page.get_by_role("heading", name="Your soup").wait_for(timeout=120_000)
        _settle(page)
        metric = page.get_by_test_id("stMetric").filter(has_text="soup val").get_by_test_id("stMetricValue")
        assert metric.inner_text() == f"{soup_val.accuracy:.1%}"  # next-token accuracy of all 16 averaged
        assert page.get_by_test_id("stMetric").filter(has_text="Checkpoints") \
            .get_by_test_id("stMetricValue").inner_text() == "16"
        page.screenshot(path=str(ARTIFACTS / "code-lm-ingredients.png"), full_page=True)
        page.goto(f"{server}/tour?zoo=code-lm&step=8")  # a link to the Tour's language-model step
        page.get_by_text("Language models and LoRA adapters").wait_for(timeout=120_000)
        page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
        assert page.get_by_text("tokens of test").count()  # the words computed from the LM zoo
        page.screenshot(path=str(ARTIFACTS / "code-lm-tour.png"), full_page=True)
        browser.close()


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="make test installs Debian's chromium")
def test_the_room_ranks_two_participants_hides_test_until_revealed_and_survives_a_restart_in_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    env = {"SOUP_ROOM_DB": str(tmp_path / "room.sqlite"), "SOUP_FACILITATOR_TOKEN": "s3cret-token"}
    server = _serve(env)
    url = next(server)
    with sync_playwright() as p:
        browser = _browser(p)
        for name, use in (("Ada", "ft-00,ft-01,ft-02"), ("Grace", "ft-03")):
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.goto(f"{url}/?zoo=digits-finetune&use={use}")
            page.get_by_role("heading", name="Your soup").wait_for(timeout=120_000)
            _settle(page)
            page.get_by_text("Submit to the room", exact=True).first.click()
            page.get_by_label("Your name").fill(name)
            page.get_by_label("Your name").press("Enter")
            _settle(page)
            page.get_by_role("button", name="Submit to the room").click()
            page.get_by_text("Submitted: the soup of").wait_for(timeout=60_000)
            assert "me=" in page.url
        page.get_by_test_id("stSidebarNav").get_by_text("Room", exact=True).click()
        page.get_by_text("2 submission(s)").wait_for(timeout=60_000)
        assert not page.get_by_role("button", name="Reveal test").count()
        page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "room.png"), full_page=True)
        wrong = browser.new_page()
        wrong.goto(f"{url}/room?facilitator=guess")
        wrong.get_by_text("2 submission(s)").wait_for(timeout=60_000)
        _settle(wrong)
        assert not wrong.get_by_role("button", name="Reveal test").count() and "guess" not in wrong.url
        facilitator = browser.new_page()
        facilitator.goto(f"{url}/room?facilitator=s3cret-token")
        facilitator.get_by_text("Hide test on every page until revealed").click()
        _settle(facilitator)
        for title, waits in (("Ingredients", "Your soup"), ("Recipes", "Figure 1, on this zoo"),
                             ("Tour", "Guided tour")):
            page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
            page.get_by_role("heading", name=waits).wait_for(timeout=120_000)
            _settle(page)
            assert page.get_by_text("Test is hidden until the facilitator reveals it").count(), title
            assert not page.get_by_test_id("stMetric").filter(has_text="test").count(), title
        assert page.get_by_text("it continues once test is revealed").count()
        facilitator.get_by_role("button", name="Reveal test").click()
        facilitator.get_by_text("2 submission(s) · test revealed").wait_for(timeout=60_000)
        csv = _download(facilitator, "Room as CSV", tmp_path / "room.csv").read_text()
        facilitator.get_by_test_id("stSidebarNav").get_by_text("Tour", exact=True).click()  # present the Tour
        facilitator.get_by_text("Present: every participant's Tour follows my zoo and step").click()
        _settle(facilitator)
        facilitator.get_by_role("button", name="Next →").click()
        page.wait_for_function("() => location.search.includes('step=2')", timeout=60_000)  # the follower moved
        page.get_by_test_id("stSidebarNav").get_by_text("Room", exact=True).click()
        page.get_by_text("2 submission(s) · test revealed").wait_for(timeout=60_000)
        browser.close()
    next(server, None)  # the server stops; a new one opens the same room
    rows = {line.split(",")[1]: line.split(",") for line in csv.splitlines()[1:]}
    zoo = open_zoo("digits-finetune")
    for name, use in (("Ada", ["ft-00", "ft-01", "ft-02"]), ("Grace", ["ft-03"])):
        assert float(rows[name][5]) == pytest.approx(make_soup(zoo, "uniform", use).metrics["test"].accuracy, abs=1e-6)
    restarted = _serve(env)
    url = next(restarted)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page()
        page.goto(f"{url}/room")
        page.get_by_text("2 submission(s) · test revealed").wait_for(timeout=60_000)
        browser.close()
    next(restarted, None)


def test_a_banner_says_the_server_is_preparing_until_the_warm_up_is_done(monkeypatch):
    from appkit import warm
    monkeypatch.setitem(warm.PROGRESS, "running", True)
    monkeypatch.setitem(warm.PROGRESS, "done", 1)
    monkeypatch.setitem(warm.PROGRESS, "total", 4)
    at = _app()
    assert any(i.value.startswith("Preparing… (1 of 4)") for i in at.info)
    monkeypatch.setitem(warm.PROGRESS, "running", False)
    at.run()
    assert not any(i.value.startswith("Preparing…") for i in at.info) and not at.exception


def test_reset_my_workspace_goes_back_to_the_defaults():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params.update({"zoo": "digits-bn", "use": "bn-00,bn-01", "export": "greedy"})
    at.run()
    assert at.selectbox(key="zoo").value == "digits-bn" and _metric(at, "Checkpoints") == "12"
    at.button(key="reset-workspace").click().run()
    assert not at.exception and at.selectbox(key="zoo").value == "digits-finetune"
    zoo = open_zoo("digits-finetune")
    assert all(at.checkbox(key=f"tick:digits-finetune:{n}").value for n in zoo.names)
    assert at.query_params.get("export") in (None, []) and at.query_params["zoo"] in ("digits-finetune", ["digits-finetune"])


def test_make_run_serves_this_machine_unless_a_host_is_given():
    def command(*args):
        out = subprocess.run(["make", "-n", "run", *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout
        return next(line for line in out.splitlines() if "streamlit run app.py" in line)
    assert command().endswith("--server.address 127.0.0.1")
    assert command("HOST=0.0.0.0", "PORT=8600").endswith("--server.port 8600 --server.address 0.0.0.0")


def test_the_landscape_projects_merge_methods_only_once_made_or_asked_for(monkeypatch):
    """On a zoo whose board is not made (a big one, say), opening the Landscape makes no merge method;
    ticking the box makes and projects them all; once made, they are always projected."""
    from appkit import cache
    from appkit.lru import ByteBudgetCache
    from soup_core.recipes import RECIPES
    monkeypatch.setattr(cache, "SOUPS", ByteBudgetCache(1 << 30))  # nothing made yet

    def merge_points(at) -> int:
        figure = json.loads(at.get("plotly_chart")[0].proto.spec)
        return sum(len(t.get("x", [])) for t in figure["data"] if t.get("name") == "merge methods")

    at = _app()
    at.switch_page("pages/landscape.py").run()
    at.slider(key="land-grid").set_value(5).run()
    at.button(key="land-compute").click().run()
    assert not at.checkbox(key="land-methods").value and merge_points(at) == 0
    assert not any(key[1] in RECIPES and RECIPES[key[1]].family == "merge" for key in cache.SOUPS._entries)
    at.checkbox(key="land-methods").check().run()
    at.button(key="land-compute").click().run()
    methods = [r for r in RECIPES.values() if r.board and r.is_soup and r.family == "merge"]
    assert merge_points(at) == len(methods) and not at.exception
    at.switch_page("pages/export.py").run()
    at.switch_page("pages/landscape.py").run()
    assert not [c for c in at.checkbox if c.key == "land-methods"]  # all made: no question left


def test_a_checkpoint_name_with_tags_is_drawn_as_typed_in_every_figure(tmp_path, monkeypatch):
    """Plotly reads <a href> in labels and follows it: a name from someone else's manifest is escaped."""
    import shutil
    zoo_dir = shutil.copytree(ROOT / "sample_data" / "digits-finetune", tmp_path / "zoo")
    manifest = (zoo_dir / "zoo.toml").read_text()
    evil = '<a href="https://evil.example/login">ft-00</a>'
    (zoo_dir / "zoo.toml").write_text(manifest.replace('name = "ft-00"', f"name = '{evil}'", 1))
    monkeypatch.setenv("SOUP_ALLOWED_ROOTS", str(tmp_path))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params.update({"folder": str(zoo_dir)})
    at.run()
    assert not at.exception
    specs = []
    for page in ("ingredients", "geometry", "recipes"):
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, page
        specs += [c.proto.spec for c in at.get("plotly_chart")]
    assert specs and not any("<a href" in spec for spec in specs)
    assert any("&lt;a href=" in spec for spec in specs)  # shown, as typed


@pytest.mark.parametrize("zoo_name, has_batchnorm", [("digits-finetune", False), ("digits-bn", True)])
def test_geometry_offers_a_batchnorm_policy_only_for_a_model_with_batchnorm(zoo_name, has_batchnorm):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params.update({"zoo": zoo_name})
    at.run()
    at.switch_page("pages/geometry.py").run()
    assert not at.exception
    assert bool([s for s in at.selectbox if s.key == "geometry-bn"]) == has_batchnorm
    assert any("BatchNorm: none in this model" in c.value for c in at.caption) != has_batchnorm


def test_the_tours_first_map_draws_the_segment_its_line_plot_follows():
    at = _app()
    at.switch_page("pages/tour.py").run()
    assert not at.exception
    maps = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    (plane,) = [m for m in maps if any(t["type"] == "contour" for t in m["data"])]
    stars = next(t for t in plane["data"] if t.get("name") == "the three points")
    segment = next(t for t in plane["data"] if str(t.get("name", "")).startswith("the line between "))
    at_star = dict(zip(stars["hovertext"], zip(stars["x"], stars["y"])))
    a, b = segment["name"].removeprefix("the line between ").removesuffix(" (the plot above)").split(" and ")
    assert list(zip(segment["x"], segment["y"])) == [at_star[a], at_star[b]] and a != "base" != b
