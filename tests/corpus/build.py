"""Builds the bad-input corpus committed beside this file: `python -m tests.corpus.build`.

Every file here is wrong in one way that users meet: see README.md in this folder. The tests
in tests/test_bad_inputs.py feed each to the CLI and to the app.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import safetensors.torch
import torch

HERE = Path(__file__).resolve().parent
MARKER = "/tmp/soup-lab-corpus-pwned"  # the malicious pickle's payload would create this file


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def lying_header(data: bytes) -> bytes:
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 10_000_000]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + size:]


def duplicate_keys(data: bytes) -> bytes:
    """The same tensor name twice in the JSON header (a JSON parser keeps the last)."""
    size = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + size].decode().rstrip()
    key = next(k for k in json.loads(header) if k != "__metadata__")
    entry = json.dumps(json.loads(header)[key], separators=(",", ":"))
    raw = (header[:-1] + f',"{key}":{entry}}}').encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + size:]


def trainer_checkpoints(good: dict) -> None:
    """Checkpoints written the way trainers write them: loaded, their plain data ignored."""
    import argparse
    import numpy as np
    timm_args = argparse.Namespace(model="mlp", lr=0.1, epochs=3, amp=True, model_ema=True, opt="sgd")
    torch.save({"epoch": 2, "arch": "mlp", "state_dict": dict(good), "state_dict_ema": dict(good),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, "version": 2,
                "args": timm_args, "metric": np.float64(0.93), "rng_state": np.random.RandomState(0).get_state(),
                "torch_version": torch.__version__}, HERE / "trainers" / "timm-train.pth.tar")
    torch.save({"epoch": 2, "global_step": 60, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in good.items()}, "loops": {"fit_loop": {"epoch_progress": {}}},
                "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {"best_model_score": torch.tensor(0.9)}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
                "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1, "width": 4}},
               HERE / "trainers" / "lightning.ckpt")
    torch.save(dict(good), HERE / "trainers" / "hf-trainer" / "pytorch_model.bin")
    (HERE / "trainers" / "hf-trainer" / "config.json").write_text('{"architectures": ["Unknown"]}\n')


def short_record(good: dict, path: Path) -> None:
    """A torch.save file whose first tensor's zip record is cut to 40 of its 64 bytes, the archive
    rewritten around it: memory-mapped, torch would read the next record's bytes as weights."""
    import io
    import zipfile
    buffer = io.BytesIO()
    torch.save(good, buffer)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            data = source.read(info.filename)
            out.writestr(info, data[:40] if info.filename.endswith("/data/0") else data)


def build() -> None:
    torch.manual_seed(0)
    good = {"layer.weight": torch.randn(4, 4), "layer.bias": torch.randn(4)}
    blob = safetensors.torch.save(good)
    torch.save({"layer.weight": torch.zeros(4, 4), "x": Payload()}, HERE / "malicious-pickle.pt")
    (HERE / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    (HERE / "lying-header.safetensors").write_bytes(lying_header(blob))
    safetensors.torch.save_file({k: torch.full_like(v, float("nan")) for k, v in good.items()},
                                HERE / "nan-weights.safetensors")
    for folder in ("mismatched", "mixed-dtype", "duplicates", "single", "outside-roots", "missing-module",
                   "trainers/hf-trainer", "index-list", "index-map-list", "wrong-types", "os-system"):
        (HERE / folder).mkdir(parents=True, exist_ok=True)
    trainer_checkpoints(good)
    (HERE / "duplicate-header-keys.safetensors").write_bytes(duplicate_keys(blob))
    safetensors.torch.save_file({"w": good["layer.weight"], "v": torch.zeros(4, 4)}, HERE / "tied-hint-lies.safetensors",
                                metadata={"soup_tied": json.dumps({"v": "w"})})
    safetensors.torch.save_file(good, HERE / "tied-hint-list.safetensors", metadata={"soup_tied": '["layer.bias"]'})
    torch.save({1: torch.zeros(2), "1": torch.ones(2)}, HERE / "colliding-keys.pt")
    safetensors.torch.save_file({k: v.to(torch.float8_e4m3fn) for k, v in good.items()}, HERE / "fp8.safetensors")
    torch.save({k: v.to(torch.complex64) for k, v in good.items()}, HERE / "complex.pt")
    torch.save({"layer.weight": good["layer.weight"].to_sparse()}, HERE / "sparse.pt")
    torch.save({"layer.weight": torch.empty(4, 4, device="meta")}, HERE / "meta.pt")
    torch.save({"layer.weight": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])}, HERE / "nested.pt")
    torch.save({"layer.weight": torch.zeros(1).expand(1 << 30)}, HERE / "expanded.pt")
    looped: dict = {"epoch": 3}
    looped["state_dict"] = looped  # a training checkpoint whose state_dict is itself
    torch.save(looped, HERE / "self-referencing.pt")
    short_record(good, HERE / "short-record.pt")
    for folder, index in (("index-list", []), ("index-map-list", {"weight_map": ["a.safetensors"]})):
        (HERE / folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (HERE / "wrong-types" / "zoo.toml").write_text('name = "wrong-types"\ncheckpoints = 5\n')
    safetensors.torch.save_file(good, HERE / "os-system" / "a.safetensors")
    safetensors.torch.save_file(good, HERE / "os-system" / "b.safetensors")
    (HERE / "os-system" / "zoo.toml").write_text('name = "os-system"\nmodel = "os:getcwd"\nevaluator = "os:system"\n'
                                                 'checkpoints = ["*.safetensors"]\n')
    safetensors.torch.save_file(good, HERE / "mismatched" / "a.safetensors")
    safetensors.torch.save_file({"layer.weight": torch.randn(8, 4), "layer.bias": torch.randn(8)},
                                HERE / "mismatched" / "b.safetensors")
    safetensors.torch.save_file(good, HERE / "mixed-dtype" / "full.safetensors")
    safetensors.torch.save_file({k: v.half() for k, v in good.items()}, HERE / "mixed-dtype" / "half.safetensors")
    safetensors.torch.save_file(good, HERE / "duplicates" / "a.safetensors")
    safetensors.torch.save_file(good, HERE / "duplicates" / "b.safetensors")
    safetensors.torch.save_file(good, HERE / "single" / "only.safetensors")
    (HERE / "outside-roots" / "zoo.toml").write_text('name = "escapes"\n'
                                                     'checkpoints = ["../mismatched/a.safetensors"]\n')
    safetensors.torch.save_file(good, HERE / "missing-module" / "a.safetensors")
    safetensors.torch.save_file(good, HERE / "missing-module" / "b.safetensors")
    (HERE / "missing-module" / "zoo.toml").write_text('name = "missing-module"\nmodel = "nowhere:make_model"\n'
                                                      'evaluator = "nowhere:make_evaluator"\n'
                                                      'checkpoints = ["*.safetensors"]\n')


if __name__ == "__main__":
    build()
