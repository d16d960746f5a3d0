"""Causal language models: `[data] kind = "lm"`, scored as transformers scores them.

The oracle is transformers itself: each sequence alone (no padding), ``model(input_ids,
labels=input_ids).loss`` — its own shift and mean — weighted by the sequence's predicted tokens;
an adapter through PEFT's unmerged ``PeftModel``. The zoo is ``code-lm``, written by
``save_pretrained`` and PEFT (:mod:`sample_data.code_lm`).
"""

from __future__ import annotations

import json
import os
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from soup_core.data import lm_splits, read_sequences  # noqa: E402
from soup_core.errors import DataError  # noqa: E402
from soup_core.evaluate import IGNORE_INDEX, Evaluator, Split  # noqa: E402
from soup_core.io import load_state_dict  # noqa: E402
from soup_core.landscape.scores import loss_and_wrong  # noqa: E402
from soup_core.zoo import open_zoo, sample_root  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZOO = sample_root() / "code-lm"


@pytest.fixture(scope="module")
def zoo():
    return open_zoo("code-lm", device="cpu")


def transformers_scores(model, texts: list[str], tokenizer, max_length: int) -> tuple[float, float, int]:
    """Token-weighted loss and next-token accuracy, one unpadded sequence at a time."""
    loss_sum, right, tokens = 0.0, 0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            loss_sum += float(out.loss) * n
            right += int((out.logits[0, :-1].argmax(-1) == ids[0, 1:]).sum())
            tokens += n
    return loss_sum / tokens, right / tokens, tokens


def test_next_token_labels_are_the_following_token_and_padding_never_counts():
    from soup_core.data import next_token_split
    split = next_token_split([[1, 2, 3, 4], [5, 6], [7]])
    assert split.inputs[:, 1].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert split.labels.tolist() == [[2, 3, 4, -100], [6, -100, -100, -100], [-100] * 4]
    assert split.predictions == 4 and len(split) == 3


def test_a_landscape_point_scores_tokens_and_skips_the_ignored_ones():
    # One point, one sequence of three positions; the third is padding whatever its logits say.
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 2.0], [9.0, -9.0]]]])
    labels = torch.tensor([[0, 0, IGNORE_INDEX]])
    loss, wrong = loss_and_wrong(logits, labels)
    expected = math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))  # −log σ(2) − log σ(−2)
    assert float(loss) == pytest.approx(expected, abs=1e-6) and int(wrong) == 1


def test_the_evaluator_flattens_scored_tokens_in_order():
    class Echo(torch.nn.Module):  # logits that spell out each input id as a one-hot over 4 classes
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.scale * torch.nn.functional.one_hot(x[:, 0], 4).float()

    from soup_core.data import next_token_split
    split = next_token_split([[1, 1, 2], [3, 3]])
    ev = Evaluator(Echo, {"val": split}, device="cpu")
    assert ev.labels("val").tolist() == [1, 2, 3]
    assert ev.logits(Echo().state_dict()).argmax(1).tolist() == [1, 1, 3]  # predicts "the same token again"
    assert ev.evaluate(Echo().state_dict())["val"].accuracy == pytest.approx(2 / 3)
    assert ev.unit == "tokens"


@pytest.mark.parametrize("name", ["base", "full-00", "lora-00"])
def test_soup_evaluate_scores_an_lm_as_transformers_does(zoo, name):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    tokenizer = AutoTokenizer.from_pretrained(str(ZOO / "base"), local_files_only=True)
    folder = ZOO / ("base" if name == "base" else f"checkpoints/{name}")
    if name.startswith("lora"):
        from peft import PeftModel
        model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(ZOO / "base")), str(folder))
    else:
        model = GPT2LMHeadModel.from_pretrained(str(folder))
    model.eval()
    texts = read_sequences(ZOO / "data/val.jsonl")
    loss, accuracy, tokens = transformers_scores(model, texts, tokenizer, zoo.spec.data_spec["max_length"])
    ours = zoo.metrics(name)["val"]
    assert len(zoo.evaluator.labels("val")) == tokens
    assert ours.loss == pytest.approx(loss, abs=1e-5)
    assert ours.accuracy == pytest.approx(accuracy, abs=1e-12)


def test_the_cli_reports_perplexity(zoo):
    result = subprocess.run([sys.executable, "-m", "soup_core", "evaluate", "code-lm", "--json", "-"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    base = next(row for row in scores["checkpoints"] if row["name"] == "base")["metrics"]["val"]
    assert base["perplexity"] == pytest.approx(math.exp(base["loss"]), rel=1e-12)


def test_a_uniform_soup_of_full_models_and_adapters_averages_what_peft_merges(zoo, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    out = tmp_path / "soup.safetensors"
    result = subprocess.run([sys.executable, "-m", "soup_core", "make", "uniform", "code-lm", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"on {len(zoo.evaluator.labels('test'))} tokens" in result.stdout  # the unit the data has
    soup = load_state_dict(out)
    merged = []
    for name in zoo.names:
        folder = ZOO / "checkpoints" / name
        if (folder / "adapter_config.json").is_file():
            model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(ZOO / "base")), str(folder))
            model = model.merge_and_unload()
        else:
            model = GPT2LMHeadModel.from_pretrained(str(folder))
        merged.append(model.state_dict())
    for key, value in soup.items():
        mean = torch.stack([m[key].double() for m in merged]).mean(0)
        assert torch.allclose(value.double(), mean, atol=1e-6), key


def test_a_landscape_point_equals_the_evaluator_at_that_soup(zoo):
    from soup_core.landscape.engine import SliceEvaluator
    base, a, b = zoo.base, zoo.state_dict("full-00"), zoo.state_dict("lora-01")
    floats = [k for k, v in base.items() if v.is_floating_point()]
    directions = [{k: a[k] - base[k] for k in floats}, {k: b[k] - base[k] for k in floats}]
    engine = SliceEvaluator(zoo.evaluator, base, directions, bn="keep")
    values = engine.evaluate([[0.5, 0.5]], splits=("val",))
    soup = {k: base[k] + 0.5 * directions[0][k] + 0.5 * directions[1][k] if k in directions[0] else base[k]
            for k in base}
    metrics = zoo.evaluator.evaluate(soup, ["val"])["val"]
    assert values.loss["val"][0] == pytest.approx(metrics.loss, abs=1e-4)
    assert 1 - values.error["val"][0] == pytest.approx(metrics.accuracy, abs=2 / len(zoo.evaluator.labels("val")))


@pytest.mark.parametrize("content, suffix, message", [
    ('{"text": "a"}\nnot json\n', ".jsonl", "line 2: not JSON"),
    ('{"body": "a"}\n', ".jsonl", "line 1: needs a string field 'text'"),
    ("a,b\n", ".csv", "is a .txt file"),
    ("\n\n", ".txt", "no sequences"),
])
def test_bad_lm_data_is_one_line_naming_the_place(tmp_path, content, suffix, message):
    path = tmp_path / f"val{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_sequences(path)


@pytest.mark.parametrize("max_length", [1, 0, True, 10**9, "64"])
def test_max_length_is_a_sensible_number_of_tokens(tmp_path, max_length):
    (tmp_path / "val.txt").write_text("x = 1\n")
    with pytest.raises(DataError, match="max_length"):
        lm_splits({"kind": "lm", "val": "val.txt", "max_length": max_length}, lambda p: tmp_path / p, tokenizer=None)


def test_an_lm_split_with_nothing_to_predict_is_refused(zoo, tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(ZOO / "base"), local_files_only=True)
    (tmp_path / "val.txt").write_text("x\n")  # one token: nothing follows it
    with pytest.raises(DataError, match="no next token"):
        lm_splits({"kind": "lm", "val": "val.txt"}, lambda p: tmp_path / p, tokenizer)


def test_logits_the_cache_keeps_stay_within_its_byte_budget():
    split = Split(torch.randn(8, 3), torch.randint(0, 5, (8,)))
    ev = Evaluator(lambda: torch.nn.Linear(3, 5), {"val": split}, device="cpu", cache_bytes=3 * 8 * 5 * 4)
    for seed in range(6):
        torch.manual_seed(seed)
        ev.logits(torch.nn.Linear(3, 5).state_dict())
    assert len(ev._cache) == 3 and ev._cached_bytes == 3 * 8 * 5 * 4


def _tokenizer_json() -> dict:
    return json.loads((ZOO / "base" / "tokenizer.json").read_text())


def _write(name: str, content):
    def change(folder: Path) -> None:
        (folder / name).unlink(missing_ok=True)
        if callable(content):
            content(folder / name)
        else:
            (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return change


@pytest.mark.parametrize("change, said", [  # what transformers raises varies by version: only our part is checked
    (_write("tokenizer.json", "{nope"), "not a readable tokenizer (JSONDecodeError:"),
    (_write("tokenizer.json", {}), "not a readable tokenizer ("),
    (_write("tokenizer.json", {**_tokenizer_json(), "model": {"type": "BPE", "vocab": 5}}), "not a readable tokenizer ("),
    (_write("tokenizer_config.json", [1, 2]), "not a readable tokenizer ("),
    (_write("special_tokens_map.json", {"pad_token": {"content": 5}}), "not a readable tokenizer ("),
    (_write("tokenizer.json", lambda path: path.symlink_to("/etc/hostname")), "is outside the allowed folders"),
    (_write("tokenizer.json", lambda path: path.symlink_to("/dev/zero")), "is outside the allowed folders"),
    (_write("tokenizer.json", lambda path: os.mkfifo(path)), "tokenizer.json: not a regular file (a link to nothing"),
    (_write("loop.json", lambda path: path.symlink_to(path)), "loop.json: not a regular file (a link to nothing"),
    (_write("tokenizer_config.json", {"tokenizer_file": "/etc/hostname"}),
     "tokenizer_file = '/etc/hostname' points outside the tokenizer's folder"),
    (_write("tokenizer.json", {**_tokenizer_json(), "model": {**_tokenizer_json()["model"], "vocab": {
        token: i + 10**6 for token, i in _tokenizer_json()["model"]["vocab"].items()}}}),
     "holds token id 1,00"),
])
def test_a_hostile_or_foreign_tokenizer_is_one_line_and_nothing_outside_the_roots_is_read(tmp_path, monkeypatch,
                                                                                        change, said):
    """The tokenizer of an lm or text zoo comes with its checkpoints: each file is checked against the
    allowed roots and must be a regular file before transformers reads any; whatever transformers or
    tokenizers raise on a bad one is one line; ids past the model's vocabulary name the tokenizer."""
    import shutil

    from tests.test_cli import soup_here
    zoo = tmp_path / "zoo"
    shutil.copytree(ZOO / "base", zoo / "base")
    shutil.copytree(ZOO / "data", zoo / "data")
    shutil.copytree(ZOO / "checkpoints" / "full-00", zoo / "full-00")
    (zoo / "zoo.toml").write_text('base = "base"\ncheckpoints = ["full-00"]\n[data]\nkind = "lm"\nmax_length = 16\n'
                                  'val = "data/val.jsonl"\ntest = "data/test.jsonl"\n')
    change(zoo / "base")
    monkeypatch.setenv("SOUP_ALLOWED_ROOTS", str(tmp_path))
    before = sorted(p.name for p in zoo.rglob("*"))
    result = soup_here("evaluate", str(zoo))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and said in result.stderr, result.stderr
    assert sorted(p.name for p in zoo.rglob("*")) == before
