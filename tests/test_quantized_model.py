"""A backbone whose weights stay block-quantized (`quantization="gguf"`, or a format given at
load): it must compute what transformers computes on the dequantized weights, keep no float copy
of a quantized weight, and refuse what it cannot run.

The oracle is transformers' LlamaForCausalLM on the float32 directory that convert_gguf writes
from the same GGUF (gguf-py's dequantization, checked bit for bit in tests/test_quant.py), or on
weights quantized and dequantized by gguf-py.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants
from helpers import PagedRun, hf_logits
from test_gguf import hf_weights, tokenizer_tokens, write_tiny_gguf

from engram_serve.kernels.cpu_quant import QuantizedWeight
from engram_serve.model.gguf import GGUF_WEIGHTS, convert_gguf
from engram_serve.model.loader import ModelLoadError, load_model

Q = GGMLQuantizationType
# Every projection quantized, in several formats (q/k/v mix three: their fusion converts).
KINDS = {
    "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1,
    "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_0, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0,
    "output": Q.Q4_1,
}  # fmt: skip
SEQUENCES = [[3, 70, 200, 258, 5, 9, 100, 259, 42, 17, 8], [44, 2, 19, 77, 130, 6, 6]]
# Decode steps (one token a sequence, the fused layer) after a prefill of 4, then a mixed step.
SCHEDULE = [{0: 4, 1: 4}, {0: 1, 1: 1}, {0: 1, 1: 1}, {0: 5, 1: 1}]
ATOL = 2e-4  # float32 sums in another order, over logits of size ~10


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory):
    """(float32 directory converted from a GGUF of quantized projections, the GGUF's tensors)."""
    root = tmp_path_factory.mktemp("qgguf")
    write_tiny_gguf(root / "tiny.gguf", hf_weights(len(tokenizer_tokens()), seed=3), kinds=KINDS)
    out = convert_gguf(root / "tiny.gguf", root / "hf", progress=False)
    return out, GGUFReader(root / "tiny.gguf").tensors


def _oracle(hf_dir, sequences):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return [hf_logits(hf, seq) for seq in sequences]


def test_gguf_weights_kept_quantized_compute_the_dequantized_model(quantized_gguf):
    hf_dir, tensors = quantized_gguf
    model = load_model(hf_dir, quantization="gguf")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    quantized = [attn.qkv_weight, attn.o_proj.weight, mlp.gate_up_weight, mlp.down_proj.weight,
                 model.model.embed_tokens.weight, model.lm_head.weight]  # fmt: skip
    assert all(isinstance(w, QuantizedWeight) for w in quantized)
    assert attn.q_proj.weight is None  # the fused weight alone holds q, k and v
    # No float copy: every float tensor left is a norm (1-D).
    assert [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.dim() > 1] == []
    layers = [(layer.self_attn, layer.mlp) for layer in model.model.layers]
    fused = [
        (a.qkv_weight, a.o_proj.weight, m.gate_up_weight, m.down_proj.weight) for a, m in layers
    ]
    held = sum(w.nbytes for ws in fused for w in ws) + sum(w.nbytes for w in quantized[-2:])
    in_file = sum(int(t.n_bytes) for t in tensors if t.tensor_type.name != "F32")
    assert in_file <= held <= 2 * in_file  # repacked with float32 scales; q/k/v as int8

    want = _oracle(hf_dir, SEQUENCES)
    got = PagedRun(model, model.config, SEQUENCES).run(SCHEDULE)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_weights_quantized_at_load_compute_the_quantize_dequantize_model(quantized_gguf, tmp_path):
    """A float checkpoint loaded with quantization="q8_0" (and q4_1): transformers' oracle gets
    the same weights quantized and dequantized by gguf-py."""
    from transformers import AutoModelForCausalLM

    hf_dir, _ = quantized_gguf
    for fmt in ("q8_0", "q4_1"):
        model = load_model(hf_dir, quantization=fmt)
        assert model.lm_head.weight.format == fmt
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        qtype = GGMLQuantizationType[fmt.upper()]
        with torch.no_grad():
            for name, param in hf.named_parameters():
                if name.endswith(("_proj.weight", "embed_tokens.weight", "lm_head.weight")):
                    w = param.numpy()
                    param.copy_(
                        torch.from_numpy(quants.dequantize(quants.quantize(w, qtype), qtype))
                    )
        got = PagedRun(model, model.config, SEQUENCES).run(SCHEDULE)
        for g, seq in zip(got, SEQUENCES, strict=True):
            torch.testing.assert_close(g, hf_logits(hf, seq), atol=ATOL, rtol=0)


def test_gguf_with_float_parts_fuses_them_dense(tmp_path):
    """A GGUF that stores some projections as floats (v in F16, gate in F32, as tests/test_gguf
    writes): the fusions holding one are dense, the rest stay quantized, and the model is still
    the dequantized one."""
    write_tiny_gguf(tmp_path / "mixed.gguf", hf_weights(len(tokenizer_tokens()), seed=4))
    hf_dir = convert_gguf(tmp_path / "mixed.gguf", tmp_path / "hf", progress=False)
    model = load_model(hf_dir, quantization="gguf")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_weight, torch.Tensor)  # q, k Q8_0 beside v F16
    assert isinstance(layer.mlp.down_proj.weight, QuantizedWeight)
    got = PagedRun(model, model.config, SEQUENCES).run(SCHEDULE)
    for g, w in zip(got, _oracle(hf_dir, SEQUENCES), strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_quantization_refusals(quantized_gguf, tmp_path):
    hf_dir, _ = quantized_gguf
    with pytest.raises(ModelLoadError, match="quantization 'q5_k' unknown"):
        load_model(hf_dir, quantization="q5_k")
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in hf_dir.iterdir():
        if f.name != GGUF_WEIGHTS:
            (plain / f.name).symlink_to(f)
    with pytest.raises(ModelLoadError, match=f"reads {plain / GGUF_WEIGHTS}, which is missing"):
        load_model(plain, quantization="gguf")
    with pytest.raises(ValueError, match="cannot quantize to 'q4_k'"):
        QuantizedWeight.quantize(torch.zeros(4, 64), "q4_k")


def test_auto_resolves_to_the_gguf_weights_and_bf16_prefill_where_the_cpu_has_it(
    default_model_dir, monkeypatch
):
    """ "auto" picks the GGUF's own weights where the directory has them, on the CPU, and
    bfloat16 prefill products for them where the CPU has bfloat16 matmul instructions."""
    from engram_serve import llm
    from engram_serve.config import EngineConfig

    def resolved(has_bf16: bool, **fields):
        monkeypatch.setattr(llm, "has_bf16_matmul", lambda: has_bf16)
        config = llm.resolve_engine_config(EngineConfig(**fields), default_model_dir)
        return config.quantization, config.dtype

    assert resolved(True) == ("gguf", "bfloat16")
    assert resolved(False) == ("gguf", "float32")
    assert resolved(True, quantization="none") == ("none", "float32")
    assert resolved(True, device="cuda") == ("none", "float32")
    assert resolved(True, quantization="q8_0", dtype="float32") == ("q8_0", "float32")
