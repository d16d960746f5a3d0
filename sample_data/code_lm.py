"""The ``code-lm`` sample zoo: a small GPT-2 and 16 fine-tunings of it on Python's own source.

``python -m sample_data.code_lm`` (CPU, seeded, about two minutes; needs transformers, tokenizers
and peft, which the app itself does not need to *read* the zoo). The protocol:

1. **Text**: the standard library of the interpreter that builds the zoo, in disjoint parts:

   * pretraining: the top-level modules (``Lib/*.py``);
   * the target task: the ``asyncio`` package, split **by file** (a seeded shuffle) into train
     (60%), val (20%) and test (20%), so no val or test text was ever trained on;
   * distribution shifts: the ``email`` and ``json`` packages.

   Evaluation sequences are runs of whole lines of up to :data:`SEQUENCE_CHARS` characters, at
   most :data:`SEQUENCES` per split spread over its files, written to ``data/*.jsonl`` and
   committed (another Python's library differs).
2. **Tokenizer**: byte-level BPE (``tokenizers``) with :data:`VOCABULARY` tokens, trained on the
   pretraining part only; saved in ``base/`` with ``save_pretrained``.
3. **θ0**: GPT-2 (:data:`GPT`: 4 layers, width 128, a 64-token context, ≈0.93 M parameters, no
   dropout) trained from scratch on the pretraining part, saved with ``save_pretrained``.
4. **Fine-tunings** on the target's train files: :data:`FULL` full fine-tunings and
   :data:`ADAPTERS` LoRA adapters written by PEFT, from a seeded sweep of learning rate and
   steps, and for the adapters rank, α, rsLoRA and target modules. Each run's settings are in
   the manifest. Nothing is chosen on val or test: every run of the sweep is kept.

A soup of this zoo averages full fine-tunings with adapters' updates B·A, exactly (soup_core.io.lora).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w
import torch

ROOT = Path(__file__).resolve().parent / "code-lm"
SEED = 0
VOCABULARY = 1024
CONTEXT = 64
GPT = {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": CONTEXT, "resid_pdrop": 0.0,
       "embd_pdrop": 0.0, "attn_pdrop": 0.0}
SEQUENCE_CHARS, SEQUENCES = 240, 48
TARGET, SHIFTS = "asyncio", ("email", "json")
PRETRAIN_STEPS, BATCH = 1000, 16
FULL, ADAPTERS = 3, 13
END = "<|endoftext|>"


@dataclass(frozen=True)
class Run:
    """One fine-tuning of θ0: full (``rank`` 0) or a LoRA adapter."""

    lr: float
    steps: int
    seed: int
    rank: int = 0
    alpha: int = 0
    rslora: bool = False
    targets: str = ""


def library() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def package_files(name: str) -> list[Path]:
    return sorted(p for p in (library() / name).rglob("*.py") if "test" not in p.parts and "__pycache__" not in p.parts)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def sequences(files: list[Path], count: int = SEQUENCES) -> list[str]:
    """Runs of whole lines up to SEQUENCE_CHARS characters, taken evenly over the files' runs."""
    runs = []
    for path in files:
        current = ""
        for line in read(path).splitlines(keepends=True):
            if current and len(current) + len(line) > SEQUENCE_CHARS:
                if current.strip():
                    runs.append(current)
                current = ""
            current += line[:SEQUENCE_CHARS]
    step = max(1, len(runs) // count)
    return runs[::step][:count]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def target_split(seed: int = SEED) -> dict[str, list[Path]]:
    files = package_files(TARGET)
    random.Random(seed).shuffle(files)
    cut1, cut2 = int(0.6 * len(files)), int(0.8 * len(files))
    return {"train": sorted(files[:cut1]), "val": sorted(files[cut1:cut2]), "test": sorted(files[cut2:])}


def train_tokenizer(texts: list[str]):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=VOCABULARY, min_frequency=2, special_tokens=[END], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=END, eos_token=END, unk_token=END,
                                   model_max_length=CONTEXT)


def blocks(tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts' tokens, end to end with END between files, cut into CONTEXT-token rows."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = len(ids) // CONTEXT
    return torch.tensor(ids[:rows * CONTEXT]).view(rows, CONTEXT)


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    """AdamW on random CONTEXT-token rows: linear warm-up over the first tenth, then linear decay to 0."""
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min((s + 1) / warm, (steps - s) / (steps - warm + 1)))
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (BATCH,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        schedule.step()
    model.eval()


def sweep(seed: int = SEED) -> dict[str, Run]:
    """FULL full fine-tunings and ADAPTERS LoRA adapters, settings drawn from a seeded sweep."""
    rng = random.Random(seed)
    runs = {}
    for i in range(FULL):
        runs[f"full-{i:02d}"] = Run(lr=float(f"{10 ** rng.uniform(-4, -3):.3g}"), steps=rng.choice([60, 100]),
                                    seed=100 + i)
    for i in range(ADAPTERS):
        rank = rng.choice([4, 8, 16])
        runs[f"lora-{i:02d}"] = Run(lr=float(f"{10 ** rng.uniform(-3, -2.3):.3g}"), steps=rng.choice([60, 100]),
                                    seed=200 + i, rank=rank, alpha=rng.choice([rank, 2 * rank]),
                                    rslora=rng.random() < 0.25,
                                    targets=rng.choice(["c_attn", "c_attn,c_proj", "c_attn,c_proj,c_fc"]))
    return runs


def finetune(base: Path, data: torch.Tensor, run: Run, out: Path) -> None:
    from transformers import GPT2LMHeadModel
    torch.manual_seed(run.seed)
    model = GPT2LMHeadModel.from_pretrained(str(base), local_files_only=True)
    if run.rank == 0:
        train(model, data, run.steps, run.lr, run.seed)
        model.save_pretrained(out)
        return
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=run.rank, lora_alpha=run.alpha, use_rslora=run.rslora, lora_dropout=0.0,
                        target_modules=run.targets.split(","), fan_in_fan_out=True)  # GPT-2's Conv1D is [in, out]
    peft_model = get_peft_model(model, config)
    train(peft_model, data, run.steps, run.lr, run.seed)
    peft_model.save_pretrained(out)
    settings = json.loads((out / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = "../../base"  # the zoo's own base, not this build's absolute path
    (out / "adapter_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def build(root: Path = ROOT, seed: int = SEED) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel
    if root.exists() and not (root / "zoo.toml").is_file():
        raise SystemExit(f"{root} exists and is not a zoo this builder made; choose another --out")
    if root.exists() and 'name = "code-lm"' not in (root / "zoo.toml").read_text(errors="replace"):
        raise SystemExit(f"{root} holds another zoo; choose another --out")
    torch.manual_seed(seed)
    pretrain_texts = [read(p) for p in sorted(library().glob("*.py"))]
    target = target_split(seed)
    tokenizer = train_tokenizer(pretrain_texts)
    staging = root.with_name(root.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "data").mkdir(parents=True)
    for name in ("val", "test"):
        write_jsonl(staging / "data" / f"{name}.jsonl", sequences(target[name]))
    for name in SHIFTS:
        write_jsonl(staging / "data" / f"{name}.jsonl", sequences(package_files(name)))

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, **GPT))
    train(model, blocks(tokenizer, pretrain_texts), PRETRAIN_STEPS, 3e-3, seed)
    model.save_pretrained(staging / "base")
    tokenizer.save_pretrained(staging / "base")

    data = blocks(tokenizer, [read(p) for p in target["train"]])
    runs = sweep(seed)
    for name, run in runs.items():
        finetune(staging / "base", data, run, staging / "checkpoints" / name)
    manifest = {
        "name": "code-lm",
        "description": (f"GPT-2 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) pretrained on "
                        f"Python's top-level modules, {FULL} full fine-tunings and {ADAPTERS} LoRA adapters on "
                        f"{TARGET} (val and test are other {TARGET} files); shifts: {', '.join(SHIFTS)}."),
        "base": "base",
        "data": {"kind": "lm", "max_length": CONTEXT, "val": "data/val.jsonl", "test": "data/test.jsonl",
                 "shifts": {name: f"data/{name}.jsonl" for name in SHIFTS}},
        "checkpoints": [{"name": name, "path": f"checkpoints/{name}",
                         "hparams": {k: v for k, v in asdict(run).items() if run.rank or k in ("lr", "steps", "seed")}}
                        for name, run in runs.items()],
    }
    (staging / "zoo.toml").write_text(tomli_w.dumps(manifest))
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help=f"the zoo folder (default {ROOT})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    build(args.out)
    print(f"built code-lm under {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
