"""What commands print and write: JSON (atomically, never over an input), progress, summaries."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_json(target: str | None, payload: Mapping[str, Any], inputs: Sequence[Path] = ()) -> None:
    """JSON to stdout (``-``) or a file written atomically, never over an input checkpoint."""
    if target is None:
        return
    text = json.dumps(payload, indent=2, sort_keys=False)
    if target == "-":
        print(text)
        return
    from soup_core.io import atomic_write, refuse_inputs
    refuse_inputs(target, inputs)
    atomic_write(target, text + "\n")


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
