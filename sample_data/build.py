"""Regenerate the sample zoos: ``python -m sample_data.build`` (CPU, deterministic, ~1 minute).

* ``digits-finetune`` — an MLP pretrained on a related source task (the digits transposed:
  same classes, different pixel layout), a linear-probe head (paper §3, "LP init"), and
  32 models fine-tuned end to end by a random hyperparameter search in the spirit of the
  paper's App. J.2.1: learning rate over a wide log range that includes too-high values,
  weight decay, epochs, label smoothing, augmentation strength, optimiser and seed.
* ``digits-scratch`` — 8 MLPs trained from different random initialisations; no shared θ0.
* ``digits-bn`` — a small CNN with BatchNorm, pretrained the same way and fine-tuned by a
  12-model sweep.
* ``digits-soup`` — the paper's conditions: θ0 pretrained on a larger re-rendered source,
  LP-FT, and a sweep of good runs (see :mod:`sample_data.paper` for the protocol).

Each zoo is a ``zoo.toml`` plus safetensors files; every checkpoint's hyperparameters are in
the manifest and in the file's provenance metadata.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import tomli_w
import torch
from torch import nn

from sample_data.digits import load_splits, make_bn_cnn, make_mlp
from sample_data.training import PRETRAIN_SEED, HParams, linear_probe, train
from soup_core.io import save_state_dict
from soup_core.state import StateDict

ROOT = Path(__file__).resolve().parent


def pretrain(factory: Callable[[], nn.Module]) -> nn.Module:
    """θ0: pretrain on the source task, then fit a linear-probe head on the target task."""
    splits = load_splits()
    x, y = splits["train"].inputs, splits["train"].labels
    torch.manual_seed(PRETRAIN_SEED)
    model = factory()
    source = x.transpose(2, 3)  # the related source task: transposed digits
    train(model, source, y, HParams(3e-3, 1e-4, 30, 0.0, 1, "adamw", PRETRAIN_SEED))
    return linear_probe(model, x, y)


def sample_hparams(rng: random.Random, index: int, sweep_seed: int) -> HParams:
    """Random search (paper App. J.2.1): log-uniform lr from 1e-5 to 1e-2 (AdamW; ×10 for
    SGD), the upper decade deliberately too high for fine-tuning. Runs that diverge to
    NaN are re-drawn by :func:`finetune_sweep`, as a real sweep would discard them."""
    optimizer = rng.choice(["adamw", "adamw", "sgd"])
    lr = 10 ** rng.uniform(-5.0, -2.0) * (10.0 if optimizer == "sgd" else 1.0)
    return HParams(lr=float(f"{lr:.3g}"),
                   weight_decay=float(f"{10 ** rng.uniform(-5.0, -1.0):.3g}"),
                   epochs=rng.choice([5, 10, 20, 30]),
                   label_smoothing=rng.choice([0.0, 0.1, 0.2]),
                   augmentation=rng.choice([0, 1, 2]),
                   optimizer=optimizer,
                   seed=sweep_seed * 1000 + index)


def finetune_sweep(theta0: nn.Module, factory: Callable[[], nn.Module], count: int,
                   sweep_seed: int, prefix: str = "ft") -> dict[str, tuple[StateDict, HParams]]:
    """Fine-tune ``count`` copies of θ0 end to end, each with sampled hyperparameters."""
    splits = load_splits()
    rng = random.Random(sweep_seed)
    out = {}
    for i in range(count):
        while True:  # a run whose weights diverged to NaN/Inf is discarded and re-drawn
            hp = sample_hparams(rng, i, sweep_seed)
            model = factory()
            model.load_state_dict(theta0.state_dict())
            train(model, splits["train"].inputs, splits["train"].labels, hp)
            if all(bool(torch.isfinite(p).all()) for p in model.state_dict().values()):
                break
        out[f"{prefix}-{i:02d}"] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, hp)
    return out


def scratch_models(count: int) -> dict[str, tuple[StateDict, HParams]]:
    splits = load_splits()
    out = {}
    for i in range(count):
        hp = HParams(3e-3, 1e-4, 30, 0.0, 1, "adamw", 5000 + i)
        torch.manual_seed(hp.seed)  # a different random initialisation for every model
        model = train(make_mlp(), splits["train"].inputs, splits["train"].labels, hp)
        out[f"scratch-{i:02d}"] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, hp)
    return out


def write_zoo(name: str, description: str, model: str, base: StateDict | None,
              models: dict[str, tuple[StateDict, HParams]]) -> Path:
    folder = ROOT / name
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    manifest: dict = {"name": name, "description": description, "model": model,
                      "evaluator": "sample_data.digits:make_evaluator"}
    if base is not None:
        save_state_dict(base, folder / "base.safetensors", provenance={"role": "base"})
        manifest["base"] = "base.safetensors"
    manifest["checkpoints"] = []
    for ckpt_name, (state, hp) in models.items():
        path = f"checkpoints/{ckpt_name}.safetensors"
        save_state_dict(state, folder / path, provenance={"hparams": asdict(hp)})
        manifest["checkpoints"].append({"name": ckpt_name, "path": path, "hparams": asdict(hp)})
    (folder / "zoo.toml").write_text(tomli_w.dumps(manifest))
    return folder


ZOOS = ("digits-finetune", "digits-scratch", "digits-bn", "digits-soup")


def main(argv: list[str] | None = None) -> None:
    from sample_data.paper import good_sweep, pretrain_on_source
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-seed", type=int, default=0)
    parser.add_argument("--only", choices=ZOOS, action="append", help="build only these zoos (default: all)")
    args = parser.parse_args(argv)
    wanted = set(args.only or ZOOS)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    if "digits-finetune" in wanted:
        mlp0 = pretrain(make_mlp)
        write_zoo("digits-finetune",
                  "MLP pretrained on transposed digits, linear-probe head, 32 fine-tunings from a random "
                  "hyperparameter search (paper App. J.2.1).", "sample_data.digits:make_mlp",
                  mlp0.state_dict(), finetune_sweep(mlp0, make_mlp, 32, args.sweep_seed))
    if "digits-scratch" in wanted:
        write_zoo("digits-scratch", "8 MLPs trained from different random initialisations (no shared θ0).",
                  "sample_data.digits:make_mlp", None, scratch_models(8))
    if "digits-bn" in wanted:
        cnn0 = pretrain(make_bn_cnn)
        write_zoo("digits-bn", "CNN with BatchNorm, pretrained on transposed digits, 12 fine-tunings.",
                  "sample_data.digits:make_bn_cnn", cnn0.state_dict(),
                  finetune_sweep(cnn0, make_bn_cnn, 12, args.sweep_seed, prefix="bn"))
    if "digits-soup" in wanted:
        soup0 = pretrain_on_source()
        write_zoo("digits-soup",
                  "The paper's conditions: MLP pretrained on 24 re-renderings of each training digit, LP-FT, "
                  "32 fine-tunings from a sweep of good settings (paper §3, App. J.2.1).",
                  "sample_data.digits:make_mlp", soup0.state_dict(), good_sweep(soup0, 32, args.sweep_seed))
    print(f"built {', '.join(sorted(wanted))} under {ROOT} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
