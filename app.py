"""Model Soup Lab — Streamlit entry point: navigation over pages/ and the shared sidebar."""

import streamlit as st

st.set_page_config(page_title="Model Soup Lab", page_icon="🥣", layout="wide")
navigation = st.navigation([st.Page("pages/overview.py", title="Overview", default=True)])
navigation.run()
