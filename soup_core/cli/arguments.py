"""The command line's grammar: commands, flags (recipe flags from the recipes' declarations),
argument types that check every number before any work, and one-line argument errors."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any

from soup_core import __version__
from soup_core.cli import commands as cmd
from soup_core.cli import merging
from soup_core.memory import parse_size
from soup_core.policies import BN_POLICIES, CURVATURE_METHODS, PRECISIONS
from soup_core.recipes import RECIPES, all_parameters
from soup_core.recipes.parameters import ON_VAL

MAX_GRID = 401          # points per side of a landscape: 160k evaluations is already hours
MAX_PATH_POINTS = 10_001

EXAMPLES = """examples:
  soup zoo list
  soup evaluate digits-finetune
  soup make greedy digits-finetune --tie gt --out greedy.safetensors --json greedy.json
  soup make learned digits-finetune --epochs 5 --learning-rate 0.05
  soup make ties digits-finetune --lambda val --density 0.3 --out ties.safetensors --mergekit-yml ties.yml
  soup landscape digits-finetune --points base ft-03 greedy --grid 21 --json plane.json
  soup path digits-finetune base greedy --range 0 1
  soup angles sample_data/digits-finetune/checkpoints/ft-0*.safetensors \\
      --base sample_data/digits-finetune/base.safetensors --short-names

A, B, C name checkpoints, `base` (θ0), or a soup recipe made from all checkpoints. ZOO is a
sample zoo's name or a zoo.toml (or a folder). `--json -` writes JSON to stdout."""


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            most = f" and at most {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}{most}")
        return value
    parse.__name__ = "int"
    parse.bounds = (low, high)  # type: ignore[attr-defined]  # for the flags' fuzz test
    return parse


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def float_or_val(text: str) -> float | str:
    """A number, or ``val``: chosen on the val split (:mod:`soup_core.recipes.tuning`)."""
    if text.strip().lower() == ON_VAL:
        return ON_VAL
    try:
        return finite_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor val (chosen on the val split)") from None


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


class Parser(argparse.ArgumentParser):
    """Argument errors in one line, like every other error of the command; a negative number in any
    spelling (``-5e-1``, ``-1.``) is a value, where argparse knew only ``-5`` and ``-.5``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default after its help (unless there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def byte_size(text: str) -> int:
    """A size flag (``5GB``, ``500MB``, ``2GiB``, bytes): :func:`soup_core.memory.parse_size`."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per parameter the recipes declare, with its help, default and the recipes using it."""
    group = parser.add_argument_group("recipe parameters (each recipe takes only its own)")
    for name, (p, users) in all_parameters().items():
        default = p.default_text or ("no limit" if p.default is None else p.default)
        on_val = (f"; or val: the best on the val split of {p.val_grid[0]:g}, {p.val_grid[1]:g}, …, "
                  f"{p.val_grid[-1]:g}") if p.val_grid else ""
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": f"{p.help}{on_val} (default: {default}; {', '.join(users)})"}
        if p.choices:
            kwargs["choices"] = p.choices
        elif p.type is bool:
            kwargs["choices"] = ("true", "false")
        elif p.val_grid:
            kwargs["type"], kwargs["metavar"] = float_or_val, "X|val"
        elif p.type in (int, float):
            kwargs["type"] = (int_in(int(p.minimum or 0), None if p.maximum is None else int(p.maximum))
                              if p.type is int else finite_float)
            kwargs["metavar"] = "N" if p.type is int else "X"
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(p.flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="soup", description="Model soups from the command line: average "
                    "fine-tuned weights, explore their landscapes, export the soup.",
                    epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"soup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    def zoo_command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = command(name, help, func)
        p.add_argument("zoo", metavar="ZOO", help="a sample zoo's name, a zoo.toml, or a folder of checkpoints")
        return p

    def distributable(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ray", metavar="auto|ADDRESS", help="run on a Ray cluster: auto starts a private one on "
                       "127.0.0.1; HOST:PORT joins `ray start --head` (default: this process only)")
        p.add_argument("--workers", type=int_in(1, 4096), default=None,
                       help="Ray workers, one per GPU or per CPU core (default: 2, or the cores with auto)")

    def alignable(p: argparse.ArgumentParser) -> None:
        p.add_argument("--align", metavar="REF", help="first permute every checkpoint's hidden units to match REF "
                       "(weight matching; for models trained from scratch)")

    def precise(p: argparse.ArgumentParser) -> None:
        p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="forward passes in exact fp32, TF32 tensor cores (CUDA; fp32 on a CPU) or bf16 autocast; "
                            "outside fp32 landscapes and paths report their measured loss deviation")

    def common(p: argparse.ArgumentParser, device: bool = True) -> None:
        if device:
            p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
        p.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE (- for stdout)")

    zoo = sub.add_parser("zoo", help="built-in sample zoos").add_subparsers(dest="zoo_command", required=True)
    zoo_list = zoo.add_parser("list", help="list the sample zoos")
    zoo_list.set_defaults(func=cmd.cmd_zoo_list)
    common(zoo_list, device=False)

    inspect = command("inspect", "show and validate checkpoints", cmd.cmd_inspect)
    inspect.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint files or Hugging Face folders")
    common(inspect, device=False)

    angles = command("angles", "pairwise cosine, angle and distance (float64, streamed)", cmd.cmd_angles)
    angles.add_argument("paths", nargs="+", metavar="ZOO|PATH",
                        help="one zoo (a sample zoo's name, a zoo.toml or a folder of checkpoints: its checkpoints, "
                             "relative to its base), or checkpoint files and Hugging Face folders")
    angles.add_argument("--ingredients", metavar="A,B,...", help="with a zoo: only these checkpoints")
    angles.add_argument("--base", metavar="PATH", help="θ0: measure θi − θ0 instead of θi (a zoo's base by default)")
    angles.add_argument("--short-names", action="store_true", help="name checkpoints by file stem")
    angles.add_argument("--include-buffers", action="store_true",
                        help="count BatchNorm running statistics too (default: parameters only, as the paper does)")
    angles.add_argument("--device", help="cpu, cuda or cuda:N: where the float64 products run, chunk by chunk "
                        "(default: cpu, where checkpoints are read)")
    common(angles, device=False)

    evaluate = zoo_command("evaluate", "score every checkpoint of a zoo on every split", cmd.cmd_evaluate)
    distributable(evaluate)
    common(evaluate)

    make = command("make", "make a soup with a recipe", cmd.cmd_make)
    make.add_argument("recipe", choices=list(RECIPES), metavar="RECIPE",
                      help=", ".join(f"{n} ({r.reference})" for n, r in RECIPES.items()))
    make.add_argument("zoo", metavar="ZOO", help="a sample zoo's name, a zoo.toml, or a folder of checkpoints")
    make.add_argument("--ingredients", metavar="A,B,...", help="only these checkpoints (default: all)")
    alignable(make)
    make.add_argument("--out", metavar="FILE", help="write the soup as safetensors with provenance, and its "
                      "model card as FILE's name with .md (a folder for Hugging Face zoos)")
    make.add_argument("--adapter-rank", type=int_in(1, 4096), metavar="R",
                      help="a soup of LoRA adapters: write --out as one LoRA adapter folder of rank R (truncated SVD "
                           "of the soup's update; the error per module is reported) instead of full weights")
    make.add_argument("--shard-size", type=byte_size, default="5GB", metavar="SIZE",
                      help="largest weights file of a Hugging Face folder written (default 5GB, as save_pretrained)")
    make.add_argument("--mergekit-yml", metavar="FILE", help="also write the mergekit configuration that remakes "
                      "this soup (weight-only recipes, and greedy/pruned as the linear merge of their choice)")
    precise(make)
    common(make)
    add_recipe_flags(make)

    merge = command("merge", "make the merge a mergekit YAML configures (linear, task_arithmetic, ties, dare_linear, "
                    "dare_ties, breadcrumbs, breadcrumbs_ties, slerp, karcher, model_stock), tensor by tensor",
                    merging.cmd_merge)
    merge.add_argument("config", metavar="CONFIG.yml", help="mergekit's configuration; model paths relative to "
                       "the current folder, as mergekit reads them")
    merge.add_argument("--out", required=True, metavar="OUT", help="the merged safetensors file, or a folder for "
                       "Hugging Face models (config and tokenizer copied from the first model)")
    merge.add_argument("--shard-size", type=byte_size, default="5GB", metavar="SIZE",
                       help="largest weights file of a Hugging Face folder written (default 5GB)")
    merge.add_argument("--device", help="cpu, cuda or cuda:N: where each tensor is combined (default: cpu)")
    merge.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE (- for stdout)")

    landscape = zoo_command("landscape", "loss and error over the plane through three points", cmd.cmd_landscape)
    landscape.add_argument("--points", nargs=3, required=True, metavar=("A", "B", "C"),
                           help="checkpoints, base, or soup recipes; A is the origin")
    landscape.add_argument("--grid", type=int_in(2, MAX_GRID), default=21, help="points per side")
    landscape.add_argument("--margin", type=non_negative_float, default=0.2,
                           help="extra extent around the anchors, as a fraction of their span")
    landscape.add_argument("--split", default="val", help="split(s), comma-separated")
    landscape.add_argument("--bn", choices=BN_POLICIES, default="recompute", help="BatchNorm statistics policy")
    landscape.add_argument("--soups", metavar="R1,R2", help="soup recipes to project onto the plane")
    landscape.add_argument("--max-samples", type=int_in(1), default=None,
                           help="a seeded subsample of each split (default: all samples)")
    landscape.add_argument("--resume", metavar="FILE", help="continue a partial run saved in FILE (and save to it)")
    alignable(landscape)
    distributable(landscape)
    precise(landscape)
    common(landscape)

    path = zoo_command("path", "loss and error on the line through two points (error barriers)", cmd.cmd_path)
    path.add_argument("a", metavar="A", help="start: a checkpoint, base, or a soup recipe")
    path.add_argument("b", metavar="B", help="end: a checkpoint, base, or a soup recipe")
    path.add_argument("--points", type=int_in(2, MAX_PATH_POINTS), default=41, help="values of α")
    path.add_argument("--range", type=finite_float, nargs=2, default=(-0.5, 1.5), metavar=("LO", "HI"),
                      help="α from LO to HI")
    path.add_argument("--split", default="val", help="split(s), comma-separated")
    path.add_argument("--bn", choices=BN_POLICIES, default="recompute", help="BatchNorm statistics policy")
    alignable(path)
    precise(path)
    common(path)

    pairs = zoo_command("pairs", "angle vs interpolation advantage, soup vs ensemble (Figures 3, 4)", cmd.cmd_pairs)
    pairs.add_argument("--split", default="test", help="the split reported (β is always fitted on val)")
    pairs.add_argument("--ingredients", metavar="A,B,...", help="only pairs among these checkpoints (default: all)")
    alignable(pairs)
    distributable(pairs)
    pairs.add_argument("--curvature", choices=CURVATURE_METHODS, default="segment",
                       help="d²L/dα² for §4: segment (over the whole segment, 8·(mean(L0, L1) − L½), the paper's "
                            "scale), fit (quadratic fit of L(α) over ±0.05), jvp (exact at α = ½ in one linear region; "
                            "smooth networks), auto (jvp for smooth networks, else fit)")
    precise(pairs)
    common(pairs)

    point = zoo_command("point", "export the weights at one point of a landscape plane", cmd.cmd_point)
    point.add_argument("--plane", nargs=3, required=True, metavar=("A", "B", "C"), help="the plane's three points")
    point.add_argument("--xy", nargs=2, type=finite_float, required=True, metavar=("X", "Y"),
                       help="coordinates in the plane (L2 units, as `soup landscape` reports them)")
    point.add_argument("--bn", choices=BN_POLICIES, default="recompute", help="BatchNorm statistics policy")
    point.add_argument("--out", required=True, metavar="FILE", help="where to write the safetensors file")
    alignable(point)
    common(point)

    align = zoo_command("align", "permute every checkpoint's hidden units to match one (weight matching, "
                        "Ainsworth et al. 2023): for models trained from scratch", cmd.cmd_align)
    align.add_argument("--to", required=True, metavar="REF", help="the checkpoint the others are matched to")
    align.add_argument("--out", required=True, metavar="DIR", help="folder for the aligned checkpoints")
    align.add_argument("--split", default="test", help="the split barriers and the soup are reported on")
    common(align)
    return parser
