"""Every format round-trips; every bad input gets one clear error and leaves files untouched."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch
import torch

from soup_core.errors import CheckpointError
from soup_core.io import (load_state_dict, load_state_dict_bytes, read_provenance, save_state_dict,
                          validate_state_dicts)
from soup_core.state import state_dict_digest
from tests.conftest import tree_digest


def sample_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"layer.weight": torch.randn(3, 4), "layer.bias": torch.randn(3),
            "bn.num_batches_tracked": torch.tensor(7)}


def assert_same(a, b):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_safetensors_round_trip_with_provenance(tmp_path):
    path = save_state_dict(sample_state(), tmp_path / "s.safetensors", provenance={"recipe": "greedy"})
    assert_same(load_state_dict(path), sample_state())
    assert read_provenance(path) == {"recipe": "greedy"}


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_file_round_trip(tmp_path, zip_format):
    path = tmp_path / "w.pt"
    torch.save(sample_state(), path, _use_new_zipfile_serialization=zip_format)
    assert_same(load_state_dict(path), sample_state())


def test_nested_training_checkpoint_is_unwrapped_and_module_prefix_stripped(tmp_path):
    wrapped = {"epoch": 3, "optimizer": {"lr": 0.1},
               "state_dict": {f"module.{k}": v for k, v in sample_state().items()}}
    torch.save(wrapped, tmp_path / "train.pth")
    assert_same(load_state_dict(tmp_path / "train.pth"), sample_state())


def test_ema_weights_are_preferred_as_timm_does(tmp_path):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sample_state().items()}
    torch.save({"state_dict": sample_state(), "state_dict_ema": ema}, tmp_path / "ckpt.pth.tar")
    torch.save({"state_dict": sample_state(), "state_dict_ema": ema}, tmp_path / "ckpt.pt")
    assert_same(load_state_dict(tmp_path / "ckpt.pt"), ema)
    assert_same(load_state_dict(tmp_path / "ckpt.pt", prefer_ema=False), sample_state())


def test_a_tensor_in_two_shards_is_refused_by_both_readers_not_taken_from_the_later_file(tmp_path):
    """The index maps w to shard 1; shard 2 holds another w. Loading used to return shard 2's copy."""
    from soup_core.merge import open_source
    safetensors.torch.save_file({"w": torch.ones(2), "a": torch.zeros(1)}, tmp_path / "model-00001-of-00002.safetensors")
    safetensors.torch.save_file({"w": torch.full((2,), 2.0), "b": torch.zeros(1)},
                                tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "w": "model-00001-of-00002.safetensors", "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors"}}))
    both = r"tensor 'w' is in two shards \(model-00001-of-00002.safetensors and model-00002-of-00002.safetensors\)"
    with pytest.raises(CheckpointError, match=both):
        load_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match=both):
        open_source(tmp_path)  # the streamed merges' reader


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hugging_face_directory_single_and_sharded(tmp_path, fmt):
    state = sample_state()
    single = tmp_path / "single"
    single.mkdir()
    if fmt == "safetensors":
        safetensors.torch.save_file(state, single / "model.safetensors")
    else:
        torch.save(state, single / "pytorch_model.bin")
    assert_same(load_state_dict(single), state)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(state)
    shards = {f"model-0000{i + 1}-of-00002.{fmt}": keys[i::2] for i in range(2)}
    for shard, shard_keys in shards.items():
        part = {k: state[k] for k in shard_keys}
        if fmt == "safetensors":
            safetensors.torch.save_file(part, sharded / shard)
        else:
            torch.save(part, sharded / shard)
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (sharded / index).write_text(json.dumps({"weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    assert_same(load_state_dict(sharded), state)


def test_bytes_round_trip_for_uploads(tmp_path):
    blob = safetensors.torch.save(sample_state())
    assert_same(load_state_dict_bytes(blob, "up.safetensors"), sample_state())
    torch.save(sample_state(), tmp_path / "up.pt")
    assert_same(load_state_dict_bytes((tmp_path / "up.pt").read_bytes(), "up.pt"), sample_state())


def test_tied_weights_stay_tied_through_export(tmp_path):
    shared = torch.randn(5, 2)
    state = {"embed.weight": shared, "head.weight": shared, "head.bias": torch.zeros(5)}
    path = save_state_dict(state, tmp_path / "tied.safetensors")
    loaded = load_state_dict(path)
    assert torch.equal(loaded["head.weight"], shared)
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()


def test_save_is_atomic_and_refuses_to_overwrite_an_input(tmp_path):
    source = save_state_dict(sample_state(), tmp_path / "in.safetensors")
    before = tree_digest(tmp_path)
    with pytest.raises(CheckpointError, match="refusing to write over an input"):
        save_state_dict({"x": torch.zeros(1)}, source, inputs=[source])
    assert tree_digest(tmp_path) == before  # no temp file left behind either


# ---- bad input: one clear error, nothing changed -----------------------------------------


class Payload:
    """Unpickling this would create a marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, path)
    before = tree_digest(tmp_path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_state_dict_bytes(path.read_bytes(), "evil.pt")
    assert not marker.exists()
    assert tree_digest(tmp_path) == before


def write_bad(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def good_bytes() -> bytes:
    return safetensors.torch.save(sample_state() | {"bn.num_batches_tracked": torch.tensor(7)})


def lying_header() -> bytes:
    data = good_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header["layer.weight"]["data_offsets"] = [0, 10_000_000]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + size:]


@pytest.mark.parametrize("name,data,message", [
    ("truncated.safetensors", good_bytes()[:-20], "not a valid safetensors file"),
    ("lying.safetensors", lying_header(), "not a valid safetensors file"),
    ("garbage.pt", b"\x00\x01not a checkpoint" * 10, "not a readable PyTorch checkpoint"),
    ("empty.safetensors", b"", "empty"),
    ("truncated.pt", b"PK\x03\x04" + b"\x00" * 50, "not a readable PyTorch checkpoint"),
])
def test_broken_files_get_a_clear_error_and_stay_untouched(tmp_path, name, data, message):
    path = write_bad(tmp_path, name, data)
    before = tree_digest(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_state_dict(path)
    assert name in str(info.value)
    with pytest.raises(CheckpointError, match=message):
        load_state_dict_bytes(data, name)
    assert tree_digest(tmp_path) == before


def test_entries_that_are_not_tensors_are_named(tmp_path):
    torch.save({"w": torch.zeros(1), "note": "hello"}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="'note'"):
        load_state_dict(tmp_path / "mixed.pt")


def test_validation_names_missing_and_unexpected_keys():
    report = validate_state_dicts({"a": {"w": torch.ones(2), "b": torch.ones(1)},
                                   "b": {"w": torch.ones(2), "extra": torch.ones(1)}})
    assert report.errors == ("b: does not match a — missing keys 'b'; unexpected keys 'extra'",)


def test_validation_names_shape_and_dtype_mismatches():
    report = validate_state_dicts({"a": {"w": torch.ones(2, 3), "v": torch.ones(2)},
                                   "b": {"w": torch.ones(3, 2), "v": torch.ones(2, dtype=torch.float16)}})
    assert "b: shape mismatch for 'w': (3, 2) here, (2, 3) in a" in report.errors
    assert any("dtype mismatch for 'v': torch.float16 here, torch.float32 in a" in e for e in report.errors)
    with pytest.raises(CheckpointError):
        report.raise_for_errors()


def test_validation_reports_nan_and_inf():
    report = validate_state_dicts({"a": {"w": torch.ones(2)}, "b": {"w": torch.tensor([1.0, float("nan")])},
                                   "c": {"w": torch.tensor([float("inf"), 0.0])}})
    assert report.errors == ("b: NaN or Inf values in 'w'", "c: NaN or Inf values in 'w'")


def test_validation_warns_about_exact_duplicates_and_lists_integer_and_tied_keys():
    shared = torch.ones(2)
    a = {"w": shared, "tied": shared, "count": torch.tensor(3)}
    report = validate_state_dicts({"a": a, "b": {k: v.clone() for k, v in a.items()}})
    assert report.duplicates == (("a", "b"),)
    assert report.integer_keys == ("count",)
    assert report.tied_groups == (("w", "tied"),)


def test_digest_depends_on_values_keys_and_dtypes():
    a = {"w": torch.ones(2)}
    assert state_dict_digest(a) == state_dict_digest({"w": torch.ones(2)})
    assert state_dict_digest(a) != state_dict_digest({"w": torch.tensor([1.0, 1.5])})
    assert state_dict_digest(a) != state_dict_digest({"v": torch.ones(2)})
    assert state_dict_digest(a) != state_dict_digest({"w": torch.ones(2, dtype=torch.float64)})


@pytest.mark.parametrize("name, data, said", [
    ("photo.safetensors", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "this is a PNG image, not a checkpoint"),
    ("photo.pt", b"\xff\xd8\xff\xe0" + b"\x00" * 64, "this is a JPEG image, not a checkpoint"),
    ("saved-page.bin", b"<!DOCTYPE html><html><body>404</body></html>", "this is an HTML page, not a checkpoint"),
    ("config.safetensors", b'{"architectures": ["ViTModel"], "hidden_size": 768}', "this is JSON text"),
])
def test_a_file_of_another_format_is_named_as_such(tmp_path, name, data, said):
    (tmp_path / name).write_bytes(data)
    for load in (lambda: load_state_dict(tmp_path / name), lambda: load_state_dict_bytes(data, name)):
        with pytest.raises(CheckpointError, match=said):
            load()


def test_a_zip_of_other_files_is_not_taken_for_a_torch_checkpoint(tmp_path):
    import zipfile
    with zipfile.ZipFile(tmp_path / "export.pt", "w") as archive:
        archive.writestr("weights/readme.txt", "hello")
    with pytest.raises(CheckpointError, match="a ZIP archive of other files, not a PyTorch checkpoint"):
        load_state_dict(tmp_path / "export.pt")
