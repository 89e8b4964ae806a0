"""GGUF -> Hugging Face directory: names, dequantization, the Q/K row order, config, atomicity.

A tiny Llama GGUF is written here with gguf.GGUFWriter from known Hugging Face-layout weights
(some stored F32, some quantized to Q8_0), in llama.cpp's Q/K row order, then converted back.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from safetensors.numpy import load_file

from engram_serve.model.gguf import convert_gguf, hf_tensor_name, unpermute_qk

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 2, 64, 4, 2, 96
HEAD_DIM = HIDDEN // HEADS
QUANTIZED = ("attn_q", "attn_k", "ffn_up", "ffn_down")  # stored Q8_0
HALF = ("attn_v",)  # stored F16; the rest F32
MERGES = ["h e", "l l", "he ll", "Ġ w", "o r"]


def llamacpp_order(w: np.ndarray, num_heads: int) -> np.ndarray:
    """HF rows -> llama.cpp rows: within each head, row j * d/2 + i moves to row 2i + j."""
    d = w.shape[0] // num_heads
    out = np.empty_like(w)
    for h in range(num_heads):
        for j in range(2):
            for i in range(d // 2):
                out[h * d + 2 * i + j] = w[h * d + j * d // 2 + i]
    return out


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest shift up."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, shifted = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


def tokenizer_tokens() -> list[str]:
    return byte_alphabet() + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]


def hf_weights(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def rand(*shape: int, std: float = 0.15) -> np.ndarray:
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    out = {"model.embed_tokens.weight": rand(vocab, HIDDEN), "model.norm.weight": norm()}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": rand(FFN, HIDDEN),
            p + "mlp.up_proj.weight": rand(FFN, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, FFN),
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
        }
    out["lm_head.weight"] = rand(vocab, HIDDEN)
    return out


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    glob = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    stem = hf_name.removesuffix(".weight")
    if stem in glob:
        return glob[stem] + ".weight"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}.weight"


def write_tiny_gguf(path, weights, arch="llama", extra_tensor=None, kinds=None) -> None:
    """`kinds`: GGUF part name ("attn_q", "token_embd", ...) -> the type to store it in (the
    rest F32); default QUANTIZED in Q8_0, HALF in F16."""
    tokens = tokenizer_tokens()
    writer = GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # the last one is a control token
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    for hf_name, w in weights.items():
        name = gguf_name(hf_name)
        if ".attn_q." in name:
            w = llamacpp_order(w, HEADS)
        elif ".attn_k." in name:
            w = llamacpp_order(w, KV_HEADS)
        part = name.split(".")[-2]
        if kinds is not None and part in kinds:
            writer.add_tensor(name, quants.quantize(w, kinds[part]), raw_dtype=kinds[part])
        elif kinds is None and part in QUANTIZED:
            q8 = GGMLQuantizationType.Q8_0
            writer.add_tensor(name, quants.quantize(w, q8), raw_dtype=q8)
        elif kinds is None and part in HALF:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, w)
    if extra_tensor is not None:
        writer.add_tensor(extra_tensor, np.zeros(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, HF weights it was written from, converted directory)."""
    root = tmp_path_factory.mktemp("gguf")
    weights = hf_weights(len(tokenizer_tokens()))
    write_tiny_gguf(root / "tiny.gguf", weights)
    out = convert_gguf(root / "tiny.gguf", root / "hf", progress=False)
    return root / "tiny.gguf", weights, out


def test_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert (
        hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    )
    assert hf_tensor_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        hf_tensor_name("blk.0.attn_qkv.weight")


def test_unpermute_inverts_llamacpp_order():
    # One head of width 4: HF rows (0, 1 | 2, 3) rotate as pairs (0, 2), (1, 3); llama.cpp
    # stores each pair adjacently: rows 0, 2, 1, 3.
    hf = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert np.array_equal(unpermute_qk(hf[[0, 2, 1, 3]], 1), hf)
    w = np.random.default_rng(1).standard_normal((3 * 8, 5))
    assert np.array_equal(unpermute_qk(llamacpp_order(w, 3), 3), w)
    bias = np.arange(24.0)
    assert np.array_equal(unpermute_qk(llamacpp_order(bias, 3), 3), bias)
    with pytest.raises(ValueError, match="heads"):
        unpermute_qk(np.zeros((6, 2)), 4)


def test_round_trip_weights(tiny):
    _, weights, out = tiny
    converted = load_file(out / "model.safetensors")
    assert converted.keys() == weights.keys()
    for name, w in weights.items():
        got = converted[name]
        assert got.dtype == np.float32 and got.shape == w.shape, name
        if gguf_name(name).split(".")[-2] in QUANTIZED:
            # Q8_0 quantizes each row on its own, so it commutes with the row permutation:
            # the result must be exactly the quantize-dequantize of the HF-order weight.
            q8 = GGMLQuantizationType.Q8_0
            want = quants.dequantize(quants.quantize(w, q8), q8)
            assert np.array_equal(got, want), name
            assert np.abs(got - w).max() <= np.abs(w).max() / 127 + 1e-7, name
        elif gguf_name(name).split(".")[-2] in HALF:
            assert np.array_equal(got, w.astype(np.float16).astype(np.float32)), name
        else:
            assert np.array_equal(got, w), name


def test_config_and_generation_config(tiny):
    _, _, out = tiny
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"]) == (HIDDEN, FFN)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert config["num_hidden_layers"] == LAYERS
    assert config["head_dim"] == HEAD_DIM
    assert config["rope_theta"] == 50000.0
    assert config["rms_norm_eps"] == 1e-5
    assert config["max_position_embeddings"] == 256
    assert config["vocab_size"] == len(tokenizer_tokens())
    assert config["tie_word_embeddings"] is False  # the GGUF has output.weight
    eos = len(tokenizer_tokens()) - 1
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos


def test_tokenizer_files(tiny):
    from transformers import AutoTokenizer

    _, _, out = tiny
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[:2] == ["hell", "o"]  # the merges apply
    assert tok.decode(ids) == "hello world"
    assert tok.eos_token == "<|endoftext|>"


def test_matches_transformers_gguf_loader(tiny):
    """Transformers reads the same GGUF on its own; both must give the same model."""
    from transformers import AutoModelForCausalLM

    path, _, out = tiny
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    ours = AutoModelForCausalLM.from_pretrained(out)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    for name, t in our_sd.items():
        assert torch.equal(t, ref_sd[name]), name
    ids = torch.tensor([[3, 70, 200, 258, 5, 9, 100, 259, 42, 17]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_failed_conversion_leaves_nothing(tmp_path):
    weights = hf_weights(len(tokenizer_tokens()))
    write_tiny_gguf(tmp_path / "bad.gguf", weights, extra_tensor="blk.0.mystery.weight")
    with pytest.raises(ValueError, match="blk.0.mystery.weight"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_refuses_unsupported_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", hf_weights(len(tokenizer_tokens())), arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny, tmp_path):
    path, _, _ = tiny
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_gguf(path, out, progress=False)
    convert_gguf(path, out, progress=False, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
