"""Uploaded checkpoints: validated against the zoo, kept in a per-session folder, never run."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from soup_core.errors import SoupError
from soup_core.io import CHECKPOINT_SUFFIXES, load_state_dict_bytes, save_state_dict, validate_state_dicts
from soup_core.io.write import process_alive
from soup_core.recipes import RECIPES
from soup_core.zoo import BASE, Zoo
from soup_core.zoo.manifest import GENERIC_STEMS

FOLDER_PREFIX = "soup-uploads-"
# All participants' uploads on this server together, on disk (SOUP_UPLOAD_BUDGET_MB to change).
UPLOAD_BUDGET_MB = 2048
# Uploads decoded and validated at once, server-wide: each may briefly take a few times its
# size in memory, so this bounds what a room uploading together can take.
_DECODING = threading.BoundedSemaphore(2)
# Closed sessions' folders are swept every SWEEP_SECONDS, once their session has been gone for
# SWEEP_GRACE_SECONDS (longer than Streamlit's 120 s disconnect timeout, within which a browser
# may come back to its session).
SWEEP_SECONDS = 60
SWEEP_GRACE_SECONDS = 300
_ABSENT_SINCE: dict[Path, float] = {}


class SessionFolder:
    """A per-session temporary folder for uploads, removed when the session goes away.

    Its name carries the server's process id and the session's id, so that the server sweeps the
    folders of closed sessions (:func:`sweep_closed_sessions`) and a server started later those
    of one that was killed (:func:`sweep_dead_servers`)."""

    def __init__(self, session_id: str = "nosession") -> None:
        session_id = re.sub(r"[^A-Za-z0-9]", "", session_id)[:40] or "nosession"
        self.path = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-{session_id}-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)


def _folder_owner(folder: Path) -> tuple[str, str]:
    """(server pid, session id) from a session folder's name."""
    parts = folder.name.removeprefix(FOLDER_PREFIX).split("-")
    return parts[0], parts[1] if len(parts) > 2 else ""


def sweep_dead_servers(root: Path | None = None) -> list[Path]:
    """Remove upload folders left by servers that are no longer running; returns what went."""
    swept = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*-*"):
        pid = _folder_owner(folder)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    return swept


def sweep_closed_sessions(session_open: Callable[[str], bool], root: Path | None = None, *,
                          grace_seconds: float = SWEEP_GRACE_SECONDS, now: Callable[[], float] = time.monotonic,
                          ) -> list[Path]:
    """Remove this server's upload folders whose session has been gone for ``grace_seconds``.

    ``session_open(session_id)`` says whether the server has that session connected; a browser
    that lost its connection may come back to its session within Streamlit's disconnect
    timeout, which the grace period outlasts. Returns what went."""
    swept = []
    for folder in server_folders(root):
        session_id = _folder_owner(folder)[1]
        if not session_id or session_id == "nosession" or session_open(session_id):
            _ABSENT_SINCE.pop(folder, None)
            continue
        if now() - _ABSENT_SINCE.setdefault(folder, now()) >= grace_seconds:
            shutil.rmtree(folder, ignore_errors=True)
            _ABSENT_SINCE.pop(folder, None)
            swept.append(folder)
    return swept


def session_connected(session_id: str) -> bool:
    """Whether this Streamlit server has the session connected (True where there is no server)."""
    from streamlit import runtime
    if not runtime.exists():
        return True
    return runtime.get_instance().get_app_session(session_id) is not None


def start_sweeper(interval_seconds: float = SWEEP_SECONDS) -> threading.Thread:
    """A daemon thread sweeping closed sessions' upload folders every ``interval_seconds``."""
    def sweep_forever() -> None:
        while True:
            time.sleep(interval_seconds)
            try:
                sweep_closed_sessions(session_connected)
            except OSError:  # a folder vanishing under us: try again next round
                pass

    thread = threading.Thread(target=sweep_forever, name="soup-upload-sweeper", daemon=True)
    thread.start()
    return thread


def server_folders(root: Path | None = None) -> list[Path]:
    """This server's session folders."""
    return sorted(Path(root or tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}{os.getpid()}-*"))


def server_upload_bytes(root: Path | None = None) -> int:
    """Bytes of every participant's uploads on this server."""
    return sum(f.stat().st_size for folder in server_folders(root) for f in folder.glob("*") if f.is_file())


def decoded(data: bytes, name: str, check: Callable[[dict], object]) -> dict:
    """An upload's tensors, read from its bytes and checked by ``check``: at most two uploads are in
    this step at once on the whole server (:data:`_DECODING`), whatever the number of sessions."""
    with _DECODING:
        state = load_state_dict_bytes(data, name)
        check(state)
        return state


def megabytes(value: float) -> str:
    """A size in MB as a participant reads it: whole megabytes from 100 up, else three digits.

    >>> megabytes(2048), megabytes(0.0957), megabytes(12.34)
    ('2,048', '0.0957', '12.3')
    """
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def upload_budget_mb() -> float:
    """The server's budget for all uploads on disk, in MB (SOUP_UPLOAD_BUDGET_MB)."""
    try:
        return float(os.environ.get("SOUP_UPLOAD_BUDGET_MB", UPLOAD_BUDGET_MB))
    except ValueError:
        return float(UPLOAD_BUDGET_MB)


def _session_folder() -> Path:
    if "workspace:session-folder" not in st.session_state:
        ctx = get_script_run_ctx()
        st.session_state["workspace:session-folder"] = SessionFolder(ctx.session_id if ctx else "nosession")
    return st.session_state["workspace:session-folder"].path


def _safe_stem(filename: str) -> str:
    """A checkpoint name from an uploaded file's name: its stem, or its folder's name for the
    generic stems trainers write (as a zoo folder names them).

    >>> _safe_stem("ft-3/model.safetensors"), _safe_stem("runs/lr 1e-4/adapter_model.bin"), _safe_stem("ft-7.pt")
    ('ft-3', 'lr_1e-4', 'ft-7')
    """
    path = PurePosixPath(filename.replace("\\", "/"))
    stem = path.name.split(".")[0] or "upload"
    if stem in GENERIC_STEMS and path.parent.name:
        stem = path.parent.name
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
        held, budget = server_upload_bytes(), upload_budget_mb()
        if held + file.size > budget * 2**20:  # not cached as refused: it may fit once others leave
            problems.append(f"{file.name}: the server already holds {megabytes(held / 2**20)} MB of uploads from all "
                            f"participants and keeps at most {megabytes(budget)} MB (SOUP_UPLOAD_BUDGET_MB); remove "
                            "an upload you no longer need, or ask the host to raise the budget")
            continue
        data = file.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        if any(u["sha256"] == digest for u in uploads.values()):
            continue
        label = file.name if file.name != reference_name else f"{file.name} (upload)"
        try:
            state = decoded(data, file.name, lambda state: validate_state_dicts(
                {reference_name: zoo.state_dict(reference_name), label: state}).raise_for_errors())
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
