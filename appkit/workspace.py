"""The workspace: which zoo is open, cached loaders, and the ticked ingredients (URL-shareable)."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tempfile
import weakref
import zipfile
from pathlib import Path

import pandas as pd
import streamlit as st

from soup_core.ablations import greedy_vs_models_considered, pruned_vs_passes
from soup_core.checkpoints import (CheckpointError, load_state_dict_bytes, save_hf_directory, save_state_dict,
                                   validate_state_dicts)
from soup_core.geometry import pairwise_angles
from soup_core.landscape import interpolation_path, plane_landscape, point_weights
from soup_core.pairs import pair_analyses

from soup_core.evaluate import TEST, VAL, ensemble_logits, metrics_from_logits, shift_average
from soup_core.params import num_parameters, uniform_average
from soup_core.recipes import RECIPES, SoupOptions, SoupResult
from soup_core.zoo import (ALLOWED_ROOTS_ENV, CHECKPOINT_SUFFIXES, SAMPLE_ROOT, Zoo, ZooError,
                           allowed_roots_from_env, make_soup, open_zoo, point_provenance, sample_zoos,
                           soup_provenance, zoo_plane, zoo_point)

DEFAULT_ZOO = "digits-finetune"


@st.cache_resource(show_spinner="Opening the zoo…")
def load_zoo(name: str) -> Zoo:
    """One Zoo per server (checkpoints memory-mapped, evaluator built once). Never mutate it."""
    return open_zoo(name)


def checkpoint_table(zoo: Zoo) -> pd.DataFrame:
    """Hyperparameters and accuracy (percent) on val, test and the shifts' mean, when scored."""
    return _checkpoint_table(zoo, zoo_key(zoo))


@st.cache_data(show_spinner="Scoring checkpoints…", max_entries=16)
def _checkpoint_table(_zoo: Zoo, key: tuple) -> pd.DataFrame:
    zoo = _zoo
    rows = []
    for ckpt in zoo.names:
        row = {"checkpoint": ckpt, **dict(zoo.hparams(ckpt))}
        if zoo.evaluator is not None:
            metrics = zoo.metrics(ckpt)
            row.update({s: 100 * metrics[s].accuracy for s in (VAL, TEST) if s in metrics})
            if zoo.evaluator.shift_names:
                row["shifts"] = 100 * shift_average(metrics, zoo.evaluator.shift_names)
        rows.append(row)
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


class SessionFolder:
    """A per-session temporary folder for uploads, removed when the session goes away."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="soup-uploads-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)


def _session_folder() -> Path:
    if "workspace:session-folder" not in st.session_state:
        st.session_state["workspace:session-folder"] = SessionFolder()
    return st.session_state["workspace:session-folder"].path


def _safe_stem(filename: str) -> str:
    stem = Path(filename).name.split(".")[0] or "upload"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:64]


def add_uploads(zoo: Zoo, files, limit_bytes: int, *, skip_other_files: bool = False) -> list[str]:
    """Validate uploaded checkpoints against the zoo; keep the good ones in the session folder.

    Returns one message per refused file. Nothing is ever unpickled beyond
    ``weights_only=True``, no upload is ever run as code, and nothing outside the session
    folder is written.
    """
    uploads = st.session_state.setdefault(f"workspace:uploads:{zoo.name}", {})
    problems = []
    reference_name = zoo.names[0]
    for file in files or []:
        if skip_other_files and not file.name.endswith(CHECKPOINT_SUFFIXES):
            continue  # a folder upload brings configs and notes along
        if file.size > limit_bytes:
            problems.append(f"{file.name}: {file.size / 2**20:.1f} MB is over the upload limit of "
                            f"{limit_bytes >> 20} MB (server.maxUploadSize)")
            continue
        data = file.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        if any(u["sha256"] == digest for u in uploads.values()):
            continue
        try:
            state = load_state_dict_bytes(data, file.name)
            report = validate_state_dicts({reference_name: zoo.state_dict(reference_name), file.name: state})
            report.raise_for_errors()
        except (CheckpointError, ValueError) as exc:
            message = str(exc)
            problems.append(message if message.startswith(file.name) else f"{file.name}: {message}")
            continue
        name = _safe_stem(file.name)
        while name in zoo.entries or name in uploads:
            name += "-upload"
        path = save_state_dict(state, _session_folder() / f"{name}.safetensors")
        uploads[name] = {"path": str(path), "sha256": digest, "file": file.name}
    return problems


def current_zoo(base: Zoo) -> Zoo:
    """The open zoo plus this session's uploaded checkpoints (built once per set of uploads)."""
    uploads = st.session_state.get(f"workspace:uploads:{base.name}", {})
    if not uploads:
        return base
    key = (id(base), tuple(uploads))
    cached = st.session_state.get("workspace:extended")
    if cached is None or cached[0] != key:
        cached = (key, base.extended({n: u["path"] for n, u in uploads.items()}))
        st.session_state["workspace:extended"] = cached
    return cached[1]


def app_allowed_roots() -> list[Path]:
    """Folders the app may open: ``SOUP_ALLOWED_ROOTS``, else only the built-in sample zoos."""
    return allowed_roots_from_env() or [SAMPLE_ROOT.resolve()]


@st.cache_resource(show_spinner="Opening the folder…", max_entries=16)
def load_folder_zoo(path: str, roots: tuple[Path, ...]) -> Zoo:
    zoo = open_zoo(path, allowed_roots=list(roots))
    zoo.validation.raise_for_errors()  # refuse it here, with the message, rather than fail on a page
    zoo.evaluator  # imports the manifest's model and data now: a missing module is an error here too
    return zoo


def _open_folder() -> Zoo | None:
    roots = tuple(app_allowed_roots())
    _recall("folder", st.query_params.get("folder", ""))
    folder = st.sidebar.text_input("Folder on this server (zoo.toml or checkpoint files)", key="folder",
                                   on_change=keep, args=("folder",),
                                   help="Allowed: " + ", ".join(map(str, roots)) + f" (set {ALLOWED_ROOTS_ENV})")
    if not folder:
        return None
    try:
        zoo = load_folder_zoo(folder, roots)
    except (ZooError, CheckpointError, ValueError, OSError) as exc:
        st.sidebar.error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    st.query_params["folder"] = folder
    return zoo


def sidebar() -> Zoo:
    """Open a sample zoo (default; the URL's ``?zoo=``) or a server folder; add uploads; report."""
    names = list(sample_zoos())
    wanted = st.query_params.get("zoo", DEFAULT_ZOO)
    _recall("zoo", wanted if wanted in names else DEFAULT_ZOO)
    name = st.sidebar.selectbox("Sample zoo", names, key="zoo", on_change=keep, args=("zoo",))
    st.query_params["zoo"] = name
    opened = _open_folder() or load_zoo(name)
    whole_folder = st.sidebar.toggle("Upload a whole folder", key="upload-folder")
    limit_mb = int(st.get_option("server.maxUploadSize"))
    files = st.sidebar.file_uploader(f"Add checkpoints (.safetensors, .pt, .pth, .bin; up to {limit_mb} MB each)",
                                     accept_multiple_files="directory" if whole_folder else True,
                                     key=f"upload:{opened.name}:{whole_folder}")
    for problem in add_uploads(opened, files, limit_mb << 20, skip_other_files=whole_folder):
        st.sidebar.error(problem)
    zoo = current_zoo(opened)
    st.sidebar.caption(zoo.description)
    base = " + base θ0" if zoo.has_base else " (no base θ0)"
    st.sidebar.write(f"**{len(zoo.names)} checkpoints**{base}, "
                     f"{num_parameters(zoo.state_dict(zoo.names[0])):,} parameters each")
    if zoo.evaluator is None:
        st.sidebar.info("Weights only (no model or data in the manifest): angles, uniform and Model Stock "
                        "soups and export work; scores, greedy/pruned/learned soups and landscapes need an "
                        "evaluator.")
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
    """Uniform soup, best individual and logit ensemble of ``names``: accuracy per report split."""
    evaluator = zoo.evaluator
    states = [zoo.state_dict(n) for n in names]
    soup = evaluator.evaluate(uniform_average(states))
    individual = {n: zoo.metrics(n) for n in names}
    best = max(names, key=lambda n: individual[n][VAL].accuracy)  # chosen on val, as the paper does
    ensemble = {s: metrics_from_logits(ensemble_logits([evaluator.logits(st_, s) for st_ in states]),
                                       evaluator.labels(s)) for s in evaluator.split_names}
    columns = report_columns(evaluator)

    def row(metrics):
        out = {s: metrics[s].accuracy for s in columns if s in metrics}
        if "shifts" in columns:
            out["shifts"] = shift_average(metrics, evaluator.shift_names)
        return out

    return {"soup": row(soup), "best": row(individual[best]), "best_name": best, "ensemble": row(ensemble)}


def report_columns(evaluator) -> list[str]:
    """val, test (when the data has it) and "shifts" (when there are any)."""
    return [s for s in (VAL, TEST) if s in evaluator.splits] + (["shifts"] if evaluator.shift_names else [])


def zoo_key(zoo: Zoo) -> tuple:
    """What identifies a session's zoo for caching: its name and checkpoint files."""
    return (zoo.name, *(str(zoo.path(n)) for n in zoo.names))


@st.cache_resource(show_spinner="Cooking…", max_entries=64)
def recipe_result(_zoo: Zoo, key: tuple, recipe: str, options: SoupOptions = SoupOptions()) -> SoupResult:
    """A recipe's result on the session's zoo (cached per zoo content and options; never mutate)."""
    return make_soup(_zoo, recipe, options)


@st.cache_data(show_spinner="Running the ablations…", max_entries=16)
def cached_ablations(_zoo: Zoo, key: tuple) -> tuple[list[dict], list[dict]]:
    ingredients = _zoo.ingredients()
    return (greedy_vs_models_considered(ingredients, _zoo.evaluator),
            pruned_vs_passes(ingredients, _zoo.evaluator))


def set_export(candidate: dict) -> None:
    """What the Export page will offer: a recipe's soup, the ticked set, or a landscape point."""
    st.session_state["workspace:export"] = candidate


@st.cache_data(show_spinner="Measuring angles…", max_entries=16)
def cached_angles(_zoo: Zoo, key: tuple) -> dict:
    return pairwise_angles([_zoo.state_dict(n) for n in _zoo.names], _zoo.base).to_json(_zoo.names)


@st.cache_data(show_spinner="Analysing pairs…", max_entries=16)
def cached_pairs(_zoo: Zoo, key: tuple, names: tuple[str, ...], split: str) -> dict:
    return pair_analyses(_zoo.ingredients(list(names)), _zoo.evaluator, base=_zoo.base, split=split).to_json()


@st.cache_data(show_spinner="Walking the line…", max_entries=64)
def cached_path(_zoo: Zoo, key: tuple, a: str, b: str, bn: str) -> dict:
    splits = [s for s in (VAL, TEST) if s in _zoo.evaluator.splits]
    return interpolation_path(_zoo.evaluator, zoo_point(_zoo, a)[0], zoo_point(_zoo, b)[0], names=(a, b),
                              splits=splits, bn=bn).to_json()


class ExportCandidate:
    """A soup ready to download: weights, metrics, provenance and the command that remakes it."""

    def __init__(self, title, state, metrics, provenance, command, ingredients, file_name) -> None:
        self.title, self.state, self.metrics = title, state, metrics
        self.provenance, self.command = provenance, command
        self.ingredients, self.file_name = ingredients, file_name


def export_candidate(zoo: Zoo) -> ExportCandidate:
    """Resolve what the user chose for export (default: the uniform soup of the ticked set)."""
    chosen = st.session_state.get("workspace:export") or {"kind": "ticked"}
    uploads = st.session_state.get(f"workspace:uploads:{zoo.name}", {})
    remakeable = not uploads
    if chosen["kind"] == "point":
        a, b, c = chosen["plane"]
        x, y = chosen["xy"]
        plane = zoo_plane(zoo, (a, b, c))
        state = point_weights(zoo.evaluator, plane, x, y, chosen["bn"])
        metrics = zoo.evaluator.evaluate(state)
        command = ["soup", "point", zoo.name, "--plane", a, b, c, "--xy", f"{x:.6g}", f"{y:.6g}",
                   "--bn", chosen["bn"], "--out", "point.safetensors"]
        provenance = point_provenance(zoo, (a, b, c), (x, y), chosen["bn"], metrics, " ".join(command))
        # Remakeable unless the plane uses an upload, or a soup that was made with uploads in it.
        remakeable = not any(n in uploads or (uploads and n not in zoo.entries and n != "base") for n in (a, b, c))
        return ExportCandidate(f"Landscape point ({x:.3f}, {y:.3f}) of the plane {a}, {b}, {c}", state, metrics,
                               provenance, command if remakeable else None, (a, b, c), "point.safetensors")
    if chosen["kind"] == "recipe":
        result = recipe_result(zoo, zoo_key(zoo), chosen["recipe"])
        command = ["soup", "make", chosen["recipe"], zoo.name, "--out", f"{chosen['recipe']}.safetensors"]
        title = RECIPES[chosen["recipe"]].pretty_name
    else:
        names = [n for n in zoo.names if st.session_state.get(f"workspace:{tick_key(zoo, n)}")]
        if not names:
            raise ValueError("Tick at least one ingredient on the Ingredients page, or pick a recipe's soup.")
        result = make_soup(zoo, "uniform", SoupOptions(), names)
        command = ["soup", "make", "uniform", zoo.name, "--ingredients", ",".join(names),
                   "--out", "uniform.safetensors"]
        title = f"Uniform soup of the {len(names)} ticked ingredient(s)"
        remakeable = not any(n in uploads for n in names)
    provenance = soup_provenance(zoo, result, " ".join(command))
    return ExportCandidate(title, result.state_dict, result.metrics, provenance, command if remakeable else None,
                           result.ingredients, f"{result.recipe}.safetensors")


@st.cache_data(show_spinner="Computing the landscape…", max_entries=32)
def cached_landscape(_zoo: Zoo, key: tuple, points: tuple[str, str, str], grid: int, split: str, bn: str) -> dict:
    """A plane's landscape as JSON (what ``soup landscape`` writes)."""
    return plane_landscape(_zoo.evaluator, zoo_plane(_zoo, points), grid=grid, splits=[split], bn=bn).to_json()


def hf_zip(state, provenance: dict, source: Path) -> bytes:
    """A zip of the Hugging Face folder ``save_hf_directory`` writes (input's config copied)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hf_directory(state, Path(tmp) / "soup", source=source, provenance=provenance)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(folder.iterdir()):
                archive.write(file, f"soup/{file.name}")
        return buffer.getvalue()
