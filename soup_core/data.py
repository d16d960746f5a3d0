"""Built-in data evaluators for user zoos: a table, an image folder, or a text CSV.

A manifest's ``[data]`` table names the kind and one file (or folder) per split; ``val``
drives the recipes, ``test`` reports, every ``[data.shifts]`` entry is a distribution shift and
``train`` (optional) is used only for BatchNorm statistics in landscapes::

    [data]
    kind = "table"            # "table" (CSV or Parquet), "images" (one subfolder per class), "text", "lm"
    label = "label"           # the label column (table, text)
    val = "data/val.csv"
    test = "data/test.csv"
    train = "data/train.csv"  # optional
    [data.shifts]
    noisy = "data/noisy.csv"

Options: ``features = [...]`` (table; default every column but the label), ``size`` /
``mean`` / ``std`` (images: resize to size×size, then normalise per channel; defaults 32,
0.5, 0.5), ``channels`` (images: 1 for grayscale, 3 for RGB; default the checkpoint config's
``num_channels`` when there is one, else 3), ``text`` / ``max_length`` (text; the tokenizer is
read from the first checkpoint directory that has one, never from a hub).

``kind = "lm"`` scores a causal language model on text: each split is a ``.txt`` file (one
sequence a line; empty lines skipped) or a ``.jsonl`` file (one object a line, its ``text``
field, or the field ``text = "..."`` names). Each sequence is tokenised as the checkpoint's
tokenizer does by default (``tokenizer(text)``, its special tokens included) and truncated to
``max_length`` tokens (default 512); every next token is one prediction (padding never counts),
so accuracy is next-token accuracy, loss the token-weighted mean cross-entropy (perplexity is
its exp) and ECE is per token. Significance tests count tokens as the unit, which overstates
the evidence when tokens of one sequence err together: read a small p-value on a few
sequences with that in mind.

Class names are sorted and numbered once over every split, so label ids agree between them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soup_core.errors import DataError
from soup_core.evaluate import Evaluator, Split
from soup_core.io.read import short
from soup_core.state import finite_number

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
KINDS = ("table", "images", "text", "lm")
UNITS = {"table": "rows", "images": "images", "text": "texts", "lm": "tokens"}  # one prediction, in words
MAX_LM_LENGTH = 1 << 16  # tokens per sequence
LM_BATCH_LOGITS = 1 << 26  # floats of next-token logits per batch (256 MB in float32)
MAX_IMAGE_SIDE = 4096  # pixels; and the images must fit in memory (checked before any is read)


def check_fields(spec: Mapping[str, Any]) -> None:
    """Each optional ``[data]`` field has its type and range, refused in one line before any file is read."""
    for key in ("label", "text"):
        if key in spec and not isinstance(spec[key], str):
            raise DataError(f"[data] {key} must be a column name (a string), not {spec[key]!r}")
    features = spec.get("features")
    if features is not None and not (isinstance(features, list) and all(isinstance(f, str) for f in features)):
        raise DataError(f"[data] features must be a list of column names, not {features!r}")
    for key in ("mean", "std"):
        value = spec.get(key, 0.5)
        values = value if isinstance(value, list) else [value]
        if not (1 <= len(values) <= 3 and all(map(finite_number, values))) or (key == "std" and min(values) <= 0):
            raise DataError(f"[data] {key} must be a {'positive ' if key == 'std' else ''}number or a list of one "
                            f"per channel, not {value!r}")
    length = spec.get("max_length", 1)
    if not (isinstance(length, int) and not isinstance(length, bool) and 1 <= length <= MAX_LM_LENGTH):
        raise DataError(f"[data] max_length must be a whole number of tokens from 1 to {MAX_LM_LENGTH}, not {length!r}")


def split_specs(spec: Mapping[str, Any]) -> dict[str, str]:
    """Each split's path as the manifest writes it (relative to the zoo)."""
    if "val" not in spec:
        raise DataError("[data] needs a 'val' split: recipes choose on held-out data")
    shifts = spec.get("shifts", {})
    if not isinstance(shifts, Mapping):
        raise DataError(f"[data] shifts must be a table of name = \"path\" ([data.shifts]), not {shifts!r}")
    names = {"val": spec["val"], **({"test": spec["test"]} if "test" in spec else {}), **shifts}
    if "train" in spec:
        names["train"] = spec["train"]
    wrong = next((name for name, p in names.items() if not isinstance(p, str)), None)
    if wrong is not None:
        raise DataError(f"[data] split {wrong!r} must be a path (a string), not {names[wrong]!r}")
    return dict(names)


def _split_paths(spec: Mapping[str, Any], resolve: Callable[[str], Path]) -> dict[str, Path]:
    return {name: resolve(p) for name, p in split_specs(spec).items()}


def _read_table(path: Path):
    import pandas as pd
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for unreadable files
        raise DataError(f"{path}: not a readable table ({type(exc).__name__}: {exc})") from None


def _label_ids(frames: Mapping[str, Any], label: str) -> dict[Any, int]:
    for name, frame in frames.items():
        if label not in frame.columns:
            raise DataError(f"split {name!r} has no label column {label!r}; columns: {', '.join(map(str, frame.columns))}")
    classes = sorted({v for frame in frames.values() for v in frame[label].tolist()}, key=str)
    return {c: i for i, c in enumerate(classes)}


def table_splits(spec: Mapping[str, Any], resolve: Callable[[str], Path]) -> dict[str, Split]:
    """Numeric feature columns → float32 inputs; the label column → class ids."""
    label = spec.get("label", "label")
    frames = {name: _read_table(path) for name, path in _split_paths(spec, resolve).items()}
    ids = _label_ids(frames, label)
    features = spec.get("features") or [c for c in next(iter(frames.values())).columns if c != label]
    out = {}
    for name, frame in frames.items():
        missing = [c for c in features if c not in frame.columns]
        if missing:
            raise DataError(f"split {name!r} lacks feature column(s) {', '.join(map(str, missing))}")
        try:
            x = frame[features].to_numpy(dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise DataError(f"split {name!r}: feature columns must be numeric ({exc})") from None
        y = np.array([ids[v] for v in frame[label].tolist()], dtype=np.int64)
        out[name] = Split(torch.from_numpy(x), torch.from_numpy(y))
    return out


def _check_fits(folders: Mapping[str, Path], classes: list[str], size: int, channels: int) -> None:
    """The images at ``size`` must fit in memory twice over (decoded, then stacked): else one line, before any is read."""
    from soup_core.memory import free_memory
    count = sum(1 for folder in folders.values() for cls in classes if (folder / cls).is_dir()
                for file in (folder / cls).iterdir() if file.suffix.lower() in IMAGE_SUFFIXES)
    need, free = 2 * count * channels * size * size * 4, free_memory(torch.device("cpu"))
    if need > free:
        raise DataError(f"[data] size = {size}: {count} images at {size}×{size}×{channels} take {need / 1e9:.1f} GB "
                        f"to load and {free / 1e9:.1f} GB is free; choose the size the model was trained at")


def image_splits(spec: Mapping[str, Any], resolve: Callable[[str], Path],
                 default_channels: int = 3, inside: Callable[[Path], object] = Path) -> dict[str, Split]:
    """Folders with one subfolder per class → normalised [N, C, size, size] float32, C = ``channels``.
    ``inside(file)`` checks every image before it is opened (a server's allowed roots: an image that
    is a link out of them is refused like any other file)."""
    from PIL import Image, UnidentifiedImageError
    size = spec.get("size", 32)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_IMAGE_SIDE:
        raise DataError(f"[data] size must be a whole number of pixels from 1 to {MAX_IMAGE_SIDE}, not {size!r}")
    channels = spec.get("channels", default_channels)
    if channels not in (1, 3):
        raise DataError(f"[data] channels must be 1 (grayscale) or 3 (RGB), not {channels!r}")
    mode = "L" if channels == 1 else "RGB"
    folders = _split_paths(spec, resolve)
    classes = sorted({d.name for f in folders.values() if f.is_dir() for d in f.iterdir() if d.is_dir()})
    if not classes:
        raise DataError("image folders need one subfolder per class")
    _check_fits(folders, classes, size, channels)
    ids = {c: i for i, c in enumerate(classes)}
    mean = np.asarray(spec.get("mean", 0.5), dtype=np.float32)
    std = np.asarray(spec.get("std", 0.5), dtype=np.float32)
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise DataError(f"[data] mean and std need one number, or one per channel ({channels}); got "
                        f"{spec.get('mean', 0.5)!r} and {spec.get('std', 0.5)!r}")
    out = {}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise DataError(f"split {name!r}: {folder} is not a folder")
        images, labels = [], []
        for cls in classes:
            for file in sorted((folder / cls).glob("*")) if (folder / cls).is_dir() else []:
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                inside(file)
                try:
                    with Image.open(file) as img:
                        array = np.asarray(img.convert(mode).resize((size, size)), dtype=np.float32) / 255.0
                    array = array.reshape(size, size, channels)
                except (UnidentifiedImageError, OSError) as exc:
                    raise DataError(f"{file}: not a readable image ({exc})") from None
                images.append((array - mean) / std)
                labels.append(ids[cls])
        if not images:
            raise DataError(f"split {name!r}: no images under {folder}")
        x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
        out[name] = Split(x, torch.tensor(labels))
    return out


def _tokenizer(tokenizer_dir: Path | None, inside: Callable[[Path], object] = Path):
    """The checkpoint folder's own tokenizer (local files only: never a hub).

    Every file of the folder is checked first (``inside``: the allowed roots, symlinks resolved) and
    must be a regular file: transformers picks which of them to read, so a ``tokenizer.json`` linked
    to a file outside the roots, or a FIFO, never reaches it. A tokenizer's files are parsed by
    transformers and tokenizers, which fail in many ways on bad ones: each is one line here.
    """
    if tokenizer_dir is None:
        raise DataError("text data needs a tokenizer saved in a checkpoint directory (tokenizer.json)")
    for file in sorted(tokenizer_dir.iterdir()):
        try:
            if file.is_dir():
                continue
            inside(file)
            regular = file.resolve().is_file()
        except (OSError, RuntimeError):  # a link to itself (RuntimeError before Python 3.13)
            regular = False
        if not regular:
            raise DataError(f"{file}: not a regular file (a link to nothing or to itself, a FIFO or a device), in "
                            "the folder whose tokenizer the data is read with; remove it")
    _refuse_paths_in_tokenizer_config(tokenizer_dir)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("text data needs the optional extra: pip install transformers (the [hf] extra)") from None
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:  # KeyError, AttributeError, tokenizers' bare Exception, ... from hostile files
        raise DataError(f"{tokenizer_dir}: not a readable tokenizer ({type(exc).__name__}: {short(exc)})") from None


def _refuse_paths_in_tokenizer_config(tokenizer_dir: Path) -> None:
    """Older transformers open a ``tokenizer_config.json``'s ``*_file`` entries as written: only plain
    names of files beside it are taken (transformers 5 ignores such paths itself)."""
    import json
    try:
        config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # none, or unreadable: transformers says which
    for key, value in (config.items() if isinstance(config, dict) else ()):
        if key.endswith("_file") and isinstance(value, str) and (Path(value).name != value or value in (".", "..")):
            raise DataError(f"{tokenizer_dir / 'tokenizer_config.json'}: {key} = {value!r} points outside the "
                            "tokenizer's folder; a tokenizer's files are read from its own folder only")


def check_vocabulary(model: torch.nn.Module, splits: Mapping[str, Split], tokenizer_dir: Path | None) -> None:
    """Token ids past the model's embedding rows mean the tokenizer is another model's: say so, not
    "index out of range" from the first forward pass."""
    try:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # transformers' default for a model without one
        return
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    for name, split in splits.items():
        top = int(split.inputs[:, 0].max())
        if top >= rows:
            raise DataError(f"split {name!r} holds token id {top:,}, but the model's vocabulary has {rows:,} ids "
                            f"(its input embeddings): the tokenizer in {tokenizer_dir} is not this model's")


def text_splits(spec: Mapping[str, Any], resolve: Callable[[str], Path], tokenizer_dir: Path | None,
                inside: Callable[[Path], object] = Path) -> dict[str, Split]:
    """A text column tokenised with the checkpoint's own tokenizer → [N, 2, L] (ids, mask)."""
    tokenizer = _tokenizer(tokenizer_dir, inside)
    label, column = spec.get("label", "label"), spec.get("text", "text")
    max_length = int(spec.get("max_length", 128))
    frames = {name: _read_table(path) for name, path in _split_paths(spec, resolve).items()}
    ids = _label_ids(frames, label)
    out = {}
    for name, frame in frames.items():
        if column not in frame.columns:
            raise DataError(f"split {name!r} has no text column {column!r}")
        encoded = tokenizer([str(t) for t in frame[column].tolist()], padding="max_length", truncation=True,
                            max_length=max_length, return_tensors="pt")
        x = torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1)
        y = torch.tensor([ids[v] for v in frame[label].tolist()])
        out[name] = Split(x, y)
    return out


def read_sequences(path: Path, field: str = "text") -> list[str]:
    """The sequences of one ``lm`` split: a ``.txt`` file's non-empty lines, or a ``.jsonl`` file's ``field``."""
    import json
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable UTF-8 text file ({short(exc)})") from None
    if path.suffix.lower() == ".txt":
        texts = [line for line in lines if line.strip()]
    elif path.suffix.lower() == ".jsonl":
        texts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}, line {number}: not JSON ({short(exc)})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}, line {number}: needs a string field {field!r}")
            texts.append(record[field])
    else:
        raise DataError(f"{path}: lm data is a .txt file (one sequence a line) or a .jsonl file (a {field!r} field)")
    if not texts:
        raise DataError(f"{path}: no sequences")
    return texts


def next_token_split(token_ids: list[list[int]]) -> Split:
    """Token sequences → inputs [N, 2, L] (ids, mask; right-padded) and next-token labels [N, L].

    ``labels[i, t]`` is token ``t + 1`` of sequence ``i``; the last token of each sequence and the
    padding are :data:`~soup_core.evaluate.IGNORE_INDEX`::

        >>> split = next_token_split([[5, 6, 7], [8]])
        >>> split.inputs[:, 0].tolist(), split.labels.tolist(), split.predictions
        ([[5, 6, 7], [8, 0, 0]], [[6, 7, -100], [-100, -100, -100]], 2)
    """
    from soup_core.evaluate import IGNORE_INDEX
    length = max(len(ids) for ids in token_ids)
    ids = torch.zeros(len(token_ids), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, sequence in enumerate(token_ids):
        ids[i, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[i, :len(sequence)] = 1
        labels[i, :len(sequence) - 1] = ids[i, 1:len(sequence)]
    return Split(torch.stack([ids, mask], dim=1), labels)


def lm_splits(spec: Mapping[str, Any], resolve: Callable[[str], Path], tokenizer) -> dict[str, Split]:
    """Text files tokenised by the checkpoint's tokenizer → next-token splits (see :func:`next_token_split`)."""
    max_length = spec.get("max_length", 512)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 2 <= max_length <= MAX_LM_LENGTH:
        raise DataError(f"[data] max_length must be a whole number of tokens from 2 to {MAX_LM_LENGTH}, not {max_length!r}")
    field = str(spec.get("text", "text"))
    out = {}
    for name, path in _split_paths(spec, resolve).items():
        encoded = tokenizer(read_sequences(path, field), truncation=True, max_length=max_length)["input_ids"]
        if not any(len(ids) > 1 for ids in encoded):
            raise DataError(f"split {name!r}: no sequence has two tokens, so there is no next token to predict")
        out[name] = next_token_split(encoded)
    return out


def data_evaluator(spec: Mapping[str, Any], model_factory: Callable[[], torch.nn.Module],
                   resolve: Callable[[str], Path], *, tokenizer_dir: Path | None = None,
                   default_channels: int = 3, device: str | None = None, batch_size: int = 1024,
                   inside: Callable[[Path], object] = Path) -> Evaluator:
    """An Evaluator over the splits a manifest's ``[data]`` table describes; ``resolve`` finds (and
    checks) each split's path, ``inside`` checks each file found in a split's folder."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise DataError(f"[data] kind must be one of {', '.join(KINDS)}, not {kind!r}")
    check_fields(spec)
    if kind == "table":
        splits = table_splits(spec, resolve)
    elif kind == "images":
        splits = image_splits(spec, resolve, default_channels, inside)
    elif kind == "lm":
        tokenizer = _tokenizer(tokenizer_dir, inside)
        splits = lm_splits(spec, resolve, tokenizer)
        # A batch's logits are sequences × length × vocabulary floats: at most LM_BATCH_LOGITS of them.
        length = max(s.labels.shape[1] for s in splits.values())
        batch_size = max(1, min(batch_size, LM_BATCH_LOGITS // (length * len(tokenizer))))
    else:
        splits = text_splits(spec, resolve, tokenizer_dir, inside)
    train = splits.pop("train", None)
    evaluator = Evaluator(model_factory, splits, train=train, device=device, batch_size=batch_size,
                          info={"data": kind, "splits": split_specs(spec),  # provenance: paths relative to the zoo
                                "unit": UNITS[kind]})
    if kind in ("lm", "text"):
        check_vocabulary(evaluator.model, {**splits, **({"train": train} if train else {})}, tokenizer_dir)
    return evaluator
