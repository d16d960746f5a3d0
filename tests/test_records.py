"""The records the library hands to the command line, the app and users' scripts, field by field.

``soup angles --json``, ``soup make --json`` and the app's downloads write these dictionaries as they
are; a renamed or dropped field breaks every script that reads them, so each is spelled out here.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from soup_core.geometry import Projection, angles_from_gram
from soup_core.landscape.path import path_alphas
from soup_core.merge.sources import MappingSource
from soup_core.recipes.base import TraceStep
from soup_core.recipes.parameters import MixingWeights


def test_angles_as_json_name_every_matrix_and_what_they_measure():
    # deltas (3, 0) and (0, 4): norms 3 and 4, at right angles, 5 apart
    angles = angles_from_gram(torch.tensor([[9.0, 0.0], [0.0, 16.0]], dtype=torch.float64))
    assert angles.to_json(["a", "b"]) == {
        "names": ["a", "b"], "cosine": [[1.0, 0.0], [0.0, 1.0]], "angle_deg": [[0.0, 90.0], [90.0, 0.0]],
        "distance": [[0.0, 5.0], [5.0, 0.0]], "norm": [3.0, 4.0], "precision": "float64", "over": "parameters"}


def test_a_projection_as_json():
    assert Projection("ft-03", (1.5, -2.0), 0.25).to_json() == {"name": "ft-03", "xy": [1.5, -2.0], "off_plane": 0.25}


def test_a_trace_step_as_json():
    step = TraceStep("ft-07", "add", 0.8125, True, ("ft-01", "ft-07"))
    assert step.to_dict() == {"candidate": "ft-07", "action": "add", "score": 0.8125, "accepted": True,
                               "ingredients": ["ft-01", "ft-07"]}


def test_the_default_path_runs_from_minus_half_to_one_and_a_half_through_both_ends():
    assert np.allclose(path_alphas(), np.linspace(-0.5, 1.5, 41), rtol=0, atol=1e-15)  # 0 and 1 on the grid
    assert path_alphas(4, 0.0, 2.0).tolist() == [0.0, 2 / 3, 1.0, 4 / 3, 2.0]  # 1 added: an end
    assert path_alphas(3, 0.25, 0.75).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]  # both ends added


def test_mixing_weights_read_back_as_written():
    weights = MixingWeights("ft-03=2, ft-17=0.5,ft-20=1e-30")
    assert str(weights) == "ft-03=2,ft-17=0.5,ft-20=1e-30"
    assert repr(weights) == "MixingWeights('ft-03=2,ft-17=0.5,ft-20=1e-30')"
    assert MixingWeights(str(weights)) == weights


def test_a_source_in_memory_has_the_digest_of_the_file_it_came_from(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"soup" * 1000)
    assert MappingSource({}, path=file).sha256() == hashlib.sha256(b"soup" * 1000).hexdigest()
    assert MappingSource({}).sha256() is None
