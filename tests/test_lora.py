"""PEFT LoRA adapters as ingredients: each reads as PEFT's own merge_and_unload on θ0, and a soup of
adapters is the average of their merged models (PEFT is the oracle; adapters written by PEFT)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from soup_core.errors import CheckpointError  # noqa: E402
from soup_core.io.lora import AdapterConfig, apply_adapter, read_updates  # noqa: E402
from soup_core.zoo import make_soup, open_zoo  # noqa: E402

ADAPTERS = {  # name -> LoRA configuration: different ranks, alphas, rsLoRA, patterns, target modules, embeddings
    "r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "r4-rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    "patterns": dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"],
                     rank_pattern={"up_proj": 5}, alpha_pattern={"layers.1.self_attn.v_proj": 1.5}),
    "embedding": dict(r=2, lora_alpha=2, target_modules=["embed_tokens", "down_proj"]),
}


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def adapter_zoo(tmp_path_factory):
    """θ0 written by save_pretrained and four adapters written by PEFT, their B matrices trained
    (random: PEFT starts B at zero)."""
    root = tmp_path_factory.mktemp("lora")
    tiny_llama().save_pretrained(root / "base")
    for i, (name, options) in enumerate(ADAPTERS.items()):
        model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", **options))
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        model.save_pretrained(root / name)
    manifest = ['name = "lora-zoo"', 'base = "base"'] + [f'[[checkpoints]]\nname = "{n}"\npath = "{n}"' for n in ADAPTERS]
    (root / "zoo.toml").write_text("\n".join(manifest) + "\n")
    return root


def merged_by_peft(root: Path, name: str) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(root / "base"), root / name)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_each_adapter_reads_as_peft_merges_it(adapter_zoo):
    zoo = open_zoo(adapter_zoo / "zoo.toml")
    for name in ADAPTERS:
        ours, theirs = zoo.state_dict(name), merged_by_peft(adapter_zoo, name)
        assert set(ours) <= set(theirs)
        changed = [k for k in ours if not torch.equal(ours[k], zoo.base[k])]
        assert changed and all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6) for k in ours), name


def test_a_soup_of_adapters_is_the_average_of_their_merged_models(adapter_zoo):
    zoo = open_zoo(adapter_zoo / "zoo.toml")
    soup = make_soup(zoo, "uniform").state_dict
    merged = [merged_by_peft(adapter_zoo, n) for n in ADAPTERS]
    for key, tensor in soup.items():
        expected = sum(m[key].double() for m in merged) / len(merged)
        assert torch.allclose(tensor.double(), expected, rtol=0, atol=1e-6), key


def test_the_update_is_scale_times_b_a_as_the_paper_writes_it(adapter_zoo):
    """Hu et al. 2021, eq. 3: h = W0 x + (α/r)·B A x; rsLoRA (Kalajdzievski 2023): α/√r."""
    updates = read_updates(adapter_zoo / "r4-rslora", open_zoo(adapter_zoo / "zoo.toml").base)
    update = updates["model.layers.0.self_attn.q_proj.weight"]
    assert update.scale == 8 / 2  # α / √r with r = 4
    assert torch.equal(update.delta(), (update.b @ update.a) * 4)
    config = AdapterConfig.read(adapter_zoo / "patterns")
    assert config.rank_and_alpha("model.layers.0.mlp.up_proj") == (5, 6.0)
    assert config.rank_and_alpha("model.layers.1.self_attn.v_proj") == (3, 1.5)
    assert config.rank_and_alpha("model.layers.0.self_attn.v_proj") == (3, 6.0)
    embedding = read_updates(adapter_zoo / "embedding", open_zoo(adapter_zoo / "zoo.toml").base)
    assert embedding["model.embed_tokens.weight"].delta().shape == (64, 16)  # (B·A)ᵀ: vocabulary × hidden


def test_streamed_soups_of_adapters_equal_the_soup_in_memory(adapter_zoo, tmp_path):
    from soup_core.export import Candidate, write_streamed
    from soup_core.io import load_state_dict
    zoo = open_zoo(adapter_zoo / "zoo.toml")
    write_streamed(zoo, Candidate.of_recipe("uniform"), tmp_path / "soup.safetensors")
    streamed, in_memory = load_state_dict(tmp_path / "soup.safetensors"), make_soup(zoo, "uniform").state_dict
    assert all(torch.equal(streamed[k], in_memory[k]) for k in in_memory)


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "bias='lora_only' trains biases"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "a IA3 adapter; only PEFT LoRA adapters are read"),
    ({"r": 3}, "has rank 2 but its configuration says r = 3"),
])
def test_what_is_not_a_plain_lora_update_is_refused_by_name(adapter_zoo, tmp_path, change, message):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_zoo / "r2", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        apply_adapter(open_zoo(adapter_zoo / "zoo.toml").base, folder)


def test_an_adapter_for_another_model_is_refused(adapter_zoo):
    base = dict(open_zoo(adapter_zoo / "zoo.toml").base)
    del base["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(CheckpointError, match="θ0 has no 'model.layers.0.self_attn.q_proj.weight'"):
        apply_adapter(base, adapter_zoo / "r2")


def test_a_gpt2_adapter_on_conv1d_is_transposed_as_peft_does(tmp_path):
    """GPT-2 stores its projections as Conv1D (in × out): fan_in_fan_out transposes the update."""
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = get_peft_model(transformers.GPT2LMHeadModel(config),
                           LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                       tmp_path / "adapter").merge_and_unload().state_dict()
    from soup_core.io import load_state_dict
    ours = apply_adapter(load_state_dict(tmp_path / "base"), tmp_path / "adapter")
    key = "transformer.h.1.attn.c_attn.weight"
    assert not torch.equal(ours[key], load_state_dict(tmp_path / "base")[key])
    assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6) for k in ours)


# --- a soup of adapters, written back as one adapter ------------------------------------------------------

def run_soup(*argv, cwd=None):
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "soup_core", *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root)}, cwd=cwd or root)


def test_a_full_rank_adapter_of_the_soup_loads_with_peft_and_is_the_soup(adapter_zoo, tmp_path):
    """Four adapters of rank ≤ 5 average to an update of rank ≤ 2+4+5+2 on each module: rank 16 is exact."""
    out = tmp_path / "soup-adapter"
    result = run_soup("make", "uniform", str(adapter_zoo / "zoo.toml"), "--out", str(out), "--adapter-rank", "16",
                      "--json", str(tmp_path / "soup.json"))
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "soup.json").read_text())
    assert max(payload["adapter"]["relative_frobenius_error"].values()) < 1e-6
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(adapter_zoo / "base"), out)
    merged = loaded.merge_and_unload().state_dict()
    soup = make_soup(open_zoo(adapter_zoo / "zoo.toml"), "uniform").state_dict
    assert all(torch.allclose(merged[k], soup[k], rtol=0, atol=1e-5) for k in soup)
    assert "--adapter-rank 16" in (out / "README.md").read_text()


def test_a_low_rank_adapter_keeps_the_best_approximation_and_says_what_it_lost(adapter_zoo, tmp_path):
    from soup_core.adapter_out import write_adapter
    zoo = open_zoo(adapter_zoo / "zoo.toml")
    soup = make_soup(zoo, "uniform")
    folder, errors = write_adapter(zoo, soup, tmp_path / "rank1", 1)
    key = "model.layers.0.self_attn.q_proj"
    delta = soup.state_dict[f"{key}.weight"].double() - zoo.base[f"{key}.weight"].double()
    singular = torch.linalg.svdvals(delta)
    assert errors[key] == pytest.approx(float(singular[1:].norm() / singular.norm()), rel=1e-9)  # Eckart–Young
    loaded = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(adapter_zoo / "base"), folder)
    merged = loaded.merge_and_unload().state_dict()[f"{key}.weight"].double() - zoo.base[f"{key}.weight"].double()
    assert torch.linalg.matrix_rank(merged, atol=1e-6) == 1
    assert float((delta - merged).norm() / delta.norm()) == pytest.approx(errors[key], abs=1e-5)
    assert f"{errors[key]:.2e}" in (folder / "README.md").read_text()


def test_an_adapter_export_refuses_full_models_and_keeps_what_is_there(adapter_zoo, tmp_path):
    from soup_core.adapter_out import write_adapter
    from soup_core.errors import SoupError
    zoo = open_zoo(adapter_zoo / "zoo.toml")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="exists and is not an empty folder"):
        write_adapter(zoo, make_soup(zoo, "uniform"), tmp_path / "taken", 4)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    full = zoo.extended({"full": adapter_zoo / "base"})
    with pytest.raises(SoupError, match="full is not a LoRA adapter: a soup is written as one adapter only"):
        write_adapter(full, make_soup(full, "uniform", ["r2", "full"]), tmp_path / "mixed", 4)
    assert not (tmp_path / "mixed").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_an_adapter_in_a_zoo_without_theta0_says_what_to_set(adapter_zoo, tmp_path):
    from soup_core.errors import ZooError
    shutil.copytree(adapter_zoo / "r2", tmp_path / "r2")
    config = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/models/tiny-llama"
    (tmp_path / "r2" / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "zoo.toml").write_text('[[checkpoints]]\nname = "r2"\npath = "r2"\n')
    with pytest.raises(ZooError, match=r"r2 is a LoRA adapter .* set base = .* names '/models/tiny-llama'"):
        open_zoo(tmp_path / "zoo.toml").state_dict("r2")


def test_a_folder_of_adapters_takes_the_base_their_config_names_when_it_is_a_local_folder(adapter_zoo, tmp_path):
    """No zoo.toml and no base.*: θ0 is the folder adapter_config.json names (relative to the adapter),
    and the soup is PEFT's merged average; outside the allowed roots, the zoo says what to set."""
    shutil.copytree(adapter_zoo / "base", tmp_path / "models" / "llama")
    for name in ("r2", "patterns"):
        shutil.copytree(adapter_zoo / name, tmp_path / "adapters" / name)
        config = json.loads((tmp_path / "adapters" / name / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "../../models/llama"
        (tmp_path / "adapters" / name / "adapter_config.json").write_text(json.dumps(config))
    zoo = open_zoo(tmp_path / "adapters")
    assert zoo.names == ("patterns", "r2") and zoo.base_path.resolve() == (tmp_path / "models" / "llama").resolve()
    soup = make_soup(zoo, "uniform").state_dict
    expected = [merged_by_peft(adapter_zoo, name) for name in ("r2", "patterns")]
    for key, value in soup.items():
        assert torch.allclose(value, (expected[0][key] + expected[1][key]) / 2, atol=1e-6), key
    from soup_core.errors import ZooError
    fenced = open_zoo(tmp_path / "adapters", allowed_roots=[tmp_path / "adapters"])
    assert fenced.base_path is None
    with pytest.raises(ZooError, match="set base = "):
        fenced.state_dict("r2")


def test_an_adapter_folder_read_as_weights_says_it_is_an_update():
    from soup_core.io import load_state_dict
    from soup_core.zoo import sample_root
    with pytest.raises(CheckpointError, match="a LoRA adapter, an update of θ0"):
        load_state_dict(sample_root() / "code-lm" / "checkpoints" / "lora-00")
