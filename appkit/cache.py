"""Results shared by every session of the server, keyed by what they depend on (zoo, settings).

Cached resources are shared between sessions: never mutate what these functions return.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
import streamlit as st

from appkit.admission import HEAVY_WORK
from appkit.lru import ByteBudgetCache, tensor_bytes
from appkit.workers import heavy
from soup_core.align import barrier_table
from soup_core.evaluate import TEST, VAL, shift_average
from soup_core.export import Candidate, ExportPlan, plan_export
from soup_core.landscape import LineBarrier, path_alphas
from soup_core.landscape.batchnorm import batchnorm_keys
from soup_core.policies import BN_POLICIES
from soup_core.recipes import RECIPES, SoupResult
from soup_core.recipes.best_individual import tie_sentence
from soup_core.significance import report_splits, versus, versus_best
from soup_core.io.resident import files_identity
from soup_core.zoo import Zoo, make_soup, open_zoo
from soup_core.zoo.manifest import read_manifest


@st.cache_resource(show_spinner="Connecting to the Ray cluster…")
def ray_cluster():
    """The Ray cluster at ``SOUP_RAY_ADDRESS`` (landscapes run there), or None when it is unset."""
    address = os.environ.get("SOUP_RAY_ADDRESS")
    if not address:
        return None
    from soup_core import distributed
    return distributed.connect(address)


@st.cache_resource
def computed_landscapes() -> dict:
    """Every landscape this server computed, by (zoo, points, grid, margin, split, BatchNorm):
    shared by all sessions, so a room computing the same plane computes it once. Never mutate
    a stored result."""
    return {}


# Zoos up to this size are read into the server's memory rather than mapped: a checkpoint file
# replaced or truncated under a mapped zoo would kill the server (SIGBUS) for every session.
RESIDENT_BYTES = int(os.environ.get("SOUP_RESIDENT_MB", "4096")) << 20


def load_zoo(name: str, roots: tuple | None = None) -> Zoo:
    """One Zoo per server and per state of its files (evaluator built once; never mutate it). A
    checkpoint file that changed — replaced, rewritten, truncated — opens the zoo again, from the
    new files; sessions already holding the old one keep its tensors, which live in memory."""
    manifest = read_manifest(name, None if roots is None else list(roots))
    files = [entry.path for entry in manifest.entries] + ([manifest.base_path] if manifest.base_path else [])
    return _open_zoo(name, roots, files_identity(files))


@st.cache_resource(show_spinner="Opening the zoo…", max_entries=16)
def _open_zoo(name: str, roots: tuple | None, identity: tuple) -> Zoo:
    size = sum(stamp[3] for stamp in identity if len(stamp) == 5)
    zoo = open_zoo(name, allowed_roots=None if roots is None else list(roots), resident=size <= RESIDENT_BYTES)
    zoo.identity = identity
    if roots is not None:  # a folder: refuse it here, with the message, rather than fail on a page
        zoo.validation.raise_for_errors()
        zoo.evaluator  # imports the manifest's model and data now: a missing module is an error here too
    return zoo


def zoo_key(zoo: Zoo) -> tuple:
    """What identifies a session's zoo for caching: its name, checkpoint files (and their state on
    disk) and alignment."""
    return (zoo.name, zoo.aligned_to, *(str(zoo.path(n)) for n in zoo.names), zoo.identity)


@st.cache_resource(show_spinner="Matching hidden units…", max_entries=8)
def aligned_zoo(_zoo: Zoo, key: tuple, reference: str) -> Zoo:
    """The zoo with every checkpoint's units permuted to match ``reference`` (never mutate it)."""
    with HEAVY_WORK.admitted():
        return _zoo.aligned(reference)


@st.cache_data(show_spinner="Measuring barriers…", max_entries=8)
def cached_barriers(_zoo: Zoo, key: tuple, reference: str, split: str) -> list[dict]:
    """Every pair's error barrier before and after alignment to ``reference``."""
    with HEAVY_WORK.admitted():
        return barrier_table(_zoo, aligned_zoo(_zoo, key, reference), _zoo.evaluator, split)


def report_columns(evaluator) -> list[str]:
    """val, test (when the data has it) and "shifts" (when there are any)."""
    return [s for s in (VAL, TEST) if s in evaluator.splits] + (["shifts"] if evaluator.shift_names else [])


def accuracy_row(metrics, evaluator) -> dict[str, float]:
    """Accuracy (fraction) on each report column of :func:`report_columns`."""
    out = {s: metrics[s].accuracy for s in report_columns(evaluator) if s in metrics}
    if evaluator.shift_names:
        out["shifts"] = shift_average(metrics, evaluator.shift_names)
    return out


def checkpoint_table(zoo: Zoo) -> pd.DataFrame:
    """Hyperparameters and accuracy (percent) on val, test and the shifts' mean, when scored."""
    return _checkpoint_table(zoo, zoo_key(zoo))


@st.cache_data(show_spinner="Scoring checkpoints…", max_entries=16)
def _checkpoint_table(_zoo: Zoo, key: tuple) -> pd.DataFrame:
    rows = []
    for ckpt in _zoo.names:
        row = {"checkpoint": ckpt, **dict(_zoo.hparams(ckpt))}
        if _zoo.evaluator is not None:
            row.update({s: 100 * v for s, v in accuracy_row(_zoo.metrics(ckpt), _zoo.evaluator).items()})
        rows.append(row)
    return pd.DataFrame(rows)


# What every tick recomputes: cheap (each model scored once, cached by content).
LIVE_RECIPES = ("uniform", "best", "ensemble")


# Soups of every session, bounded in bytes (a 1B-parameter soup holds 4 GB): SOUP_SOUP_CACHE_MB.
SOUPS = ByteBudgetCache(int(os.environ.get("SOUP_SOUP_CACHE_MB", "2048")) << 20)


def recipe_result(_zoo: Zoo, key: tuple, recipe: str, ingredients: tuple[str, ...] | None = None,
                  params: tuple[tuple[str, Any], ...] = ()) -> SoupResult:
    """A recipe's result on the session's zoo (cached per zoo, ingredients and parameters in
    :data:`SOUPS`, least recently used out past its byte budget; never mutate).

    The live soup's recipes score each model once and never wait in line behind a landscape;
    the others (greedy, pruned, learned…) take a slot of the server's heavy work, in its worker process
    (:mod:`appkit.workers`)."""
    def make() -> SoupResult:
        if recipe in LIVE_RECIPES:
            return make_soup(_zoo, recipe, ingredients, **dict(params))
        return heavy(_zoo, "recipe", recipe, ingredients, params)
    return SOUPS.get_or_make((key, recipe, ingredients, params), make, lambda r: tensor_bytes(r.state_dict))


def live_soup(zoo: Zoo, names: list[str]) -> dict:
    """Uniform soup, best individual (chosen on val) and logit ensemble of ``names``: accuracy per
    report column, from the recipes themselves, and the soups' tests against the best model."""
    return _live_soup(zoo, zoo_key(zoo), tuple(names))


@st.cache_data(show_spinner=False, max_entries=256)
def _live_soup(_zoo: Zoo, key: tuple, chosen: tuple[str, ...]) -> dict:
    results = {r: recipe_result(_zoo, key, r, chosen) for r in LIVE_RECIPES}
    rows = {r: accuracy_row(result.metrics, _zoo.evaluator) for r, result in results.items()}
    ingredients = _zoo.ingredients(chosen)
    first = report_splits(_zoo.evaluator.split_names)[:1]  # the one the Ingredients caption shows
    versus = {r: next(iter(versus_best(results[r], ingredients, _zoo.evaluator, first)), None)
              for r in ("uniform", "ensemble")}
    return {"soup": rows["uniform"], "best": rows["best"], "best_name": results["best"].ingredients[0],
            "best_ties": tie_sentence(results["best"]), "best_ties_on_val": tie_sentence(results["best"], report=False),
            "ensemble": rows["ensemble"], "versus": versus}


def board_result(zoo: Zoo, recipe: str, key: tuple | None = None) -> SoupResult:
    """A recipe as the Recipes board, the Landscape and the Tour show it: every ingredient, and
    its app values (a merge method's λ chosen on val: :attr:`Recipe.app_values`)."""
    return recipe_result(zoo, key or zoo_key(zoo), recipe, None, RECIPES[recipe].app_values)


def board_made(zoo: Zoo, recipe: str) -> bool:
    """Whether the board's result of ``recipe`` is made already (so showing it costs nothing)."""
    return SOUPS.holds((zoo_key(zoo), recipe, None, RECIPES[recipe].app_values))


@st.cache_data(show_spinner="Testing the differences…", max_entries=128)
def recipe_significance(_zoo: Zoo, key: tuple, recipe: str, against: str = "best") -> list[dict]:
    """A recipe's board result against the best individual model (``best``) or another recipe's
    board result (``greedy``) on every report split (JSON); empty against itself."""
    result = board_result(_zoo, recipe, key)
    if against == "best":
        comparisons = versus_best(result, _zoo.ingredients(), _zoo.evaluator)
    elif against == recipe:
        comparisons = []
    else:
        comparisons = versus(board_result(_zoo, against, key), result, _zoo.ingredients(), _zoo.evaluator)
    return [c.to_json() | {"sentence": c.sentence(), "brief": c.brief()} for c in comparisons]


def export_plan(zoo: Zoo, candidate: Candidate, local_names: tuple[str, ...]) -> ExportPlan:
    """The plan for a candidate, reusing the cached recipe result when there is one."""
    result = None
    if candidate.kind == "recipe":
        result = recipe_result(zoo, zoo_key(zoo), candidate.recipe, candidate.ingredients, candidate.params)
    return _export_plan(zoo, zoo_key(zoo), candidate, local_names, result)


@st.cache_resource(show_spinner="Preparing the export…", max_entries=32)
def _export_plan(_zoo: Zoo, key: tuple, candidate: Candidate, local_names: tuple[str, ...],
                 _result: SoupResult | None) -> ExportPlan:
    return plan_export(_zoo, candidate, result=_result, local_names=local_names)


@st.cache_data(show_spinner="Running the ablations…", max_entries=16)
def cached_ablations(_zoo: Zoo, key: tuple) -> tuple[list[dict], list[dict]]:
    return heavy(_zoo, "ablations")


@st.cache_data(show_spinner="Measuring angles…", max_entries=16)
def cached_angles(_zoo: Zoo, key: tuple) -> dict:
    return heavy(_zoo, "angles")


@st.cache_data(show_spinner="Analysing pairs…", max_entries=16)
def cached_pairs(_zoo: Zoo, key: tuple, names: tuple[str, ...], split: str) -> dict:
    return heavy(_zoo, "pairs", names, split)


def path_policy(zoo: Zoo, chosen: str | None = None) -> str:
    """The BatchNorm policy of Geometry's path: the one chosen, or the first, for a model with
    BatchNorm; ``keep`` for one without (no running statistics: every policy is the same)."""
    if zoo.evaluator is None or not batchnorm_keys(zoo.evaluator.model):
        return "keep"
    return chosen or BN_POLICIES[0]


@st.cache_data(show_spinner="Walking the line…", max_entries=64)
def cached_path(_zoo: Zoo, key: tuple, a: str, b: str, bn: str, low: float = -0.5, high: float = 1.5,
                points: int = 41) -> dict:
    splits = [s for s in (VAL, TEST) if s in _zoo.evaluator.splits]
    return heavy(_zoo, "path", a, b, bn, path_alphas(points, low, high), splits)


@st.cache_data(show_spinner="Measuring the barrier's interval…", max_entries=16)
def cached_barrier_interval(_zoo: Zoo, key: tuple, a: str, b: str, split: str) -> LineBarrier:
    """The error along the line between two checkpoints, its barrier and the barrier's 95%
    bootstrap interval over ``split``'s images."""
    return heavy(_zoo, "barrier_interval", a, b, split)


@st.cache_data(show_spinner="Finding the flattest pair…", max_entries=16)
def cached_flattest_pair(_zoo: Zoo, key: tuple) -> tuple[str, str, float]:
    """The two good models (chosen on val) with the lowest error barrier between them (on val)."""
    return heavy(_zoo, "flattest_pair")


@st.cache_data(show_spinner="Computing the landscape…", max_entries=32)
def cached_landscape(_zoo: Zoo, key: tuple, points: tuple[str, str, str], grid: int, split: str, bn: str) -> dict:
    """A plane's landscape as JSON (what ``soup landscape`` writes)."""
    return heavy(_zoo, "landscape", points, grid, 0.2, [split], bn, None, (), None).to_json()
