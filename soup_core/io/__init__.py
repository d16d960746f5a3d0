"""Checkpoint I/O: :mod:`~soup_core.io.read`, :mod:`~soup_core.io.validate`, :mod:`~soup_core.io.write`,
:mod:`~soup_core.io.weights_out` (safetensors, one file or shards, written progressively).

Loading is safe by default (safetensors first; pickles only with ``weights_only=True``), every
check happens before any math, and every write is atomic and never lands on an input.

>>> import torch, tempfile, os
>>> from soup_core.io import load_state_dict, save_state_dict, validate_state_dicts
>>> path = save_state_dict({"w": torch.ones(2)}, os.path.join(tempfile.mkdtemp(), "w.safetensors"))
>>> validate_state_dicts({"saved": load_state_dict(path), "fresh": {"w": torch.ones(2)}}).warnings
('fresh is an exact duplicate of saved: it would count twice in a uniform soup',)
"""

from soup_core.io.read import (
                               CHECKPOINT_SUFFIXES,
                               PROVENANCE_KEY,
                               LazySafetensors,
                               file_sha256,
                               load_state_dict,
                               load_state_dict_bytes,
                               open_checkpoint,
)
from soup_core.io.provenance import read_provenance
from soup_core.io.validate import ValidationReport, validate_state_dicts
from soup_core.io.weights_out import save_hf_directory, save_state_dict, state_dict_bytes
from soup_core.io.write import atomic_write, refuse_inputs

__all__ = ["CHECKPOINT_SUFFIXES", "PROVENANCE_KEY", "LazySafetensors", "ValidationReport", "atomic_write",
           "file_sha256", "load_state_dict", "load_state_dict_bytes", "open_checkpoint", "read_provenance",
           "refuse_inputs", "save_hf_directory", "save_state_dict", "state_dict_bytes", "validate_state_dicts"]
