"""Bring your own models: Hugging Face directories, data-file evaluators, folders, weights-only zoos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from appkit.plain import as_read
from soup_core.io import load_state_dict, read_provenance, save_hf_directory
from soup_core.params import uniform_average
from soup_core.zoo import ZooError, open_zoo
from tests.conftest import tree_digest
from tests.fixtures.tiny_hf import build_tiny_hf_zoo

ROOT = Path(__file__).resolve().parent.parent
transformers = pytest.importorskip("transformers")


def soup(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soup_core", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def hf_zoo(tmp_path_factory) -> Path:
    return build_tiny_hf_zoo(tmp_path_factory.mktemp("tiny-bert"))


def test_a_hugging_face_zoo_is_detected_from_its_config(hf_zoo):
    zoo = open_zoo(hf_zoo)
    assert zoo.names == ("ft-0", "ft-1", "ft-2", "ft-3") and zoo.has_base
    ev = zoo.evaluator
    assert set(ev.split_names) == {"val", "test"} and ev.train is not None
    accuracies = [zoo.metrics(n)["val"].accuracy for n in zoo.names]
    assert max(accuracies) > 0.7  # the fine-tunings learned the toy task


def test_greedy_soup_exports_a_directory_that_from_pretrained_loads_with_the_same_logits(hf_zoo, tmp_path):
    before = tree_digest(hf_zoo)
    out = tmp_path / "greedy-soup"
    result = soup("make", "greedy", str(hf_zoo), "--out", str(out), "--json", "-")
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    zoo = open_zoo(hf_zoo)
    soup_state = load_state_dict(out)
    x = zoo.evaluator.splits["test"].inputs
    with torch.no_grad():
        theirs = model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
    ours = zoo.evaluator.logits(soup_state, "test")
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert read_provenance(out)["recipe"] == "greedy"
    assert tree_digest(hf_zoo) == before


def test_a_sharded_export_loads_back(hf_zoo, tmp_path):
    zoo = open_zoo(hf_zoo)
    state = zoo.state_dict("ft-1")
    out = save_hf_directory(state, tmp_path / "sharded", source=zoo.path("ft-1"), max_shard_bytes=3_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    for key, tensor in model.state_dict().items():
        if key in state:
            assert torch.equal(tensor, state[key]), key


def test_angles_and_landscape_run_on_the_hugging_face_zoo(hf_zoo):
    names = [str(hf_zoo / n) for n in ("ft-0", "ft-1", "ft-2")]
    angles = soup("angles", *names, "--base", str(hf_zoo / "base"), "--json", "-")
    assert angles.returncode == 0, angles.stderr
    assert np.allclose(np.diag(json.loads(angles.stdout)["angle_deg"]), 0)
    land = soup("landscape", str(hf_zoo), "--points", "base", "ft-0", "ft-1", "--grid", "3", "--json", "-")
    assert land.returncode == 0, land.stderr
    payload = json.loads(land.stdout)
    assert len(payload["loss"]["val"]) == 3 and payload["bn"] == "none"


def test_the_landscape_at_an_anchor_is_the_models_own_loss(hf_zoo):
    from soup_core.geometry import plane_basis
    from soup_core.landscape import SliceEvaluator
    zoo = open_zoo(hf_zoo)
    ev = zoo.evaluator
    plane = plane_basis(zoo.base, zoo.state_dict("ft-0"), zoo.state_dict("ft-1"))
    values = SliceEvaluator(ev, plane.origin, plane.directions).evaluate([a.xy for a in plane.anchors], ["val"])
    for i, state in enumerate((zoo.base, zoo.state_dict("ft-0"), zoo.state_dict("ft-1"))):
        assert values.loss["val"][i] == pytest.approx(ev.evaluate(state, ["val"])["val"].loss, abs=1e-5)


# ---- data-file evaluators and folders ----------------------------------------------------------


def _table_zoo(root: Path) -> Path:
    """A CSV table zoo with a user model module beside the manifest."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("val", 60), ("test", 60), ("shifted", 60)):
        x = rng.normal(size=(n, 3)) * (2.0 if name == "shifted" else 1.0)
        y = np.where(x[:, 0] + x[:, 1] > 0, "yes", "no")
        lines = ["a,b,c,answer"] + [f"{r[0]:.4f},{r[1]:.4f},{r[2]:.4f},{c}" for r, c in zip(x, y)]
        (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
    (root / "mymodel.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(3, 2)\n")
    torch.manual_seed(0)
    for i in range(3):
        w = {"weight": torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]]) + 0.3 * torch.randn(2, 3),
             "bias": torch.zeros(2)}
        (root / "runs" / f"r{i}").mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(w, root / "runs" / f"r{i}" / "model.safetensors")
    (root / "zoo.toml").write_text('name = "table"\ncheckpoints = ["runs/*/model.safetensors"]\nmodel = "mymodel:make"\n'
                                   '[data]\nkind = "table"\nlabel = "answer"\nval = "val.csv"\ntest = "test.csv"\n'
                                   '[data.shifts]\nshifted = "shifted.csv"\n')
    return root


def test_a_table_zoo_with_globs_and_a_user_module(tmp_path):
    zoo = open_zoo(_table_zoo(tmp_path / "t"))
    assert zoo.names == ("r0", "r1", "r2")  # generic file names take their folder's name
    ev = zoo.evaluator
    assert ev.shift_names == ("shifted",)
    assert all(zoo.metrics(n)["test"].accuracy > 0.8 for n in zoo.names)
    result = soup("make", "greedy", str(tmp_path / "t"), "--json", "-")
    assert result.returncode == 0, result.stderr


def test_an_image_folder_zoo(tmp_path):
    from PIL import Image
    root = tmp_path / "img"
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        for cls, level in (("dark", 40), ("light", 210)):
            (root / split / cls).mkdir(parents=True)
            for i in range(6):
                pixels = np.clip(rng.normal(level, 20, (10, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    (root / "net.py").write_text("import torch\n\ndef make():\n    return torch.nn.Sequential("
                                 "torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())\n")
    w = {"0.weight": torch.zeros(2, 3, 3, 3), "0.bias": torch.zeros(2)}
    w["0.weight"][1] = 0.1
    w["0.weight"][0] = -0.1
    for i in range(2):
        safetensors.torch.save_file({k: v * (1 + i) for k, v in w.items()}, root / f"m{i}.safetensors")
    (root / "zoo.toml").write_text('checkpoints = ["m*.safetensors"]\nmodel = "net:make"\n'
                                   '[data]\nkind = "images"\nsize = 8\nval = "val"\ntest = "test"\n')
    zoo = open_zoo(root)
    assert zoo.evaluator.splits["val"].inputs.shape == (12, 3, 8, 8)
    assert zoo.metrics("m0")["test"].accuracy == 1.0
    (root / "zoo.toml").write_text((root / "zoo.toml").read_text().replace('size = 8', 'size = 8\nchannels = 1'))
    result = soup("evaluate", str(root))  # grey inputs for a 3-channel model: one line, exit 2
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "inputs of shape [12, 1, 8, 8]" in result.stderr and "channels" in result.stderr


def test_a_folder_without_a_manifest_is_a_weights_only_zoo(tmp_path):
    for i in range(3):
        safetensors.torch.save_file({"w": torch.randn(4, 4)}, tmp_path / f"run{i}.safetensors")
    safetensors.torch.save_file({"w": torch.zeros(4, 4)}, tmp_path / "base.safetensors")
    zoo = open_zoo(tmp_path)
    assert zoo.names == ("run0", "run1", "run2") and zoo.has_base and zoo.evaluator is None
    ok = soup("make", "model-stock", str(tmp_path), "--out", str(tmp_path.parent / "stock.safetensors"))
    assert ok.returncode == 0, ok.stderr
    refused = soup("make", "greedy", str(tmp_path))
    assert refused.returncode == 2 and "weights-only" in refused.stderr and "held-out" in refused.stderr


def test_allowed_roots_refuse_paths_outside_them_and_symlink_escapes(tmp_path):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    safetensors.torch.save_file({"w": torch.ones(2)}, outside / "secret.safetensors")
    safetensors.torch.save_file({"w": torch.ones(2)}, inside / "ok.safetensors")
    (inside / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (inside / "zoo.toml").write_text('checkpoints = ["ok.safetensors", "../outside/secret.safetensors"]\n')
    with pytest.raises(ZooError, match="outside the allowed folders"):
        open_zoo(inside, allowed_roots=[inside])
    (inside / "zoo.toml").write_text('checkpoints = ["ok.safetensors", "link.safetensors"]\n')
    with pytest.raises(ZooError, match="outside the allowed folders"):
        open_zoo(inside, allowed_roots=[inside])
    with pytest.raises(ZooError, match="outside the allowed folders"):
        open_zoo(outside, allowed_roots=[inside])
    result = soup("inspect", str(outside / "secret.safetensors"))  # the CLI on one's own files: allowed
    assert result.returncode == 0
    refused = soup("make", "uniform", str(inside), env={"SOUP_ALLOWED_ROOTS": str(inside)})
    assert refused.returncode == 2 and "outside the allowed folders" in refused.stderr


def test_module_names_cannot_climb_out_of_the_zoo(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    (tmp_path / "zoo.toml").write_text('model = "../evil:make"\ncheckpoints = ["a.safetensors"]\n')
    with pytest.raises(ZooError, match="module:function"):
        open_zoo(tmp_path).model_factory


# ---- the app on user zoos -----------------------------------------------------------------------


def _app(monkeypatch, roots: list[Path]):
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("SOUP_ALLOWED_ROOTS", os.pathsep.join(map(str, roots)))
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()


def _metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def test_the_app_opens_a_hugging_face_folder_and_exports_it(monkeypatch, hf_zoo, tmp_path):
    at = _app(monkeypatch, [hf_zoo.parent])
    at.sidebar.text_input(key="folder").input(str(hf_zoo)).run()
    assert not at.exception and not at.sidebar.error
    assert _metric(at, "Checkpoints") == "4"
    from appkit.plain import literal
    assert literal(f"Showing the folder {hf_zoo.resolve()}, not the sample zoo; clear the folder box to go "
                   "back.") in [c.value for c in at.sidebar.caption]
    zoo = open_zoo(hf_zoo)
    soup_state = uniform_average([zoo.state_dict(n) for n in zoo.names])
    assert _metric(at, "soup val") == f"{100 * zoo.evaluator.evaluate(soup_state, ['val'])['val'].accuracy:.1f}%"
    for page in ("landscape", "geometry", "recipes", "export"):
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, page
    hf_button = [b for b in at.get("download_button") if b.proto.label.startswith("Download as a Hugging Face")]
    assert hf_button
    # What that button serves: a zip of a folder from_pretrained loads, with the soup's weights.
    import io
    import zipfile
    from soup_core.export import Candidate, plan_export
    data = plan_export(zoo, Candidate.ticked(zoo.names)).hf_zip()
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "soup")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in soup_state.items() if k in model.state_dict())


def test_the_app_refuses_a_folder_outside_the_allowed_roots(monkeypatch, hf_zoo, tmp_path):
    elsewhere = tmp_path / "allowed"
    elsewhere.mkdir()
    at = _app(monkeypatch, [elsewhere])
    at.sidebar.text_input(key="folder").input(str(hf_zoo)).run()
    assert not at.exception
    assert "outside the allowed folders" in at.sidebar.error[0].value
    assert _metric(at, "Checkpoints") == "32"  # the sample zoo stays open


def test_the_app_works_weights_only(monkeypatch, tmp_path):
    for i in range(3):
        safetensors.torch.save_file({"w": torch.randn(4, 4)}, tmp_path / f"run{i}.safetensors")
    at = _app(monkeypatch, [tmp_path])
    at.sidebar.text_input(key="folder").input(str(tmp_path)).run()
    assert not at.exception
    assert _metric(at, "Checkpoints") == "3"
    assert any("Weights only" in i.value for i in at.sidebar.info)
    for page in ("recipes", "geometry", "landscape", "export"):
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, page
    assert "soup make uniform" in at.code[0].value


def test_a_timm_checkpoint_is_recognised_by_its_arch(tmp_path):
    # timm itself cannot be installed beside torch 2.13.0 here (it needs torchvision), so this
    # checks the detection and the message; with timm installed the factory is
    # timm.create_model(arch, pretrained=False, num_classes=...).
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(7, 4), "fc.bias": torch.zeros(7)}
    for i in range(2):
        torch.save({"arch": "resnet18", "epoch": 3, "state_dict": state, "state_dict_ema": state},
                   tmp_path / f"run{i}.pth.tar")
    zoo = open_zoo(tmp_path)
    assert zoo.names == ("run0", "run1")
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ZooError, match=r"arch 'resnet18'.*pip install timm"):
            zoo.model_factory
    else:
        assert zoo.model_factory().num_classes == 7


def test_a_timm_training_checkpoint_with_data_says_timm_is_missing_in_one_line(tmp_path):
    import argparse
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(2, 4), "fc.bias": torch.zeros(2)}
    for i in range(2):  # as timm's train.py saves them: its args Namespace beside the weights
        torch.save({"arch": "resnet18", "epoch": 3, "state_dict": state, "args": argparse.Namespace(lr=0.1)},
                   tmp_path / f"run{i}.pth.tar")
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    (tmp_path / "zoo.toml").write_text('checkpoints = ["run*.pth.tar"]\n[data]\nkind = "images"\nval = "data/val"\n')
    try:
        import timm  # noqa: F401
    except ImportError:
        result = soup("evaluate", str(tmp_path), env={"SOUP_ALLOWED_ROOTS": str(tmp_path)})
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert "arch 'resnet18'" in result.stderr and "pip install timm" in result.stderr
    else:  # a machine with timm: the model is built from the arch
        assert open_zoo(tmp_path, allowed_roots=[tmp_path]).model_factory().num_classes == 2


def test_the_app_says_timm_is_missing_in_the_same_words(monkeypatch, tmp_path):
    pytest.importorskip("PIL")
    try:
        import timm  # noqa: F401
        pytest.skip("timm is installed here: its model is built, nothing is missing")
    except ImportError:
        pass
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(2, 4), "fc.bias": torch.zeros(2)}
    for i in range(2):
        torch.save({"arch": "resnet18", "state_dict": state}, tmp_path / f"run{i}.pth.tar")
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    (tmp_path / "zoo.toml").write_text('checkpoints = ["run*.pth.tar"]\n[data]\nkind = "images"\nval = "data/val"\n')
    at = _app(monkeypatch, [tmp_path])
    at.sidebar.text_input(key="folder").input(str(tmp_path)).run()
    assert not at.exception  # the folder is refused with the CLI's words; the sample zoo stays open
    assert [as_read(e.value) for e in at.sidebar.error] == [
        "a timm checkpoint (arch 'resnet18') needs the optional extra: pip install timm (the [timm] extra)"]
    assert not any("Weights only" in i.value for i in at.sidebar.info)


def test_a_vit_zoo_with_legacy_names_and_grayscale_images_scores_as_from_pretrained(tmp_path):
    """transformers 5 builds ViT with renamed modules while the files keep the legacy names; the
    zoo scores through transformers' own conversion: the accuracies of from_pretrained, on one channel."""
    from PIL import Image
    zoo = quick_start_zoo(tmp_path)
    on_disk = list(load_state_dict(zoo / "ft-0"))
    assert any(".encoder.layer." in k for k in on_disk)  # the legacy names the files keep
    from torch.func import functional_call

    from soup_core.models import hf_model_factory
    model = hf_model_factory(zoo / "ft-0")()
    own = dict(model.named_parameters())
    assert not set(on_disk) <= set(own)  # the module itself names them otherwise
    functional_call(model, dict(load_state_dict(zoo / "ft-1")), (torch.zeros(2, 1, 8, 8),))
    assert all(p is own[n] for n, p in model.named_parameters())  # the call left the model's own tensors
    result = soup("evaluate", str(zoo), "--json", "-", env={"SOUP_ALLOWED_ROOTS": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    scored = {row["name"]: row["metrics"]["test"]["accuracy"] for row in json.loads(result.stdout)["checkpoints"]}

    def reference_accuracy(folder: Path) -> float:
        model = transformers.ViTForImageClassification.from_pretrained(folder).eval()
        files = sorted((zoo / "data" / "test").glob("*/*.png"))
        x = torch.tensor(np.stack([(np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255 - 0.5) / 0.5
                                   for f in files]))[:, None]
        labels = torch.tensor([0 if f.parent.name == "dark" else 1 for f in files])
        with torch.no_grad():
            return float((model(pixel_values=x).logits.argmax(1) == labels).double().mean())
    assert scored == {name: reference_accuracy(zoo / name) for name in ("base", "ft-0", "ft-1", "ft-2")}
    out = tmp_path / "greedy"
    made = soup("make", "greedy", str(zoo), "--out", str(out), "--json", "-", env={"SOUP_ALLOWED_ROOTS": str(tmp_path)})
    assert made.returncode == 0, made.stderr
    assert set(load_state_dict(out)) == set(on_disk)  # the export keeps the names on disk
    provenance = read_provenance(out)
    assert provenance["command"].startswith(f"soup make greedy {zoo.resolve()} ")  # works from any folder
    assert provenance["manifest"] == "zoo.toml" and provenance["data"]["splits"] == {"val": "data/val",
                                                                                     "test": "data/test"}
    assert json.loads(made.stdout)["metrics"]["test"]["accuracy"] == reference_accuracy(out)
    opened = open_zoo(zoo, allowed_roots=[tmp_path])
    from soup_core.landscape import plane_landscape
    from soup_core.zoo import zoo_plane
    grid = plane_landscape(opened.evaluator, zoo_plane(opened, ("base", "ft-0", "ft-1")), grid=3, splits=["test"])
    assert np.isfinite(np.asarray(grid.error["test"])).all()


def test_checkpoint_names_transformers_drops_on_load_are_dropped_and_unknown_ones_refused():
    from soup_core.errors import ModelError
    from soup_core.models import answer_to_checkpoint_names
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    old_file = [*model.state_dict(), "bert.embeddings.position_ids"]  # what older BERT files hold
    assert answer_to_checkpoint_names(model, old_file) == 0
    with pytest.raises(ModelError, match="'bert.pooler.extra.weight' has no place in BertForSequenceClassification"):
        answer_to_checkpoint_names(model, [*model.state_dict(), "bert.pooler.extra.weight"])

def quick_start_zoo(tmp_path: Path) -> Path:
    """The README's quick start, generated: four ViT classifiers saved by save_pretrained (legacy
    tensor names on disk), grayscale PNGs in class folders, and the README's own manifest."""
    from PIL import Image
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=2)
    zoo = tmp_path / "vit"
    for i, name in enumerate(("base", "ft-0", "ft-1", "ft-2")):
        torch.manual_seed(i)
        transformers.ViTForImageClassification(config).save_pretrained(zoo / name)
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        for cls, level in (("dark", 40), ("light", 210)):
            (zoo / "data" / split / cls).mkdir(parents=True)
            for i in range(5):
                Image.fromarray(np.clip(rng.normal(level, 60, (8, 8)), 0, 255).astype(np.uint8), mode="L").save(
                    zoo / "data" / split / cls / f"{i}.png")
    readme = (ROOT / "README.md").read_text()  # the quick start's manifest, as written
    start = readme.index("`my-zoo/zoo.toml` (image classifiers):")
    opening = readme.index("```toml\n", start) + len("```toml\n")
    (zoo / "zoo.toml").write_text(readme[opening:readme.index("```", opening)])
    return zoo


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="make test installs Debian's chromium")
def test_the_quick_start_in_chromium(tmp_path):
    """SOUP_ALLOWED_ROOTS=DIR make run, then the folder typed into the sidebar: the zoo opens and
    its live soup shows the library's number."""
    from playwright.sync_api import sync_playwright

    from tests.test_app import _browser, _serve, _settle
    zoo = quick_start_zoo(tmp_path)
    opened = open_zoo(zoo, allowed_roots=[tmp_path])
    soup_state = uniform_average([opened.state_dict(n) for n in opened.names])
    expected = f"{100 * opened.evaluator.evaluate(soup_state, ['val'])['val'].accuracy:.1f}%"
    serving = _serve({"SOUP_ALLOWED_ROOTS": str(tmp_path), "SOUP_WARM": "0"})
    url = next(serving)
    try:
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.get_by_test_id("stMetricValue").first.wait_for(timeout=60_000)
            _settle(page)
            box = page.get_by_label("Folder on this server (zoo.toml or checkpoint files)", exact=True)
            box.fill(str(zoo))
            box.press("Enter")
            page.get_by_text("Showing the folder").first.wait_for(timeout=60_000)
            _settle(page)
            soup_val = page.get_by_test_id("stMetric").filter(has_text="soup val").get_by_test_id("stMetricValue")
            soup_val.wait_for(timeout=60_000)
            assert soup_val.inner_text() == expected
            browser.close()
    finally:
        next(serving, None)
