"""The bad-input corpus (tests/corpus/): the CLI ends with one clear line, the app shows an error
and keeps serving, no file changes, and the malicious pickle's payload never runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from appkit.plain import as_read
from tests.conftest import tree_digest
from tests.corpus.build import MARKER

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"

CLI_CASES = {
    "malicious pickle": (["inspect", "malicious-pickle.pt"], "refused to unpickle"),
    "truncated safetensors": (["inspect", "truncated.safetensors"], "not a valid safetensors file"),
    "header offsets lie": (["inspect", "lying-header.safetensors"], "not a valid safetensors file"),
    "NaN weights": (["inspect", "nan-weights.safetensors", "single/only.safetensors"], "NaN"),
    "mismatched architectures": (["angles", "mismatched/a.safetensors", "mismatched/b.safetensors"], "shape"),
    "float16/float32 mix": (["inspect", "mixed-dtype/full.safetensors", "mixed-dtype/half.safetensors"], "dtype"),
    "single checkpoint": (["angles", "single/only.safetensors"], "at least two"),
    "manifest outside the allowed roots": (["make", "uniform", "outside-roots"], "outside the allowed folders"),
    "missing module": (["evaluate", "missing-module"], "cannot import 'nowhere'"),
    "duplicate header keys": (["inspect", "duplicate-header-keys.safetensors"], "more than once"),
    "tie metadata that contradicts the data": (["inspect", "tied-hint-lies.safetensors"], "holds different values"),
    "tie metadata that is a list": (["inspect", "tied-hint-list.safetensors"], "not a mapping of names"),
    "pickle keys that collide as strings": (["inspect", "colliding-keys.pt"], "keys 1 and '1' are both '1'"),
    "fp8 weights": (["inspect", "fp8.safetensors"], "dtype float8_e4m3fn, which is not supported"),
    "complex weights": (["inspect", "complex.pt"], "dtype complex64, which is not supported"),
    "sparse tensor": (["inspect", "sparse.pt"], "is sparse_coo"),
    "meta tensor": (["inspect", "meta.pt"], "on the meta device"),
    "nested tensor": (["inspect", "nested.pt"], "is a nested tensor"),
    "stride-0 expansion": (["inspect", "expanded.pt"], "expanded view (1,073,741,824 elements over 1 stored)"),
    "a checkpoint that contains itself": (["inspect", "self-referencing.pt"], "refer to themselves"),
    "a zip record shorter than its tensor": (["inspect", "short-record.pt"],
                                             "zip record data/0 holds 40 bytes but its tensor needs 64"),
    "shard index that is a list": (["inspect", "index-list"], "not a valid shard index"),
    "weight_map that is a list": (["inspect", "index-map-list"], "not a valid shard index"),
    "manifest field of the wrong type": (["evaluate", "wrong-types"], "`checkpoints` must be a list, not int"),
    "manifest naming os:system": (["evaluate", "os-system"], "`evaluator = 'os:system'` failed"),
}


def soup(args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soup_core", *args], capture_output=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture(autouse=True)
def no_marker():
    Path(MARKER).unlink(missing_ok=True)
    before = tree_digest(CORPUS)
    yield
    assert not Path(MARKER).exists(), "the malicious pickle's payload ran"
    assert tree_digest(CORPUS) == before, "a bad input changed a file"


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_the_cli_ends_with_one_clear_line(case):
    args, message = CLI_CASES[case]
    env = {"SOUP_ALLOWED_ROOTS": str(CORPUS / "outside-roots")} if "allowed" in case else None
    result = soup(args, CORPUS, env)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, (case, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soup: error: ") and message in lines[0], (case, stderr)


@pytest.mark.parametrize("path, prefix", [("trainers/timm-train.pth.tar", ""), ("trainers/lightning.ckpt", "model."),
                                          ("trainers/hf-trainer", "")])
def test_checkpoints_written_by_trainers_load_with_their_plain_data_ignored(path, prefix):
    """timm's train.py (argparse.Namespace args, numpy metric and RNG state), Lightning (its module's
    own key prefix kept), the Hugging Face Trainer."""
    import torch
    from soup_core.io import load_state_dict
    result = soup(["inspect", path], CORPUS)
    assert result.returncode == 0, result.stderr
    state, good = load_state_dict(CORPUS / path), load_state_dict(CORPUS / "single" / "only.safetensors")
    assert sorted(state) == sorted(prefix + k for k in good)
    assert all(torch.equal(state[prefix + k], v) for k, v in good.items())


def test_a_decompression_bomb_is_refused_before_it_inflates(tmp_path):
    """A small .pt whose zip holds a deflated record of 256 MiB of zeros."""
    import zipfile
    bomb = tmp_path / "bomb.pt"
    torch_save = tmp_path / "real.pt"
    import torch
    torch.save({"w": torch.zeros(4)}, torch_save)
    with zipfile.ZipFile(torch_save) as real, zipfile.ZipFile(bomb, "w") as out:
        for info in real.infolist():
            data = real.read(info)
            if info.filename.endswith("/data/0"):
                data = bytes(256 << 20)
            out.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    code = ("import resource, sys; from soup_core.io import load_state_dict\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    load_state_dict(sys.argv[1])\nexcept Exception as e:\n    print(e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    message, growth_kib = out.stdout.strip().splitlines()
    assert "256 MiB of compressed data" in message and "refused" in message
    assert int(growth_kib) < 32 << 10  # peak memory grew by less than 32 MiB: nothing was inflated


def test_duplicates_are_reported_not_refused():
    result = soup(["inspect", "duplicates/a.safetensors", "duplicates/b.safetensors"], CORPUS)
    assert result.returncode == 0
    assert b"exact duplicate" in result.stdout


def test_an_empty_folder_and_non_utf8_names(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = soup(["make", "uniform", str(empty)], tmp_path)
    assert result.returncode == 2 and b"no checkpoints found" in result.stderr
    odd = os.fsencode(tmp_path) + b"/\xff\xfe-run.safetensors"
    with open(odd, "wb") as handle:
        handle.write((CORPUS / "truncated.safetensors").read_bytes())
    result = subprocess.run([sys.executable, "-m", "soup_core", "inspect", odd], capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(b"soup: error: ")


# ---- the app ------------------------------------------------------------------------------------

UPLOADS = {
    "malicious-pickle.pt": "refused to unpickle",
    "truncated.safetensors": "not a valid safetensors file",
    "lying-header.safetensors": "not a valid safetensors file",
    "nan-weights.safetensors": "missing keys",  # another architecture than the digits MLP
    "mismatched/b.safetensors": "missing keys",
    "expanded.pt": "expanded view",
    "fp8.safetensors": "float8_e4m3fn",
    "sparse.pt": "sparse_coo",
    "duplicate-header-keys.safetensors": "more than once",
    "colliding-keys.pt": "both '1'",
    "short-record.pt": "holds 40 bytes but its tensor needs 64",
}


def _app(monkeypatch=None, roots=None) -> AppTest:
    if monkeypatch is not None:
        monkeypatch.setenv("SOUP_ALLOWED_ROOTS", os.pathsep.join(map(str, roots)))
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()


def _count(at: AppTest) -> str:
    return next(m.value for m in at.metric if m.label == "Checkpoints")


@pytest.mark.parametrize("name", list(UPLOADS))
def test_a_bad_upload_is_an_error_and_the_app_keeps_serving(name):
    at = _app()
    at.file_uploader(key="upload:digits-finetune:False").set_value(
        [(Path(name).name, (CORPUS / name).read_bytes(), "application/octet-stream")]).run()
    assert not at.exception
    errors = " ".join(as_read(e.value) for e in at.sidebar.error)
    assert Path(name).name in errors and UPLOADS[name] in errors
    assert _count(at) == "32"
    at.checkbox(key="tick:digits-finetune:ft-00").uncheck().run()  # still serving
    assert not at.exception


def test_nan_weights_of_the_right_architecture_are_refused():
    import safetensors.torch
    import torch
    from soup_core.zoo import open_zoo
    state = open_zoo("digits-finetune").state_dict("ft-00")
    blob = safetensors.torch.save({k: torch.full_like(v, float("nan")) for k, v in state.items()})
    at = _app()
    at.file_uploader(key="upload:digits-finetune:False").set_value(
        [("nan-digits.safetensors", blob, "application/octet-stream")]).run()
    assert not at.exception and "NaN" in at.sidebar.error[0].value
    assert _count(at) == "32"


def test_a_file_over_the_upload_limit_is_refused():
    from streamlit import config
    previous = config.get_option("server.maxUploadSize")
    config.set_option("server.maxUploadSize", 1)
    try:
        at = _app()
        at.file_uploader(key="upload:digits-finetune:False").set_value(
            [("big.safetensors", b"\0" * (2 << 20), "application/octet-stream")]).run()
    finally:
        config.set_option("server.maxUploadSize", previous)
    assert not at.exception
    assert "over the upload limit" in at.sidebar.error[0].value


@pytest.mark.parametrize("folder, message", [
    ("outside-roots", "outside the allowed folders"),
    ("mismatched", "shape"),
    ("mixed-dtype", "dtype"),
    ("missing-module", "cannot import 'nowhere'"),
])
def test_a_bad_folder_is_an_error_and_the_sample_zoo_stays_open(monkeypatch, folder, message):
    at = _app(monkeypatch, [CORPUS / folder])
    at.sidebar.text_input(key="folder").input(str(CORPUS / folder)).run()
    assert not at.exception, at.exception
    assert message in " ".join(as_read(e.value) for e in at.sidebar.error)
    assert _count(at) == "32"


def test_an_empty_folder_in_the_app(monkeypatch, tmp_path):
    at = _app(monkeypatch, [tmp_path])
    at.sidebar.text_input(key="folder").input(str(tmp_path)).run()
    assert not at.exception and "no checkpoints found" in at.sidebar.error[0].value


def test_every_test_the_corpus_readme_names_exists():
    """The README's table of probes the tests make points at tests by name: a renamed test fails here."""
    import re
    named = set(re.findall(r"test_[a-z0-9_]+(?=`)", (CORPUS / "README.md").read_text()))
    source = "".join(p.read_text() for p in CORPUS.parent.glob("test_*.py"))
    assert len(named) > 30 and {n for n in named if f"def {n}(" not in source} == set()
