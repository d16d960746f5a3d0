"""Weight-only merges on the command line: ``soup make`` streamed to disk, ``soup merge CONFIG.yml``
(mergekit's format), the mergekit YAML written beside a soup (``--mergekit-yml``), and a soup of
LoRA adapters written back as one adapter (``--adapter-rank``)."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soup_core.cli.inputs import check_device, zoo_inputs
from soup_core.cli.output import progress_bar, say, write_json
from soup_core.errors import UsageError
from soup_core.recipes import RECIPES


def refuse_mergekit(recipe: str) -> None:
    """A clear error, before any work, for a recipe mergekit cannot remake."""
    from soup_core.mergekit_config import LINEAR, METHODS, OTHERS
    if recipe not in LINEAR | OTHERS and recipe not in METHODS.values():
        raise UsageError(f"--mergekit-yml: the {RECIPES[recipe].pretty_name} has no mergekit equivalent "
                         f"(these do: {', '.join(sorted(LINEAR | OTHERS | set(METHODS.values())))})")


def write_mergekit_yml(target: str, zoo, recipe: str, ingredients: Sequence[str], weights: Sequence[float],
                       options: Mapping[str, Any]) -> str:
    """The mergekit configuration of a soup, with the checkpoints' absolute paths; returns where."""
    from soup_core.io import atomic_write, refuse_inputs
    from soup_core.mergekit_config import to_mergekit
    from soup_core.zoo.manifest import BASE
    paths = {n: zoo.path(n).resolve() for n in ingredients}
    text = to_mergekit(recipe, paths, weights, dict(options), zoo.path(BASE).resolve() if zoo.has_base else None)
    refuse_inputs(target, zoo_inputs(zoo))
    atomic_write(target, text)
    return target


def make_streamed(args: argparse.Namespace, zoo, chosen: list[str] | None, params: dict[str, Any],
                  remake: Sequence[str] | None = None) -> None:
    """A weight-only soup of a zoo with nothing to score it: streamed tensor by tensor to ``--out``."""
    from soup_core.export import Candidate, write_streamed
    if getattr(args, "mergekit_yml", None):
        refuse_mergekit(args.recipe)
    candidate = Candidate.of_recipe(args.recipe, chosen, **params)
    bar, report = progress_bar("merge")
    with bar:
        plan, written = write_streamed(zoo, candidate, args.out, progress=report, max_shard_bytes=args.shard_size,
                                       device=check_device(args.device), remake=remake)  # never over the zoo's files
    card = str(written[1]) if len(written) > 1 else str(Path(written[0]) / "README.md")
    payload = {"recipe": args.recipe, "zoo": zoo.name, "ingredients": list(plan.ingredients),
               "weights": list(plan.weights), "trace": [], "metrics": {}, "options": plan.provenance["options"],
               "precision": getattr(args, "precision", "fp32"), "extras": dict(plan.extras), "out": args.out,
               "model_card": card, "significance": []}
    if getattr(args, "mergekit_yml", None):
        payload["mergekit_yml"] = write_mergekit_yml(args.mergekit_yml, zoo, args.recipe, plan.ingredients,
                                                     plan.weights, plan.provenance["options"])
    write_json(args.json, payload, zoo_inputs(zoo))
    say(args, f"{RECIPES[args.recipe].pretty_name}: {len(plan.ingredients)} ingredient(s) "
              f"{', '.join(plan.ingredients)}")
    say(args, f"  written to {args.out} tensor by tensor (model card: {card})")


def cmd_merge(args: argparse.Namespace) -> None:
    """``soup merge CONFIG.yml --out OUT``: mergekit's configuration, made by our engine."""
    from soup_core.mergekit_config import read_mergekit, zoo_of
    config_path = Path(args.config)
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{config_path}: cannot read it ({error.__class__.__name__}: {error})") from None
    config = read_mergekit(text)
    zoo = zoo_of(config, config_path)
    args.recipe = config.recipe
    remake = ["soup", "merge", str(config_path.resolve()), "--out", args.out]
    make_streamed(args, zoo, list(config.models), config.params, remake=remake)


def write_adapter_out(args: argparse.Namespace, zoo, result, chosen: list[str] | None,
                      params: dict[str, Any]) -> dict[str, Any]:
    """``--adapter-rank R``: the soup of LoRA adapters written to ``--out`` as one adapter of rank R
    (:mod:`soup_core.adapter_out`); returns what the JSON output adds."""
    from soup_core.adapter_out import write_adapter
    from soup_core.export import Candidate, zoo_reference
    argv = Candidate.of_recipe(args.recipe, chosen, **params).command(zoo_reference(zoo), args.out)
    folder, errors = write_adapter(zoo, result, args.out, args.adapter_rank, inputs=zoo_inputs(zoo),
                                   command=shlex.join([*argv, "--adapter-rank", str(args.adapter_rank)]))
    return {"out": str(folder), "model_card": str(folder / "README.md"),
            "adapter": {"rank": args.adapter_rank, "relative_frobenius_error": errors}}
