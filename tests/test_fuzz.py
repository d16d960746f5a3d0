"""Bounded fuzzing (hypothesis, derandomised): safetensors headers, torch zip members and zoo
manifests give one clear error or a correct load — never a traceback, and never more tensor
bytes than the file holds."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soup_core.errors import SoupError
from soup_core.io import load_state_dict_bytes

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X9", "", 7, None]
DIMENSION = st.one_of(st.integers(-3, 8), st.integers(2**31, 2**63), st.just(0))


def materialised_bytes(state: dict[str, torch.Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    return sum(storages.values())


def assert_loads_or_refuses(blob: bytes, name: str) -> None:
    try:
        state = load_state_dict_bytes(blob, name)
    except SoupError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip()
        return
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    assert materialised_bytes(state) <= len(blob)


@st.composite
def safetensors_blobs(draw) -> bytes:
    data = draw(st.binary(min_size=0, max_size=256))
    header = {}
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.text(max_size=8), st.sampled_from(["w", "b", "__metadata__"])))
        header[key] = draw(st.one_of(
            st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES), "shape": st.lists(DIMENSION, max_size=4),
                                   "data_offsets": st.lists(st.integers(-8, 300), min_size=0, max_size=3)}),
            st.dictionaries(st.text(max_size=4), st.text(max_size=8), max_size=3),
            st.integers(), st.text(max_size=8), st.none()))
    raw = json.dumps(header).encode()
    if draw(st.booleans()):  # a duplicate key, spelled by hand
        raw = raw[:-1] + b', "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}' if len(raw) > 2 else raw
    size = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", size) + raw + data


@FUZZ
@given(safetensors_blobs())
def test_any_safetensors_header_loads_or_is_refused_in_one_line(blob):
    assert_loads_or_refuses(blob, "fuzz.safetensors")


def _torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(6.0), "b": torch.zeros(2, dtype=torch.int64)}, buffer)
    return buffer.getvalue()


GOOD_ZIP = _torch_zip()


@st.composite
def torch_zips(draw) -> bytes:
    with zipfile.ZipFile(io.BytesIO(GOOD_ZIP)) as source:
        members = [(info.filename, source.read(info)) for info in source.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members:
            action = draw(st.sampled_from(["keep", "keep", "deflate", "truncate", "grow", "drop", "garbage"]))
            if action == "drop":
                continue
            if action == "truncate":
                data = data[: draw(st.integers(0, len(data)))]
            elif action == "grow":
                data = data + bytes(draw(st.integers(1, 1 << 16)))
            elif action == "garbage":
                data = draw(st.binary(max_size=64))
            kind = zipfile.ZIP_DEFLATED if action == "deflate" else zipfile.ZIP_STORED
            archive.writestr(name, data, compress_type=kind)
    blob = out.getvalue()
    if draw(st.booleans()):  # flip a few bytes anywhere
        cut = draw(st.integers(0, len(blob) - 1))
        blob = blob[:cut] + draw(st.binary(min_size=1, max_size=4)) + blob[cut + 4:]
    return blob


@FUZZ
@given(torch_zips())
def test_any_torch_zip_loads_or_is_refused_in_one_line(blob):
    assert_loads_or_refuses(blob, "fuzz.pt")


FIELD_VALUES = st.one_of(st.integers(), st.booleans(), st.text(max_size=12), st.lists(st.text(max_size=8), max_size=3),
                         st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3), st.floats(allow_nan=False))


@FUZZ
@given(st.dictionaries(st.sampled_from(["name", "description", "model", "evaluator", "base", "data", "checkpoints"]),
                       FIELD_VALUES, max_size=5),
       st.lists(st.one_of(st.text(max_size=12), st.dictionaries(st.sampled_from(["name", "path", "hparams"]),
                                                               FIELD_VALUES, max_size=3)), max_size=3))
def test_any_manifest_opens_or_is_refused_in_one_line(tmp_path_factory, fields, checkpoints):
    import tomli_w

    from soup_core.zoo import open_zoo
    folder = tmp_path_factory.mktemp("zoo")
    safetensors.torch.save_file({"w": torch.ones(2)}, folder / "a.safetensors")
    manifest = {**fields}
    if checkpoints and "checkpoints" not in manifest:
        manifest["checkpoints"] = checkpoints
    (folder / "zoo.toml").write_text(tomli_w.dumps(manifest))
    try:
        zoo = open_zoo(folder, allowed_roots=[folder])
        zoo.validation
        zoo.evaluator
    except SoupError as exc:
        assert str(exc).strip()
        return
    assert zoo.names
