"""Model factories found from the checkpoints themselves: Hugging Face directories and timm.

* A Hugging Face directory (``config.json`` beside the weights) gets the class its config
  names (``architectures[0]``, e.g. ``BertForSequenceClassification``), built **from the
  config only** (``cls(config)``: random weights, no hub, no download); the zoo's checkpoints
  supply the weights.
* A timm training checkpoint (a dict with ``arch``) gets ``timm.create_model(arch,
  pretrained=False, num_classes=...)`` with the class count read from the classifier's shape.

Both libraries are optional extras: ``pip install -e ".[hf]"`` (transformers) and ``".[timm]"``.

Hugging Face models return an output object and take keyword inputs; the factory returns a
subclass of the config's class whose ``forward(x)`` returns logits. Text inputs are ``[N, 2, L]``:
token ids and attention mask (see :mod:`soup_core.data`), for classifiers and causal language
models (``…ForCausalLM``, ``…LMHeadModel``: logits ``[N, L, vocabulary]``); vision inputs are pixel values.

**Checkpoint names, a pitfall of transformers 5.** Files on disk keep the legacy tensor names
(``vit.encoder.layer.0.attention.attention.query.weight``), and transformers 5 writes them that
way too, while the module it builds from the config names the same tensor
``vit.layers.0.attention.q_proj.weight``; its ``from_pretrained`` converts between the two, a
``load_state_dict`` of the file does not. Every soup, angle, landscape and export here works in
the checkpoint's own names, so the model learns them: :func:`answer_to_checkpoint_names` asks
transformers' own conversion (``get_model_conversion_mapping``, ``rename_source_key``) where each
checkpoint tensor goes, and makes the checkpoint's path lead to that module as well (plain
attributes, so each tensor is still listed once). ``functional_call`` with checkpoint names then
fills the real module. A conversion that changes tensors (fusing, transposing) cannot be an alias and is refused
by name. transformers 4 has no such mapping: names already agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from soup_core.errors import ModelError

HF_CONFIG = "config.json"
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers")
DEPTH_FACTOR = 64  # a config may ask for this many times the layers its checkpoint stores (weight sharing)


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / HF_CONFIG).is_file()


def config_channels(folders: Iterable[Path]) -> int:
    """Image channels the first Hugging Face config among ``folders`` names (``num_channels``), else 3."""
    for folder in folders:
        if is_hf_directory(folder):
            try:
                channels = json.loads((folder / HF_CONFIG).read_text()).get("num_channels")
            except (ValueError, UnicodeDecodeError, AttributeError):
                channels = None
            return channels if channels in (1, 3) else 3
    return 3


TEXT_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForCausalLM", "LMHeadModel")


def _logits_class(cls: type) -> type:
    text = any(head in cls.__name__ for head in TEXT_HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if text:
            return cls.forward(self, input_ids=x[:, 0].long(), attention_mask=x[:, 1].long()).logits
        return cls.forward(self, pixel_values=x).logits

    return type(f"Logits{cls.__name__}", (cls,), {"forward": forward})


def hf_model_factory(directory: Path) -> Callable[[], torch.nn.Module]:
    """A factory for the model class a Hugging Face directory's config names (no weights)."""
    try:
        import transformers
    except ImportError:
        raise ModelError(f"{directory}: a Hugging Face checkpoint needs the optional extra: "
                         "pip install transformers (the [hf] extra)") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelError(f"{directory / HF_CONFIG}: not a usable config ({exc})") from None
    names = getattr(config, "architectures", None) or []
    found = getattr(transformers, names[0], None) if isinstance(names, list) and names and isinstance(
        names[0], str) and names[0].isidentifier() else None
    if not (isinstance(found, type) and issubclass(found, transformers.PreTrainedModel)):  # never `pipeline`
        raise ModelError(f"{directory / HF_CONFIG}: 'architectures' must name a transformers model class, "
                         f"got {names!r}")
    cls = _logits_class(found)
    from soup_core.io import load_state_dict  # memory-mapped: only the names are read
    checkpoint_keys = tuple(load_state_dict(directory))
    check_depth(config, checkpoint_keys, directory)

    def factory() -> torch.nn.Module:
        model = cls(config)
        answer_to_checkpoint_names(model, checkpoint_keys, directory)
        model.eval()
        return model

    return factory


def check_depth(config, keys: Iterable[str], where: Path) -> None:
    """A config asking for far more layers than its checkpoint holds is refused before the model is
    built (``num_hidden_layers = 10**7`` would allocate until memory runs out). The checkpoint's
    depth is its longest numbered block list (``encoder.layer.0 … 11``); weight-shared models
    (ALBERT: 12 layers from one stored group) stay far inside the ``DEPTH_FACTOR`` margin."""
    from soup_core.merge.lines import numbered_block
    indices: dict[str, set[int]] = {}
    for key in keys:
        found = numbered_block(key)
        if found is not None:
            indices.setdefault(found[0], set()).add(found[1])
    held = max((len(found) for found in indices.values()), default=0)
    for field in LAYER_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > DEPTH_FACTOR * max(held, 1):
            raise ModelError(f"{where / HF_CONFIG}: {field} = {value}, but the checkpoint holds {held} numbered "
                             "layers; a model built that deep would not fit in memory. Is this config the "
                             "checkpoint's own?")


def answer_to_checkpoint_names(model: torch.nn.Module, keys: Iterable[str], where: Path | str = "") -> int:
    """Register ``model``'s modules under the paths the checkpoint names their tensors by, as
    transformers' own loading conversion maps them; returns how many tensors needed it."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: the checkpoint's names are the model's
        return 0
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    own = model.state_dict()
    aliased = 0
    for key in keys:
        if key in own:
            continue
        target, converted = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None),
                                              own)
        if converted is not None:
            raise ModelError(f"{where}: transformers converts {key!r} into {target!r} by changing the tensor "
                             "(not only its name) when it loads; soups of this architecture cannot be scored here yet")
        if target not in own:
            if _ignored_on_load(model, target):  # e.g. old files' position_ids: from_pretrained drops them too
                continue
            raise ModelError(f"{where}: the checkpoint's {key!r} has no place in {type(model).__name__} "
                             f"(transformers maps it to {target!r}); is the config the checkpoint's own?")
        _alias(model, key, target)
        aliased += 1
    return aliased


def _ignored_on_load(model: torch.nn.Module, name: str) -> bool:
    """Whether ``from_pretrained`` drops a checkpoint tensor of this name: a buffer the model does
    not save (``persistent=False``) or a key its class lists in ``_keys_to_ignore_on_load_unexpected``."""
    if name in dict(model.named_buffers()):
        return True
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    return any(re.search(pattern, name) for pattern in patterns)


def _alias(model: torch.nn.Module, key: str, target: str) -> None:
    """Make ``key``'s module path lead to the module that holds ``target`` (same leaf name).

    The path is made of plain attributes, not registered submodules: ``named_parameters`` and
    ``state_dict`` still list each tensor once, under the model's name, so ``functional_call``
    sees no tied pair — it would swap the one attribute twice and restore it wrongly — while its
    dotted-name lookup (``getattr``) follows the checkpoint's name to the real module."""
    path, _, leaf = key.rpartition(".")
    target_path, _, target_leaf = target.rpartition(".")
    if leaf != target_leaf:
        raise ModelError(f"{key!r} becomes {target!r}: a renamed tensor inside one module cannot be aliased")
    if not path or not target_path:
        raise ModelError(f"{key!r} becomes {target!r}: a tensor of the model itself cannot be aliased")
    holder = model.get_submodule(target_path)
    parent = model
    parts = path.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        child = getattr(parent, part, None)
        if child is None:
            child = holder if last else torch.nn.Module()
            object.__setattr__(parent, part, child)  # an attribute, not a registered submodule
        elif not isinstance(child, torch.nn.Module) or (last and child is not holder):
            raise ModelError(f"{key!r}: {part!r} is already something else in {type(parent).__name__}")
        parent = child


def timm_model_factory(arch: str, num_classes: int) -> Callable[[], torch.nn.Module]:
    """``timm.create_model(arch, pretrained=False, num_classes=...)`` — never a download."""
    try:
        import timm
    except ImportError:
        raise ModelError(f"a timm checkpoint (arch {arch!r}) needs the optional extra: "
                         "pip install timm (the [timm] extra)") from None
    return lambda: timm.create_model(arch, pretrained=False, num_classes=num_classes)


def timm_arch(path: Path) -> str | None:
    """The ``arch`` a timm training checkpoint records, or None (read with weights_only=True)."""
    if path.suffix not in (".pth", ".pt", ".tar") and not path.name.endswith(".pth.tar"):
        return None
    from soup_core.errors import CheckpointError
    from soup_core.io.read import _torch_load
    try:  # the safe reader: timm's train.py saves its argparse Namespace beside the weights
        data = _torch_load(path, str(path))
    except CheckpointError:  # not a pickle we may read: not a timm checkpoint either
        return None
    arch = data.get("arch") if isinstance(data, dict) else None
    return arch if isinstance(arch, str) else None


def classifier_classes(state: dict[str, torch.Tensor]) -> int:
    """Number of classes: rows of the last 2-D weight (timm's classifier comes last)."""
    weights = [t for k, t in state.items() if k.endswith("weight") and t.dim() == 2]
    if not weights:
        raise ModelError("cannot find a classifier weight to count the classes")
    return int(weights[-1].shape[0])


def detect_model_factory(first_checkpoint: Path, state: dict[str, torch.Tensor]) -> Callable[[], torch.nn.Module] | None:
    """A factory for a Hugging Face directory or a timm checkpoint; None when neither."""
    if is_hf_directory(first_checkpoint):
        return hf_model_factory(first_checkpoint)
    arch = timm_arch(first_checkpoint)
    if arch is not None:
        return timm_model_factory(arch, classifier_classes(state))
    return None
