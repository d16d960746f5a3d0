"""What every figure gets under it: a line on how to read it and its data as CSV and JSON.

>>> import pandas as pd
>>> csv_text(pd.DataFrame({"alpha": [0.0, 1.0], "val error (%)": [3.2, 4.1]})).splitlines()[0]
'alpha,val error (%)'
"""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st


def csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


def figure_footer(key: str, how_to_read: str, data: pd.DataFrame | None = None, *, raw: object = None) -> None:
    """A caption on how to read the figure above, and its data (``data`` as CSV and JSON, or
    ``raw`` as JSON) for slides and notebooks. The figure's own toolbar exports PNG."""
    st.caption(f"How to read this: {how_to_read}")
    if data is None and raw is None:
        return
    left, right, _ = st.columns([1, 1, 4])
    if data is not None:
        left.download_button("Data (CSV)", csv_text(data), f"{key}.csv", "text/csv", key=f"{key}-csv")
        payload = data.to_dict(orient="records") if raw is None else raw
    else:
        payload = raw
    right.download_button("Data (JSON)", json.dumps(payload, indent=1, default=float), f"{key}.json",
                          "application/json", key=f"{key}-json")
