"""Export: download the soup you made, with its provenance, and the command that remakes it."""

import json
import shlex

import streamlit as st

from appkit.workspace import export_candidate, hf_zip, sidebar, ticked
from soup_core.checkpoints import state_dict_bytes
from soup_core.models import is_hf_directory

zoo = sidebar()
st.title("Export")
ticked(zoo)  # the ticked set is the default candidate
try:
    candidate = export_candidate(zoo)
except ValueError as exc:
    st.error(str(exc))
    st.stop()
st.subheader(candidate.title)
cols = st.columns(3)
for col, split in zip(cols, ("val", "test")):
    if split in candidate.metrics:
        col.metric(f"{split} accuracy", f"{100 * candidate.metrics[split].accuracy:.2f}%")
cols[2].metric("ingredients", len(candidate.ingredients) or "—")
if candidate.command:
    st.markdown("Remake it from the command line:")
    st.code(" ".join(shlex.quote(part) for part in candidate.command), language="sh")
else:
    st.caption("No single `soup` command remakes this soup: it contains uploaded checkpoints that are not in "
               "the zoo's manifest. Its provenance lists their sha256.")
st.download_button("Download safetensors", data=state_dict_bytes(candidate.state, candidate.provenance),
                   file_name=candidate.file_name, mime="application/octet-stream", key="export-download",
                   type="primary")
source = zoo.path(zoo.names[0])
if is_hf_directory(source):
    st.download_button("Download as a Hugging Face folder (zip)", data=hf_zip(candidate.state, candidate.provenance,
                                                                              source),
                       file_name=candidate.file_name.replace(".safetensors", ".zip"), mime="application/zip",
                       key="export-download-hf", help="config and tokenizer copied from the input; "
                                                      "from_pretrained loads the unzipped folder")
with st.expander("Provenance (stored in the file's metadata as `soup_provenance`)"):
    st.code(json.dumps(candidate.provenance, indent=2), language="json")
