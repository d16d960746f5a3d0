"""Warm-up: fill the server's shared caches before participants arrive, so nobody waits on a cold one.

What a first visit to each page computes with the page's default settings — checkpoint scores,
the live soup of the default ticks, every recipe and its test against the best model, angles,
the default interpolation path, and every Tour step — is computed once for the zoo the app opens
with and the zoos the Tour uses, in a background thread at server start (``SOUP_WARM=0`` turns
it off). The calls are the pages' own, with their defaults; ``tests/test_warm.py`` renders
every page and Tour step afterwards and checks that none of them computes anything.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time

from appkit.board import board_recipes
from appkit.cache import (aligned_zoo, board_result, cached_angles, cached_barrier_interval, cached_barriers,
                          cached_flattest_pair, cached_landscape, cached_pairs, cached_path, checkpoint_table,
                          live_soup, load_zoo, path_policy, recipe_result, recipe_significance, zoo_key)
from appkit.workspace import DEFAULT_ZOO
from soup_core.zoo import BASE, Zoo

TOUR_ZOOS = ("digits-scratch", "digits-bn")
LOG = logging.getLogger("soup.warm")


def warm_pages(zoo: Zoo) -> None:
    """Ingredients, Recipes and Geometry at their defaults (every model ticked)."""
    key = zoo_key(zoo)
    checkpoint_table(zoo)
    live_soup(zoo, list(zoo.names))
    for recipe in board_recipes(zoo):
        board_result(zoo, recipe.name)
        if zoo.evaluator is not None:
            recipe_significance(zoo, key, recipe.name)
            recipe_significance(zoo, key, recipe.name, "greedy")
    cached_angles(zoo, key)
    points = ([BASE] if zoo.has_base else []) + list(zoo.names)
    cached_path(zoo, key, points[0], points[1], path_policy(zoo))


def warm_tour(story: Zoo) -> None:
    """Every Tour step: steps 1–4 on ``story``, 5 on digits-scratch, 6 on digits-bn, 8 on code-lm; 7
    (the merge methods against greedy) is the Recipes board's, warmed with ``story``'s pages."""
    key = zoo_key(story)
    a, b, _ = cached_flattest_pair(story, key)
    cached_barrier_interval(story, key, a, b, "test")
    cached_landscape(story, key, ("base", a, b), 15, "test", "recompute")
    cached_pairs(story, key, tuple(story.names[:10]), "test")
    for recipe in ("best", "uniform", "ensemble", "greedy", "pruned"):
        recipe_result(story, key, recipe)
    for recipe in ("uniform", "greedy", "pruned"):
        recipe_significance(story, key, recipe)
    scratch = load_zoo("digits-scratch")
    reference = scratch.names[0]
    matched = aligned_zoo(scratch, zoo_key(scratch), reference)
    for zoo in (scratch, matched):
        recipe_significance(zoo, zoo_key(zoo), "uniform")
        for recipe in ("best", "uniform", "ensemble"):
            recipe_result(zoo, zoo_key(zoo), recipe)
    cached_barriers(scratch, zoo_key(scratch), reference, "test")
    bn_zoo = load_zoo("digits-bn")
    for policy in ("recompute", "interpolate", "keep"):
        cached_path(bn_zoo, zoo_key(bn_zoo), "base", bn_zoo.names[0], policy, 0.0, 1.0, 11)
    recipe_result(bn_zoo, zoo_key(bn_zoo), "uniform")
    lm = load_zoo("code-lm")
    for recipe in ("best", "uniform", "greedy", "ensemble"):
        recipe_result(lm, zoo_key(lm), recipe)
    recipe_significance(lm, zoo_key(lm), "uniform")


# How far the warm-up has come: stages done of all, while it runs (the pages' "Preparing…" banner).
PROGRESS = {"done": 0, "total": 0, "running": False}


def warm() -> float:
    """Warm everything a workshop's first minutes need; returns the seconds it took."""
    start = time.perf_counter()
    story = load_zoo(DEFAULT_ZOO)
    stages = [lambda: warm_pages(story), lambda: warm_tour(story),
              *(lambda name=name: warm_pages(load_zoo(name)) for name in TOUR_ZOOS)]
    PROGRESS.update(done=0, total=len(stages), running=True)
    try:
        for stage in stages:
            stage()
            PROGRESS["done"] += 1
    finally:
        PROGRESS["running"] = False
    return time.perf_counter() - start


def freeze_the_heap() -> None:
    """Move what the server holds after its warm-up (modules, zoos, caches) out of the garbage
    collector's sight (``gc.freeze``). A full collection scans every tracked object with the GIL
    held, stalling all sessions; frozen objects are not scanned, so later collections cost what
    the sessions allocated since. Frozen objects are still freed when their count drops to zero;
    only a reference cycle among them would stay (the warm caches live as long as the server)."""
    gc.collect()
    gc.freeze()


WARM_THREAD = "soup-warm-up"
CONTEXT_LOGGER = "streamlit.runtime.scriptrunner_utils.script_run_context"


class QuietWarmUp(logging.Filter):
    """Drops Streamlit's "missing ScriptRunContext" warnings from the warm-up thread: it calls the
    pages' cached functions outside any session on purpose (dozens of lines in the terminal, each
    saying it "can be ignored"); the same warning from anywhere else still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.threadName == WARM_THREAD and "ScriptRunContext" in record.getMessage())


def start_warming() -> threading.Thread | None:
    """Warm in a background thread (the first visitors are served meanwhile), unless SOUP_WARM=0."""
    if os.environ.get("SOUP_WARM", "1") == "0":
        return None

    def run() -> None:
        try:
            seconds = warm()
            freeze_the_heap()
            LOG.warning("warm-up done in %.1f s", seconds)
        except Exception:  # noqa: BLE001 - a failed warm-up costs speed, never the server
            LOG.exception("warm-up failed; pages will compute on first use")

    logger = logging.getLogger(CONTEXT_LOGGER)
    if not any(isinstance(f, QuietWarmUp) for f in logger.filters):
        logger.addFilter(QuietWarmUp())
    thread = threading.Thread(target=run, name=WARM_THREAD, daemon=True)
    thread.start()
    return thread
