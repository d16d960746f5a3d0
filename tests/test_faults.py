"""Round two of bad inputs (issue 24): outputs only as regular files, readers that neither loop nor
crawl, and every number that work grows with bounded — one line each, nothing changed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from soup_core.errors import CheckpointError, RecipeError, SoupError
from soup_core.export import Candidate
from soup_core.io import atomic_write
from soup_core.io.safety import check_header
from soup_core.recipes import RECIPES
from tests.test_cli import gone, soup_here, the_worker


def test_json_onto_a_fifo_is_refused_and_the_fifo_stays(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = soup_here("angles", "digits-finetune", "--ingredients", "ft-00,ft-01", "--json", str(fifo))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"soup: error: {fifo} is not a regular file (a device, a pipe or a "
                                                  "socket); outputs are written as regular files, so choose another "
                                                  "name"]
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_an_output_that_is_a_symlink_or_a_folder_is_left_alone(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "out.json"
    link.symlink_to(target)
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        atomic_write(link, "{}")
    assert link.is_symlink() and target.read_text() == "keep me"
    with pytest.raises(CheckpointError, match="is a folder"):
        atomic_write(tmp_path, "{}")


@pytest.mark.timeout(60)
def test_a_header_of_200k_names_is_checked_without_crawling():
    header = {f"layer.{i}.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
              for i in range(200_000)}
    check_header(json.dumps(header).encode(), "big.safetensors")  # quadratic before: never finished
    text = json.dumps(header)[:-1] + ', "layer.7.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    with pytest.raises(CheckpointError, match="'layer.7.weight' more than once"):
        check_header(text.encode(), "big.safetensors")


@pytest.mark.parametrize("flags, message", [
    (["--passes", "1000000000"], "at most 100"),
    (["--seed", str(10**23)], "at most 9223372036854775807"),
])
def test_numbers_that_work_grows_with_are_bounded_on_the_command_line(flags, message):
    result = soup_here("make", "greedy", "digits-finetune", *flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize("values, message", [
    ({"passes": 10**9}, "passes must be at most 100"),
    ({"epochs": 10**6}, "epochs must be at most 1000"),
    ({"learning_rate": 1e300}, "learning_rate must be at most 1000"),
    ({"density": 1.5}, "density must be at most 1"),
])
def test_numbers_are_bounded_in_the_library_and_in_shared_links(values, message):
    recipe = next(r for r in RECIPES.values() if all(p in {q.name for q in r.parameters} for p in values))
    with pytest.raises(RecipeError, match=message):
        recipe.resolve(values)
    if recipe.name == "greedy":
        with pytest.raises(SoupError, match=message):  # /?export=greedy;passes=1000000000
            Candidate.from_query(f"greedy;passes={values['passes']}")


def test_a_pass_that_changes_nothing_ends_the_recipe(tiny_evaluator, tiny_states):
    previous = None
    for passes in range(1, 10):
        result = RECIPES["greedy"].make(tiny_states, tiny_evaluator, passes=passes, order="random", seed=1)
        if previous is not None and result.ingredients == previous.ingredients:
            break
        previous = result
    many = RECIPES["greedy"].make(tiny_states, tiny_evaluator, passes=100, order="random", seed=1)
    assert many.trace == result.trace and many.ingredients == result.ingredients


TRUNCATE_UNDER_A_ZOO = """
import sys
from soup_core.zoo import make_soup, open_zoo
zoo = open_zoo(sys.argv[1], resident=sys.argv[2] == "resident")
before = make_soup(zoo, "uniform").metrics["val"].accuracy
with open(sys.argv[1] + "/checkpoints/ft-05.safetensors", "r+b") as handle:
    handle.truncate(100)  # what `cp new.safetensors ft-05.safetensors` does first
after = make_soup(zoo, "uniform").metrics["val"].accuracy
print(before == after)
"""


@pytest.fixture
def zoo_copy(tmp_path):
    import shutil
    from pathlib import Path
    source = Path(__file__).resolve().parents[1] / "sample_data" / "digits-finetune"
    shutil.copytree(source, tmp_path / "zoo")
    return tmp_path / "zoo"


@pytest.mark.parametrize("mode", ["resident", "mapped"])
def test_a_checkpoint_truncated_under_a_resident_zoo_changes_nothing_where_a_mapped_one_dies(zoo_copy, mode):
    import signal
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", TRUNCATE_UNDER_A_ZOO, str(zoo_copy), mode], capture_output=True,
                         text=True, timeout=300)
    if mode == "resident":  # what the app's server opens
        assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr
    else:  # why it must: the library's default, memory-mapped, is killed by the kernel
        assert run.returncode == -signal.SIGBUS, (run.returncode, run.stderr[-500:])


def test_a_checkpoint_truncated_under_the_app_is_one_error_and_the_app_keeps_serving(monkeypatch, zoo_copy):
    from tests.test_bad_inputs import _app, _count
    at = _app(monkeypatch, [zoo_copy.parent])
    at.sidebar.text_input(key="folder").input(str(zoo_copy)).run()
    assert not at.exception and _count(at) == "32" and not at.sidebar.error
    with open(zoo_copy / "checkpoints" / "ft-05.safetensors", "r+b") as handle:
        handle.truncate(100)
    at.run()  # the next interaction: the file changed, so the folder is opened again, and refused
    assert not at.exception, at.exception
    assert "ft-05.safetensors" in " ".join(e.value for e in at.sidebar.error)
    assert _count(at) == "32"  # the sample zoo, still serving


def test_align_refuses_a_bad_split_and_a_stranger_file_before_writing_anything(tmp_path):
    result = soup_here("align", "digits-scratch", "--to", "scratch-00", "--out", str(tmp_path / "a"), "--split", "nope")
    assert result.returncode == 2 and "unknown split(s) nope" in result.stderr
    assert not (tmp_path / "a").exists()  # it wrote 8 files before refusing
    out = tmp_path / "b"
    out.mkdir()
    (out / "scratch-03.safetensors").write_bytes(b"a user's own file")
    result = soup_here("align", "digits-scratch", "--to", "scratch-00", "--out", str(out))
    assert result.returncode == 2 and "scratch-03.safetensors exists and was not written by soup align" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["scratch-03.safetensors"]
    assert (out / "scratch-03.safetensors").read_bytes() == b"a user's own file"


def test_an_alignment_that_fails_midway_leaves_no_folder_and_the_next_one_writes_all(tmp_path, monkeypatch):
    import soup_core.io as io
    real, written = io.save_state_dict, []

    def dies_at_the_third(state, path, **kwargs):  # a kill, a full disk, a bug: after two of eight files
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        return real(state, path, **kwargs)
    monkeypatch.setattr(io, "save_state_dict", dies_at_the_third)
    out = tmp_path / "aligned"
    result = soup_here("align", "digits-scratch", "--to", "scratch-00", "--out", str(out))
    assert result.returncode == 130 and not out.exists() and os.listdir(tmp_path) == []  # not a zoo of two
    monkeypatch.undo()
    result = soup_here("align", "digits-scratch", "--to", "scratch-00", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("*.safetensors"))) == 8 and os.listdir(tmp_path) == ["aligned"]


def test_an_alignment_goes_into_a_folder_of_its_own_never_into_an_input_or_beside_others_files(tmp_path):
    from soup_core.zoo import sample_zoos
    data = sample_zoos()["digits-scratch"].parent / "checkpoints"  # the zoo's own checkpoints folder
    result = soup_here("align", "digits-scratch", "--to", "scratch-00", "--out", str(data))
    assert result.returncode == 2 and "refusing to write over an input of this run" in result.stderr
    out = tmp_path / "aligned"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = soup_here("align", "digits-scratch", "--to", "scratch-00", "--out", str(out))
    assert result.returncode == 2 and "notes.txt is not one of soup align's files" in result.stderr
    assert os.listdir(out) == ["notes.txt"]


def test_a_staged_folder_appears_in_one_rename_readable_as_any_new_folder(tmp_path):
    from soup_core.io.write import staged_folder
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "out"
    with staged_folder(out) as staging:
        (staging / "a.txt").write_text("new")
        assert not out.exists()  # nothing appears before the end
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask and (out / "a.txt").read_text() == "new"
    with pytest.raises(RuntimeError):
        with staged_folder(out) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["out"] and (out / "a.txt").read_text() == "new"  # as it was
    with staged_folder(out) as staging:  # a folder of its own files: replaced whole
        (staging / "b.txt").write_text("next")
    assert os.listdir(out) == ["b.txt"] and os.listdir(tmp_path) == ["out"]


def test_weights_named_like_their_model_card_are_refused(tmp_path):
    result = soup_here("make", "uniform", "digits-finetune", "--out", str(tmp_path / "soup.md"))
    assert result.returncode == 2 and "the weights would be written where their model card goes" in result.stderr
    assert os.listdir(tmp_path) == []


def test_json_onto_the_zoos_own_manifest_is_refused(zoo_copy):
    manifest = zoo_copy / "zoo.toml"
    before = manifest.read_bytes()
    for named in (manifest, zoo_copy):  # the zoo named by its zoo.toml, and by its folder
        result = soup_here("angles", str(named), "--ingredients", "ft-00,ft-01", "--json", str(manifest))
        assert result.returncode == 2 and "refusing to write over an input" in result.stderr
        assert manifest.read_bytes() == before


def test_a_shared_link_with_markdown_in_it_is_shown_as_typed_never_followed(monkeypatch, tmp_path):
    """``?folder=![x](https://host/p.png) [Sign in again](https://host/login)`` once made the victim's
    browser fetch an outside image and showed a phishing link in the app's error box."""
    from tests.test_bad_inputs import _app
    at = _app(monkeypatch, [tmp_path])
    attack = "![x](https://host/p.png) [Sign in again](https://host/login)"
    at.sidebar.text_input(key="folder").input(attack).run()
    shown = " ".join(e.value for e in at.sidebar.error)
    assert not at.exception and shown
    assert "](" not in shown.replace("\\](", "") and "\\!\\[x\\]" in shown  # no link, no image: escaped
    assert "\\[Sign in again\\]" in shown


def test_a_zoo_description_and_an_upload_name_are_shown_as_typed(monkeypatch, tmp_path):
    import shutil

    from tests.test_bad_inputs import _app
    zoo = tmp_path / "zoo"
    shutil.copytree(Path(__file__).resolve().parents[1] / "sample_data" / "digits-finetune", zoo)
    manifest = zoo / "zoo.toml"
    manifest.write_text(manifest.read_text().replace(
        'description = "', 'description = "[Sign in again](https://host/login) ', 1))
    at = _app(monkeypatch, [tmp_path])
    at.sidebar.text_input(key="folder").input(str(zoo)).run()
    captions = [c.value for c in at.sidebar.caption]
    assert not at.exception and any("\\[Sign in again\\]\\(https\\://host/login\\)" in c for c in captions)


def test_a_checkpoint_cut_short_under_a_running_command_is_one_line_and_writes_nothing(tmp_path):
    """``cp new.safetensors ft-01.safetensors`` truncates ft-01 before it writes. The command reads its
    checkpoints memory-mapped, so its next read there dies of SIGBUS, which no Python code can catch:
    the command's parent turns that into one line (exit 2), and the staged outputs leave nothing."""
    import subprocess
    import sys

    from soup_core.cli.supervise import CUT_SHORT
    zoo = _table_zoo(tmp_path / "zoo", DATA, model="mymodel:make")
    (zoo / "mymodel.py").write_text(  # the model's first forward cuts ft-01 short, after the zoo has mapped it
        "import os\nfrom pathlib import Path\nfrom sample_data.digits import make_mlp\n\n"
        "def cut(module, inputs):\n    os.truncate(Path(__file__).parent / 'ck' / 'ft-01.safetensors', 200)\n\n"
        "def make():\n    model = make_mlp()\n    model.register_forward_pre_hook(cut)\n    return model\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "soup_core", "make", "greedy", str(zoo), "--out",
                             str(out / "soup.safetensors"), "--json", str(out / "soup.json")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert (zoo / "ck" / "ft-01.safetensors").stat().st_size == 200  # the fault happened
    assert result.returncode == 2 and result.stderr.splitlines() == [f"soup: error: {CUT_SHORT}"]
    assert os.listdir(out) == []


def test_more_checkpoints_than_the_kernel_lets_a_process_map_is_one_line_naming_the_limit(tmp_path):
    """Each open checkpoint is one memory map, and vm.max_map_count (65,530) bounds them: a zoo of more
    files failed as "not a valid safetensors file (... Cannot allocate memory)" on valid files. The
    process here first takes all but 20 of its maps, as 65,000 open checkpoints would."""
    import subprocess
    import sys

    import torch

    from soup_core.io import save_state_dict
    from soup_core.io.maps import map_limit
    if not map_limit() or map_limit() > 300_000:
        pytest.skip(f"vm.max_map_count is {map_limit()}: too many maps to take in a test (unit-tested below)")
    for i in range(40):
        save_state_dict({"w": torch.full((3,), float(i))}, tmp_path / f"ft-{i:02d}.safetensors")
    script = ("import contextlib, io, mmap, sys\nfrom soup_core.cli import main\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n    main(sys.argv[1:4])  # torch and the command loaded\n"
              "held = []\ntry:\n    while True:\n"
              "        held.append(mmap.mmap(-1, 4096, prot=mmap.PROT_READ | (mmap.PROT_WRITE if len(held) % 2 else 0)))\n"
              "except OSError:\n    del held[-20:]\nsys.exit(main(sys.argv[1:]))\n")
    files = sorted(str(p) for p in tmp_path.glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", script, "angles", *files], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "cannot be memory-mapped: this process holds" in result.stderr
    assert "(vm.max_map_count), one per open checkpoint; open fewer checkpoints at once" in result.stderr


@pytest.mark.parametrize("held, said", [(65_531, "this process holds 65,531 memory maps and the kernel allows "
                                                   "65,530 (vm.max_map_count)"),
                                         (1_000, "cannot be read: out of memory (unable to mmap")])
def test_enomem_is_the_map_limit_only_near_it(monkeypatch, held, said):
    from soup_core.io import maps
    monkeypatch.setattr(maps, "maps_held", lambda: held)
    monkeypatch.setattr(maps, "map_limit", lambda: 65_530)
    error = maps.mapping_error("ft-00.safetensors", OSError("unable to mmap 1372 bytes: Cannot allocate memory (12)"))
    assert str(error).startswith("ft-00.safetensors: ") and said in str(error)


def test_a_command_whose_worker_is_killed_dies_of_the_same_signal(tmp_path):
    """The out-of-memory killer picks the worker: the command ends as a killed command, not as a success."""
    import signal
    import subprocess
    import sys
    argv = [sys.executable, "-m", "soup_core", "landscape", "digits-finetune", "--points", "base", "ft-00", "ft-01",
            "--grid", "101", "--json", str(tmp_path / "plane.json")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.kill(the_worker(proc), signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL and proc.stderr.read() == b""
    assert not (tmp_path / "plane.json").exists()


@pytest.mark.parametrize("start", ["SIGCHLD ignored", "stdout closed"])
def test_the_command_and_its_worker_start_under_what_a_parent_may_leave_them(start):
    """A daemon may start the command with SIGCHLD ignored (the kernel would reap the worker before the
    command could read its exit code), or with stdout closed (sys.stdout is None)."""
    import signal
    import subprocess
    import sys

    def prepare():
        if start == "SIGCHLD ignored":
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        else:
            os.close(1)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "soup_core", "zoo", "list"], env=env, capture_output=True,
                            text=True, timeout=120, preexec_fn=prepare)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert ("digits-finetune" in result.stdout) == (start == "SIGCHLD ignored")


def test_a_landscape_killed_mid_run_keeps_its_resume_file_and_finishes_from_it(tmp_path):
    """Without --ray too, --resume is saved after every chunk: SIGKILL loses one chunk, never the file."""
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    state = tmp_path / "plane.json"
    argv = [sys.executable, "-m", "soup_core", "landscape", "digits-finetune", "--points", "base", "ft-00", "ft-01",
            "--grid", "101", "--resume", str(state)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the landscape finished before it could be killed"
    worker = the_worker(proc)
    proc.send_signal(signal.SIGKILL)  # the command's own process: its worker dies with it
    proc.wait(timeout=60)
    assert gone(worker)
    partial = json.loads(state.read_text())
    done = np.array([[v is not None for v in row] for row in partial["loss"]["val"]])
    assert not partial["complete"] and 0 < done.sum() < done.size
    i, j = map(int, np.argwhere(done)[0])
    partial["loss"]["val"][i][j] = 123.0  # a marker: a resumed run keeps computed cells, a fresh one would not
    state.write_text(json.dumps(partial))
    finished = subprocess.run([*argv, "--json", str(tmp_path / "out.json")], env=env, capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr
    full = json.loads((tmp_path / "out.json").read_text())
    assert full["complete"]
    assert full["loss"]["val"][i][j] == 123.0  # resumed from the file, not recomputed
    assert np.isfinite(np.array(full["loss"]["val"], dtype=float)).all()


def _image_folders(root: Path) -> dict[str, Path]:
    from PIL import Image
    for split in ("val", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (4, 4), (10, 20, 30)).save(root / split / cls / "x.png")
    return {"val": "val", "test": "test"}


@pytest.mark.parametrize("size", [100_000, 0, 2.5, "32", True])
def test_an_image_size_out_of_bounds_is_one_line_before_any_image_is_read(tmp_path, size):
    from soup_core.data import image_splits
    from soup_core.errors import DataError
    spec = {"kind": "images", "size": size, **_image_folders(tmp_path)}
    with pytest.raises(DataError, match=r"\[data\] size must be a whole number of pixels from 1 to 4096, not"):
        image_splits(spec, lambda p: tmp_path / p)


def test_images_that_would_not_fit_in_memory_are_refused_with_what_they_need(tmp_path, monkeypatch):
    import soup_core.memory
    from soup_core.data import image_splits
    from soup_core.errors import DataError
    spec = {"kind": "images", "size": 4096, **_image_folders(tmp_path)}
    monkeypatch.setattr(soup_core.memory, "free_memory", lambda device: 1 << 30)  # a machine with 1 GB free
    with pytest.raises(DataError, match=r"4 images at 4096×4096×3 take 1\.6 GB to load and 1\.1 GB is free"):
        image_splits(spec, lambda p: tmp_path / p)
    assert image_splits({**spec, "size": 8}, lambda p: tmp_path / p)["val"].inputs.shape == (2, 3, 8, 8)


def test_a_config_far_deeper_than_its_checkpoint_is_refused_before_the_model_is_built(tmp_path):
    transformers = pytest.importorskip("transformers")
    from soup_core.errors import ModelError
    from soup_core.models import hf_model_factory
    config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=2,
                                     architectures=["BertForSequenceClassification"])
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "model")
    assert hf_model_factory(tmp_path / "model")() is not None  # its own config builds
    written = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**written, "num_hidden_layers": 10**7}))
    with pytest.raises(ModelError, match="num_hidden_layers = 10000000, but the checkpoint holds 2 numbered layers"):
        hf_model_factory(tmp_path / "model")


def test_a_checkpoint_named_like_a_link_is_shown_as_typed_on_the_pages(monkeypatch, tmp_path):
    """The best model's name appears in the Tour's comparisons: never a link there."""
    import shutil

    from appkit.plain import as_read
    from tests.test_bad_inputs import _app
    zoo = tmp_path / "zoo"
    shutil.copytree(Path(__file__).resolve().parents[1] / "sample_data" / "digits-finetune", zoo)
    name = "[Sign in again](https://host/login)"
    manifest = zoo / "zoo.toml"
    manifest.write_text(manifest.read_text().replace('name = "ft-17"', f'name = "{name}"', 1))
    at = _app(monkeypatch, [tmp_path])
    at.sidebar.text_input(key="folder").input(str(zoo)).run()
    assert not at.exception and not at.sidebar.error
    label = next(c.label for c in at.checkbox if c.key.endswith(f":{name}"))  # its tick box
    assert as_read(label) == name and "](https" not in label
    at.switch_page("pages/tour.py").run()
    at.radio(key="tour-step").set_value(next(s for s in at.radio(key="tour-step").options if s.startswith("4"))).run()
    text = [m.value for m in at.markdown]
    assert not at.exception and any(name in as_read(m) for m in text) and not any("](https" in m for m in text)


def test_a_users_file_at_the_model_cards_place_is_never_replaced(tmp_path):
    notes = tmp_path / "soup.md"
    notes.write_text("my notes on this soup")
    refused = soup_here("make", "uniform", "digits-finetune", "--out", str(tmp_path / "soup.safetensors"))
    assert refused.returncode == 2 and "soup.md exists and was not written by soup" in refused.stderr
    assert notes.read_text() == "my notes on this soup" and sorted(p.name for p in tmp_path.iterdir()) == ["soup.md"]
    notes.unlink()
    for _ in range(2):  # a previous soup's card is replaced with its soup
        made = soup_here("make", "uniform", "digits-finetune", "--out", str(tmp_path / "soup.safetensors"))
        assert made.returncode == 0, made.stderr
    assert "library_name: model-soup-lab" in notes.read_text()
    streamed = soup_here("make", "uniform", str(_weights_only(tmp_path)), "--out", str(tmp_path / "w.safetensors"))
    assert streamed.returncode == 0, streamed.stderr
    (tmp_path / "w.md").write_text("mine")
    again = soup_here("make", "uniform", str(_weights_only(tmp_path)), "--out", str(tmp_path / "w.safetensors"))
    assert again.returncode == 2 and (tmp_path / "w.md").read_text() == "mine"


def test_a_users_file_that_comes_to_the_cards_place_during_a_streamed_merge_is_kept(tmp_path, monkeypatch):
    """The card's place is checked when the merge is planned and again at its end, which for a large
    model can be hours later: a file the user saved there meanwhile stays, and so do the old weights."""
    from soup_core.io import weights_out
    out = tmp_path / "w.safetensors"
    assert soup_here("make", "uniform", str(_weights_only(tmp_path)), "--out", str(out)).returncode == 0
    before = out.read_bytes()  # a soup of ours, and its card: both may be replaced
    real_write = weights_out.StreamingWriter.write

    def write_while_the_user_saves_notes(self, *args, **kwargs):
        real_write(self, *args, **kwargs)
        (tmp_path / "w.md").write_text("mine, saved during the merge")
    monkeypatch.setattr(weights_out.StreamingWriter, "write", write_while_the_user_saves_notes)
    again = soup_here("make", "weighted", str(_weights_only(tmp_path)), "--out", str(out), "--weights", "m0=1,m1=3")
    assert again.returncode == 2 and "w.md exists and was not written by soup" in again.stderr
    assert (tmp_path / "w.md").read_text() == "mine, saved during the merge" and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.md", "w.safetensors", "weights-only"]


def _weights_only(tmp_path: Path) -> Path:
    """Two tiny checkpoints and nothing else: `soup make` streams their soup."""
    import torch

    from soup_core.io import save_state_dict
    folder = tmp_path / "weights-only"
    if not folder.exists():
        folder.mkdir()
        for i in range(2):
            save_state_dict({"w": torch.full((4,), float(i))}, folder / f"m{i}.safetensors")
    return folder


def _table_zoo(folder: Path, manifest_tail: str, *, model: str = "sample_data.digits:make_mlp") -> Path:
    """Three digits fine-tunings with val and test as CSV tables; ``manifest_tail`` ends the zoo.toml."""
    import shutil

    import numpy as np
    from sklearn.datasets import load_digits
    source = Path(__file__).resolve().parents[1] / "sample_data" / "digits-finetune" / "checkpoints"
    (folder / "ck").mkdir(parents=True)
    for name in ("ft-00", "ft-01", "ft-02"):
        shutil.copy(source / f"{name}.safetensors", folder / "ck")
    x, y = load_digits(return_X_y=True)
    header = ",".join([f"f{i}" for i in range(64)] + ["label"])
    for split, rows in (("val", range(0, 60)), ("test", range(60, 120)), ("empty", range(0))):
        table = np.column_stack([x[list(rows)] / 16, y[list(rows)]]) if rows else np.zeros((0, 65))
        np.savetxt(folder / f"{split}.csv", table, delimiter=",", header=header, comments="", fmt="%g")
    (folder / "zoo.toml").write_text(f'checkpoints = ["ck/*.safetensors"]\nmodel = "{model}"\n{manifest_tail}')
    return folder


DATA = '[data]\nkind = "table"\nlabel = "label"\nval = "val.csv"\ntest = "test.csv"\n'


@pytest.mark.parametrize("model, tail, said", [
    ("builtins:exec", DATA, "`model = 'builtins:exec'` failed (TypeError: exec() takes at least 1"),
    ("sample_data.digits:make_mlp", "seed = " + "9" * 5000 + "\n" + DATA, "not valid TOML (Exceeds the limit"),
    ("sample_data.digits:make_mlp", "x = " + "[" * 100_000 + "]" * 100_000 + "\n" + DATA,
     "not valid TOML (nested too deeply to read)"),
    ("sample_data.digits:make_mlp", DATA.replace("val.csv", "empty.csv"), "split 'val' holds no samples"),
    ("sample_data.digits:make_mlp", DATA + 'shifts = "abc"\n', "[data] shifts must be a table of name"),
    ("sample_data.digits:make_mlp", DATA + "[data.shifts]\nsketch = 5\n", "[data] split 'sketch' must be a path"),
    ("sample_data.digits:make_mlp", DATA + "features = 5\n", "[data] features must be a list of column names"),
    ("sample_data.digits:make_mlp", DATA.replace('"label"', "5"), "[data] label must be a column name"),
    ("sample_data.digits:make_mlp", DATA + 'mean = "abc"\n', "[data] mean must be a number or a list of one"),
    ("sample_data.digits:make_mlp", DATA + "std = [0]\n", "[data] std must be a positive number"),
    ("sample_data.digits:make_mlp", DATA + "max_length = -1\n", "[data] max_length must be a whole number"),
    ("sample_data.digits:make_mlp", DATA + "mean = " + "9" * 400 + "\n", "[data] mean must be a number"),
])
def test_a_manifest_that_breaks_its_reader_or_its_own_code_is_one_line(tmp_path, model, tail, said):
    from soup_core.zoo import open_zoo
    zoo_dir = _table_zoo(tmp_path / "zoo", tail, model=model)
    with pytest.raises(SoupError) as caught:
        open_zoo(zoo_dir, device="cpu").evaluator
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_the_table_zoo_the_manifest_tests_break_scores_as_written(tmp_path):
    from soup_core.zoo import open_zoo
    zoo = open_zoo(_table_zoo(tmp_path / "zoo", DATA), device="cpu")
    assert zoo.evaluator.split_names == ("val", "test") and len(zoo.evaluator.labels("val")) == 60


def test_choices_are_never_made_on_test_or_a_shift(tiny_evaluator, tiny_states):
    for split in ("test", "shift"):  # the tiny evaluator's distribution shift is named "shift"
        with pytest.raises(RecipeError, match=f"not '{split}': a choice made on the splits that report it"):
            RECIPES["greedy"].make(tiny_states, tiny_evaluator, val_split=split)
    result = soup_here("make", "greedy", "digits-finetune", "--val-split", "test")
    assert result.returncode == 2 and "val_split must be a held-out split such as val" in result.stderr


def test_weights_near_the_largest_float_mix_as_their_ratios_say():
    import torch
    states = {"a": {"w": torch.zeros(2)}, "b": {"w": torch.ones(2)}}
    soup_of = RECIPES["weighted"].make
    huge = soup_of(states, weights="a=1.5e308,b=0.5e308")  # their sum overflows; 3:1 does not
    assert huge.weights == (0.75, 0.25) and huge.state_dict["w"].tolist() == [0.25, 0.25]


def test_a_point_whose_weights_overflow_is_refused_before_anything_is_written(tmp_path):
    from soup_core.export import plan_export
    from soup_core.zoo import open_zoo
    zoo = open_zoo("digits-finetune", device="cpu")
    with pytest.raises(SoupError, match=r"the point \(1e\+308, 1e\+308\) lies so far .* overflow float32"):
        plan_export(zoo, Candidate.point(("ft-00", "ft-01", "ft-02"), (1e308, 1e308), "keep"))


def test_negative_numbers_in_any_spelling_are_values_on_the_command_line():
    result = soup_here("path", "digits-finetune", "ft-00", "ft-01", "--range", "-5e-1", "1.5", "--points", "3")
    assert result.returncode == 0 and "α from -0.5 to 1.5" in result.stdout, result.stderr


def test_a_provenance_that_is_not_json_is_a_warning_beside_readable_weights(tmp_path):
    import safetensors.torch
    import torch

    from soup_core.io import read_provenance
    from soup_core.io.read import PROVENANCE_KEY
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path, metadata={"format": "pt", PROVENANCE_KEY: "{not json"})
    with pytest.raises(CheckpointError, match="soup_provenance metadata is not a JSON object"):
        read_provenance(path)
    result = soup_here("inspect", str(path))
    assert result.returncode == 0 and result.stdout.startswith(f"warning: {path}: its soup_provenance"), result.stderr
    quiet = json.loads(soup_here("inspect", str(path), "--json", "-").stdout)["checkpoints"][0]  # no words: JSON
    assert quiet["provenance"] is None and "is not a JSON object" in quiet["provenance_error"]


@pytest.mark.parametrize("architectures", [["pipeline"], ["AutoModel"], [5], "ViTForImageClassification"])
def test_a_config_naming_no_model_class_is_refused_by_what_it_names(tmp_path, architectures):
    pytest.importorskip("transformers")
    import safetensors.torch
    import torch

    from soup_core.errors import ModelError
    from soup_core.models import hf_model_factory
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": architectures}))
    with pytest.raises(ModelError, match="'architectures' must name a transformers model class, got"):
        hf_model_factory(tmp_path)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_soup_and_its_card_are_one_output_and_no_card_outlives_its_weights(tmp_path, monkeypatch, streamed):
    import soup_core.io.weights_out as weights_out
    from soup_core.export import plan_export, write_streamed
    from soup_core.zoo import open_zoo
    zoo = open_zoo("digits-finetune", device="cpu")

    def export(names):
        candidate = Candidate.ticked(names)
        if streamed:
            return write_streamed(zoo, candidate, tmp_path / "soup.safetensors")[1]
        return plan_export(zoo, candidate).write(tmp_path / "soup.safetensors")
    assert [p.name for p in export(["ft-00", "ft-01"])] == ["soup.safetensors", "soup.md"]
    assert "ft-01" in (tmp_path / "soup.md").read_text()
    real_replace, renamed = os.replace, []

    def killed_after_the_weights(source, target):  # the process dies right after the weights' rename
        real_replace(source, target)
        renamed.append(Path(target).name)
        if Path(target).name == "soup.safetensors":
            raise KeyboardInterrupt
    monkeypatch.setattr(weights_out.os, "replace", killed_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        export(["ft-02", "ft-03"])
    assert renamed == ["soup.safetensors"] and not (tmp_path / "soup.md").exists()  # never the old soup's card
    monkeypatch.undo()
    export(["ft-02", "ft-03"])  # the next run sweeps what was left and writes both
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup.md", "soup.safetensors"]
    assert "ft-03" in (tmp_path / "soup.md").read_text() and "ft-01" not in (tmp_path / "soup.md").read_text()


def test_no_output_replaces_the_zoos_data_or_code_or_a_hard_link_to_a_checkpoint(tmp_path):
    zoo_dir = _table_zoo(tmp_path / "zoo", DATA)
    (zoo_dir / "mymodel.py").write_text("from sample_data.digits import make_mlp\n")
    (zoo_dir / "zoo.toml").write_text((zoo_dir / "zoo.toml").read_text().replace("sample_data.digits:", "mymodel:"))
    os.link(zoo_dir / "ck" / "ft-00.safetensors", tmp_path / "linked.safetensors")
    before = {p: p.read_bytes() for p in zoo_dir.rglob("*") if p.is_file()}
    for flags in (["--json", str(zoo_dir / "val.csv")], ["--json", str(zoo_dir / "mymodel.py")],
                  ["--out", str(tmp_path / "linked.safetensors")]):
        result = soup_here("make", "uniform", str(zoo_dir), *flags)
        assert result.returncode == 2 and "refusing to write over an input of this run" in result.stderr, flags
    assert {p: p.read_bytes() for p in zoo_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linked.safetensors", "zoo"]


def test_an_image_linked_out_of_the_allowed_roots_is_refused_like_any_other_file(tmp_path):
    import safetensors.torch
    import torch
    from PIL import Image

    from soup_core.zoo import open_zoo
    zoo_dir, outside = tmp_path / "zoo", tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(outside / "secret.png")
    for split in ("val", "test"):
        for label in ("a", "b"):
            (zoo_dir / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 200, 10)).save(zoo_dir / split / label / "0.png")
    (zoo_dir / "val" / "a" / "1.png").symlink_to(outside / "secret.png")
    (zoo_dir / "net.py").write_text("import torch\n\ndef make():\n"
                                    "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))\n")
    for i in range(2):
        torch.manual_seed(i)
        layer = torch.nn.Linear(192, 2)
        safetensors.torch.save_file({"1.weight": layer.weight.detach(), "1.bias": layer.bias.detach()},
                                    zoo_dir / f"ft-{i}.safetensors")
    (zoo_dir / "zoo.toml").write_text('checkpoints = ["ft-*.safetensors"]\nmodel = "net:make"\n'
                                      '[data]\nkind = "images"\nsize = 8\nval = "val"\ntest = "test"\n')
    with pytest.raises(SoupError, match=r"data file .*1\.png is outside the allowed folders"):
        open_zoo(zoo_dir, allowed_roots=[zoo_dir], device="cpu").evaluator
    assert len(open_zoo(zoo_dir, device="cpu").evaluator.labels("val")) == 3  # the CLI on one's own files: read
