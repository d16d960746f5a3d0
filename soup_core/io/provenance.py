"""Where a soup came from, as :func:`soup_core.io.save_state_dict` stored it in the weights file's
metadata (``soup_provenance``: recipe, ingredients with their sha256, metrics, the command)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors

from soup_core.errors import CheckpointError
from soup_core.io.read import PROVENANCE_KEY, unreadable_safetensors


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance manifest that :func:`soup_core.io.save_state_dict` stored in a safetensors
    file (or in the first weights file of a Hugging Face directory)."""
    if Path(path).is_dir():
        files = sorted(Path(path).glob("model*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no model*.safetensors in this folder")
        path = files[0]
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:
        raise unreadable_safetensors(path, exc) from None
    if PROVENANCE_KEY not in meta:
        return None
    try:
        provenance = json.loads(meta[PROVENANCE_KEY])
    except (ValueError, RecursionError):
        provenance = None
    if not isinstance(provenance, dict):
        raise CheckpointError(f"{path}: its {PROVENANCE_KEY} metadata is not a JSON object; the weights may be "
                              "fine, but where they came from cannot be read")
    return provenance
