"""Overview: the open zoo's checkpoints and their metrics (placeholder until the app issue)."""

import pandas as pd
import streamlit as st

from soup_core.zoo import open_zoo, sample_zoos


@st.cache_resource(show_spinner="Opening the zoo…")
def load_zoo(name: str):
    return open_zoo(name)


@st.cache_data(show_spinner="Scoring checkpoints…")
def checkpoint_table(name: str) -> pd.DataFrame:
    zoo = load_zoo(name)
    rows = []
    for ckpt in zoo.names:
        metrics = zoo.metrics(ckpt)
        rows.append({"checkpoint": ckpt, **dict(zoo.hparams(ckpt)),
                     **{f"{split} acc": m.accuracy for split, m in metrics.items()}})
    return pd.DataFrame(rows)


st.title("Model Soup Lab")
names = list(sample_zoos())
zoo_name = st.sidebar.selectbox("Sample zoo", names, index=names.index("digits-finetune"), key="zoo")
zoo = load_zoo(zoo_name)
st.caption(zoo.description)
st.metric("Checkpoints", len(zoo.names))
st.dataframe(checkpoint_table(zoo_name), hide_index=True)
