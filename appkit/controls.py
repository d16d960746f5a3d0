"""Widgets derived from what recipes declare: one control per parameter, its help as tooltip."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st

from soup_core.recipes import Recipe
from soup_core.recipes.parameters import MixingWeights


def recipe_controls(recipe: Recipe, choice_splits: Sequence[str], key: str,
                    names: Sequence[str] = ()) -> dict[str, Any]:
    """Controls for ``recipe``'s parameters; returns the values that differ from the defaults.

    A split parameter offers ``choice_splits`` (held-out splits: never test); mixing weights
    offer one number per checkpoint in ``names``.
    """
    values: dict[str, Any] = {}
    shown = [p for p in recipe.parameters if p.in_app]  # not the machine's resources (memory budget)
    columns = st.columns(max(1, min(3, len(shown))))
    for i, p in enumerate(shown):
        column, label, widget_key = columns[i % len(columns)], p.name.replace("_", " "), f"{key}:{p.name}"
        if p.type is MixingWeights:
            value = weights_control(p.help, names, widget_key)
        elif p.type is bool:
            value = column.checkbox(label, value=p.default, help=p.help, key=widget_key)
        elif p.choices or p.type is str:
            options = list(p.choices or choice_splits)
            value = column.selectbox(label, options, index=options.index(p.default) if p.default in options else 0,
                                     help=p.help, key=widget_key)
        elif p.type is int:
            value = column.number_input(label, min_value=int(p.minimum or 0), value=p.default, step=1,
                                        help=p.help + (" (empty: no limit)" if p.default is None else ""),
                                        key=widget_key)
        else:
            value = column.number_input(label, min_value=float(p.minimum or 0.0), value=float(p.default),
                                        format="%g", help=p.help, key=widget_key)
        if value != p.default:
            values[p.name] = value
    return values


def weights_control(help: str, names: Sequence[str], key: str) -> MixingWeights:
    """A weight per checkpoint (1 unless changed); returns those that differ from 1."""
    st.caption(f"Weights: {help}.")
    columns = st.columns(8)
    weights = {name: columns[i % 8].number_input(name, min_value=0.0, value=1.0, step=0.5, format="%g",
                                                 key=f"{key}:{name}")
               for i, name in enumerate(names)}
    return MixingWeights({name: w for name, w in weights.items() if w != 1.0})
