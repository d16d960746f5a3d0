"""Export: download the soup you made, with its provenance, model card and the command that remakes it."""

import json

import streamlit as st

from appkit.cache import export_plan
from appkit.plain import error, percent
from appkit.room_controls import test_hidden, visible
from appkit.sidebar import sidebar
from appkit.uploads import uploads_of
from appkit.workspace import chosen_export, ticked
from soup_core.errors import SoupError
from soup_core.export import Candidate
from soup_core.mergekit_config import mergekit_of_export

zoo = sidebar()
st.title("Export")
names = ticked(zoo)
candidates = [Candidate.ticked(names)] + ([chosen_export()] if chosen_export() is not None else [])
shown = st.radio("Soup to export", range(len(candidates)), format_func=lambda i: candidates[i].title(),
                 index=len(candidates) - 1, horizontal=True, key="export-choice",
                 help="The uniform soup of the ticked ingredients, or what you last chose on Recipes or Landscape.")
candidate = candidates[shown]
if candidate.kind == "recipe" and candidate.ingredients == ():
    st.error("Tick at least one ingredient on the Ingredients page, or pick a recipe's soup.")
    st.stop()
try:
    plan = export_plan(zoo, candidate, tuple(uploads_of(zoo.name)))
except SoupError as exc:
    error(str(exc))
    st.stop()
st.subheader(plan.title)
cols = st.columns(3)
hidden = test_hidden()  # the room is read once a run
for col, split in zip(cols, visible(("val", "test"), hidden)):
    if split in plan.metrics:
        col.metric(f"{split} accuracy", percent(plan.metrics[split].accuracy))
cols[2].metric("ingredients", len(plan.ingredients) or "—")
if plan.command_line:
    st.markdown("Remake it from the command line:")
    st.code(plan.command_line, language="sh")
else:
    st.caption("No single `soup` command remakes this soup: it contains uploaded checkpoints that are not in "
               "the zoo's manifest. Its provenance lists their sha256.")
# The files are made when a button is pressed (a callable), not on every run: a soup of a 1B-parameter
# model is 4 GB, which the page would otherwise serialise and hold for each session.
left, middle, right = st.columns(3)
left.download_button("Download safetensors", data=plan.safetensors_bytes, file_name=plan.file_name,
                     mime="application/octet-stream", key="export-download", type="primary", on_click="ignore")
card = plan.model_card()
if hidden:  # the card (and the folder's README) report test
    middle.caption("The model card reports test accuracy: it is offered once the facilitator reveals test.")
else:
    middle.download_button("Download the model card", data=card, on_click="ignore",
                           file_name=plan.file_name.replace(".safetensors", ".md"), mime="text/markdown",
                           key="export-card")
if plan.hf_source is not None and not hidden:
    right.download_button("Download as a Hugging Face folder (zip)", data=plan.hf_zip, on_click="ignore",
                          file_name=plan.file_name.replace(".safetensors", ".zip"), mime="application/zip",
                          key="export-download-hf", help="config and tokenizer copied from the input, the model "
                                                         "card as README.md; from_pretrained loads the unzipped folder")
mergekit = mergekit_of_export(zoo, plan.provenance, tuple(uploads_of(zoo.name)))
if mergekit is not None:
    st.download_button("Download the mergekit configuration", data=mergekit, on_click="ignore",
                       file_name=plan.file_name.replace(".safetensors", ".mergekit.yml"), mime="application/yaml",
                       key="export-mergekit", help="mergekit-yaml remakes this soup from the same checkpoints "
                                                   "(paths as on this server), at any model size")
if hidden:  # the card and the provenance hold the soup's test accuracy
    st.caption("The model card and the provenance report test accuracy: they are shown once the facilitator "
               "reveals test.")
else:
    with st.expander("Model card (its Markdown source: names in it are shown as typed, never followed)"):
        st.code(card, language="markdown")
    with st.expander("Provenance (stored in the file's metadata as `soup_provenance`)"):
        st.code(json.dumps(plan.provenance, indent=2), language="json")
