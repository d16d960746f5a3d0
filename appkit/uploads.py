"""Uploaded checkpoints: validated against the zoo, kept in a per-session folder, never run."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

import streamlit as st

from soup_core.errors import SoupError
from soup_core.io import CHECKPOINT_SUFFIXES, load_state_dict_bytes, save_state_dict, validate_state_dicts
from soup_core.io.write import process_alive
from soup_core.recipes import RECIPES
from soup_core.zoo import BASE, Zoo

FOLDER_PREFIX = "soup-uploads-"


class SessionFolder:
    """A per-session temporary folder for uploads, removed when the session goes away.

    Its name carries the server's process id, so that a server started later can sweep the
    folders of one that was killed (:func:`sweep_dead_servers`)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)


def sweep_dead_servers(root: Path | None = None) -> list[Path]:
    """Remove upload folders left by servers that are no longer running; returns what went."""
    swept = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*-*"):
        pid = folder.name.removeprefix(FOLDER_PREFIX).split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    return swept


def _session_folder() -> Path:
    if "workspace:session-folder" not in st.session_state:
        st.session_state["workspace:session-folder"] = SessionFolder()
    return st.session_state["workspace:session-folder"].path


def _safe_stem(filename: str) -> str:
    stem = Path(filename).name.split(".")[0] or "upload"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:64]


def uploads_of(zoo_name: str) -> dict[str, dict]:
    """This session's accepted uploads for a zoo: name -> {path, sha256, file}."""
    return st.session_state.setdefault(f"workspace:uploads:{zoo_name}", {})


def taken_names(zoo: Zoo) -> set[str]:
    """Names an upload may not take: the zoo's checkpoints, ``base`` and the recipes (which name
    points of weight space too)."""
    return {*zoo.entries, BASE, *RECIPES}


def add_uploads(zoo: Zoo, files, limit_bytes: int, *, skip_other_files: bool = False) -> list[str]:
    """Validate uploaded checkpoints against the zoo; keep the good ones in the session folder.

    Returns one message per refused file; a renamed upload keeps a ``note`` saying so. Files no longer in
    the uploader leave the zoo. Nothing is ever unpickled beyond ``weights_only=True``, no
    upload is ever run as code, and nothing outside the session folder is written.
    """
    uploads = uploads_of(zoo.name)
    present = {file.file_id for file in files or []}
    for name in [n for n, u in uploads.items() if u["file_id"] not in present]:
        Path(uploads.pop(name)["path"]).unlink(missing_ok=True)
    # A file is read, hashed and validated once: reruns only look its verdict up by file id.
    refused = st.session_state.setdefault(f"workspace:refused:{zoo.name}", {})
    accepted = {u["file_id"] for u in uploads.values()}
    problems = []
    reference_name = zoo.names[0]
    for file in files or []:
        if file.file_id in accepted or (skip_other_files and not file.name.endswith(CHECKPOINT_SUFFIXES)):
            continue  # already in the zoo; or a config or note a folder upload brings along
        if file.file_id in refused:
            problems.append(refused[file.file_id])
            continue
        if file.size > limit_bytes:
            problems.append(f"{file.name}: {file.size / 2**20:.1f} MB is over the upload limit of "
                            f"{limit_bytes >> 20} MB (server.maxUploadSize)")
            continue
        data = file.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        if any(u["sha256"] == digest for u in uploads.values()):
            continue
        label = file.name if file.name != reference_name else f"{file.name} (upload)"
        try:
            state = load_state_dict_bytes(data, file.name)
            validate_state_dicts({reference_name: zoo.state_dict(reference_name), label: state}).raise_for_errors()
        except SoupError as exc:
            message = str(exc)
            refused[file.file_id] = message if message.startswith(file.name) else f"{file.name}: {message}"
            problems.append(refused[file.file_id])
            continue
        name = wanted = _safe_stem(file.name)
        while name in taken_names(zoo) or name in uploads:
            name += "-upload"
        note = (f"{file.name} joined as {name!r}: {wanted!r} already names a checkpoint, θ0 or a recipe"
                if name != wanted else None)
        path = save_state_dict(state, _session_folder() / f"{name}.safetensors")
        uploads[name] = {"path": str(path), "sha256": digest, "file": file.name, "file_id": file.file_id,
                         "note": note}
    return problems


def with_uploads(base: Zoo) -> Zoo:
    """The open zoo plus this session's uploaded checkpoints (built once per set of uploads)."""
    uploads = uploads_of(base.name)
    if not uploads:
        return base
    key = (id(base), tuple(uploads))
    cached = st.session_state.get("workspace:extended")
    if cached is None or cached[0] != key:
        cached = (key, base.extended({n: u["path"] for n, u in uploads.items()}))
        st.session_state["workspace:extended"] = cached
    return cached[1]
