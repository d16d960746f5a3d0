"""The ``soup`` commands: each adapts its arguments, calls the library, and reports.

Heavy modules are imported inside the commands, so that parsing the command line stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from soup_core.cli.inputs import check_device, zoo_inputs
from soup_core.cli.merging import make_streamed, refuse_mergekit, write_adapter_out, write_mergekit_yml
from soup_core.cli.output import metrics_line, progress_bar, say, write_json
from soup_core.errors import CheckpointError, SoupError, UsageError
from soup_core.recipes import RECIPES, all_parameters


def open_zoo_for(args: argparse.Namespace):
    """The zoo a command works on; with ``--align REF``, its checkpoints permuted to match REF."""
    from soup_core.zoo import open_zoo
    zoo = open_zoo(args.zoo, device=check_device(args.device))
    zoo = zoo.aligned(args.align) if getattr(args, "align", None) else zoo
    if getattr(args, "precision", None) and zoo.evaluator is not None:  # every forward pass of the command
        zoo.evaluator.precision = args.precision
    return zoo


def splits_of(zoo, text: str, what: str) -> list[str]:
    evaluator = zoo.require_evaluator(what)
    splits = [s for s in text.split(",") if s]
    unknown = [s for s in splits if s not in evaluator.splits]
    if unknown or not splits:
        raise UsageError(f"unknown split(s) {', '.join(unknown) or '(none)'}; {zoo.name} has "
                         f"{', '.join(evaluator.split_names)}")
    return splits


def cmd_zoo_list(args: argparse.Namespace) -> None:
    from soup_core.zoo import open_zoo, sample_zoos
    rows = []
    for name, manifest in sample_zoos().items():
        zoo = open_zoo(manifest)
        rows.append({"name": name, "manifest": str(manifest), "checkpoints": len(zoo.names),
                     "base": zoo.has_base, "description": zoo.description})
        say(args, f"{name:18s} {len(zoo.names):3d} checkpoints  base={'yes' if zoo.has_base else 'no ':3s}  "
                  f"{zoo.description}")
    write_json(args.json, {"zoos": rows})


def cmd_inspect(args: argparse.Namespace) -> None:
    from soup_core.io import load_state_dict, read_provenance, validate_state_dicts
    from soup_core.state import is_float, tied_groups
    states, rows = {}, []
    for path in args.paths:
        state = load_state_dict(path)
        states[path] = state
        floats = [t for t in state.values() if is_float(t)]
        row = {"path": path, "tensors": len(state), "parameters": sum(t.numel() for t in floats),
               "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
               "integer_keys": [k for k, t in state.items() if not is_float(t)],
               "tied": [list(g) for g in tied_groups(state)],
               "provenance": None}
        if str(path).endswith(".safetensors"):
            try:
                row["provenance"] = read_provenance(path)
            except CheckpointError as exc:  # the weights load; only their story is unreadable
                row["provenance_error"] = str(exc)
                say(args, f"warning: {exc}")
        rows.append(row)
        say(args, f"{path}: {row['tensors']} tensors, {row['parameters']:,} parameters, "
                  f"dtypes {', '.join(row['dtypes'])}"
                  + (f", integer {row['integer_keys']}" if row["integer_keys"] else "")
                  + (f", tied {row['tied']}" if row["tied"] else ""))
    report = validate_state_dicts(states)
    for line in report.warnings:
        say(args, f"warning: {line}")
    write_json(args.json, {"checkpoints": rows, "errors": list(report.errors), "warnings": list(report.warnings)},
               [Path(p) for p in args.paths])
    if report.errors:
        raise UsageError(report.errors[0] + (f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""))
    say(args, f"{len(states)} checkpoint(s) compatible" if len(states) > 1 else "ok")


def angle_inputs(args: argparse.Namespace) -> tuple[dict[str, Path], str | None, list[str]]:
    """The checkpoints ``soup angles`` compares (name -> path), θ0's path and the row names: a zoo's
    checkpoints and base when given one zoo (a sample zoo's name, a zoo.toml, a folder), else the files."""
    from soup_core.models import is_hf_directory
    from soup_core.zoo import open_zoo, sample_zoos
    from soup_core.zoo.manifest import checkpoint_name
    single = args.paths[0] if len(args.paths) == 1 else None
    if single is not None and (single in sample_zoos() or Path(single).is_file() and single.endswith(".toml")
                               or Path(single).is_dir() and not is_hf_directory(Path(single))):
        zoo = open_zoo(single)
        names = [n for n in args.ingredients.split(",") if n] if args.ingredients else list(zoo.names)
        base = args.base or (str(zoo.base_path) if zoo.has_base else None)
        return {n: zoo.path(n) for n in names}, base, names
    if args.ingredients:
        raise UsageError("--ingredients picks checkpoints of a zoo; give one zoo instead of files")
    names = [checkpoint_name(Path(p), Path(p).parent.parent) if args.short_names else p for p in args.paths]
    return {p: Path(p) for p in args.paths}, args.base, names


def cmd_angles(args: argparse.Namespace) -> None:
    from soup_core.geometry import pairwise_angles
    from soup_core.io import open_checkpoint, validate_state_dicts
    paths, base_path, names = angle_inputs(args)
    if len(paths) < 2:
        raise UsageError("angles needs at least two checkpoints (files, or one zoo with two or more)")
    states = [open_checkpoint(p) for p in paths.values()]
    base = open_checkpoint(base_path) if base_path else None
    named = {str(p): s for p, s in zip(paths.values(), states)}  # errors name the files
    if base is not None:
        named = {base_path: base, **named}
    validate_state_dicts(named, check_values=False).raise_for_errors()  # values stream below
    bar, report = progress_bar("angles")
    with bar:
        angles = pairwise_angles(states, base, progress=report, include_buffers=args.include_buffers,
                                 device=check_device(args.device))
    named = [Path(p) for p in args.paths if Path(p).is_file()]  # a zoo's manifest, named or in its folder, too
    named += [Path(p) / "zoo.toml" for p in args.paths if (Path(p) / "zoo.toml").is_file()]
    write_json(args.json, {**angles.to_json(names), "relative_to": base_path},
               [*paths.values(), *([Path(base_path)] if base_path else []), *named])
    if args.json != "-":
        width = max(len(n) for n in names)
        print(f"angle (degrees) between {'θi − θ0' if base is not None else 'θi'}, over the {angles.over}:")
        for name, row in zip(names, angles.angle_deg.tolist()):
            print(f"{name:{width}s} " + " ".join(f"{v:6.2f}" for v in row))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from soup_core.evaluate import metrics_to_json
    zoo = open_zoo_for(args)
    zoo.validation.raise_for_errors()
    evaluator = zoo.require_evaluator("evaluate")
    if args.ray:
        from soup_core import distributed
        with distributed.cluster(args.ray, workers=args.workers) as ray:
            scored = distributed.scores(ray, zoo, zoo.all_names, workers=args.workers or 2)
    rows = []
    for name in tqdm(zoo.all_names, desc="evaluate", file=sys.stderr, leave=False, disable=not sys.stderr.isatty()):
        metrics = metrics_to_json(evaluator.evaluate(zoo.state_dict(name))) if not args.ray else scored[name]
        hparams = dict(zoo.hparams(name)) if name in zoo.entries else {}
        rows.append({"name": name, "hparams": hparams, "metrics": metrics})
        accuracies = "  ".join(f"{s} {m['accuracy']:.2%}" for s, m in metrics.items() if s in ("val", "test"))
        say(args, f"{name:12s} {accuracies}")
    write_json(args.json, {"zoo": zoo.name, "splits": list(evaluator.split_names),
                           "device": str(evaluator.device), "checkpoints": rows}, zoo_inputs(zoo))


def recipe_params(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe parameters given as flags; a flag the recipe does not take is an error."""
    given = {name: getattr(args, name) for name in all_parameters() if hasattr(args, name)}
    recipe = RECIPES[args.recipe]
    declared = {p.name for p in recipe.parameters}
    unused = [name for name in given if name not in declared]
    if unused:
        flags = ", ".join(recipe.parameter(n).flag if n in declared else "--" + n.replace("_", "-") for n in unused)
        takes = ", ".join(p.flag for p in recipe.parameters) or "no parameters"
        raise UsageError(f"the {recipe.pretty_name} does not use {flags}; it takes {takes}")
    return given


def cmd_make(args: argparse.Namespace) -> None:
    from soup_core.evaluate import metrics_to_json
    from soup_core.export import Candidate, plan_export
    from soup_core.recipes.best_individual import tie_sentence
    from soup_core.significance import versus_best
    from soup_core.zoo import make_soup
    params = recipe_params(args)
    zoo = open_zoo_for(args)
    chosen = [n for n in args.ingredients.split(",") if n] if args.ingredients else None
    for name in chosen or ():
        zoo.path(name)  # a clear error for an unknown name
    if args.adapter_rank and not args.out:
        raise UsageError("--adapter-rank writes the adapter to --out: give --out FOLDER")
    if args.out and RECIPES[args.recipe].merge_path and not args.align and zoo.evaluator is None \
            and not args.adapter_rank:
        return make_streamed(args, zoo, chosen, params)
    if args.mergekit_yml:
        refuse_mergekit(args.recipe)
    result = make_soup(zoo, args.recipe, chosen, **params)
    payload = {"recipe": result.recipe, "zoo": zoo.name, "ingredients": list(result.ingredients),
               "weights": list(result.weights), "trace": [s.to_dict() for s in result.trace],
               "metrics": metrics_to_json(result.metrics), "options": dict(result.options),
               "precision": args.precision,
               "extras": dict(result.extras)}
    comparisons = None
    if args.out and args.adapter_rank:
        payload.update(write_adapter_out(args, zoo, result, chosen, params))
    elif args.out:
        if result.state_dict is None:
            raise UsageError(f"{RECIPES[result.recipe].pretty_name} is not one set of weights and cannot "
                             "be written as a checkpoint; choose a soup recipe")
        candidate = Candidate.of_recipe(args.recipe, chosen, align=args.align, **params)
        plan = plan_export(zoo, candidate, out=args.out, result=result)
        written = plan.write(args.out, inputs=zoo_inputs(zoo))
        comparisons = list(plan.significance)  # the plan tested the soup already
        payload["out"] = args.out
        payload["model_card"] = str(written[1]) if len(written) > 1 else str(Path(written[0]) / "README.md")
    if comparisons is None:
        comparisons = [] if zoo.evaluator is None else versus_best(result, zoo.ingredients(chosen), zoo.evaluator)
    payload["significance"] = [c.to_json() for c in comparisons]
    if args.mergekit_yml:
        payload["mergekit_yml"] = write_mergekit_yml(args.mergekit_yml, zoo, result.recipe, result.ingredients,
                                                     result.weights, result.options)
    write_json(args.json, payload, zoo_inputs(zoo))
    shifts = zoo.evaluator.shift_names if zoo.evaluator is not None else ()
    say(args, f"{RECIPES[result.recipe].pretty_name}: {len(result.ingredients)} ingredient(s) "
              f"{', '.join(result.ingredients)}")
    if result.metrics:
        say(args, "  " + metrics_line(result.metrics, shifts))
    tie = tie_sentence(result) if result.recipe == "best" else None
    if tie:
        say(args, "  " + tie)
    for comparison in comparisons[:1]:  # test, when the zoo has it
        say(args, f"  vs the {comparison.a} on {comparison.split}: {comparison.sentence()}")
    if args.out:
        say(args, f"  written to {args.out} (model card: {payload['model_card']})")


def cmd_landscape(args: argparse.Namespace) -> None:
    import numpy as np

    from soup_core.landscape import Landscape, plane_landscape
    from soup_core.zoo import zoo_plane, zoo_point
    zoo = open_zoo_for(args)
    splits = splits_of(zoo, args.split, "a landscape")
    plane = zoo_plane(zoo, args.points)
    others = [n for n in zoo.all_names if n not in args.points]
    others += [s for s in (args.soups.split(",") if args.soups else []) if s and s not in args.points]
    projections = [plane.project(zoo_point(zoo, n)[0], n) for n in others]
    resume = None
    if args.resume and Path(args.resume).exists():
        try:
            resume = Landscape.from_json(json.loads(Path(args.resume).read_text()))
        except ValueError as exc:  # the file's JSON, or Landscape.from_json naming the field that is wrong
            raise UsageError(f"{args.resume}: not a landscape JSON this command wrote ({exc})") from None
        except RecursionError:
            raise UsageError(f"{args.resume}: not a landscape JSON this command wrote (nested too deeply)") from None
    def payload_of(result) -> dict:
        return {"zoo": zoo.name, "points": list(args.points), "grid": args.grid, "margin": args.margin,
                **result.to_json()}

    # --resume FILE: the partial grid is saved (atomically) after every chunk, so a killed run loses one chunk
    save = (lambda partial: write_json(args.resume, payload_of(partial), zoo_inputs(zoo))) if args.resume else None
    bar, report = progress_bar("landscape")
    with bar:
        if args.ray:
            from soup_core import distributed
            with distributed.cluster(args.ray, workers=args.workers) as ray:
                result = distributed.landscape(ray, zoo, args.points, grid=args.grid, margin=args.margin,
                                               splits=splits, bn=args.bn, max_samples=args.max_samples,
                                               projections=projections, resume=resume, workers=args.workers or 2,
                                               progress=report, checkpoint=save, precision=args.precision)
        else:
            result = plane_landscape(zoo.evaluator, plane, grid=args.grid, margin=args.margin, splits=splits,
                                     bn=args.bn, projections=projections, max_samples=args.max_samples,
                                     resume=resume, progress=report, checkpoint=save)
    payload = payload_of(result)
    write_json(args.json, payload, zoo_inputs(zoo))
    if args.resume:
        write_json(args.resume, payload, zoo_inputs(zoo))
    say(args, f"plane through {', '.join(args.points)}  ({args.grid}×{args.grid}, BatchNorm: {result.bn})")
    for anchor in plane.anchors:
        say(args, f"  {anchor.name:12s} at ({anchor.xy[0]:9.4f}, {anchor.xy[1]:9.4f})")
    for s in splits:
        say(args, f"  {s}: error {np.nanmin(result.error[s]):.2%} … {np.nanmax(result.error[s]):.2%}, "
                  f"loss {np.nanmin(result.loss[s]):.4f} … {np.nanmax(result.loss[s]):.4f}")


def cmd_path(args: argparse.Namespace) -> None:
    import numpy as np

    from soup_core.landscape import interpolation_path, path_alphas
    from soup_core.zoo import zoo_point
    if args.range[0] >= args.range[1]:
        raise UsageError(f"--range {args.range[0]} {args.range[1]}: LO must be below HI")
    zoo = open_zoo_for(args)
    splits = splits_of(zoo, args.split, "a path")
    a, b = zoo_point(zoo, args.a)[0], zoo_point(zoo, args.b)[0]
    path = interpolation_path(zoo.evaluator, a, b, path_alphas(args.points, *args.range), names=(args.a, args.b),
                              splits=splits, bn=args.bn)
    payload = {"zoo": zoo.name, **path.to_json()}
    write_json(args.json, payload, zoo_inputs(zoo))
    say(args, f"(1 − α)·{args.a} + α·{args.b}, α from {args.range[0]} to {args.range[1]} (BatchNorm: {path.bn})")
    for s in splits:
        barrier = payload["barrier"][s]
        say(args, f"  {s}: error barrier {barrier['error']:.2%}, loss barrier {barrier['loss']:.4f}, "
                  f"best error {np.min(path.error[s]):.2%} at α = {path.alphas[np.argmin(path.error[s])]:.2f}")


def cmd_pairs(args: argparse.Namespace) -> None:
    from soup_core.pairs import pair_analyses
    zoo = open_zoo_for(args)
    split = splits_of(zoo, args.split, "pair analyses")[0]
    bar, report = progress_bar("pairs")
    with bar:
        chosen = [n for n in args.ingredients.split(",") if n] if args.ingredients else None
        if args.ray:
            from soup_core import distributed
            with distributed.cluster(args.ray, workers=args.workers) as ray:
                result = distributed.pair_report(ray, zoo, list(zoo.ingredients(chosen)), split=split,
                                                 curvature=args.curvature, workers=args.workers or 2, progress=report)
        else:
            result = pair_analyses(zoo.ingredients(chosen), zoo.evaluator, base=zoo.base, split=split,
                                   progress=report, curvature=args.curvature)
    payload = {"zoo": zoo.name, **result.to_json()}
    write_json(args.json, payload, zoo_inputs(zoo))
    say(args, f"{len(result.pairs)} pairs on {split}")
    for key, value in payload["correlations"].items():
        say(args, f"  {key.replace('_', ' ')}: r = {'n/a' if value is None else f'{value:+.3f}'}")
    methods = sorted({p.curvature_method for p in result.pairs})
    say(args, f"  approximation has the measured difference's sign in {result.sign_agreement()}/{len(result.pairs)} "
              f"pairs (curvature: {', '.join(methods)})")


def cmd_point(args: argparse.Namespace) -> None:
    from soup_core.evaluate import metrics_to_json
    from soup_core.export import Candidate, plan_export
    zoo = open_zoo_for(args)
    zoo.require_evaluator("a landscape point")
    plan = plan_export(zoo, Candidate.point(args.plane, args.xy, args.bn, align=args.align), out=args.out)
    written = plan.write(args.out, inputs=zoo_inputs(zoo))
    write_json(args.json, {"zoo": zoo.name, "plane": list(args.plane), "xy": list(args.xy), "bn": args.bn,
                           "metrics": metrics_to_json(plan.metrics), "out": args.out}, zoo_inputs(zoo))
    say(args, f"point ({args.xy[0]}, {args.xy[1]}) of the plane {', '.join(args.plane)}: "
              f"{metrics_line(plan.metrics, zoo.evaluator.shift_names)}\n  written to {args.out}"
              + (f" (model card: {written[1]})" if len(written) > 1 else ""))


def refuse_foreign_files(out: Path, targets: list[Path], inputs: list[Path]) -> None:
    """``out`` (a folder) may replace what ``soup align`` wrote before, never an input of this run
    or a file of someone else's: the folder is replaced as a whole."""
    from soup_core.io import read_provenance, refuse_inputs
    for target in (out, *targets):
        refuse_inputs(target, inputs)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; choose an empty folder for --out")
    names = {target.name for target in targets}
    for item in sorted(out.iterdir()) if out.is_dir() else []:
        if item.name not in names:
            raise UsageError(f"{item} is not one of soup align's files, and --out is replaced as a whole; choose "
                             "an empty folder for --out, or move that file away")
    for target in targets:
        if target.exists() or target.is_symlink():
            try:
                ours = "aligned_to" in (read_provenance(target) or {})
            except (SoupError, OSError):
                ours = False
            if not ours:
                raise UsageError(f"{target} exists and was not written by soup align; choose an empty folder for "
                                 "--out, or move that file away")


def cmd_align(args: argparse.Namespace) -> None:
    """Aligned checkpoints in a folder of their own, and what alignment did to barriers and the soup."""
    import numpy as np

    from soup_core.align import barrier_table
    from soup_core.io import save_state_dict
    from soup_core.io.write import staged_folder
    from soup_core.params import uniform_average
    from soup_core.zoo import open_zoo
    zoo = open_zoo(args.zoo, device=check_device(args.device))
    evaluator = zoo.require_evaluator("alignment")  # every request checked before the first byte is written
    split = splits_of(zoo, args.split, "alignment")[0]
    out = Path(args.out)
    inputs = zoo_inputs(zoo)
    refuse_foreign_files(out, [out / f"{name}.safetensors" for name in zoo.names], inputs)
    aligned = zoo.aligned(args.to)
    with staged_folder(out) as staging:  # all the aligned checkpoints appear together, or none does
        for name in zoo.names:
            save_state_dict(aligned.state_dict(name), staging / f"{name}.safetensors", inputs=inputs,
                            provenance={"aligned_to": args.to, "source": str(zoo.path(name)), "source_sha256":
                                        zoo.sha256[name], "method": "weight matching (Ainsworth et al. 2023)",
                                        "zoo": zoo.name})
    table = barrier_table(zoo, aligned, evaluator, split)
    before, after = (uniform_average([z.state_dict(n) for n in zoo.names]) for z in (zoo, aligned))
    soup = {"before": evaluator.accuracy(before, split), "after": evaluator.accuracy(after, split)}
    moved = {name: {layer: {"moved": m, "units": n} for layer, (m, n) in layers.items()}
             for name, layers in aligned.units_moved.items()}
    write_json(args.json, {"zoo": zoo.name, "aligned_to": args.to, "out": str(out), "split": split,
                           "units_moved": moved, "pairs": table, "uniform_soup_accuracy": soup}, inputs)
    for name, layers in aligned.units_moved.items():
        say(args, f"{name}: units moved " + ", ".join(f"{layer} {m}/{n}" for layer, (m, n) in layers.items()))
    for label in ("before", "after"):
        values = np.array([row[label] for row in table]) * 100
        say(args, f"error barrier {label} alignment, {len(table)} pairs on {split}: {values.mean():.1f} ± "
                  f"{values.std(ddof=1) if len(values) > 1 else 0:.1f} points (max {values.max():.1f}); "
                  f"uniform soup {100 * soup[label]:.1f}%")
    say(args, f"aligned checkpoints written to {out} (use `--align {args.to}` with make, landscape, path, pairs "
              "and point to work on them in place)")
