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


def build() -> None:
    torch.manual_seed(0)
    good = {"layer.weight": torch.randn(4, 4), "layer.bias": torch.randn(4)}
    blob = safetensors.torch.save(good)
    torch.save({"layer.weight": torch.zeros(4, 4), "x": Payload()}, HERE / "malicious-pickle.pt")
    (HERE / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    (HERE / "lying-header.safetensors").write_bytes(lying_header(blob))
    safetensors.torch.save_file({k: torch.full_like(v, float("nan")) for k, v in good.items()},
                                HERE / "nan-weights.safetensors")
    for folder in ("mismatched", "mixed-dtype", "duplicates", "single", "outside-roots", "missing-module"):
        (HERE / folder).mkdir(exist_ok=True)
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
