"""mergekit's YAML, read and written: a merge configured for mergekit is made here, and a soup made
here can be remade at LLM scale with mergekit.

Reading (``soup merge CONFIG.yml --out DIR``): ``merge_method``, ``base_model``, ``models`` (each
``model`` a local path, relative to the current folder as mergekit takes it, with per-model
``parameters``), global ``parameters`` and ``dtype``. Methods: ``linear``, ``task_arithmetic``,
``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``slerp``,
``karcher`` and ``model_stock``. Anything this reader cannot make exactly is refused by name, never guessed:
``slices``, per-layer parameter lists (gradients) and ``filter`` entries, per-model densities
that differ, Hugging Face hub names (nothing is downloaded), an ``out_dtype`` other than the
inputs'. mergekit computes in ``dtype`` (often float32); we compute in float64 and round once.

Writing (:func:`to_mergekit`): the configuration that makes the same merge in mergekit, with
absolute paths. Soups chosen by scoring (greedy, pruned) are the uniform soup of the chosen
ingredients: mergekit's ``linear``; WiSE-FT is ``linear`` with θ0 among the models. mergekit
loads Hugging Face model folders; a configuration naming single checkpoint files says so in a
comment at its top.

>>> config = to_mergekit("ties", {"ft-0": "/z/ft-0", "ft-1": "/z/ft-1"}, [1.0, 1.0],
...                      {"density": 0.5, "lambda": 1.0, "normalize": True, "weights": ""}, "/z/base")
>>> print(config.strip())
merge_method: ties
base_model: /z/base
models:
- model: /z/ft-0
  parameters:
    weight: 1.0
- model: /z/ft-1
  parameters:
    weight: 1.0
parameters:
  density: 0.5
  lambda: 1.0
  normalize: true
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from soup_core.errors import SoupError
from soup_core.state import finite_number

# mergekit's method -> our recipe
METHODS = {"linear": "weighted", "task_arithmetic": "task-arithmetic", "ties": "ties", "dare_linear": "dare-linear",
           "dare_ties": "dare-ties", "breadcrumbs": "breadcrumbs", "breadcrumbs_ties": "breadcrumbs-ties",
           "slerp": "slerp", "model_stock": "model-stock", "karcher": "karcher"}
# recipes made by scoring or by hand whose soup is a linear merge of its ingredients
LINEAR = {"uniform", "weighted", "greedy", "pruned", "best"}
OTHERS = {"wise-ft"}  # made by mergekit as one of its methods with other parameters
TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
GLOBAL = {"normalize", "rescale", "lambda", "int8_mask", "t", "filter_wise", "density", "gamma", "weight", "max_iter",
          "tol"}
PER_MODEL = {"weight", "density", "gamma"}
DEFAULTS = {"ties": {"normalize": True}, "dare_linear": {"rescale": True}, "dare_ties": {"rescale": True}}


@dataclass(frozen=True)
class MergeConfig:
    """A mergekit configuration as one of our recipes: which, on which checkpoints, with what."""

    recipe: str
    models: dict[str, Path]  # name -> checkpoint path, in the configuration's order
    base: Path | None
    params: dict[str, Any]


def _number(value: Any, where: str) -> float:
    if isinstance(value, (list, dict)):
        raise SoupError(f"{where}: per-layer parameter lists (gradients) and filters are not supported; "
                        "give one number")
    if not finite_number(value):
        raise SoupError(f"{where} must be a number, not {value!r}")
    return float(value)


def _local(path: Any, where: str, relative_to: Path) -> Path:
    if not isinstance(path, str) or not path:
        raise SoupError(f"{where} must be a path to a local checkpoint, not {path!r}")
    found = (relative_to / path).expanduser()
    if not found.exists():
        raise SoupError(f"{where} {path!r} is not a local file or folder (soup merge downloads nothing: "
                        "give the path of a checkpoint on disk)")
    return found.resolve()


def read_mergekit(text: str, *, relative_to: Path | None = None) -> MergeConfig:
    """A mergekit YAML as a :class:`MergeConfig`; anything that cannot be made exactly is a
    :class:`SoupError` naming it. Paths are relative to ``relative_to`` (default: the current folder)."""
    relative_to = relative_to or Path.cwd()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SoupError(f"not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise SoupError("a mergekit configuration is a mapping with merge_method and models")
    if "slices" in data:
        raise SoupError("slices (layer ranges from several models) are not supported; list whole models under models")
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise SoupError(f"{', '.join(unknown)}: not supported by soup merge (it reads {', '.join(sorted(TOP_LEVEL))})")
    method = data.get("merge_method")
    if method not in METHODS:
        raise SoupError(f"merge_method {method!r} is not supported; soup merge makes {', '.join(METHODS)}")
    if data.get("tokenizer_source") not in (None, "base"):
        raise SoupError("tokenizer_source other than base is not supported (the base's tokenizer is copied)")
    models_list = data.get("models")
    if not isinstance(models_list, list) or not models_list:
        raise SoupError("models must be a list of {model: PATH, parameters: {...}}")
    glob = dict(data.get("parameters") or {})
    extra = sorted(set(glob) - GLOBAL)
    if extra:
        raise SoupError(f"parameters: {', '.join(extra)} not supported (known: {', '.join(sorted(GLOBAL))})")
    base = _local(data["base_model"], "base_model", relative_to) if data.get("base_model") else None
    models: dict[str, Path] = {}
    per_model: dict[str, dict[str, float]] = {}
    for i, entry in enumerate(models_list):
        where = f"models[{i}]"
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise SoupError(f"{where} must be a mapping with a model path")
        path = _local(entry["model"], f"{where}.model", relative_to)
        if base is not None and path == base:
            continue  # mergekit lists the base among the models for some methods; it is θ0 here
        name = path.name if path.is_dir() else path.stem
        if name in models:
            raise SoupError(f"{where}: two models are named {name!r} (the folder or file name); rename one")
        own = dict(entry.get("parameters") or {})
        if set(own) - PER_MODEL:
            raise SoupError(f"{where}.parameters: {', '.join(sorted(set(own) - PER_MODEL))} not supported per model")
        models[name] = path
        per_model[name] = {k: _number(v, f"{where}.parameters.{k}") for k, v in {**{k: glob[k] for k in PER_MODEL
                                                                                    if k in glob}, **own}.items()}
    params = _params(method, glob, per_model)
    if method == "slerp":  # from the base (t = 0) to the other model (t = 1); no θ0 besides
        if base is None or len(models) != 1:
            raise SoupError("slerp needs base_model and exactly one other model")
        return MergeConfig("slerp", {(base.name if base.is_dir() else base.stem): base, **models}, None, params)
    return MergeConfig(METHODS[method], models, base, params)


def _params(method: str, glob: Mapping[str, Any], per_model: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Our recipe's parameters from mergekit's global and per-model ones (defaults as mergekit's)."""
    glob = {**DEFAULTS.get(method, {}), **glob}
    params: dict[str, Any] = {}
    for shared in ("density", "gamma"):
        values = {m[shared] for m in per_model.values() if shared in m}
        if len(values) > 1:
            raise SoupError(f"per-model {shared} values differ ({', '.join(f'{v:g}' for v in sorted(values))}); "
                            f"soup merge takes one {shared} for all models")
        if values:
            params[shared] = values.pop()
    if method == "slerp":
        return {"t": _number(glob.get("t"), "parameters.t")}
    if method == "karcher":
        return {"max_iter": int(_number(glob.get("max_iter", 10), "parameters.max_iter")),
                "tol": _number(glob.get("tol", 1e-5), "parameters.tol")}
    if method == "model_stock":
        if glob.get("filter_wise"):
            raise SoupError("model_stock with filter_wise: true is not supported (one ratio per tensor)")
        return {}
    if any("weight" not in m for m in per_model.values()) and method != "linear":
        missing = [n for n, m in per_model.items() if "weight" not in m]
        raise SoupError(f"{method} needs a weight for every model; {', '.join(missing)} has none")
    params["weights"] = ",".join(f"{n}={m.get('weight', 1.0)!r}" for n, m in per_model.items())
    if method == "linear":
        if glob.get("normalize", True) is not True:
            raise SoupError("linear with normalize: false is not supported (the weighted soup divides by the "
                            "weights' sum)")
        return {"weights": params["weights"]}
    params["lambda"] = _number(glob.get("lambda", 1.0), "parameters.lambda")
    params["normalize"] = bool(glob.get("normalize", False))
    if method.startswith("dare"):
        params["rescale"] = "l1" if glob.get("rescale", True) else "none"
        params.setdefault("density", 1.0)
    elif glob.get("rescale"):
        raise SoupError(f"{method} with rescale: true is not supported")
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        params.setdefault("density", 1.0)
    if method.startswith("breadcrumbs"):
        params.setdefault("gamma", 0.01)
    return params


def zoo_of(config: MergeConfig, config_path: Path):
    """The configuration's checkpoints as a zoo (no evaluator), inside ``SOUP_ALLOWED_ROOTS`` when set."""
    from soup_core.zoo import Zoo
    from soup_core.zoo.manifest import CheckpointEntry, Manifest, allowed_roots_from_env, within_roots
    roots = allowed_roots_from_env()
    entries = tuple(CheckpointEntry(name, within_roots(path, roots, "model")) for name, path in config.models.items())
    base = within_roots(config.base, roots, "base_model") if config.base is not None else None
    manifest = Manifest(config_path.stem, f"mergekit configuration {config_path.name}", config_path.resolve(),
                        config_path.resolve().parent, entries, base, allowed_roots=tuple(roots) if roots else None)
    return Zoo(manifest)


def mergekit_of_export(zoo, provenance: Mapping[str, Any], local_names: Sequence[str] = ()) -> str | None:
    """The mergekit YAML of an exported soup (from its provenance), or None when mergekit cannot
    remake it: a landscape point, a learned soup, an ensemble, or uploaded checkpoints (whose
    files live only in the app's session)."""
    from soup_core.zoo.manifest import BASE
    recipe = provenance.get("recipe")
    names = [item["name"] for item in provenance.get("ingredients", [])]
    if recipe not in LINEAR | OTHERS | set(METHODS.values()) or any(n in local_names for n in names):
        return None
    paths = {n: zoo.path(n).resolve() for n in names}
    base = zoo.path(BASE).resolve() if zoo.has_base else None
    try:
        return to_mergekit(recipe, paths, provenance.get("weights", []), provenance.get("options", {}), base)
    except SoupError:  # e.g. DARE with the paper's rescale, which mergekit does not have
        return None


def to_mergekit(recipe: str, paths: Mapping[str, str | Path], weights: Sequence[float], params: Mapping[str, Any],
                base: str | Path | None) -> str:
    """The mergekit YAML that makes the same merge (absolute paths as given)."""
    names = list(paths)
    if recipe == "wise-ft":  # (1 − α)·θ0 + α·mean: a linear merge with θ0 among the models
        if base is None:
            raise SoupError("WiSE-FT needs θ0")
        return to_mergekit("weighted", {"θ0": base, **paths}, [1 - sum(weights), *weights], {}, None)
    if recipe in LINEAR:
        method, glob = "linear", {"normalize": True}
    elif recipe in METHODS.values():
        method = next(k for k, v in METHODS.items() if v == recipe)
        glob = {k: params[k] for k in ("density", "gamma", "lambda", "normalize") if k in params}
        if "rescale" in params:
            if params["rescale"] == "density":
                raise SoupError("DARE with rescale density (the paper's 1/density) has no mergekit equivalent; "
                                "use rescale l1 to export a mergekit configuration")
            glob["rescale"] = params["rescale"] == "l1"
        if recipe == "slerp":
            glob = {"t": float(params["t"])}
        if recipe == "karcher":
            glob = {"max_iter": int(params["max_iter"]), "tol": float(params["tol"])}
    else:
        raise SoupError(f"the {recipe} recipe has no mergekit equivalent")
    config: dict[str, Any] = {"merge_method": method}
    if base is not None and method not in ("linear",):
        config["base_model"] = str(base)
    if method == "slerp":
        config["base_model"] = str(paths[names[0]])
        config["models"] = [{"model": str(paths[n])} for n in names]
    elif method in ("model_stock", "karcher"):
        config["models"] = [{"model": str(paths[n])} for n in names]
    else:
        config["models"] = [{"model": str(paths[n]), "parameters": {"weight": float(w)}}
                            for n, w in zip(names, weights)]
    if glob:
        config["parameters"] = glob
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    if any(Path(p).is_file() for p in [*paths.values(), *([base] if base is not None else [])]):
        text = ("# mergekit loads Hugging Face model folders (config.json beside the weights); the checkpoints\n"
                "# named here are single files, which `soup merge` reads but mergekit does not.\n") + text
    return text
