"""What commands print and write: JSON (atomically, never over an input), progress, summaries."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_json(target: str | None, payload: Mapping[str, Any], inputs: Sequence[Path] = ()) -> None:
    """JSON to stdout (``-``) or a file written atomically, never over an input checkpoint."""
    if target is None:
        return
    text = json.dumps(finite_json(payload), indent=2, sort_keys=False, allow_nan=False)
    if target == "-":
        print(text)
        return
    from soup_core.io import atomic_write, refuse_inputs
    refuse_inputs(target, inputs)
    atomic_write(target, text + "\n")


def finite_json(value: Any, path: str = "", found: list[str] | None = None) -> Any:
    """``value`` with every NaN or infinity replaced by ``null`` (strict JSON parsers reject them),
    and the places listed under ``"non_finite"`` at the top, so the nulls are explained.

    >>> finite_json({"loss": float("nan"), "rows": [1.0, float("inf")]})
    {'loss': None, 'rows': [1.0, None], 'non_finite': ['loss', 'rows[1]']}
    """
    top = found is None
    found = [] if found is None else found
    if isinstance(value, float) and not math.isfinite(value):
        found.append(path or "(the value)")
        out: Any = None
    elif isinstance(value, Mapping):
        out = {k: finite_json(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        out = [finite_json(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    else:
        out = value
    if top and found and isinstance(out, dict):
        out["non_finite"] = found
    return out


def say(args: argparse.Namespace, text: str) -> None:
    """Human-readable output, unless JSON goes to stdout."""
    if getattr(args, "json", None) != "-":
        print(text)


def progress_bar(desc: str):
    from tqdm import tqdm
    bar = tqdm(total=1000, desc=desc, unit="‰", file=sys.stderr, leave=False, disable=not sys.stderr.isatty())

    def report(fraction: float, message: str) -> None:
        bar.n = int(fraction * 1000)
        bar.set_postfix_str(message[-30:], refresh=True)

    return bar, report


def metrics_line(metrics, shifts: Sequence[str]) -> str:
    from soup_core.evaluate import shift_average
    parts = [f"{s} {metrics[s].accuracy:.2%}" for s in ("val", "test") if s in metrics]
    avg = shift_average(metrics, shifts)
    if avg is not None:
        parts.append(f"shifts {avg:.2%}")
    return "  ".join(parts)

