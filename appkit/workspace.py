"""The workspace: which zoo is open, cached loaders, and the ticked ingredients (URL-shareable)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from soup_core.evaluate import metrics_from_logits, ensemble_logits, shift_average
from soup_core.params import num_parameters, uniform_average
from soup_core.zoo import Zoo, open_zoo, sample_zoos

DEFAULT_ZOO = "digits-finetune"


@st.cache_resource(show_spinner="Opening the zoo…")
def load_zoo(name: str) -> Zoo:
    """One Zoo per server (checkpoints memory-mapped, evaluator built once). Never mutate it."""
    return open_zoo(name)


@st.cache_data(show_spinner="Scoring checkpoints…")
def checkpoint_table(name: str) -> pd.DataFrame:
    """Hyperparameters and val/test/shift accuracy of every checkpoint (percent)."""
    zoo = load_zoo(name)
    shifts = zoo.evaluator.shift_names
    rows = []
    for ckpt in zoo.names:
        metrics = zoo.metrics(ckpt)
        rows.append({"checkpoint": ckpt, **dict(zoo.hparams(ckpt)),
                     "val": 100 * metrics["val"].accuracy, "test": 100 * metrics["test"].accuracy,
                     "shifts": 100 * shift_average(metrics, shifts)})
    return pd.DataFrame(rows)


def keep(widget_key: str) -> None:
    """``on_change`` of a workspace widget: copy its new value into the workspace."""
    st.session_state[f"workspace:{widget_key}"] = st.session_state[widget_key]


def _recall(widget_key: str, default):
    """Seed a widget from the workspace's copy before it is drawn.

    Under st.navigation a widget's own state does not survive a page switch, so the
    workspace keeps a copy (updated by :func:`keep` when the user changes the widget).
    """
    value = st.session_state.setdefault(f"workspace:{widget_key}", default)
    st.session_state[widget_key] = value
    return value


def sidebar() -> Zoo:
    """The zoo picker (first visit: the URL's ``?zoo=``) and what was loaded."""
    names = list(sample_zoos())
    wanted = st.query_params.get("zoo", DEFAULT_ZOO)
    _recall("zoo", wanted if wanted in names else DEFAULT_ZOO)
    name = st.sidebar.selectbox("Sample zoo", names, key="zoo", on_change=keep, args=("zoo",))
    st.query_params["zoo"] = name
    zoo = load_zoo(name)
    st.sidebar.caption(zoo.description)
    base = " + base θ0" if zoo.has_base else " (no base θ0)"
    st.sidebar.write(f"**{len(zoo.names)} checkpoints**{base}, "
                     f"{num_parameters(zoo.state_dict(zoo.names[0])):,} parameters each")
    report = zoo.validation
    for message in report.errors:
        st.sidebar.error(message)
    for message in report.warnings:
        st.sidebar.warning(message)
    return zoo


def tick_key(zoo: Zoo, name: str) -> str:
    return f"tick:{zoo.name}:{name}"


def seed_ticks(zoo: Zoo) -> None:
    """Before the tick boxes are drawn: last state, else the URL's ``?use=a,b``, else all."""
    from_url = [n for n in st.query_params.get("use", "").split(",") if n in zoo.entries]
    initial = set(from_url) if from_url else set(zoo.names)
    for name in zoo.names:
        _recall(tick_key(zoo, name), name in initial)


def ticked(zoo: Zoo) -> list[str]:
    """The ticked ingredients (after the boxes were drawn), also put in the URL."""
    chosen = [n for n in zoo.names if st.session_state.get(f"workspace:{tick_key(zoo, n)}")]
    st.query_params["use"] = ",".join(chosen)
    return chosen


def live_soup(zoo: Zoo, names: list[str]) -> dict:
    """Uniform soup, best individual and logit ensemble of ``names``: accuracy per split."""
    evaluator = zoo.evaluator
    states = [zoo.state_dict(n) for n in names]
    soup = evaluator.evaluate(uniform_average(states))
    individual = {n: zoo.metrics(n) for n in names}
    best = max(names, key=lambda n: individual[n]["val"].accuracy)  # chosen on val, as the paper does
    ensemble = {s: metrics_from_logits(ensemble_logits([evaluator.logits(st_, s) for st_ in states]),
                                       evaluator.labels(s)) for s in evaluator.split_names}
    shifts = evaluator.shift_names

    def row(metrics):
        return {"val": metrics["val"].accuracy, "test": metrics["test"].accuracy,
                "shifts": shift_average(metrics, shifts)}

    return {"soup": row(soup), "best": row(individual[best]), "best_name": best, "ensemble": row(ensemble)}
