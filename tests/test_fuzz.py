"""Bounded fuzzing (hypothesis, derandomised): safetensors headers, torch zip members and zoo
manifests give one clear error or a correct load — never a traceback, and never more tensor
bytes than the file holds; every numeric flag of the command line is taken within its bounds or
refused in one line."""

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


NUMBER_TEXT = st.one_of(
    st.integers(-10**30, 10**30).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e308", "-1e308", "1e309", "nan", "-inf", "9" * 5000, "0x10", "1_000", " 3 ", "", "val", "-0"]),
    st.text(max_size=6))
# Each command's required arguments, valid, so that only the flag under test can be refused.
COMMANDS = {"make": ["make", "greedy", "digits-finetune"], "landscape": ["landscape", "digits-finetune"],
            "path": ["path", "digits-finetune", "base", "ft-00"], "point": ["point", "digits-finetune", "--xy", "0", "0"],
            "merge": ["merge", "config.yml"], "align": ["align", "digits-scratch", "--out", "x"]}
NUMBER_TYPES = ("int", "finite_float", "float_or_val", "non_negative_float")


def number_flags() -> dict[tuple[str, str], object]:
    """Every flag of those commands that takes numbers: (command, flag) → its argparse action."""
    import argparse

    from soup_core.cli import build_parser
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {(name, action.option_strings[-1]): action for name in COMMANDS for action in commands[name]._actions
            if action.option_strings and getattr(action.type, "__name__", "") in NUMBER_TYPES}


def test_the_fuzzed_flags_are_every_numeric_flag_of_those_commands():
    """A flag typed plain ``int`` or ``float`` takes any number (inf, 10**30): every number goes through
    one of the bounded types, so the fuzz test below sees it."""
    import argparse

    from soup_core.cli import build_parser
    flags = number_flags()
    assert {("make", "--passes"), ("landscape", "--grid"), ("path", "--range"), ("point", "--xy")} <= set(flags)
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    plain = [(name, action.option_strings) for name, command in commands.items() for action in command._actions
             if action.type in (int, float)]
    assert plain == [] and len(flags) >= 20


@settings(FUZZ, max_examples=1000)  # parsing only: 1,000 cases take seconds
@given(flag=st.sampled_from(sorted(number_flags())), texts=st.lists(NUMBER_TEXT, min_size=2, max_size=2))
def test_any_number_on_the_command_line_is_taken_within_its_bounds_or_refused_in_one_line(flag, texts):
    """Every numeric flag of every command that works: argparse refuses in one line (exit 2), or the
    value is finite and within the flag's bounds, and a recipe's parameter is then taken or refused
    in one line by the bounds the recipe declares; never a traceback, an infinity or a 5,000-digit seed."""
    import contextlib
    import math

    from soup_core.cli import build_parser
    from soup_core.recipes import all_parameters
    action = number_flags()[flag]
    count = action.nargs if isinstance(action.nargs, int) else 1
    argv = [*COMMANDS[flag[0]], flag[1], *texts[:count]]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 2 and len(err.getvalue().splitlines()) == 1 and ": error: " in err.getvalue()
            return
    value = getattr(args, action.dest)
    low, high = getattr(action.type, "bounds", (-math.inf, math.inf))
    for number in value if isinstance(value, (list, tuple)) else [value]:
        assert number == "val" or (math.isfinite(number) and low <= number <= (math.inf if high is None else high))
    declared = all_parameters().get(action.dest)
    if declared is None:
        return
    try:
        checked = declared[0].check(value)
    except SoupError as exc:
        assert "\n" not in str(exc).strip()
        return
    assert checked == "val" or ((declared[0].minimum is None or checked >= declared[0].minimum)
                                and (declared[0].maximum is None or checked <= declared[0].maximum)), (argv, checked)
