"""What commands share about their inputs: the device asked for, and the files never written over."""

from __future__ import annotations

from pathlib import Path

from soup_core.errors import UsageError


def check_device(device: str | None) -> str | None:
    """``cpu``, ``cuda`` or ``cuda:N`` that exists here, else a clear error."""
    if device is None:
        return None
    import torch
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    elif parsed.type != "cpu":
        raise UsageError(f"--device {device!r}: only cpu and cuda are supported")
    return device


def zoo_inputs(zoo) -> list[Path]:
    """Every file a zoo reads — checkpoints, its zoo.toml, its data files and folders, its own model
    code — so that no output is written over one (by name or hard link: :func:`soup_core.io.write.refuse_inputs`)."""
    from soup_core.data import split_specs
    from soup_core.errors import SoupError
    from soup_core.zoo.manifest import local_module
    manifest = [zoo.manifest] if zoo.manifest.is_file() else []
    try:
        data = [zoo.root / p for p in split_specs(zoo.spec.data_spec).values()] if zoo.spec.data_spec else []
    except SoupError:  # a [data] table that cannot be read is refused when the data is read
        data = []
    code = [local_module(spec, zoo.root) for spec in (zoo.spec.model_spec, zoo.spec.evaluator_spec)
            if spec and ":" in spec]
    return [zoo.path(n) for n in zoo.all_names] + manifest + data + [c for c in code if c.is_file()]
