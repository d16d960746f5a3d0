"""Check that checkpoints can be averaged, before any math.

>>> import torch
>>> from soup_core.io import validate_state_dicts
>>> report = validate_state_dicts({"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(3)}})
>>> report.errors
("b: shape mismatch for 'w': (3,) here, (2,) in a",)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from soup_core.errors import CheckpointError
from soup_core.state import integer_differs_message, is_counter, is_float, names_list, state_dict_digest, tied_groups


@dataclass(frozen=True)
class ValidationReport:
    """What :func:`validate_state_dicts` found. ``errors`` block any math; the rest inform."""

    reference: str
    num_parameters: int
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    integer_keys: tuple[str, ...] = ()
    tied_groups: tuple[tuple[str, ...], ...] = ()
    duplicates: tuple[tuple[str, str], ...] = ()

    def raise_for_errors(self) -> None:
        if self.errors:
            raise CheckpointError("; ".join(self.errors))


def structure_errors(name: str, state: Mapping[str, torch.Tensor], ref_name: str,
                     ref: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing and unexpected keys, then shape and dtype mismatches, of one state dict against
    a reference; each message names the file, the keys and the shapes."""
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    if missing or unexpected:
        parts = ([f"missing keys {names_list(missing)}"] if missing else []) + \
                ([f"unexpected keys {names_list(unexpected)}"] if unexpected else [])
        return [f"{name}: does not match {ref_name} — " + "; ".join(parts)]
    errors = []
    for key in ref:
        a, b = ref[key], state[key]
        if a.shape != b.shape:
            errors.append(f"{name}: shape mismatch for {key!r}: {tuple(b.shape)} here, "
                          f"{tuple(a.shape)} in {ref_name}")
        elif a.dtype != b.dtype:
            errors.append(f"{name}: dtype mismatch for {key!r}: {b.dtype} here, "
                          f"{a.dtype} in {ref_name} — convert all checkpoints to one dtype")
    return errors


def validate_state_dicts(
    named: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    reference: str | None = None,
    check_values: bool = True,
) -> ValidationReport:
    """Check that checkpoints can be averaged: same keys, shapes and dtypes, finite values.

    Errors name the file, the keys and the shapes. Exact duplicates are a warning: they are
    legal, but a duplicate counts twice in a uniform soup. ``check_values=False`` checks the
    structure only (no NaN/Inf scan, no duplicate hashes), for streaming work on large files.
    """
    if not named:
        raise CheckpointError("no checkpoints given")
    ref_name = reference if reference is not None else next(iter(named))
    ref = named[ref_name]
    errors = [e for name, state in named.items() if name != ref_name
              for e in structure_errors(name, state, ref_name, ref)]
    warnings: list[str] = []
    if check_values and not errors:
        for name, state in named.items():
            bad = sorted(k for k, t in state.items() if is_float(t) and not bool(torch.isfinite(t).all()))
            if bad:
                errors.append(f"{name}: NaN or Inf values in {names_list(bad)}")
    if check_values and not errors:
        integers = [k for k, t in ref.items() if not is_float(t) and not is_counter(k, t.numel())]
        errors += [integer_differs_message(name, key, ref[key].dtype, ref_name)
                   for name, state in named.items() if name != ref_name
                   for key in integers if not torch.equal(state[key], ref[key])][:1]
    duplicates: list[tuple[str, str]] = []
    if check_values and not errors:
        seen: dict[str, str] = {}
        for name, state in named.items():
            digest = state_dict_digest(state)
            if digest in seen:
                duplicates.append((seen[digest], name))
                warnings.append(f"{name} is an exact duplicate of {seen[digest]}: "
                                f"it would count twice in a uniform soup")
            else:
                seen[digest] = name
    integer_keys = tuple(k for k, t in ref.items() if not is_float(t))
    num_parameters = sum(t.numel() for t in ref.values() if is_float(t))
    return ValidationReport(ref_name, num_parameters, tuple(errors), tuple(warnings),
                            integer_keys, tied_groups(ref), tuple(duplicates))
