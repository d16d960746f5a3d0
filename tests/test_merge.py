"""The streaming merge engine and the one safetensors writer, specified.

The oracles: ``safetensors``' own writer for the bytes of a file, ``transformers``'
``from_pretrained`` for sharded folders, ``hashlib`` over whole files for the hashes taken while
reading, hand-worked 2×2 examples for the methods, and the in-memory soups for the streamed ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from soup_core.errors import CheckpointError, SoupError
from soup_core.export import Candidate, plan_export, write_streamed
from soup_core.io import file_sha256, load_state_dict, save_state_dict, state_dict_bytes
from soup_core.io.weights_out import StreamingWriter, plan_shards, save_hf_directory
from soup_core.io.layout import TensorInfo
from soup_core.merge import (MappingSource, MergeRun, linear, mean_of, merge_in_memory, model_stock, open_source,
                             write_merge)
from soup_core.zoo import open_zoo, sample_zoos
from tests.conftest import write_sharded
from tests.test_cli import gone, the_worker

ROOT = Path(__file__).resolve().parent.parent


def safetensors_own_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """What safetensors itself writes, with its metadata put first and sorted (our one change)."""
    blob = safetensors.torch.save(tensors, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    return blob[:8] + text + b" " * (size - len(text)) + blob[8 + size:]


def test_our_writer_gives_the_bytes_safetensors_gives_for_every_dtype(tmp_path):
    tensors = {"z.f32": torch.randn(3, 2), "a.i32": torch.arange(3, dtype=torch.int32),
               "y.f64": torch.randn(2, dtype=torch.float64), "b.i64": torch.tensor(7),
               "x.bf16": torch.randn(5).bfloat16(), "c.f16": torch.randn(1).half(),
               "w.i16": torch.ones(2, dtype=torch.int16), "d.u8": torch.ones(3, dtype=torch.uint8),
               "e.bool": torch.tensor([True, False]), "empty": torch.zeros(0)}
    path = save_state_dict(tensors, tmp_path / "w.safetensors", provenance={"é": "ü", "recipe": "x"})
    metadata = {"format": "pt", "soup_provenance": json.dumps({"é": "ü", "recipe": "x"}, sort_keys=True)}
    assert path.read_bytes() == safetensors_own_bytes(tensors, metadata)
    assert state_dict_bytes(tensors, {"é": "ü", "recipe": "x"}) == path.read_bytes()


def test_every_sample_zoos_uniform_soup_is_written_as_safetensors_writes_it(tmp_path):
    for name in sample_zoos():
        zoo = open_zoo(name, device="cpu")
        plan = plan_export(zoo, Candidate.ticked(zoo.names[:3]))
        written = Path(plan.write(tmp_path / f"{name}.safetensors")[0])
        metadata = safetensors.safe_open(str(written), "pt").metadata()
        assert written.read_bytes() == safetensors_own_bytes(dict(plan.state_dict), metadata), name


@pytest.mark.parametrize("kernel", ["links an unnamed file", "refuses to link it", "has no O_TMPFILE"])
def test_blocks_written_in_any_order_land_where_they_belong(tmp_path, monkeypatch, kernel):
    import soup_core.io.weights_out as weights_out

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")
    if kernel == "refuses to link it":  # some sandboxes: the finished file is copied instead
        monkeypatch.setattr(weights_out, "_link_unnamed", refuse)
    if kernel == "has no O_TMPFILE":  # a named file in the hidden staging folder
        monkeypatch.delattr(weights_out.os, "O_TMPFILE")
    infos = {"a": TensorInfo(torch.float32, (2, 3)), "b": TensorInfo(torch.bfloat16, (4,))}
    with StreamingWriter(tmp_path / "x.safetensors", infos, {"format": "pt"}) as writer:
        writer.write("b", torch.tensor([3.0, 4.0]).bfloat16(), start=2)
        writer.write("a", torch.arange(3.0, 6.0), start=3)
        writer.write("b", torch.tensor([1.0, 2.0]).bfloat16(), start=0)
        writer.write("a", torch.arange(3.0), start=0)
        writer.finish()
    out = safetensors.torch.load_file(tmp_path / "x.safetensors")
    assert out["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and out["b"].tolist() == [1, 2, 3, 4]
    assert os.listdir(tmp_path) == ["x.safetensors"]  # no probe, no staging folder


def test_an_unfinished_write_leaves_nothing_and_keeps_the_previous_file(tmp_path):
    target = tmp_path / "soup.safetensors"
    target.write_bytes(b"the previous soup")
    with pytest.raises(RuntimeError):
        with StreamingWriter(target, {"w": TensorInfo(torch.float32, (2,))}, {"format": "pt"}) as writer:
            writer.write("w", torch.ones(2))
            raise RuntimeError("the merge failed")
    assert target.read_bytes() == b"the previous soup" and os.listdir(tmp_path) == ["soup.safetensors"]


def test_a_full_disk_fails_before_any_work_as_one_line(tmp_path, monkeypatch):
    import errno

    import soup_core.io.weights_out as weights_out

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(weights_out.os, "posix_fallocate", full)
    (tmp_path / "soup.safetensors").write_bytes(b"the previous soup")
    with pytest.raises(CheckpointError, match="no space left on the device; nothing was written"):
        save_state_dict({"w": torch.ones(2)}, tmp_path / "soup.safetensors")
    assert os.listdir(tmp_path) == ["soup.safetensors"]
    assert (tmp_path / "soup.safetensors").read_bytes() == b"the previous soup"


def test_shards_are_split_as_save_pretrained_splits_them():
    infos = {k: TensorInfo(torch.float32, (n,)) for k, n in [("a", 10), ("b", 10), ("huge", 100), ("c", 5)]}
    assert plan_shards(infos, max_shard_bytes=80) == [["a", "b"], ["huge"], ["c"]]
    assert plan_shards(infos, max_shard_bytes=10**9) == [["a", "b", "huge", "c"]]


def test_hashes_taken_while_reading_equal_hashing_the_files(tmp_path):
    save_state_dict({"b": torch.randn(300), "a": torch.randn(7, 5), "n": torch.tensor(3)}, tmp_path / "one.safetensors")
    folder = tmp_path / "hf"
    save_hf_directory({f"layer.{i}": torch.randn(64) for i in range(6)}, folder, source=_config_folder(tmp_path),
                      max_shard_bytes=600)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    for path in (tmp_path / "one.safetensors", folder):
        source = open_source(path)
        for key in reversed(source.layout_order()):  # out of order: the gaps are hashed on the way
            source.read(key)
        expected = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())
                                  if path.is_dir() else path.read_bytes()).hexdigest()
        assert source.sha256() == expected == file_sha256(path)


def _config_folder(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir(exist_ok=True)
    (source / "config.json").write_text("{}")
    return source


def test_methods_on_a_worked_example():
    a, b, base = (torch.tensor(v, dtype=torch.float64) for v in ([1.0, 2.0], [3.0, 0.0], [1.0, 0.0]))
    assert mean_of().combine([a, b], None, None).tolist() == [2.0, 1.0]
    assert linear([0.25, 0.75]).combine([a, b], None, None).tolist() == [2.5, 0.5]
    # deltas (0, 2) and (2, 0) are orthogonal: cos = 0, so Model Stock keeps θ0
    stock = model_stock()
    gram = stock.statistic([a, b], base)
    assert gram.tolist() == [[4.0, 0.0], [0.0, 4.0]] and stock.summary(gram) == 0.0
    assert stock.combine([a, b], base, 0.0).tolist() == [1.0, 0.0]
    # deltas (1, 1) and (1, 0): cos = 1/√2, t = 2c/(1+c); merged = t·mean + (1 − t)·θ0
    c = 2 ** -0.5
    t = stock.summary(stock.statistic([base + torch.tensor([1.0, 1.0]), base + torch.tensor([1.0, 0.0])], base))
    assert t == pytest.approx(2 * c / (1 + c), abs=1e-15)


def test_a_streamed_merge_is_the_same_whatever_the_block_size():
    torch.manual_seed(0)
    states = [{"w": torch.randn(1000), "b": torch.randn(3, 7), "n.num_batches_tracked": torch.tensor(i)} for i in range(3)]
    base = {"w": torch.randn(1000), "b": torch.randn(3, 7), "n.num_batches_tracked": torch.tensor(9)}
    sources = [MappingSource(s, name=str(i)) for i, s in enumerate(states)]
    for method, exact in ((mean_of(), True), (linear([0.2, 0.3, 0.5]), True), (model_stock(), False)):
        whole = merge_in_memory(method, sources, MappingSource(base))
        run = MergeRun(method, sources, MappingSource(base), block_bytes=8 * 6 * 10)  # 10-element blocks
        blocked = {}
        for key, start, block in run.blocks():
            blocked.setdefault(key, []).append((start, block.reshape(-1)))
        for key, parts in blocked.items():
            flat = torch.cat([b for _, b in sorted(parts, key=lambda p: p[0])]).reshape(whole[key].shape)
            assert (torch.equal(flat, whole[key]) if exact else torch.allclose(flat, whole[key], atol=1e-6)), key
        assert whole["n.num_batches_tracked"].item() == 0  # a step counter: the reference ingredient's


def test_a_tensor_is_merged_in_blocks_of_the_budget_shared_by_every_input_and_two_working_copies():
    from soup_core.merge.karcher import karcher
    from soup_core.merge.task_vectors import task_vector_method
    sources = [MappingSource({"w": torch.arange(25.0) * (i + 1)}, name=n) for i, n in enumerate("ab")]
    base = MappingSource({"w": torch.zeros(25)})

    def blocks(run: MergeRun) -> list[tuple[int, int]]:
        return [(start, block.numel()) for _, start, block in run.blocks()]
    # two ingredients and two working copies: four float64 blocks, so 320 bytes hold 10 elements each
    assert blocks(MergeRun(mean_of(), sources, block_bytes=320)) == [(0, 10), (10, 10), (20, 5)]
    # θ0 is a fifth input: 8 elements
    task_arithmetic = task_vector_method("task-arithmetic", [1.0, 1.0])
    assert blocks(MergeRun(task_arithmetic, sources, base, block_bytes=320)) == [(0, 8), (8, 8), (16, 8), (24, 1)]
    assert blocks(MergeRun(mean_of(), sources, block_bytes=4 * 8 * 25)) == [(0, 25)]  # the whole tensor fits
    assert blocks(MergeRun(mean_of(), sources, block_bytes=1)) == [(i, 1) for i in range(25)]  # never stuck
    assert blocks(MergeRun(karcher(), sources, block_bytes=320)) == [(0, 25)]  # a per-tensor method: whole


def test_a_merge_in_memory_assembles_its_blocks_and_keeps_tied_tensors_tied():
    a, b = torch.arange(12.0).reshape(3, 4), torch.full((3, 4), 2.0)
    ingredients = [{"emb": t, "head": t, "bias": torch.tensor([1.0, -1.0]) * i} for i, t in enumerate((a, b))]
    sources = [MappingSource(s, name=str(i)) for i, s in enumerate(ingredients)]
    for block_bytes in (4 * 8 * 2, 4 * 8 * 5, 1 << 20):  # 2 and 5 elements a block, and whole tensors
        merged = merge_in_memory(mean_of(), sources, block_bytes=block_bytes)
        assert merged["emb"].tolist() == ((a + b) / 2).tolist() and merged["bias"].tolist() == [0.5, -0.5]
        assert merged["head"] is merged["emb"] and list(merged) == ["emb", "bias", "head"]


def test_a_merge_reports_its_progress_by_bytes_after_each_tensor():
    seen: list[tuple[float, str]] = []
    run = MergeRun(mean_of(), [MappingSource({"a": torch.zeros(4), "b": torch.zeros(12)})], block_bytes=64)
    blocks = list(run.blocks(lambda fraction, key: seen.append((fraction, key))))
    assert len(blocks) == 2 + 6  # one input and two working copies: 2 elements a block
    assert seen == [(0.25, "a"), (1.0, "b")]


def test_a_non_finite_base_or_a_base_that_does_not_match_is_named():
    from soup_core.merge.task_vectors import task_vector_method
    task_arithmetic = task_vector_method("task-arithmetic", [1.0, 1.0])
    sources = [MappingSource({"w": torch.ones(3)}, name=n) for n in "ab"]
    with pytest.raises(CheckpointError, match=r"^base: tensor 'w' holds NaN or Inf values"):
        list(MergeRun(task_arithmetic, sources, MappingSource({"w": torch.tensor([0.0, math.inf, 0.0])},
                                                              name="base")).blocks())
    with pytest.raises(CheckpointError, match=r"^base and a hold different tensors: base lacks 'w' and has 'v'"):
        MergeRun(task_arithmetic, sources, MappingSource({"v": torch.zeros(3)}, name="base"))


def test_a_merged_tensor_whose_float64_sum_overflows_is_not_refused_when_its_values_are_finite():
    """The merge checks a block's sum for NaN and Inf (one reduction, not a mask): 3 × 1e308 is inf
    in float64 though each value is finite, and such a block is kept."""
    ingredient = MappingSource({"w": torch.full((3,), 1e308, dtype=torch.float64)}, name="a")
    assert merge_in_memory(mean_of(), [ingredient])["w"].tolist() == [1e308] * 3


def test_a_merge_written_in_blocks_is_the_merge_in_memory_in_one_file(tmp_path):
    a, b = torch.arange(30.0).reshape(5, 6), torch.linspace(-1, 1, 30).reshape(5, 6)
    sources = [MappingSource({"emb": t, "head": t, "bias": t[0]}, name=n) for n, t in (("a", a), ("b", b))]
    seen: list[tuple[float, str]] = []
    path, digests = write_merge(MergeRun(linear([0.25, 0.75]), sources, block_bytes=4 * 8 * 4), tmp_path / "soup",
                                progress=lambda fraction, key: seen.append((fraction, key)))
    assert path.is_file() and digests == {"a": "0" * 64, "b": "0" * 64}  # in memory: nothing to hash
    written = load_state_dict(path)
    expected = merge_in_memory(linear([0.25, 0.75]), sources)
    assert {k: t.tolist() for k, t in written.items()} == {k: t.tolist() for k, t in expected.items()}
    assert written["head"].data_ptr() == written["emb"].data_ptr()  # the file records the tie
    assert seen[-1] == (1.0, "bias") and [k for _, k in seen] == ["emb", "bias"]
    from soup_core.merge.task_vectors import task_vector_method
    with_base = MergeRun(task_vector_method("task-arithmetic", [1.0, 1.0]), sources,
                         MappingSource({"emb": torch.zeros(5, 6), "bias": torch.zeros(6)}, name="base"))
    _, digests = write_merge(with_base, tmp_path / "with-base")
    assert sorted(digests) == ["a", "b", "base"]  # θ0 is an input too: its digest is recorded
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="refusing to write over an input of this run"):
        write_merge(MergeRun(linear([0.25, 0.75]), sources), path, inputs=[path])
    assert path.read_bytes() == before


def test_a_nan_in_one_block_is_traced_to_the_ingredient_that_holds_it():
    fine = MappingSource({"w": torch.ones(25)}, name="fine")
    values = torch.ones(25)
    values[0] = math.nan  # in the first of three blocks
    broken = MappingSource({"w": values}, name="broken")
    with pytest.raises(CheckpointError, match=r"^broken: tensor 'w' holds NaN or Inf values"):
        list(MergeRun(mean_of(), [fine, broken], block_bytes=4 * 8 * 10).blocks())


def test_integer_tensors_are_copied_only_when_every_ingredient_holds_the_same():
    """int8 weights (a quantized layer) that differ cannot be averaged: copying the first one while the
    card says 0.5/0.5 would be silently wrong, so the merge and the zoo's validation refuse by name."""
    from soup_core.io import validate_state_dicts
    table = torch.arange(4)
    a = {"w": torch.zeros(2), "pos.position_ids": table, "q.weight": torch.tensor([1, 2], dtype=torch.int8)}
    b = {"w": torch.ones(2), "pos.position_ids": table.clone(), "q.weight": torch.tensor([1, 3], dtype=torch.int8)}
    message = r"^ft-1: integer tensor 'q.weight' \(int8\) differs from ft-0's; .*dequantize"
    with pytest.raises(CheckpointError, match=message):
        merge_in_memory(mean_of(), [MappingSource(a, name="ft-0"), MappingSource(b, name="ft-1")])
    assert validate_state_dicts({"ft-0": a, "ft-1": b}).errors[0].startswith(
        "ft-1: integer tensor 'q.weight' (int8) differs from ft-0's")
    b["q.weight"] = a["q.weight"].clone()  # the same in both: copied, as position_ids is
    merged = merge_in_memory(mean_of(), [MappingSource(a, name="ft-0"), MappingSource(b, name="ft-1")])
    assert merged["q.weight"].tolist() == [1, 2] and torch.equal(merged["pos.position_ids"], table)
    assert merged["w"].tolist() == [0.5, 0.5] and not validate_state_dicts({"ft-0": a, "ft-1": b}).errors
    # a single integer counts or switches (an EMA's update count, an observer's flag): copied though it differs
    a["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
    b["model_ema.num_updates"] = torch.tensor(9, dtype=torch.int32)
    merged = merge_in_memory(mean_of(), [MappingSource(a, name="ft-0"), MappingSource(b, name="ft-1")])
    assert merged["model_ema.num_updates"].item() == 7 and not validate_state_dicts({"ft-0": a, "ft-1": b}).errors


def test_inputs_that_do_not_match_are_refused_by_name_before_any_math():
    a = MappingSource({"w": torch.zeros(2), "v": torch.zeros(1)}, name="ft-0")
    with pytest.raises(CheckpointError, match="'w' is \\[3\\] float32 in ft-1 but \\[2\\] float32 in ft-0"):
        MergeRun(mean_of(), [a, MappingSource({"w": torch.zeros(3), "v": torch.zeros(1)}, name="ft-1")])
    with pytest.raises(CheckpointError, match="ft-2 lacks 'v'"):
        MergeRun(mean_of(), [a, MappingSource({"w": torch.zeros(2)}, name="ft-2")])
    nan = MappingSource({"w": torch.tensor([0.0, float("nan")]), "v": torch.zeros(1)}, name="ft-3")
    with pytest.raises(CheckpointError, match="ft-3: tensor 'w' holds NaN"):
        merge_in_memory(mean_of(), [a, nan])


@pytest.fixture
def folder_zoo(tmp_path):
    """Five digits-finetune checkpoints and θ0 in a plain folder: a zoo with no evaluator."""
    source = sample_zoos()["digits-finetune"].parent
    folder = tmp_path / "zoo"
    folder.mkdir()
    shutil.copy(source / "base.safetensors", folder / "base.safetensors")
    for name in ("ft-00", "ft-03", "ft-05", "ft-17", "ft-22"):
        shutil.copy(source / "checkpoints" / f"{name}.safetensors", folder / f"{name}.safetensors")
    return folder


@pytest.mark.parametrize("recipe, params", [("uniform", {}), ("weighted", {"weights": "ft-03=2,ft-05=0"}),
                                            ("model-stock", {})])
def test_a_streamed_export_is_the_in_memory_export_byte_for_byte(folder_zoo, tmp_path, monkeypatch, recipe, params):
    zoo = open_zoo(folder_zoo)
    assert zoo.evaluator is None
    candidate = Candidate.of_recipe(recipe, **params)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")  # the same --out in both remaking commands
    in_memory = [Path("soup.safetensors").resolve(), Path("soup.md").resolve()]
    plan_export(zoo, candidate, out="soup.safetensors").write("soup.safetensors")
    monkeypatch.chdir(tmp_path / "b")
    streamed = [p.resolve() for p in write_streamed(zoo, candidate, "soup.safetensors")[1]]
    assert [p.name for p in streamed] == [p.name for p in in_memory] == ["soup.safetensors", "soup.md"]
    for ours, theirs in zip(streamed, in_memory):
        assert ours.read_bytes() == theirs.read_bytes()


def test_soup_make_streams_a_zoo_without_an_evaluator_and_records_the_inputs_hashes(folder_zoo, tmp_path):
    out = tmp_path / "soup.safetensors"
    result = subprocess.run([sys.executable, "-m", "soup_core", "make", "uniform", str(folder_zoo), "--out", str(out),
                             "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tensor by tensor" in result.stdout
    provenance = json.loads(safetensors.safe_open(str(out), "pt").metadata()["soup_provenance"])
    assert {i["name"]: i["sha256"] for i in provenance["ingredients"]} == {
        p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder_zoo.glob("ft-*.safetensors")}
    states = [load_state_dict(p) for p in sorted(folder_zoo.glob("ft-*.safetensors"))]
    merged = load_state_dict(out)
    for key, tensor in merged.items():  # float64 sum of float32 values, rounded once
        assert torch.equal(tensor, (sum(s[key].double() for s in states) / 5).float()), key


def test_a_sharded_soup_loads_with_from_pretrained_and_equals_the_single_file_soup(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=100)
    zoo = tmp_path / "zoo"
    for i, name in enumerate(("base", "ft-0", "ft-1", "ft-2")):
        torch.manual_seed(i)
        transformers.LlamaForCausalLM(config).save_pretrained(zoo / name)
    opened = open_zoo(zoo)
    candidate = Candidate.of_recipe("model-stock")
    plan, written = write_streamed(opened, candidate, tmp_path / "soup", max_shard_bytes=20_000)
    folder = written[0]
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2 and (folder / "README.md").exists()
    single = write_streamed(opened, candidate, tmp_path / "soup.safetensors")[1][0]
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    loaded = load_state_dict(single)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in loaded.items() if k in model.state_dict())
    ratios = plan.extras["ratios"]  # independent inits: cos ≈ ½, t ≈ 3·½/(1 + 2·½); norms unmoved: t = 0
    assert all(t == 0 if k.endswith("norm.weight") else 0.7 < t < 0.8 for k, t in ratios.items())


def test_a_merge_holds_blocks_not_models(tmp_path):
    """Three 128 MB checkpoints merged in a process whose memory grows by less than one of them."""
    for i in range(3):
        torch.manual_seed(i)
        save_state_dict({"big": torch.randn(32 << 20), "small": torch.randn(10)}, tmp_path / f"ft-{i}.safetensors")
    code = f"""
import resource, sys
from pathlib import Path
from soup_core.merge import MergeRun, mean_of, open_source, write_merge
folder = Path({str(tmp_path)!r})
sources = [open_source(folder / f"ft-{{i}}.safetensors", name=str(i)) for i in range(3)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
write_merge(MergeRun(mean_of(), sources, block_bytes=16 << 20), folder / "out" / "soup.safetensors")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.strip())
    assert grown < 64 << 20, f"the merge grew the process by {grown / 2**20:.0f} MB"
    merged = load_state_dict(tmp_path / "out" / "soup.safetensors")["big"]
    inputs = [load_state_dict(tmp_path / f"ft-{i}.safetensors")["big"] for i in range(3)]
    assert torch.equal(merged, (sum(t.double() for t in inputs) / 3).float())


def test_a_killed_merge_leaves_nothing_behind(tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for i in range(3):
        save_state_dict({"big": torch.randn(24 << 20)}, zoo / f"ft-{i}.safetensors")
    before = sorted(os.listdir(zoo))
    out = tmp_path / "out" / "soup.safetensors"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "soup_core", "make", "uniform", str(zoo), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = the_worker(proc)
    deadline = time.monotonic() + 120
    writing = False
    while time.monotonic() < deadline and proc.poll() is None and not writing:
        try:
            targets = [os.readlink(f"/proc/{worker}/fd/{fd}") for fd in os.listdir(f"/proc/{worker}/fd")]
        except OSError:
            targets = []
        writing = any(t.startswith(str(out.parent)) for t in targets)  # an output file is open
        time.sleep(0.005)
    assert writing, "the merge finished before it could be killed; make the zoo larger"
    os.kill(proc.pid, signal.SIGKILL)  # the command's own process: its worker dies with it
    proc.wait(timeout=30)
    assert gone(worker)
    assert sorted(os.listdir(out.parent)) == [] and sorted(os.listdir(zoo)) == before


def test_a_checkpoint_truncated_under_a_streamed_make_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """A streamed merge reads by byte range (no memory map): a file cut short under it is a short read,
    reported with the file and the byte, and the output never appears."""
    from soup_core.merge import sources
    from tests.test_cli import soup_here
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for i in range(3):
        save_state_dict({"a": torch.randn(4096), "b": torch.randn(4096)}, zoo / f"ft-{i}.safetensors")
    real_read = sources._HashedStream.read

    def read_then_cut(self, index, begin, end):  # `cp new.safetensors ft-2.safetensors` starts under the merge
        data = real_read(self, index, begin, end)
        os.truncate(zoo / "ft-2.safetensors", 200)
        return data
    monkeypatch.setattr(sources._HashedStream, "read", read_then_cut)
    out = tmp_path / "out"
    out.mkdir()
    result = soup_here("make", "uniform", str(zoo), "--out", str(out / "soup.safetensors"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "ft-2.safetensors: the file ended at byte" in result.stderr and "nothing was written" in result.stderr
    assert os.listdir(out) == []


def test_streaming_needs_a_per_tensor_recipe(folder_zoo):
    with pytest.raises(SoupError, match="not a per-tensor merge"):
        write_streamed(open_zoo(folder_zoo), Candidate.of_recipe("greedy"), folder_zoo.parent / "x.safetensors")


def test_weight_only_work_on_hugging_face_folders_needs_no_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")  # to write the folders; the commands run without it
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=50)
    zoo = tmp_path / "zoo"
    for i, name in enumerate(("base", "ft-0", "ft-1")):
        torch.manual_seed(i)
        transformers.LlamaForCausalLM(config).save_pretrained(zoo / name)
    blocked = tmp_path / "blocked" / "transformers"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('transformers is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked.parent), str(ROOT)])}
    for argv in (["make", "uniform", str(zoo), "--out", str(tmp_path / "uniform")],
                 ["make", "model-stock", str(zoo), "--out", str(tmp_path / "stock.safetensors")],
                 ["angles", str(zoo)]):
        result = subprocess.run([sys.executable, "-m", "soup_core", *argv], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, (argv, result.stderr)
    assert (tmp_path / "uniform" / "config.json").exists() and (tmp_path / "stock.safetensors").exists()


def test_a_hub_cache_folder_of_symlinks_is_read_and_hashed(tmp_path):
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir(), snapshot.mkdir()
    save_state_dict({"w": torch.arange(4.0)}, blobs / "abc123")  # the hub stores content-named blobs
    (snapshot / "model.safetensors").symlink_to(blobs / "abc123")
    (blobs / "cfg").write_text("{}")
    (snapshot / "config.json").symlink_to(blobs / "cfg")
    source = open_source(snapshot)
    assert source.read("w").tolist() == [0.0, 1.0, 2.0, 3.0] and source.sha256() == file_sha256(snapshot)


def test_a_streamed_merge_reads_every_input_byte_once(tmp_path, monkeypatch):
    import soup_core.merge.sources as sources
    folders = []
    for i in range(2):
        folder = tmp_path / f"ft-{i}"
        save_hf_directory({f"layer.{j}": torch.randn(256) for j in range(6)}, folder, source=_config_folder(tmp_path),
                          max_shard_bytes=2500)
        folders.append(folder)
    read = []
    real = os.preadv
    monkeypatch.setattr(sources.os, "preadv", lambda fd, buffers, offset: read.append(real(fd, buffers, offset))
                        or read[-1])
    opened = [open_source(f, name=f.name) for f in folders]
    write_merge(MergeRun(mean_of(), opened, block_bytes=1 << 20), tmp_path / "soup.safetensors")
    header_bytes = sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for f in folders
                       for p in f.glob("model-*.safetensors"))
    total = sum(p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file())
    assert sum(read) == total + header_bytes  # headers twice (parsed apart from the hash), every other byte once


def test_an_overflow_of_the_tensor_dtype_is_refused_not_written_as_inf():
    big = MappingSource({"w": torch.tensor([40000.0], dtype=torch.float16)}, name="big")
    with pytest.raises(CheckpointError, match="overflow float16"):
        merge_in_memory(linear([2.0, 0.0]), [big, MappingSource({"w": torch.zeros(1, dtype=torch.float16)})])
    with pytest.raises(SoupError, match="2 weights for 3 ingredients"):
        merge_in_memory(linear([0.5, 0.5]), [big, big, big])


def test_a_failed_write_leaves_no_open_file(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(CheckpointError):
            save_state_dict({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")
    assert len(os.listdir("/proc/self/fd")) == before and os.listdir(tmp_path) == []


@pytest.mark.parametrize("header, said", [
    ({"__metadata__": [1]}, "__metadata__ is not a map of strings"),
    ({"a": {"dtype": "F32", "shape": "12", "data_offsets": [0, 8]}}, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap or leave gaps"),
])
def test_a_malformed_header_is_refused_by_name(header, said):
    from soup_core.io.layout import parse_header
    with pytest.raises(CheckpointError, match=said):
        parse_header(json.dumps(header).encode(), 1000, "bad.safetensors")


def test_a_writer_never_finishes_a_file_with_values_missing(tmp_path):
    with pytest.raises(ValueError, match="got 2 of 4 elements"):
        with StreamingWriter(tmp_path / "x.safetensors", {"w": TensorInfo(torch.float32, (4,))}, {"format": "pt"}) as w:
            w.write("w", torch.ones(2))
            w.finish()
    assert os.listdir(tmp_path) == []


def test_a_streamed_source_reads_tied_tensors_slices_and_rereads_and_hashes_every_byte_once(tmp_path, monkeypatch):
    """What the streamed merges read: a tensor tied to another (soup_tied metadata) is named as an
    alias, slices and re-reads return the file's values, the kernel's short reads are completed,
    and the digest is the file's sha256."""
    from soup_core.merge import sources
    shared = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = save_state_dict({"embed": shared, "head": shared, "bias": torch.tensor([5.0, 6.0])},
                           tmp_path / "tied.safetensors")
    real_preadv = os.preadv
    monkeypatch.setattr(sources.os, "preadv", lambda fd, buffers, offset: real_preadv(
        fd, [b[:7] for b in buffers], offset))  # at most 7 bytes a call, as a pipe or NFS may give
    source = open_source(path)
    assert source.aliases == {"head": "embed"} and set(source.infos) == {"embed", "bias"}
    assert source.layout_order() == sorted(source.infos, key=lambda k: source._where[k][1].begin)
    assert torch.equal(source.read("embed"), shared)
    assert source.read("embed", 5, 9).tolist() == [5.0, 6.0, 7.0, 8.0]
    assert source.read("bias").tolist() == [5.0, 6.0] and torch.equal(source.read("embed"), shared)  # a re-read
    assert source.sha256() == file_sha256(path)
    source.close()
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes().replace(b'\\"embed\\"}', b'\\"gone!\\"}'))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: its 'soup_tied' metadata does not name tensors"):
        open_source(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("kind", ["in memory", "streamed"])
def test_a_source_reads_a_whole_tensor_shaped_and_any_slice_flat(tmp_path, kind):
    """``read(key)`` is the tensor in its shape; ``read(key, start)`` its flat tail, ``read(key, start, stop)``
    the flat elements between; an empty tensor reads as an empty tensor of its dtype."""
    tensors = {"w": torch.arange(12, dtype=torch.float16).reshape(3, 4),
               "empty": torch.zeros(0, 5, dtype=torch.bfloat16)}
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, str(file))
    source = MappingSource(tensors) if kind == "in memory" else open_source(file)
    assert source.read("w").shape == (3, 4) and source.read("w").tolist() == tensors["w"].tolist()
    assert source.read("w", 0, None).shape == (3, 4)
    assert source.read("w", 9).tolist() == [9.0, 10.0, 11.0]
    assert source.read("w", 0, 2).tolist() == [0.0, 1.0] and source.read("w", 4, 6).tolist() == [4.0, 5.0]
    empty = source.read("empty")
    assert empty.shape == (0, 5) and empty.dtype == torch.bfloat16
    assert source.read("empty", 0, 0).shape == (0,)


def test_open_source_reads_each_format_by_its_name_and_only_inside_the_roots(tmp_path):
    """A safetensors file or folder is streamed; a torch file is loaded (its digest from the file); an
    adapter folder is θ0 plus B·A·(α/r); every file read, a shard or an adapter's weights, lies inside
    the roots; a name given is the source's name, else the file's or folder's."""
    from soup_core.merge.sources import AdapterSource, SafetensorsSource
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir(), outside.mkdir()
    tensors = {"fc.weight": torch.arange(12.0).reshape(3, 4), "fc.bias": torch.ones(3)}
    safetensors.torch.save_file(tensors, str(inside / "a.safetensors"))
    torch.save(tensors, inside / "b.pt")
    folder = inside / "hf"
    folder.mkdir()
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"))
    roots = [inside]

    streamed = open_source(inside / "a.safetensors", roots=roots)
    assert isinstance(streamed, SafetensorsSource) and streamed.name == "a.safetensors"
    loaded = open_source(inside / "b.pt", name="bee", roots=roots)
    assert type(loaded) is MappingSource and loaded.name == "bee" and loaded.path == inside / "b.pt"
    assert loaded.read("fc.weight").tolist() == tensors["fc.weight"].tolist()
    assert loaded.sha256() == hashlib.sha256((inside / "b.pt").read_bytes()).hexdigest()
    assert open_source(inside / "b.pt").name == "b.pt"
    assert isinstance(open_source(folder, roots=roots), SafetensorsSource) and open_source(folder).name == "hf"

    adapter = inside / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["fc"]}))
    a, b = torch.ones(2, 4), torch.full((3, 2), 0.5)
    safetensors.torch.save_file({"base_model.model.fc.lora_A.weight": a, "base_model.model.fc.lora_B.weight": b},
                                str(adapter / "adapter_model.safetensors"))
    tuned = open_source(adapter, base=tensors, roots=roots)
    assert isinstance(tuned, AdapterSource) and tuned.name == "adapter"
    assert open_source(adapter, base=tensors, name="ft").name == "ft"
    assert tuned.read("fc.weight").tolist() == (tensors["fc.weight"] + 2.0 * b @ a).tolist()  # α/r = 2
    assert tuned.read("fc.bias").tolist() == [1.0, 1.0, 1.0]

    for escape in (outside / "c.safetensors", outside / "adapter"):  # outside, or reached through a link
        if escape.name == "adapter":
            shutil.copytree(adapter, escape)
        else:
            shutil.copy(inside / "a.safetensors", escape)
        (inside / f"link-{escape.name}").symlink_to(escape)
        for path in (escape, inside / f"link-{escape.name}"):
            with pytest.raises(CheckpointError, match="outside the allowed"):
                open_source(path, base=tensors, roots=roots)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(outside / "c.safetensors")  # the folder inside, its weights not
    with pytest.raises(CheckpointError, match="outside the allowed"):
        open_source(folder, roots=roots)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.safetensors").symlink_to(outside / "adapter" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="outside the allowed"):
        open_source(adapter, base=tensors, roots=roots)


def test_reads_in_any_order_across_shards_hash_every_byte_once_in_file_order(tmp_path):
    """Slices read out of order, overlapping, again, and across the boundary between two shards: the
    digest is still sha256 over the files' bytes in name order, each byte once."""
    from soup_core.io.read import hashed_files
    folder = tmp_path / "sharded"
    write_sharded(folder, {"model-00001-of-00002.safetensors": {"a": torch.arange(40.0)},
                           "model-00002-of-00002.safetensors": {"b": torch.arange(30.0) * 2}})
    source = open_source(folder)
    assert source.read("a", 5, 10).tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]
    assert source.read("a", 3, 12).tolist() == [float(i) for i in range(3, 12)]  # overlaps what was hashed
    assert source.read("a", 0, 2).tolist() == [0.0, 1.0]  # already hashed
    assert source.read("b", 20).tolist() == [float(2 * i) for i in range(20, 30)]  # hashing crosses into shard 2
    expected = hashlib.sha256(b"".join(f.read_bytes() for f in hashed_files(folder))).hexdigest()
    assert source.sha256() == expected
    source.close()
