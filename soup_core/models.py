"""Model factories found from the checkpoints themselves: Hugging Face directories and timm.

* A Hugging Face directory (``config.json`` beside the weights) gets the class its config
  names (``architectures[0]``, e.g. ``BertForSequenceClassification``), built **from the
  config only** (``cls(config)``: random weights, no hub, no download); the zoo's checkpoints
  supply the weights.
* A timm training checkpoint (a dict with ``arch``) gets ``timm.create_model(arch,
  pretrained=False, num_classes=...)`` with the class count read from the classifier's shape.

Both libraries are optional extras: ``pip install -e ".[hf]"`` (transformers) and ``".[timm]"``.

Hugging Face models return an output object and take keyword inputs; the factory returns a
subclass of the config's class whose ``forward(x)`` returns logits, with the same parameter
names, so state dicts apply unchanged. Text inputs are ``[N, 2, L]``: token ids and attention
mask (see :mod:`soup_core.data`); vision inputs are pixel values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from soup_core.errors import ModelError

HF_CONFIG = "config.json"


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / HF_CONFIG).is_file()


def _logits_class(cls: type) -> type:
    text = "ForSequenceClassification" in cls.__name__ or "ForTokenClassification" in cls.__name__

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
    if not names or not hasattr(transformers, names[0]):
        raise ModelError(f"{directory / HF_CONFIG}: 'architectures' must name a transformers model class, "
                         f"got {names!r}")
    cls = _logits_class(getattr(transformers, names[0]))

    def factory() -> torch.nn.Module:
        model = cls(config)
        model.eval()
        return model

    return factory


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
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip/pickle we may read: not a timm checkpoint either
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
