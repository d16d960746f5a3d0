"""One way out: a candidate (a recipe's soup, a ticked set, a landscape point) becomes an
:class:`ExportPlan` — weights, metrics, provenance, model card and the ``soup`` command that
remakes it — and the plan is written as safetensors or a Hugging Face folder.

The ``soup`` command and the app build their exports here and nowhere else, so the same
candidate gives the same bytes from either (the command line's ``--out`` aside).

>>> from soup_core.zoo import open_zoo
>>> from soup_core.export import Candidate, plan_export
>>> zoo = open_zoo("digits-finetune", device="cpu")
>>> plan = plan_export(zoo, Candidate.ticked(["ft-00", "ft-01"]))
>>> plan.command_line
'soup make uniform digits-finetune --ingredients ft-00,ft-01 --out uniform.safetensors'
>>> plan.weights
(0.5, 0.5)
"""

from __future__ import annotations

import io
import math
import shlex
import tempfile
import zipfile
from urllib.parse import unquote
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from soup_core import __version__
from soup_core.errors import SoupError
from soup_core.evaluate import Metrics, metrics_to_json
from soup_core.io import save_hf_directory, save_state_dict, state_dict_bytes
from soup_core.io.weights_out import HF_SHARD_BYTES
from soup_core.landscape import point_weights
from soup_core.merge import MergeRun, open_source, write_merge
from soup_core.models import is_hf_directory
from soup_core.model_card import card_beside, model_card
from soup_core.policies import BN_POLICIES
from soup_core.recipes import RECIPES, SoupResult, get_recipe
from soup_core.significance import Comparison, versus_best
from soup_core.state import Progress, StateDict
from soup_core.zoo import BASE, Zoo, make_soup, sample_zoos, zoo_plane

POINT_REFERENCE = "Wortsman et al. 2022, Figure 2 (plane through three points)"


@dataclass(frozen=True)
class Candidate:
    """What a user chose to export. ``ingredients=None`` means all of the zoo's checkpoints."""

    kind: Literal["recipe", "point"] = "recipe"
    recipe: str = "uniform"
    ingredients: tuple[str, ...] | None = None
    params: tuple[tuple[str, Any], ...] = ()
    plane: tuple[str, str, str] | None = None
    xy: tuple[float, float] | None = None
    bn: str = "recompute"
    align: str | None = None  # checkpoints first aligned to this one (soup_core.align)

    @classmethod
    def ticked(cls, names: Sequence[str]) -> Candidate:
        """The uniform soup of a hand-picked set."""
        return cls("recipe", "uniform", tuple(names))

    @classmethod
    def of_recipe(cls, recipe: str, ingredients: Sequence[str] | None = None, *, align: str | None = None,
                  **params: Any) -> Candidate:
        return cls("recipe", recipe, tuple(ingredients) if ingredients is not None else None,
                   tuple(sorted(params.items())), align=align)

    @classmethod
    def point(cls, plane: Sequence[str], xy: Sequence[float], bn: str, *, align: str | None = None) -> Candidate:
        a, b, c = plane
        return cls("point", plane=(a, b, c), xy=(float(xy[0]), float(xy[1])), bn=bn, align=align)

    def title(self) -> str:
        if self.kind == "point":
            (a, b, c), (x, y) = self.plane, self.xy
            return f"Landscape point ({x:.3f}, {y:.3f}) of the plane {a}, {b}, {c}"
        if self.recipe == "uniform" and self.ingredients is not None:
            return f"Uniform soup of the {len(self.ingredients)} ticked ingredient(s)"
        return get_recipe(self.recipe).pretty_name

    def file_name(self) -> str:
        return "point.safetensors" if self.kind == "point" else f"{self.recipe}.safetensors"

    def command(self, zoo: str, out: str | None = None) -> list[str]:
        """The ``soup`` command line (as an argument list) that remakes this candidate."""
        out = out or self.file_name()
        if self.kind == "point":
            (a, b, c), (x, y) = self.plane, self.xy
            return ["soup", "point", zoo, "--plane", a, b, c, "--xy", _number(x), _number(y),
                    "--bn", self.bn, *(["--align", self.align] if self.align else []), "--out", out]
        argv = ["soup", "make", self.recipe, zoo]
        if self.ingredients is not None:
            argv += ["--ingredients", ",".join(self.ingredients)]
        if self.align:
            argv += ["--align", self.align]
        for name, value in self.params:
            argv += [RECIPES[self.recipe].parameter(name).flag, str(value)]
        return argv + ["--out", out]

    def to_query(self) -> str:
        """A readable form for a shareable URL: ``greedy``, ``greedy;passes=2;ingredients=a,b``,
        ``point:base,ft-00,ft-01@0.5,-1.25;bn=keep`` (``;align=REF`` on either)."""
        if self.kind == "point":
            (a, b, c), (x, y) = self.plane, self.xy
            parts = [f"point:{link_names((a, b, c))}@{_number(x)},{_number(y)}", f"bn={self.bn}"]
        else:
            parts = [self.recipe, *(f"{k}={v}" for k, v in self.params)]
            if self.ingredients is not None:
                parts.append("ingredients=" + link_names(self.ingredients))
        return ";".join(parts + ([f"align={link_names([self.align])}"] if self.align else []))

    @classmethod
    def from_query(cls, text: str) -> Candidate:
        """The candidate :meth:`to_query` wrote; a :class:`SoupError` naming what is wrong otherwise.

        >>> Candidate.from_query("point:base,a,b@0.5,-1;bn=keep").to_query()
        'point:base,a,b@0.5,-1;bn=keep'
        """
        head, *rest = str(text).split(";")
        options = {}
        for part in rest:
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise SoupError(f"export={text!r}: {part!r} is not key=value")
            options[key] = value
        align = "".join(names_from_link(options.pop("align", ""))) or None
        if head.startswith("point:"):
            where, _, xy = head.removeprefix("point:").partition("@")
            plane, coords = names_from_link(where), xy.split(",")
            try:
                x, y = (float(v) for v in coords)
            except ValueError:
                raise SoupError(f"export={text!r}: a point needs x,y after @") from None
            if len(plane) != 3 or not all(plane) or not all(map(math.isfinite, (x, y))):
                raise SoupError(f"export={text!r}: a point is point:A,B,C@X,Y with three names and finite X, Y")
            bn = options.pop("bn", "recompute")
            if bn not in BN_POLICIES or options:
                raise SoupError(f"export={text!r}: a point takes bn= (one of {', '.join(BN_POLICIES)}) and align=")
            return cls.point(plane, (x, y), bn, align=align)
        if head not in RECIPES:
            raise SoupError(f"export={text!r}: no recipe {head!r}; the recipes are {', '.join(RECIPES)}")
        ingredients = options.pop("ingredients", None)
        params = get_recipe(head).resolve(options)  # declared names and types only
        given = {k: params[k] for k in options}
        return cls.of_recipe(head, names_from_link(ingredients) if ingredients is not None else None, align=align,
                             **given)

    def names_used(self, zoo: Zoo) -> set[str]:
        """The checkpoints the candidate's weights come from."""
        if self.kind == "point":
            used = {n for n in self.plane if n in zoo.entries or n == BASE}
            return used | (set(zoo.names) if any(n in RECIPES for n in self.plane) else set())
        return set(self.ingredients if self.ingredients is not None else zoo.names)


_LINK_ESCAPES = {"%": "%25", ",": "%2C", ";": "%3B", "=": "%3D", "@": "%40"}  # what separates a link's parts


def link_names(names: Iterable[str]) -> str:
    """Checkpoint names joined by commas for a shareable link, each with ``% , ; = @`` escaped, so
    that any name — a folder's ``lr=1e-4,wd=0`` — reads back as itself (:func:`names_from_link`).

    >>> link_names(["ft-03", "lr=1e-4,wd=0"])
    'ft-03,lr%3D1e-4%2Cwd%3D0'
    >>> names_from_link(_)
    ['ft-03', 'lr=1e-4,wd=0']
    """
    return ",".join("".join(_LINK_ESCAPES.get(c, c) for c in name) for name in names)


def names_from_link(text: str) -> list[str]:
    """The names :func:`link_names` joined (empty parts dropped)."""
    return [unquote(part) for part in str(text).split(",") if part]


def _number(value: float) -> str:
    """The shortest text that reads back as exactly ``value`` (``1``, ``0.5``, ``0.1``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class ExportPlan:
    """A soup ready to write: weights, metrics, provenance, the remaking command, a model card."""

    title: str
    state_dict: StateDict | None  # None: streamed to disk by write_streamed, never held
    metrics: Mapping[str, Metrics]
    provenance: Mapping[str, Any]
    command: tuple[str, ...] | None  # None: made from checkpoints the manifest does not list
    ingredients: tuple[str, ...]
    weights: tuple[float, ...]
    file_name: str
    hf_source: Path | None = None  # the zoo's first checkpoint, when it is a Hugging Face folder
    extras: Mapping[str, Any] = field(default_factory=dict)
    significance: tuple[Comparison, ...] = ()  # against the best individual model, per report split

    @property
    def command_line(self) -> str | None:
        return shlex.join(self.command) if self.command else None

    def safetensors_bytes(self) -> bytes:
        return state_dict_bytes(self.state_dict, self.provenance)

    def model_card(self) -> str:
        return model_card(self)

    def write(self, out: str | Path, *, inputs: Iterable[str | Path] = (), hf: bool | None = None) -> list[Path]:
        """Write the weights to ``out`` and the model card beside them; returns what was written.

        ``hf=None`` writes a Hugging Face folder when the zoo's checkpoints are Hugging Face
        folders and ``out`` does not end in ``.safetensors``; the card is then the folder's
        ``README.md``. A safetensors file gets its card as ``<out without suffix>.md``.
        """
        out, inputs = Path(out), list(inputs)
        if _writes_folder(self.hf_source, out, hf):
            if self.hf_source is None:
                raise SoupError("a Hugging Face folder needs a Hugging Face source checkpoint")
            folder = save_hf_directory(self.state_dict, out, source=self.hf_source, provenance=self.provenance,
                                       inputs=inputs, extra_files={"README.md": self.model_card()})
            return [folder]
        card = card_beside(out, inputs)
        written = save_state_dict(self.state_dict, out, provenance=self.provenance, inputs=inputs,
                                  beside={card.name: self.model_card()})
        return [written, card]

    def hf_zip(self) -> bytes:
        """A zip of the Hugging Face folder :meth:`write` would make (for downloads)."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.write(Path(tmp) / "soup", hf=True)[0]
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for file in sorted(folder.iterdir()):
                    archive.write(file, f"soup/{file.name}")
            return buffer.getvalue()


def plan_export(zoo: Zoo, candidate: Candidate, *, out: str | None = None, result: SoupResult | None = None,
                local_names: Collection[str] = ()) -> ExportPlan:
    """Build the plan for ``candidate`` on ``zoo``.

    ``result`` reuses a recipe result already made for this candidate (the app caches them);
    ``local_names`` are checkpoints the manifest does not list (the app's uploads): a soup made
    from any of them has no remaking command, only their sha256 in the provenance.
    """
    command, hf_source, common = _provenance_common(zoo, candidate, out, local_names)
    if candidate.align and zoo.aligned_to != candidate.align:
        zoo = zoo.aligned(candidate.align)
    if zoo.aligned_to:
        common["aligned_to"] = zoo.aligned_to
    if candidate.kind == "point":
        evaluator = zoo.require_evaluator("a landscape point")
        (x, y) = candidate.xy
        state = point_weights(evaluator, zoo_plane(zoo, candidate.plane), x, y, candidate.bn)
        metrics = evaluator.evaluate(state)
        provenance = {"recipe": "landscape-point", "recipe_name": "Landscape point", "reference": POINT_REFERENCE,
                      "plane": list(candidate.plane), "xy": list(candidate.xy), "bn": candidate.bn,
                      "ingredients": [{"name": n, "sha256": zoo.sha256[n]} for n in candidate.plane
                                      if n in zoo.sha256],
                      "metrics": metrics_to_json(metrics), **common}
        return ExportPlan(candidate.title(), state, metrics, provenance, tuple(command) if command else None,
                          candidate.plane, (), candidate.file_name(), hf_source)
    if result is None:
        result = make_soup(zoo, candidate.recipe, candidate.ingredients, **dict(candidate.params))
    recipe = get_recipe(result.recipe)
    if result.state_dict is None:
        raise SoupError(f"{recipe.pretty_name} is not one set of weights and cannot be written as a "
                        "checkpoint; choose a soup recipe")
    provenance = _recipe_provenance(result.recipe, result.ingredients, result.weights, result.options,
                                    zoo.sha256, result.metrics, common)
    comparisons = (versus_best(result, zoo.ingredients(candidate.ingredients), zoo.evaluator)
                   if zoo.evaluator is not None else [])
    return ExportPlan(candidate.title(), result.state_dict, result.metrics, provenance,
                      tuple(command) if command else None, result.ingredients, result.weights,
                      candidate.file_name(), hf_source, dict(result.extras), tuple(comparisons))


def _writes_folder(hf_source: Path | None, out: Path, hf: bool | None) -> bool:
    """``hf=None``: a Hugging Face folder when the zoo's checkpoints are and ``out`` is not ``*.safetensors``."""
    return hf_source is not None and not out.name.endswith(".safetensors") if hf is None else hf


def _provenance_common(zoo: Zoo, candidate: Candidate, out: str | None,
                       local_names: Collection[str]) -> tuple[list[str] | None, Path | None, dict[str, Any]]:
    """The remaking command, the Hugging Face source folder (if any) and the provenance every export shares."""
    remakeable = not (candidate.names_used(zoo) & set(local_names))
    command = candidate.command(zoo_reference(zoo), out) if remakeable else None
    source = zoo.path(zoo.names[0])
    hf_source = source if is_hf_directory(source) else None
    common = {"zoo": zoo.name, "manifest": zoo.manifest.name if zoo.manifest.is_file() else ".",
              "data": dict(zoo.evaluator.info) if zoo.evaluator is not None else {},
              "library_version": __version__, "command": shlex.join(command) if command else None}
    return command, hf_source, common


def zoo_reference(zoo: Zoo) -> str:
    """How a remaking command names the zoo: a sample zoo by its name, any other by its folder's
    absolute path (a command that works from wherever it is run)."""
    return zoo.name if sample_zoos().get(zoo.name) == zoo.manifest else str(zoo.root)


def _recipe_provenance(recipe_name: str, ingredients: Sequence[str], weights: Sequence[float],
                       options: Mapping[str, Any], digests: Mapping[str, str], metrics: Mapping[str, Metrics],
                       common: Mapping[str, Any]) -> dict[str, Any]:
    recipe = get_recipe(recipe_name)
    return {"recipe": recipe_name, "recipe_name": recipe.pretty_name, "reference": recipe.reference,
            "ingredients": [{"name": n, "sha256": digests[n]} for n in ingredients],
            "weights": list(weights), "options": dict(options), "metrics": metrics_to_json(metrics), **common}


def write_streamed(zoo: Zoo, candidate: Candidate, out: str | Path, *, inputs: Iterable[str | Path] = (),
                   hf: bool | None = None, max_shard_bytes: int = HF_SHARD_BYTES, device: str | None = None,
                   progress: Progress | None = None, remake: Sequence[str] | None = None,
                   ) -> tuple[ExportPlan, list[Path]]:
    """Write a weight-only recipe's soup tensor by tensor (:mod:`soup_core.merge`): memory holds a
    few blocks, never a model, so any model the disk holds can be merged.

    The same files as :meth:`ExportPlan.write` for the same candidate (tested): weights with
    provenance — the inputs' sha256 computed from the bytes the merge reads — and the model card;
    a Hugging Face folder is sharded past ``max_shard_bytes``; nothing is written over the zoo's
    checkpoints or ``inputs``. No metrics: use it for zoos
    without an evaluator (``soup make`` does); a soup that is to be scored is made in memory.
    ``remake`` replaces the remaking command recorded (``soup merge CONFIG.yml`` records itself).
    """
    recipe = get_recipe(candidate.recipe)
    if candidate.kind != "recipe" or recipe.merge_path is None or candidate.align:
        raise SoupError(f"{candidate.title()} is not a per-tensor merge and cannot be streamed; "
                        "write it with plan_export(...).write(...)")
    merge = recipe.plan_merge(candidate.ingredients or zoo.names, dict(candidate.params))
    if merge.method.needs_base and not zoo.has_base:
        raise SoupError(f"the {recipe.pretty_name} needs a base checkpoint θ0 (`base = ...` in zoo.toml)")
    command, hf_source, common = _provenance_common(zoo, candidate, str(out), ())
    if remake is not None:  # made from something other than a zoo (a mergekit configuration): its own command
        command, common["command"] = list(remake), shlex.join(remake)
    out = Path(out)
    hf = _writes_folder(hf_source, out, hf)
    options = recipe.resolve(dict(candidate.params))
    sources = [open_source(zoo.path(n), name=n, roots=zoo.allowed_roots, base=zoo.base if zoo.has_base else None)
               for n in merge.ingredients]
    base = open_source(zoo.path(BASE), name=BASE, roots=zoo.allowed_roots) if merge.method.needs_base else None
    run = MergeRun(merge.method, sources, base, merge.ingredients.index(merge.reference), device)

    def plan(digests: Mapping[str, str], extras: Mapping[str, Any] | None = None) -> ExportPlan:
        provenance = _recipe_provenance(recipe.name, merge.ingredients, merge.weights, options, digests, {}, common)
        return ExportPlan(candidate.title(), None, {}, provenance, tuple(command) if command else None,
                          merge.ingredients, merge.weights, candidate.file_name(), hf_source, extras or {})

    inputs = [*inputs, *(zoo.path(n) for n in zoo.all_names)]
    card = None if hf else card_beside(out, inputs)

    def finished(digests: Mapping[str, str]) -> ExportPlan:  # after the last block: the summaries are known
        return plan(digests, {merge.summary_name: dict(run.summaries)} if merge.summary_name else None)

    def cards(digests: Mapping[str, str]) -> dict[str, str]:
        if card is None:
            return {"README.md": finished(digests).model_card()}  # inside the new folder
        # checked again at the end: in the hours a merge can take, a user's own file may have come there
        return {card_beside(out, inputs).name: finished(digests).model_card()}
    try:
        written, digests = write_merge(run, out, folder=hf, max_shard_bytes=max_shard_bytes, copy_from=hf_source,
                                       inputs=inputs, provenance=lambda d: plan(d).provenance, extra_files=cards,
                                       progress=progress)
    finally:
        for source in (*sources, *([base] if base is not None else [])):
            source.close()
    return finished(digests), [written] + ([card] if card is not None else [])
