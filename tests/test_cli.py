"""The `soup` command: its JSON is a stable interface; bad input is one line and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from soup_core.io import load_state_dict, read_provenance
from soup_core.params import weighted_average
from soup_core.zoo import open_zoo
from tests.conftest import tree_digest

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = ROOT / "sample_data" / "digits-finetune"
METRIC_KEYS = {"accuracy", "loss", "ece"}


def soup(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "soup_core", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=300)


def soup_here(*args: str) -> subprocess.CompletedProcess:
    """The command line's own ``main`` in this process (what the ``soup`` script runs, without its
    start-up cost of a few seconds), as ``subprocess.run`` would report it."""
    import contextlib
    import io

    from soup_core.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's refusals
            code = exc.code
    return subprocess.CompletedProcess(["soup", *args], code, out.getvalue(), err.getvalue())


def the_worker(proc: subprocess.Popen, timeout: float = 60) -> int:
    """The pid of the child that does a started ``soup`` command's work (:mod:`soup_core.cli.supervise`)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for stat in Path("/proc").glob("[0-9]*/stat"):  # every process whose parent is the command
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
                    return int(stat.parent.name)
            except (OSError, IndexError, ValueError):
                continue
        time.sleep(0.002)
    raise AssertionError("the command started no worker")


def gone(pid: int, timeout: float = 30) -> bool:
    """Whether a process (not ours to reap) has ended within ``timeout`` seconds."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.002)
    return False


def ok_json(*args: str) -> dict:
    """A command's JSON on stdout (run in this process: its own start-up is tested elsewhere)."""
    result = soup_here(*args, "--json", "-")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_zoo_list():
    names = {z["name"] for z in ok_json("zoo", "list")["zoos"]}
    assert names == {"digits-finetune", "digits-scratch", "digits-bn", "digits-soup", "code-lm"}


def test_evaluate_json_holds_every_checkpoint_and_split():
    payload = ok_json("evaluate", "digits-bn")
    names = [c["name"] for c in payload["checkpoints"]]
    assert names[0] == "base" and len(names) == 13
    for row in payload["checkpoints"]:
        assert set(row["metrics"]) == set(payload["splits"])
        assert all(set(m) == METRIC_KEYS for m in row["metrics"].values())


def test_make_greedy_writes_a_soup_with_provenance_that_loads_back(tmp_path):
    out = tmp_path / "greedy.safetensors"
    payload = ok_json("make", "greedy", "digits-finetune", "--out", str(out))
    assert {"recipe", "ingredients", "weights", "trace", "metrics"} <= set(payload)
    assert all(set(m) == METRIC_KEYS for m in payload["metrics"].values())
    zoo = open_zoo("digits-finetune", device="cpu")
    soup_state = load_state_dict(out)
    assert zoo.evaluator.evaluate(soup_state)["val"].accuracy == pytest.approx(payload["metrics"]["val"]["accuracy"])
    manifest = read_provenance(out)
    assert [i["name"] for i in manifest["ingredients"]] == payload["ingredients"]
    assert all(len(i["sha256"]) == 64 for i in manifest["ingredients"])
    assert manifest["data"]["split_seed"] == 0 and manifest["library_version"]
    assert manifest["command"].startswith("soup make greedy digits-finetune")


def test_make_random_order_follows_the_seed():
    a = ok_json("make", "greedy", "digits-finetune", "--order", "random", "--seed", "1")
    b = ok_json("make", "greedy", "digits-finetune", "--order", "random", "--seed", "1")
    assert a["ingredients"] == b["ingredients"] and a["options"]["seed"] == 1


def test_make_on_chosen_ingredients():
    payload = ok_json("make", "uniform", "digits-finetune", "--ingredients", "ft-01,ft-02")
    assert payload["ingredients"] == ["ft-01", "ft-02"] and payload["weights"] == [0.5, 0.5]


def test_make_best_names_every_model_tied_on_val():
    result = soup("make", "best", "digits-finetune", "--ingredients", "ft-03,ft-17,ft-20", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    payload = ok_json("make", "best", "digits-finetune", "--ingredients", "ft-03,ft-17,ft-20", "--device", "cpu")
    tied = payload["extras"]["tied_on_val"]
    assert tied == ["ft-17", "ft-20"] and "2 models tie on val" in result.stdout and "ft-17, ft-20" in result.stdout


def test_make_weighted_takes_weights_by_name_and_its_help_says_the_default(tmp_path):
    out = tmp_path / "weighted.safetensors"
    payload = ok_json("make", "weighted", "digits-finetune", "--ingredients", "ft-01,ft-02", "--weights", "ft-01=3",
                      "--out", str(out))
    assert payload["ingredients"] == ["ft-01", "ft-02"] and payload["weights"] == [0.75, 0.25]
    zoo = open_zoo("digits-finetune", device="cpu")
    expected = weighted_average([zoo.state_dict("ft-01"), zoo.state_dict("ft-02")], [0.75, 0.25])
    assert all(torch.equal(load_state_dict(out)[k], expected[k]) for k in expected)
    assert read_provenance(out)["command"].startswith("soup make weighted digits-finetune --ingredients ft-01,ft-02 "
                                                      "--weights ft-01=3")
    assert "(default: every ingredient 1; weighted, task-arithmetic," in " ".join(soup("make", "--help").stdout.split())


def test_angles_json_is_symmetric_with_zero_diagonal():
    paths = [str(FINETUNE / "checkpoints" / f"ft-0{i}.safetensors") for i in range(3)]
    payload = ok_json("angles", *paths, "--base", str(FINETUNE / "base.safetensors"))
    assert payload["names"] == paths
    angle = torch.tensor(payload["angle_deg"])
    assert torch.equal(angle, angle.T) and angle.diagonal().abs().max() == 0
    assert {"cosine", "distance"} <= set(payload)


def test_angles_takes_a_zoo_like_every_command_and_names_rows_by_checkpoint(tmp_path):
    paths = [str(FINETUNE / "checkpoints" / f"ft-0{i}.safetensors") for i in range(3)]
    by_files = ok_json("angles", *paths, "--base", str(FINETUNE / "base.safetensors"))
    by_zoo = ok_json("angles", "digits-finetune", "--ingredients", "ft-00,ft-01,ft-02")  # its base by default
    assert by_zoo["names"] == ["ft-00", "ft-01", "ft-02"] and by_zoo["angle_deg"] == by_files["angle_deg"]
    for i in range(2):  # checkpoints with generic file names are named after their folders
        (tmp_path / f"run-{i}").mkdir()
        shutil.copy(paths[i], tmp_path / f"run-{i}" / "model.safetensors")
    short = ok_json("angles", *(str(tmp_path / f"run-{i}" / "model.safetensors") for i in range(2)), "--short-names")
    assert short["names"] == ["run-0", "run-1"]


def malicious(tmp_path: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Payload()}, path)
    return path


def bad_inputs(tmp_path: Path) -> dict[str, list[str]]:
    good = {"w": torch.ones(2, 2)}
    safetensors.torch.save_file(good, tmp_path / "good.safetensors")
    safetensors.torch.save_file({"w": torch.ones(3, 2)}, tmp_path / "other.safetensors")
    safetensors.torch.save_file({"w": torch.ones(2, 2, dtype=torch.float16)}, tmp_path / "half.safetensors")
    safetensors.torch.save_file({"w": torch.full((2, 2), float("nan"))}, tmp_path / "nan.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:-5])
    return {
        "malicious pickle": ["inspect", str(malicious(tmp_path))],
        "truncated": ["inspect", str(tmp_path / "cut.safetensors")],
        "mismatched shapes": ["angles", str(tmp_path / "good.safetensors"), str(tmp_path / "other.safetensors")],
        "float16/float32 mix": ["inspect", str(tmp_path / "good.safetensors"), str(tmp_path / "half.safetensors")],
        "NaN weights": ["inspect", str(tmp_path / "good.safetensors"), str(tmp_path / "nan.safetensors")],
        "single checkpoint angles": ["angles", str(tmp_path / "good.safetensors")],
        "missing file": ["inspect", str(tmp_path / "absent.safetensors")],
        "unknown zoo": ["make", "greedy", "no-such-zoo"],
        "unknown ingredient": ["make", "uniform", "digits-finetune", "--ingredients", "ft-99"],
        "ensemble has no weights": ["make", "ensemble", "digits-finetune", "--out", str(tmp_path / "e.safetensors")],
        "model stock without base": ["make", "model-stock", "digits-scratch"],
    }


def test_bad_input_ends_with_one_clear_line_and_changes_nothing(tmp_path):
    cases = bad_inputs(tmp_path)
    before = tree_digest(tmp_path)
    for case, args in cases.items():  # in this process; the first also as its own process, whose stderr
        for result in [soup_here(*args)] + ([soup(*args)] if case == "malicious pickle" else []):  # shows all
            assert result.returncode == 2, (case, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("soup: error: "), (case, result.stderr)
            assert "Traceback" not in result.stderr
    assert tree_digest(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


def test_make_never_writes_over_an_input(tmp_path):
    zoo = shutil.copytree(FINETUNE, tmp_path / "zoo")  # a copy: were the refusal broken, no committed file is hit
    target = zoo / "checkpoints" / "ft-00.safetensors"
    before = target.read_bytes()
    result = soup("make", "uniform", str(zoo / "zoo.toml"), "--out", str(target))
    assert result.returncode == 2 and "refusing to write over an input" in result.stderr
    assert target.read_bytes() == before


def test_landscape_json_has_axes_grids_anchors_and_projections(tmp_path):
    before = tree_digest(FINETUNE)
    out = ok_json("landscape", "digits-finetune", "--points", "base", "ft-00", "greedy", "--grid", "5",
                  "--split", "val,test", "--soups", "uniform")
    assert len(out["axes"]["x"]) == len(out["axes"]["y"]) == 5
    for metric in ("loss", "error"):
        assert set(out[metric]) == {"val", "test"}
        assert all(len(row) == 5 and None not in row for row in out[metric]["val"])
    assert [a["name"] for a in out["anchors"]] == ["base", "ft-00", "greedy"]
    assert out["anchors"][0]["xy"] == [0.0, 0.0] and out["anchors"][1]["xy"][1] == 0.0
    projected = {p["name"] for p in out["projections"]}
    assert projected == {f"ft-{i:02d}" for i in range(1, 32)} | {"uniform"}
    assert all(p["off_plane"] >= 0 for p in out["projections"])
    assert out["bn"] == "none" and out["complete"]
    assert tree_digest(FINETUNE) == before


def test_landscape_resume_file_is_written_and_reused(tmp_path):
    state = tmp_path / "run.json"
    first = ok_json("landscape", "digits-finetune", "--points", "base", "ft-00", "ft-01", "--grid", "3",
                    "--resume", str(state))
    assert json.loads(state.read_text())["loss"] == first["loss"]
    again = ok_json("landscape", "digits-finetune", "--points", "base", "ft-00", "ft-01", "--grid", "3",
                    "--resume", str(state))
    assert again["loss"] == first["loss"]
    other_plane = soup("landscape", "digits-finetune", "--points", "base", "ft-00", "ft-02", "--grid", "3",
                       "--resume", str(state))
    assert other_plane.returncode == 2 and "other settings" in other_plane.stderr


def test_path_reports_barriers_for_each_split():
    out = ok_json("path", "digits-bn", "base", "bn-00", "--points", "5", "--split", "val,test", "--bn", "keep")
    assert out["alphas"] == [-0.5, 0.0, 0.5, 1.0, 1.5] and out["bn"] == "keep"
    assert set(out["barrier"]) == {"val", "test"}
    assert out["barrier"]["val"]["error"] >= 0


def test_pairs_json_has_each_pair_and_the_correlations():
    out = ok_json("pairs", "digits-finetune", "--ingredients", "ft-00,ft-01,ft-02,ft-03")
    assert len(out["pairs"]) == 6
    pair = out["pairs"][0]
    assert pair["interpolation_advantage"] == pytest.approx(
        pair["soup_accuracy"] - (pair["accuracy_a"] + pair["accuracy_b"]) / 2)
    assert 0 < pair["angle_deg"] < 180
    assert set(out["correlations"]) == {"angle_vs_interpolation_advantage", "approximation_vs_loss_difference",
                                        "approximation_vs_error_difference", "variance_term_vs_ensemble_gain",
                                        "soup_term_vs_loss_difference"}
    assert {p["curvature_method"] for p in out["pairs"]} == {"segment"}  # the paper's scale by default


@pytest.mark.parametrize("args, message", [
    (("landscape", "digits-finetune", "--points", "base", "base", "ft-00"), "three different points"),
    (("landscape", "digits-finetune", "--points", "base", "ft-00", "nope"), "neither a checkpoint"),
    (("landscape", "digits-finetune", "--points", "base", "ft-00", "ensemble"), "not one set of weights"),
    (("landscape", "digits-finetune", "--points", "base", "ft-00", "ft-01", "--split", "train"), "unknown split"),
    (("path", "digits-finetune", "base", "ft-00", "--points", "1"), "at least 2"),
])
def test_landscape_commands_reject_bad_requests_in_one_line(args, message):
    result = soup(*args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_precision_is_a_flag_whose_cost_is_reported():
    exact = ok_json("landscape", "digits-finetune", "--points", "base", "ft-00", "ft-01", "--grid", "3")
    fast = ok_json("landscape", "digits-finetune", "--points", "base", "ft-00", "ft-01", "--grid", "3",
                   "--precision", "bf16")
    assert exact["precision"] == "fp32" and exact["precision_deviation"] is None
    assert fast["precision"] == "bf16" and 0 < fast["precision_deviation"] < 0.05
    moved = max(abs(a - b) for ra, rb in zip(exact["loss"]["val"], fast["loss"]["val"]) for a, b in zip(ra, rb))
    assert 0 < moved < 0.05
    path = ok_json("path", "digits-finetune", "ft-00", "ft-01", "--points", "3", "--precision", "bf16")
    assert path["precision"] == "bf16" and path["precision_deviation"] is not None
    made = ok_json("make", "greedy", "digits-finetune", "--precision", "bf16")
    assert made["precision"] == "bf16" and made["ingredients"]
    assert soup("pairs", "digits-finetune", "--precision", "fp16").returncode == 2
