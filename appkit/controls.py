"""Widgets derived from what recipes declare: one control per parameter, its help as tooltip."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st

from soup_core.recipes import Recipe
from appkit.plain import literal
from soup_core.recipes.parameters import ON_VAL, MixingWeights


def recipe_controls(recipe: Recipe, choice_splits: Sequence[str], key: str,
                    names: Sequence[str] = ()) -> dict[str, Any]:
    """Controls for ``recipe``'s parameters, set at first as the board makes the recipe (its app
    values); returns the values that differ from the declared defaults.

    A split parameter offers ``choice_splits`` (held-out splits: never test; none: the zoo has no
    evaluator, and nothing can be chosen on val); mixing weights offer one number per checkpoint
    in ``names``; a parameter with a val grid offers "best on val".
    """
    values: dict[str, Any] = {}
    start = dict(recipe.app_values) if choice_splits else {}
    shown = [p for p in recipe.parameters if p.in_app]  # not the machine's resources (memory budget)
    columns = st.columns(max(1, min(3, len(shown))))
    for i, p in enumerate(shown):
        column, label, widget_key = columns[i % len(columns)], p.name.replace("_", " "), f"{key}:{p.name}"
        initial = start.get(p.name, p.default)
        if p.val_grid is not None and choice_splits and column.checkbox(
                f"{label}: best on val", value=initial == ON_VAL, key=f"{widget_key}:on-val",
                help=f"the value of {p.val_grid[0]:g}, {p.val_grid[1]:g}, …, {p.val_grid[-1]:g} whose soup scores "
                     "best on the val split, as the method's paper chooses it"):
            value = ON_VAL
        elif p.type is MixingWeights:
            value = weights_control(p.help, names, widget_key)
        elif p.type is bool:
            value = column.checkbox(label, value=initial, help=p.help, key=widget_key)
        elif p.choices or issubclass(p.type, str):
            options = list(p.choices or choice_splits)
            value = column.selectbox(label, options, index=options.index(p.default) if p.default in options else 0,
                                     help=p.help, key=widget_key)
        elif p.type is int:
            value = column.number_input(label, min_value=int(p.minimum or 0), value=p.default, step=1,
                                        help=p.help + (" (empty: no limit)" if p.default is None else ""),
                                        key=widget_key)
        else:
            value = column.number_input(label, min_value=float(p.minimum or 0.0), value=float(p.default),
                                        max_value=None if p.maximum is None else float(p.maximum),
                                        format="%g", help=p.help, key=widget_key)
        if value != p.default:
            values[p.name] = value
    return values


def weights_control(help: str, names: Sequence[str], key: str) -> MixingWeights:
    """A weight per checkpoint (1 unless changed); returns those that differ from 1."""
    st.caption(f"Weights: {help}.")
    columns = st.columns(8)
    weights = {name: columns[i % 8].number_input(literal(name), min_value=0.0, value=1.0, step=0.5, format="%g",
                                                 key=f"{key}:{name}")
               for i, name in enumerate(names)}
    return MixingWeights({name: w for name, w in weights.items() if w != 1.0})
