"""How the house holds together: one error family, declared recipe parameters, one export path,
reproducible files, a command that answers before torch loads, sample zoos found as package data."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch

import soup_core.errors as errors
from soup_core.io import file_sha256, save_state_dict, state_dict_bytes
from soup_core.recipes import RECIPES, all_parameters
from tests.test_cli import ROOT, gone, ok_json, soup, the_worker


def test_every_error_the_library_raises_on_purpose_is_a_soup_error():
    from soup_core.landscape.folded import Unsupported
    family = [errors.CheckpointError, errors.ZooError, errors.ModelError, errors.DataError, errors.RecipeError,
              errors.UsageError, Unsupported]
    assert all(issubclass(e, errors.SoupError) and issubclass(e, ValueError) for e in family)


def test_the_command_parses_its_arguments_before_importing_torch():
    code = ("import sys; from soup_core.cli import build_parser; build_parser().parse_args(['make', 'greedy', 'z']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_soup_make_has_one_flag_per_declared_parameter_with_its_help_and_default():
    result = soup("make", "--help")
    assert result.returncode == 0
    text = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(result.stdout.split()))  # words argparse hyphen-wrapped
    for name, (parameter, users) in all_parameters().items():
        assert parameter.flag in text and " ".join(parameter.help.split()[:4]) in text
        default = parameter.default_text or ("no limit" if parameter.default is None else str(parameter.default))
        assert f"(default: {default}; {', '.join(users)})" in text
    assert "examples:" in soup("--help").stdout


def test_a_recipe_refuses_a_parameter_it_does_not_declare():
    result = soup("make", "uniform", "digits-finetune", "--tie", "gt")
    assert result.returncode == 2
    assert result.stderr.strip() == "soup: error: the Uniform soup does not use --tie; it takes no parameters"
    with pytest.raises(errors.RecipeError, match="takes no epochs"):
        RECIPES["greedy"].make({"a": {"w": torch.ones(1)}}, None, epochs=3)


def test_the_learned_soups_knobs_reach_it_from_the_command_line():
    payload = ok_json("make", "learned", "digits-finetune", "--ingredients", "ft-00,ft-01", "--epochs", "1",
                      "--learning-rate", "0.05", "--device", "cpu")
    assert payload["options"]["epochs"] == 1 and payload["options"]["learning_rate"] == 0.05
    assert [s["candidate"] for s in payload["trace"]] == ["epoch 1"]


@pytest.mark.parametrize("args, message", [
    (("make", "greedy", "digits-finetune", "--passes", "0"), "--passes: 0 must be at least 1"),
    (("make", "learned", "digits-finetune", "--learning-rate", "nan"), "not a finite number"),
    (("point", "digits-finetune", "--plane", "base", "ft-00", "ft-01", "--xy", "nan", "inf", "--out", "x"),
     "not a finite number"),
    (("path", "digits-finetune", "base", "ft-00", "--range", "1", "0"), "LO must be below HI"),
    (("evaluate", "digits-finetune", "--device", "bogus"), "not a device"),
    (("landscape", "digits-finetune", "--points", "base", "ft-00", "ft-01", "--max-samples", "0"),
     "must be at least 1"),
])
def test_flags_out_of_range_end_in_one_line(args, message):
    result = soup(*args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def test_the_same_soup_is_the_same_bytes(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    provenance = {"recipe": "uniform", "zoo": "z", "ingredients": ["a", "b"]}
    blobs = {state_dict_bytes(state, provenance) for _ in range(8)}
    files = {save_state_dict(state, tmp_path / f"{i}.safetensors", provenance=provenance).read_bytes()
             for i in range(8)}
    assert len(blobs) == 1 and files == blobs


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    import hashlib

    import soup_core.io.read as read
    hashed = []
    monkeypatch.setattr(read, "_sha256_of", lambda files: hashed.append(files) or hashlib.sha256(
        b"".join(f.read_bytes() for f in files)).hexdigest())
    path = save_state_dict({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    first = file_sha256(path)
    assert file_sha256(path) == first == hashlib.sha256(path.read_bytes()).hexdigest() and len(hashed) == 1
    save_state_dict({"w": torch.zeros(3)}, path)
    assert file_sha256(path) != first and len(hashed) == 2


def test_make_writes_the_model_card_beside_the_soup(tmp_path):
    out = tmp_path / "greedy.safetensors"
    payload = ok_json("make", "greedy", "digits-finetune", "--out", str(out))
    card = (tmp_path / "greedy.md").read_text()
    assert payload["model_card"] == str(tmp_path / "greedy.md")
    assert "# Greedy soup — digits-finetune" in card and "Wortsman et al. 2022, Recipe 1" in card
    for name, weight in zip(payload["ingredients"], payload["weights"]):
        assert f"| {name} | {weight:.4f} |" in card
    assert f"{100 * payload['metrics']['test']['accuracy']:.2f}%" in card
    assert f"soup make greedy digits-finetune --out {out}" in card


def test_the_sample_zoos_are_found_in_the_sample_data_package():
    from soup_core.zoo import sample_root, sample_zoos
    assert sample_root() == (ROOT / "sample_data").resolve()
    assert set(sample_zoos()) == {"code-lm", "digits-bn", "digits-finetune", "digits-scratch", "digits-soup"}


def test_json_is_never_written_over_an_input(tmp_path):
    zoo = shutil.copytree(ROOT / "sample_data" / "digits-finetune", tmp_path / "zoo")  # never aim at committed files
    victim = zoo / "checkpoints" / "ft-00.safetensors"
    before = victim.read_bytes()
    result = soup("evaluate", str(zoo / "zoo.toml"), "--json", str(victim))
    assert result.returncode == 2 and "refusing to write over an input" in result.stderr
    assert victim.read_bytes() == before


@pytest.mark.slow
def test_an_installed_wheel_opens_the_sample_zoos_outside_the_checkout(tmp_path):
    """The wheel carries the sample zoos as package data and declares what it imports."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path, timeout=300)
    wheel = next((tmp_path / "dist").glob("model_soup_lab-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    code = ("import soup_core; zoo = soup_core.zoo.open_zoo('digits-finetune'); "
            "print(soup_core.__file__); print(zoo.manifest); print(len(zoo.names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=300)
    module, manifest, count = out.stdout.split()
    assert module.startswith(str(site)) and manifest.startswith(str(site)) and count == "32"
    from importlib.metadata import PathDistribution
    requires = PathDistribution(next(site.glob("model_soup_lab-*.dist-info"))).requires
    assert {"torch", "safetensors", "numpy", "scipy", "scikit-learn", "tqdm"} <= {r.split(">")[0].split("<")[0]
                                                                                   for r in requires}


def _weights_only_zoo(folder, megabytes: int = 64):
    """Two random checkpoints large enough that writing their soup takes a noticeable moment."""
    folder.mkdir()
    for i in range(2):
        save_state_dict({"w": torch.randn(megabytes << 18, generator=torch.Generator().manual_seed(i))},
                        folder / f"m{i}.safetensors")
    return folder


@pytest.mark.parametrize("signal_name, to", [("SIGINT", "group"), ("SIGINT", "pid"), ("SIGTERM", "pid"),
                                              ("SIGKILL", "pid")])
def test_a_killed_export_leaves_the_previous_file_and_the_next_run_no_temp_file(tmp_path, signal_name, to):
    import os
    import signal
    import time
    zoo = _weights_only_zoo(tmp_path / "zoo")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "soup.safetensors"
    out.write_bytes(b"the previous soup")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # a suite started in the background (`make test &`) inherits SIGINT ignored, and so would the command:
    # give it the default disposition a terminal gives it, as a user's Ctrl-C meets it
    proc = subprocess.Popen([sys.executable, "-m", "soup_core", "make", "uniform", str(zoo), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    worker = the_worker(proc)
    deadline = time.time() + 120
    def writing() -> bool:  # the output is open (its files have no name until the end: O_TMPFILE)
        try:
            fds = os.listdir(f"/proc/{worker}/fd")
            return any(os.readlink(f"/proc/{worker}/fd/{fd}").startswith(str(out_dir)) for fd in fds)
        except OSError:
            return False
    while not writing() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the export finished before it could be interrupted"
    if to == "group":  # Ctrl-C: the terminal signals the command and its worker
        os.killpg(proc.pid, getattr(signal, signal_name))
    else:  # `kill -INT PID`, `kill PID` or `kill -9 PID`: the command's own process
        proc.send_signal(getattr(signal, signal_name))
    proc.wait(timeout=120)
    assert gone(worker)
    assert out.read_bytes() == b"the previous soup"
    assert sorted(p.name for p in out_dir.iterdir()) == ["soup.safetensors"]  # SIGKILL too: nothing left
    if signal_name != "SIGKILL":
        assert proc.returncode == 130 and proc.stderr.read().decode().strip() == "soup: interrupted"
    result = subprocess.run([sys.executable, "-m", "soup_core", "make", "uniform", str(zoo), "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["soup.md", "soup.safetensors"]
    assert out.read_bytes() != b"the previous soup"


def test_a_full_disk_is_one_line_and_the_previous_file_stays(tmp_path, monkeypatch):
    import errno

    import soup_core.io.write as write
    out = save_state_dict({"w": torch.ones(2)}, tmp_path / "soup.safetensors")
    before = out.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(write.os, "fsync", full)
    with pytest.raises(errors.CheckpointError, match="no space left on the device; nothing was written"):
        save_state_dict({"w": torch.zeros(2)}, out)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["soup.safetensors"]
