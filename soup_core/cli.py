"""The ``soup`` command (also ``python -m soup_core``).

    soup zoo list
    soup inspect PATH...
    soup angles PATH... [--base PATH] [--json FILE]
    soup evaluate ZOO [--json FILE]
    soup make RECIPE ZOO [--order sorted|random] [--seed N] [--passes N] [--tie ge|gt]
                         [--max-ingredients N] [--ingredients A,B,...] [--out FILE] [--json FILE]
    soup landscape ZOO --points A B C [--grid R] [--margin M] [--split val] [--bn recompute|interpolate|keep]
                         [--soups uniform,greedy] [--max-samples N] [--resume FILE] [--json FILE]
    soup path ZOO A B [--points N] [--range LO HI] [--split val] [--bn ...] [--json FILE]
    soup pairs ZOO [--split test] [--ingredients A,B,...] [--json FILE]
    soup point ZOO --plane A B C --xy X Y [--bn recompute|interpolate|keep] --out FILE [--json FILE]

A, B, C name checkpoints, ``base`` (θ0), or a soup recipe (``greedy``, ``uniform``, ...).

ZOO is a sample zoo's name or a path to a ``zoo.toml``. ``--json -`` writes JSON to stdout.
Bad input ends with exit code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from soup_core import __version__
from soup_core.allocator import keep_freed_memory
from soup_core.checkpoints import (CheckpointError, is_float, load_state_dict,
                                   open_checkpoint, read_provenance, save_hf_directory, save_state_dict,
                                   tied_groups, validate_state_dicts)
from soup_core.evaluate import Metrics, metrics_to_json, shift_average
from soup_core.geometry import pairwise_angles
from soup_core.recipes import RECIPES, SoupOptions
from soup_core.landscape import (BN_POLICIES, Landscape, interpolation_path, path_alphas, plane_landscape,
                                 point_weights)
from soup_core.models import is_hf_directory
from soup_core.pairs import pair_analyses
from soup_core.zoo import (BASE, Zoo, ZooError, make_soup, open_zoo, point_provenance, sample_zoos,
                           soup_provenance, zoo_plane, zoo_point)


class CliError(Exception):
    """Ends the command with one line on stderr and exit code 2."""


def _write_json(target: str | None, payload: Mapping[str, Any]) -> None:
    if target is None:
        return
    text = json.dumps(payload, indent=2, sort_keys=False)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n")


def _say(args: argparse.Namespace, text: str) -> None:
    """Human-readable output, unless JSON goes to stdout."""
    if getattr(args, "json", None) != "-":
        print(text)


def _tqdm_progress(desc: str):
    bar = tqdm(total=1000, desc=desc, unit="‰", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty())

    def report(fraction: float, message: str) -> None:
        bar.n = int(fraction * 1000)
        bar.set_postfix_str(message[-30:], refresh=True)

    return bar, report


def _metrics_line(metrics: Mapping[str, Metrics], shifts: Sequence[str]) -> str:
    parts = [f"{s} {metrics[s].accuracy:.2%}" for s in ("val", "test") if s in metrics]
    avg = shift_average(metrics, shifts)
    if avg is not None:
        parts.append(f"shifts {avg:.2%}")
    return "  ".join(parts)


# ---- commands ---------------------------------------------------------------------------


def cmd_zoo_list(args: argparse.Namespace) -> None:
    rows = []
    for name, manifest in sample_zoos().items():
        zoo = open_zoo(manifest)
        rows.append({"name": name, "manifest": str(manifest), "checkpoints": len(zoo.names),
                     "base": zoo.has_base, "description": zoo.description})
        _say(args, f"{name:18s} {len(zoo.names):3d} checkpoints  base={'yes' if zoo.has_base else 'no ':3s}  "
                   f"{zoo.description}")
    _write_json(args.json, {"zoos": rows})


def cmd_inspect(args: argparse.Namespace) -> None:
    states, rows = {}, []
    for path in args.paths:
        state = load_state_dict(path)
        states[path] = state
        floats = [t for t in state.values() if is_float(t)]
        row = {"path": path, "tensors": len(state), "parameters": sum(t.numel() for t in floats),
               "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
               "integer_keys": [k for k, t in state.items() if not is_float(t)],
               "tied": [list(g) for g in tied_groups(state)],
               "provenance": read_provenance(path) if str(path).endswith(".safetensors") else None}
        rows.append(row)
        _say(args, f"{path}: {row['tensors']} tensors, {row['parameters']:,} parameters, "
                   f"dtypes {', '.join(row['dtypes'])}"
                   + (f", integer {row['integer_keys']}" if row["integer_keys"] else "")
                   + (f", tied {row['tied']}" if row["tied"] else ""))
    report = validate_state_dicts(states)
    for line in report.warnings:
        _say(args, f"warning: {line}")
    _write_json(args.json, {"checkpoints": rows, "errors": list(report.errors), "warnings": list(report.warnings)})
    if report.errors:
        raise CliError(report.errors[0] + (f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""))
    _say(args, f"{len(states)} checkpoint(s) compatible" if len(states) > 1 else "ok")


def cmd_angles(args: argparse.Namespace) -> None:
    if len(args.paths) < 2:
        raise CliError("angles needs at least two checkpoints")
    states = [open_checkpoint(p) for p in args.paths]
    base = open_checkpoint(args.base) if args.base else None
    named = {p: s for p, s in zip(args.paths, states)}
    if base is not None:
        named = {args.base: base, **named}
    validate_state_dicts(named, check_values=False).raise_for_errors()  # values stream below
    bar, report = _tqdm_progress("angles")
    with bar:
        angles = pairwise_angles(states, base, progress=report)
    names = [Path(p).stem if args.short_names else p for p in args.paths]
    payload = {**angles.to_json(names), "relative_to": args.base}
    _write_json(args.json, payload)
    if args.json != "-":
        width = max(len(n) for n in names)
        print(f"angle (degrees) between {'θi − θ0' if base is not None else 'θi'}:")
        for name, row in zip(names, angles.angle_deg.tolist()):
            print(f"{name:{width}s} " + " ".join(f"{v:6.2f}" for v in row))


def cmd_evaluate(args: argparse.Namespace) -> None:
    zoo = open_zoo(args.zoo, device=args.device)
    zoo.validation.raise_for_errors()
    evaluator = zoo.require_evaluator("evaluate")
    names = ((BASE,) if zoo.has_base else ()) + zoo.names
    rows = []
    for name in tqdm(names, desc="evaluate", file=sys.stderr, leave=False, disable=not sys.stderr.isatty()):
        metrics = evaluator.evaluate(zoo.state_dict(name))
        hparams = dict(zoo.hparams(name)) if name != BASE else {}
        rows.append({"name": name, "hparams": hparams, "metrics": metrics_to_json(metrics)})
        _say(args, f"{name:12s} {_metrics_line(metrics, evaluator.shift_names)}")
    _write_json(args.json, {"zoo": zoo.name, "splits": list(evaluator.split_names),
                            "device": str(evaluator.device), "checkpoints": rows})


def cmd_make(args: argparse.Namespace) -> None:
    zoo = open_zoo(args.zoo, device=args.device)
    options = SoupOptions(order=args.order, seed=args.seed, tie=args.tie, passes=args.passes,
                          max_ingredients=args.max_ingredients)
    chosen = args.ingredients.split(",") if args.ingredients else None
    if chosen:
        for name in chosen:
            zoo.path(name)  # a clear error for an unknown name
    result = make_soup(zoo, args.recipe, options, chosen)
    command = "soup " + " ".join(shlex.quote(a) for a in args.argv)
    payload = {"recipe": result.recipe, "zoo": zoo.name, "ingredients": list(result.ingredients),
               "weights": list(result.weights), "trace": [s.to_dict() for s in result.trace],
               "metrics": metrics_to_json(result.metrics), "options": dict(result.options),
               "extras": dict(result.extras)}
    if args.out:
        if result.state_dict is None:
            raise CliError(f"{RECIPES[result.recipe].pretty_name} is not one set of weights and cannot "
                           "be written as a checkpoint; choose a soup recipe")
        inputs = [zoo.path(n) for n in (*zoo.names, *((BASE,) if zoo.has_base else ()))]
        source = zoo.path(zoo.names[0])
        if is_hf_directory(source) and not args.out.endswith(".safetensors"):
            # The input's own format: a folder from_pretrained loads, config and tokenizer copied.
            save_hf_directory(result.state_dict, args.out, source=source,
                              provenance=soup_provenance(zoo, result, command), inputs=inputs)
        else:
            save_state_dict(result.state_dict, args.out, provenance=soup_provenance(zoo, result, command),
                            inputs=inputs)
        payload["out"] = args.out
    _write_json(args.json, payload)
    shifts = zoo.evaluator.shift_names if zoo.evaluator is not None else ()
    _say(args, f"{RECIPES[result.recipe].pretty_name}: {len(result.ingredients)} ingredient(s) "
               f"{', '.join(result.ingredients)}")
    if result.metrics:
        _say(args, "  " + _metrics_line(result.metrics, shifts))
    if args.out:
        _say(args, f"  written to {args.out}")


def _splits(zoo: Zoo, text: str, what: str) -> list[str]:
    evaluator = zoo.require_evaluator(what)
    splits = [s for s in text.split(",") if s]
    unknown = [s for s in splits if s not in evaluator.splits]
    if unknown or not splits:
        raise CliError(f"unknown split(s) {', '.join(unknown) or '(none)'}; {zoo.name} has "
                       f"{', '.join(evaluator.split_names)}")
    return splits


def cmd_landscape(args: argparse.Namespace) -> None:
    zoo = open_zoo(args.zoo, device=args.device)
    splits = _splits(zoo, args.split, "a landscape")
    plane = zoo_plane(zoo, args.points)
    others = [n for n in ((BASE,) if zoo.has_base else ()) + zoo.names if n not in args.points]
    others += [s for s in (args.soups.split(",") if args.soups else []) if s and s not in args.points]
    projections = [plane.project(zoo_point(zoo, n)[0], n) for n in others]
    resume = None
    if args.resume and Path(args.resume).exists():
        resume = Landscape.from_json(json.loads(Path(args.resume).read_text()))
    bar, report = _tqdm_progress("landscape")
    with bar:
        result = plane_landscape(zoo.evaluator, plane, grid=args.grid, margin=args.margin, splits=splits,
                                 bn=args.bn, projections=projections, max_samples=args.max_samples,
                                 resume=resume, progress=report)
    payload = {"zoo": zoo.name, "points": list(args.points), "grid": args.grid, "margin": args.margin,
               **result.to_json()}
    _write_json(args.json, payload)
    if args.resume:
        Path(args.resume).write_text(json.dumps(payload) + "\n")
    _say(args, f"plane through {', '.join(args.points)}  ({args.grid}×{args.grid}, BatchNorm: {result.bn})")
    for anchor in plane.anchors:
        _say(args, f"  {anchor.name:12s} at ({anchor.xy[0]:9.4f}, {anchor.xy[1]:9.4f})")
    for s in splits:
        _say(args, f"  {s}: error {np.nanmin(result.error[s]):.2%} … {np.nanmax(result.error[s]):.2%}, "
                   f"loss {np.nanmin(result.loss[s]):.4f} … {np.nanmax(result.loss[s]):.4f}")


def cmd_path(args: argparse.Namespace) -> None:
    zoo = open_zoo(args.zoo, device=args.device)
    splits = _splits(zoo, args.split, "a path")
    if args.points < 2:
        raise CliError("--points must be at least 2")
    a, b = zoo_point(zoo, args.a)[0], zoo_point(zoo, args.b)[0]
    path = interpolation_path(zoo.evaluator, a, b, path_alphas(args.points, *args.range), names=(args.a, args.b),
                              splits=splits, bn=args.bn)
    payload = {"zoo": zoo.name, **path.to_json()}
    _write_json(args.json, payload)
    _say(args, f"(1 − α)·{args.a} + α·{args.b}, α from {args.range[0]} to {args.range[1]} (BatchNorm: {path.bn})")
    for s in splits:
        barrier = payload["barrier"][s]
        _say(args, f"  {s}: error barrier {barrier['error']:.2%}, loss barrier {barrier['loss']:.4f}, "
                   f"best error {np.min(path.error[s]):.2%} at α = {path.alphas[np.argmin(path.error[s])]:.2f}")


def cmd_pairs(args: argparse.Namespace) -> None:
    zoo = open_zoo(args.zoo, device=args.device)
    split = _splits(zoo, args.split, "pair analyses")[0]
    bar, report = _tqdm_progress("pairs")
    with bar:
        chosen = args.ingredients.split(",") if args.ingredients else None
        result = pair_analyses(zoo.ingredients(chosen), zoo.evaluator, base=zoo.base, split=split,
                               progress=report)
    payload = {"zoo": zoo.name, **result.to_json()}
    _write_json(args.json, payload)
    _say(args, f"{len(result.pairs)} pairs on {split}")
    for key, value in payload["correlations"].items():
        _say(args, f"  {key.replace('_', ' ')}: r = {'n/a' if value is None else f'{value:+.3f}'}")


def cmd_point(args: argparse.Namespace) -> None:
    zoo = open_zoo(args.zoo, device=args.device)
    evaluator = zoo.require_evaluator("a landscape point")
    plane = zoo_plane(zoo, args.plane)
    state = point_weights(evaluator, plane, args.xy[0], args.xy[1], args.bn)
    metrics = evaluator.evaluate(state)
    command = "soup " + " ".join(shlex.quote(a) for a in args.argv)
    inputs = [zoo.path(n) for n in (*zoo.names, *((BASE,) if zoo.has_base else ()))]
    provenance = point_provenance(zoo, args.plane, args.xy, args.bn, metrics, command)
    save_state_dict(state, args.out, provenance=provenance, inputs=inputs)
    _write_json(args.json, {"zoo": zoo.name, "plane": list(args.plane), "xy": list(args.xy), "bn": args.bn,
                            "metrics": metrics_to_json(metrics), "out": args.out})
    _say(args, f"point ({args.xy[0]}, {args.xy[1]}) of the plane {', '.join(args.plane)}: "
               f"{_metrics_line(metrics, evaluator.shift_names)}\n  written to {args.out}")


# ---- argument parsing -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soup", description="Model soups from the command line.")
    parser.add_argument("--version", action="version", version=f"soup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="built-in sample zoos").add_subparsers(dest="zoo_command", required=True)
    zoo_list = zoo.add_parser("list", help="list the sample zoos")
    zoo_list.add_argument("--json", metavar="FILE")
    zoo_list.set_defaults(func=cmd_zoo_list)

    inspect = sub.add_parser("inspect", help="show and validate checkpoints")
    inspect.add_argument("paths", nargs="+", metavar="PATH")
    inspect.add_argument("--json", metavar="FILE")
    inspect.set_defaults(func=cmd_inspect)

    angles = sub.add_parser("angles", help="pairwise cosine, angle and distance (float64, streamed)")
    angles.add_argument("paths", nargs="+", metavar="PATH")
    angles.add_argument("--base", metavar="PATH", help="θ0: measure θi − θ0 instead of θi")
    angles.add_argument("--short-names", action="store_true", help="name checkpoints by file stem")
    angles.add_argument("--json", metavar="FILE")
    angles.set_defaults(func=cmd_angles)

    evaluate = sub.add_parser("evaluate", help="score every checkpoint of a zoo on every split")
    evaluate.add_argument("zoo", metavar="ZOO")
    evaluate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    evaluate.add_argument("--json", metavar="FILE")
    evaluate.set_defaults(func=cmd_evaluate)

    make = sub.add_parser("make", help="make a soup with a recipe")
    make.add_argument("recipe", choices=list(RECIPES), metavar="RECIPE", help=", ".join(RECIPES))
    make.add_argument("zoo", metavar="ZOO")
    make.add_argument("--order", choices=["sorted", "random"], default="sorted")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--passes", type=int, default=1)
    make.add_argument("--tie", choices=["ge", "gt"], default="ge")
    make.add_argument("--max-ingredients", type=int, default=None)
    make.add_argument("--ingredients", metavar="A,B,...", help="only these checkpoints")
    make.add_argument("--device", default=None)
    make.add_argument("--out", metavar="FILE", help="write the soup as safetensors with provenance")
    make.add_argument("--json", metavar="FILE")
    make.set_defaults(func=cmd_make)

    landscape = sub.add_parser("landscape", help="loss and error over the plane through three points")
    landscape.add_argument("zoo", metavar="ZOO")
    landscape.add_argument("--points", nargs=3, required=True, metavar=("A", "B", "C"),
                           help="checkpoints, base, or soup recipes; A is the origin")
    landscape.add_argument("--grid", type=int, default=21, help="points per side (default 21)")
    landscape.add_argument("--margin", type=float, default=0.2, help="extra extent around the anchors")
    landscape.add_argument("--split", default="val", help="split(s), comma-separated")
    landscape.add_argument("--bn", choices=BN_POLICIES, default="recompute", help="BatchNorm statistics policy")
    landscape.add_argument("--soups", metavar="R1,R2", help="soup recipes to project onto the plane")
    landscape.add_argument("--max-samples", type=int, default=None, help="seeded subsample of each split")
    landscape.add_argument("--resume", metavar="FILE", help="continue a partial run saved in FILE (and save to it)")
    landscape.add_argument("--device", default=None)
    landscape.add_argument("--json", metavar="FILE")
    landscape.set_defaults(func=cmd_landscape)

    path = sub.add_parser("path", help="loss and error on the line through two points (error barriers)")
    path.add_argument("zoo", metavar="ZOO")
    path.add_argument("a", metavar="A")
    path.add_argument("b", metavar="B")
    path.add_argument("--points", type=int, default=41)
    path.add_argument("--range", type=float, nargs=2, default=(-0.5, 1.5), metavar=("LO", "HI"))
    path.add_argument("--split", default="val")
    path.add_argument("--bn", choices=BN_POLICIES, default="recompute")
    path.add_argument("--device", default=None)
    path.add_argument("--json", metavar="FILE")
    path.set_defaults(func=cmd_path)

    pairs = sub.add_parser("pairs", help="angle vs interpolation advantage, soup vs ensemble (Figures 3, 4)")
    pairs.add_argument("zoo", metavar="ZOO")
    pairs.add_argument("--split", default="test")
    pairs.add_argument("--ingredients", metavar="A,B,...", help="only pairs among these checkpoints")
    pairs.add_argument("--device", default=None)
    pairs.add_argument("--json", metavar="FILE")
    pairs.set_defaults(func=cmd_pairs)

    point = sub.add_parser("point", help="export the weights at one point of a landscape plane")
    point.add_argument("zoo", metavar="ZOO")
    point.add_argument("--plane", nargs=3, required=True, metavar=("A", "B", "C"))
    point.add_argument("--xy", nargs=2, type=float, required=True, metavar=("X", "Y"))
    point.add_argument("--bn", choices=BN_POLICIES, default="recompute")
    point.add_argument("--out", required=True, metavar="FILE")
    point.add_argument("--device", default=None)
    point.add_argument("--json", metavar="FILE")
    point.set_defaults(func=cmd_point)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except (CliError, CheckpointError, ZooError, ValueError, OSError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"soup: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soup: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The ``soup`` command: this process is ours, so freed memory stays for reuse (landscapes
    page-fault without it; see :mod:`soup_core.allocator`)."""
    keep_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    run()
