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
    """Every checkpoint file of a zoo and its manifest: outputs are never written over one."""
    manifest = [zoo.manifest] if zoo.manifest.is_file() else []  # its zoo.toml too
    return [zoo.path(n) for n in zoo.all_names] + manifest
