"""Loading Hugging Face directories: config mapping, sharded and tied checkpoints, dtype,
Engram module weights, and one clear error per way a directory can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import PagedRun, hf_logits, save_tiny_hf
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from engram_serve.engram.config import EngramConfig
from engram_serve.model.engram import EngramDemo
from engram_serve.model.loader import ModelLoadError, load_model, load_model_config

SMALL = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
PROMPT = [5, 17, 3, 60, 22, 9, 41, 8, 30]
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny untied Llama directory and transformers' logits for PROMPT."""
    path = tmp_path_factory.mktemp("tiny")
    hf_model = save_tiny_hf(path, LlamaConfig(**SMALL, tie_word_embeddings=False))
    return path, hf_logits(hf_model, PROMPT)


@pytest.fixture
def copy_of(tiny, tmp_path) -> Path:
    path = tmp_path / "model"
    shutil.copytree(tiny[0], path)
    return path


def prompt_logits(model) -> torch.Tensor:
    return PagedRun(model, model.config, [PROMPT]).run([{0: len(PROMPT)}])[0]


def edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS)


def edit_config(path: Path, **changes) -> None:  # a None value deletes the field
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if k not in changes or v is not None}
    (path / "config.json").write_text(json.dumps(raw))


# ---------------------------------------------------------------- config


def test_config_fields_follow_transformers(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
    hf = LlamaConfig(**SMALL, rope_theta=500000.0, rope_scaling=dict(rope), eos_token_id=[2, 5])
    hf.architectures = ["LlamaForCausalLM"]
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    config = load_model_config(tmp_path)
    assert config.architecture == "LlamaForCausalLM"
    for name in SMALL:
        assert getattr(config, name) == getattr(hf, name), name
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == rope
    assert config.attn_head_dim == 16
    assert config.eos_token_id == (2, 5, 7)  # config.json's, then generation_config.json's


def test_config_older_rope_spelling(tmp_path):
    """Configs written before transformers 5: top-level rope_theta, rope_scaling with `type`,
    no num_key_value_heads (then every head has its own K/V)."""
    raw = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
    raw |= {"architectures": ["LlamaForCausalLM"], "rope_theta": 1e6, "eos_token_id": 2,
            "rope_scaling": {"type": "linear", "factor": 2.0}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_model_config(tmp_path)
    assert config.rope_theta == 1e6
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.num_key_value_heads == SMALL["num_attention_heads"]
    assert config.eos_token_id == (2,)


# ---------------------------------------------------------------- loading


def test_sharded_checkpoint(tiny, tmp_path):
    path, expected = tiny
    hf_model = save_tiny_hf(tmp_path, LlamaConfig(**SMALL), max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(
        prompt_logits(load_model(tmp_path)), hf_logits(hf_model, PROMPT), atol=1e-4, rtol=0
    )


def test_tied_checkpoint_shares_the_embedding(tmp_path):
    save_tiny_hf(tmp_path, LlamaConfig(**SMALL, tie_word_embeddings=True))
    assert "lm_head.weight" not in load_file(tmp_path / WEIGHTS)
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_checkpoint_that_also_stores_the_head(tmp_path):
    hf_model = save_tiny_hf(tmp_path, LlamaConfig(**SMALL, tie_word_embeddings=True))
    edit_weights(
        tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()})
    )
    torch.testing.assert_close(
        prompt_logits(load_model(tmp_path)), hf_logits(hf_model, PROMPT), atol=1e-4, rtol=0
    )


def test_bfloat16(tiny):
    path, expected = tiny
    model = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    logits = PagedRun(model, model.config, [PROMPT], dtype=torch.bfloat16).run([{0: len(PROMPT)}])[
        0
    ]
    assert logits.dtype == torch.float32
    # bf16 keeps ~3 significant digits: close to float32, not equal.
    torch.testing.assert_close(logits, expected, atol=0.25, rtol=0.05)


# ---------------------------------------------------------------- Engram weights

ENGRAM = EngramConfig(
    variant="demo", layer_ids=(1,), max_ngram_size=3, n_head_per_ngram=2, head_dim=8,
    engram_vocab_size=(101, 103),
)  # fmt: skip


def test_engram_weights_from_the_checkpoint(copy_of):
    module = EngramDemo(ENGRAM, SMALL["hidden_size"])
    stored = {f"model.layers.1.engram.{k}": v.clone() for k, v in module.state_dict().items()}
    edit_weights(copy_of, lambda t: t.update(stored))
    model = load_model(copy_of, engram_config=ENGRAM)
    loaded = model.state_dict()
    for name, value in stored.items():
        torch.testing.assert_close(loaded[name], value, atol=0, rtol=0)


def test_engram_weights_absent_keep_the_module_init(tiny):
    model = load_model(tiny[0], engram_config=ENGRAM)
    engram = model.model.layers[1].engram
    assert isinstance(engram, EngramDemo)
    assert not any(p.is_meta for p in engram.parameters())
    assert model.model.layers[0].engram is None


def test_engram_weights_partly_present(copy_of):
    module = EngramDemo(ENGRAM, SMALL["hidden_size"])
    stored = {f"model.layers.1.engram.{k}": v for k, v in module.state_dict().items()}
    del stored["model.layers.1.engram.value_proj.weight"]
    edit_weights(copy_of, lambda t: t.update(stored))
    with pytest.raises(ModelLoadError, match=r"lacks tensor\(s\) model.layers.1.engram.value_proj"):
        load_model(copy_of, engram_config=ENGRAM)


def test_engram_weights_without_engram_config(copy_of):
    bias = {"model.layers.1.engram.value_proj.bias": torch.zeros(SMALL["hidden_size"])}
    edit_weights(copy_of, lambda t: t.update(bias))
    with pytest.raises(ModelLoadError, match="has Engram weights: pass an Engram config"):
        load_model(copy_of)


# ---------------------------------------------------------------- errors


def test_error_unsupported_architecture(copy_of):
    edit_config(copy_of, architectures=["MistralForCausalLM"])
    with pytest.raises(
        ModelLoadError,
        match="unsupported architecture 'MistralForCausalLM'; supported: LlamaForCausalLM, "
        "Qwen2ForCausalLM, Qwen3ForCausalLM",
    ):
        load_model(copy_of)


def test_error_missing_config(copy_of):
    (copy_of / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json not found"):
        load_model(copy_of)


def test_error_missing_weights(copy_of):
    (copy_of / WEIGHTS).unlink()
    with pytest.raises(ModelLoadError, match="expected model.safetensors or model.safetensors"):
        load_model(copy_of)


def test_error_missing_tensor(copy_of):
    edit_weights(copy_of, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ModelLoadError, match=r"lacks tensor\(s\) model.layers.1.mlp.up_proj.weight"
    ):
        load_model(copy_of)


def test_error_extra_tensor(copy_of):
    edit_weights(copy_of, lambda t: t.update({"model.layers.0.mystery.weight": torch.ones(3)}))
    with pytest.raises(
        ModelLoadError, match=r"unexpected tensor\(s\) model.layers.0.mystery.weight in model.safe"
    ):
        load_model(copy_of)


def test_error_shape_mismatch(copy_of):
    edit_weights(copy_of, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(
        ModelLoadError, match=r"tensor model.norm.weight has shape \(63,\), expected \(64,\)"
    ):
        load_model(copy_of)


def test_error_missing_shard(tmp_path):
    save_tiny_hf(tmp_path, LlamaConfig(**SMALL), max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"lists shard {shard.name}, which is missing"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' unsupported"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"hidden_size": None}, "required field 'hidden_size' is missing"),
    ],
)
def test_error_unsupported_config(copy_of, changes, message):
    edit_config(copy_of, **changes)
    with pytest.raises(ModelLoadError, match=message):
        load_model_config(copy_of)
