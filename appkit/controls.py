"""Widgets derived from what recipes declare: one control per parameter, its help as tooltip."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st

from soup_core.recipes import Recipe


def recipe_controls(recipe: Recipe, choice_splits: Sequence[str], key: str) -> dict[str, Any]:
    """Controls for ``recipe``'s parameters; returns the values that differ from the defaults.

    A split parameter offers ``choice_splits`` (held-out splits: never test).
    """
    values: dict[str, Any] = {}
    columns = st.columns(max(1, min(3, len(recipe.parameters))))
    for i, p in enumerate(recipe.parameters):
        column, label, widget_key = columns[i % len(columns)], p.name.replace("_", " "), f"{key}:{p.name}"
        if p.choices or p.type is str:
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
