"""kernels/cpu_quant.py: block-quantized weights against gguf-py (the formats' oracle) and
products against float64 ones; the fused decode layer with quantized weights against the same
layer with their dequantized float32 values."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from helpers import counting

from engram_serve.kernels import cpu_quant
from engram_serve.kernels.cpu_quant import FORMATS, QUANTIZABLE, QuantizedWeight

# Bytes of the fp16 scales in each format's block, which random blocks must keep finite.
SCALE_BYTES = {"q4_0": [0], "q4_1": [0, 2], "q8_0": [0], "q4_k": [0, 2], "q6_k": [208]}


def _qtype(format: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[format.upper()]


def _blocks(format: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF data [N, row_bytes]: gguf-py's quantizer where it implements the format (with a
    zero block and a constant one among random values), else random bytes with finite fp16
    scales of both signs (one of them -0.0)."""
    rng = np.random.default_rng(seed)
    if format in QUANTIZABLE:
        w = rng.standard_normal((n, k), dtype=np.float32)
        w[0, :32] = 0.0
        w[-1, -32:] = -1.5
        return gguf.quants.quantize(w, _qtype(format))
    block_size, type_size = gguf.GGML_QUANT_SIZES[_qtype(format)]
    data = rng.integers(0, 256, (n, k // block_size, type_size), dtype=np.uint8)
    scales = (rng.standard_normal((n, k // block_size)) * 0.02).astype(np.float16)
    scales[0, 0] = -0.0
    for at in SCALE_BYTES[format]:
        data[..., at : at + 2] = scales.view(np.uint8).reshape(n, -1, 2)
    return data.reshape(n, -1)


def _oracle(data: np.ndarray, format: str) -> np.ndarray:
    return gguf.quants.dequantize(data, _qtype(format))


def _assert_bitwise(got: torch.Tensor, want: np.ndarray) -> None:
    """Same bits (so -0.0 != 0.0), with the first difference named."""
    got = got.numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    diff = np.argwhere(got.view(np.int32) != want.view(np.int32))
    assert not len(diff), f"{len(diff)} values differ, first at {diff[0]}: {got[tuple(diff[0])]!r}"


def _weight(format: str, n: int, k: int, seed: int = 0) -> tuple[QuantizedWeight, np.ndarray]:
    data = _blocks(format, n, k, seed)
    return QuantizedWeight.from_gguf(data, format.upper(), (n, k)), _oracle(data, format)


def _k(format: str) -> int:
    """A K that is a multiple of the format's block and not of 64 (so not of the 16-lane
    vectors' pairs either) where the block allows it."""
    return 768 if format in ("q4_k", "q6_k") else 96


# --- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("format", FORMATS)
def test_dequantize_equals_gguf_bit_for_bit(format):
    weight, want = _weight(format, 11, _k(format))
    assert weight.format == format and weight.shape == want.shape
    _assert_bitwise(weight.dequantize(), want)


def test_dequantize_equals_gguf_on_the_default_model():
    """Real tensors: the default model's Q4_1 layers and its Q8_0 embedding (its first rows)."""
    from engram_serve.model.default_model import packaged_gguf_path

    tensors = {t.name: t for t in gguf.GGUFReader(packaged_gguf_path()).tensors}
    names = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.29.attn_k.weight"]
    seen = set()
    for name, rows in [*((n, None) for n in names), ("token_embd.weight", 4096)]:
        t = tensors[name]
        data = t.data[:rows]
        shape = (len(data), int(t.shape[0]))
        weight = QuantizedWeight.from_gguf(data, t.tensor_type.name, shape)
        _assert_bitwise(weight.dequantize(), _oracle(data, t.tensor_type.name.lower()))
        seen.add(weight.format)
    assert seen == {"q4_1", "q8_0"}


@pytest.mark.parametrize("format", QUANTIZABLE)
def test_quantize_is_ggufs_reference_quantizer(format):
    w = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    want = _oracle(gguf.quants.quantize(w.numpy(), _qtype(format)), format)
    weight = QuantizedWeight.quantize(w, format)
    assert weight.format == format
    _assert_bitwise(weight.dequantize(), want)
    assert np.abs(want - w.numpy()).max() < 0.2 * np.abs(w.numpy()).max()  # really quantized


def test_quantize_names_what_it_supports():
    for format in ("q4_k", "q6_k", "f16"):
        with pytest.raises(ValueError, match=r"cannot quantize to .*q4_0, q4_1, q8_0"):
            QuantizedWeight.quantize(torch.randn(4, 256), format)
    with pytest.raises(ValueError, match="K a multiple of 32"):
        QuantizedWeight.quantize(torch.randn(4, 48), "q8_0")
    with pytest.raises(ValueError, match="float32"):
        QuantizedWeight.quantize(torch.randn(4, 64).double(), "q8_0")


def test_memory_stays_close_to_the_blocks():
    """No float32 copy: at most 1.25 bytes a value (q4: 0.75, q8_0: 1.125, q6_k: 1.25)."""
    for format, most in [("q4_0", 0.625), ("q4_1", 0.75), ("q4_k", 0.75), ("q8_0", 1.125)]:
        weight, _ = _weight(format, 8, 768)
        assert weight.nbytes == most * 8 * 768, format
    weight, _ = _weight("q6_k", 8, 768)
    assert weight.nbytes == 1.25 * 8 * 768


def test_from_gguf_refuses_bad_input():
    data = _blocks("q4_1", 4, 64)
    with pytest.raises(ValueError, match=r"unsupported GGUF tensor type 'Q5_K'.*Q4_0, Q4_1"):
        QuantizedWeight.from_gguf(data, "Q5_K", (4, 64))
    with pytest.raises(ValueError, match="unsupported GGUF tensor type 'F32'"):
        QuantizedWeight.from_gguf(np.zeros((4, 64), np.float32), "F32", (4, 64))
    with pytest.raises(ValueError, match=r"Q4_1 needs K a multiple of 32, got shape \(4, 80\)"):
        QuantizedWeight.from_gguf(data, "Q4_1", (4, 80))
    with pytest.raises(ValueError, match=r"takes 4 rows of 40 bytes, got \(4, 20\)"):
        QuantizedWeight.from_gguf(data[:, :20], "Q4_1", (4, 64))
    with pytest.raises(ValueError, match=r"must be a 2-D uint8 array, got int8"):
        QuantizedWeight.from_gguf(data.view(np.int8), "Q4_1", (4, 64))


# --- rows ---------------------------------------------------------------------------------


@pytest.mark.parametrize("format", FORMATS)
def test_take_rows_and_permute_rows(format):
    weight, want = _weight(format, 21, _k(format))
    ids = torch.tensor([20, 0, 7, 7, 3])
    _assert_bitwise(weight.take_rows(ids), want[ids.numpy()])
    assert weight.take_rows(torch.tensor([], dtype=torch.int64)).shape == (0, weight.shape[1])
    perm = np.random.default_rng(2).permutation(21)
    permuted = weight.permute_rows(perm)
    _assert_bitwise(permuted.dequantize(), want[perm])
    assert permuted.format == format and permuted.nbytes == weight.nbytes


def test_rows_refuse_bad_ids():
    weight, _ = _weight("q8_0", 5, 64)
    with pytest.raises(ValueError, match=r"ids span \[-1, 2\], outside \[0, 5\)"):
        weight.take_rows(torch.tensor([2, -1]))
    with pytest.raises(ValueError, match=r"ids span \[0, 5\]"):
        weight.take_rows(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        weight.take_rows(torch.tensor([[0]]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        weight.take_rows(torch.tensor([0.0]))
    for perm in ([0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 4, 5]):
        with pytest.raises(ValueError, match=r"permutation of range\(5\)"):
            weight.permute_rows(np.array(perm))


def test_concat_of_one_storage_keeps_it():
    """q/k/v of one format, and q4_1 with q4_k (both 4-bit with a scale and offset per 32)."""
    parts = [_weight("q4_1", n, 256, seed) for seed, n in enumerate((8, 3, 5))]
    fused = QuantizedWeight.concat([p for p, _ in parts])
    assert fused.format == "q4_1" and fused.shape == (16, 256)
    assert fused.nbytes == sum(p.nbytes for p, _ in parts)
    _assert_bitwise(fused.dequantize(), np.concatenate([want for _, want in parts]))
    mixed = [_weight("q4_1", 4, 256), _weight("q4_k", 3, 256)]
    fused = QuantizedWeight.concat([p for p, _ in mixed])
    assert fused.format == "q4_1" and fused.codes.dtype == np.uint8
    _assert_bitwise(fused.dequantize(), np.concatenate([want for _, want in mixed]))


@pytest.mark.parametrize(
    "formats",
    [FORMATS, ("q4_0", "q4_1"), ("q8_0", "q6_k"), ("q4_k", "q6_k"), ("q4_0", "q8_0")],
    ids="+".join,
)
def test_concat_of_mixed_formats_keeps_every_value(formats):
    parts = [_weight(f, 5 + i, 512, seed=i) for i, f in enumerate(formats)]
    fused = QuantizedWeight.concat([p for p, _ in parts])
    want = np.concatenate([w for _, w in parts])
    _assert_bitwise(fused.dequantize(), want)
    assert fused.format == ("q6_k" if "q6_k" in formats else "q8_0")
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    _assert_close_to_float64(cpu_quant.linear(x, fused), x, want)


def test_concat_refuses_mismatched_parts():
    with pytest.raises(ValueError, match="at least one"):
        QuantizedWeight.concat([])
    with pytest.raises(ValueError, match="needs one K"):
        QuantizedWeight.concat([_weight("q8_0", 2, 64)[0], _weight("q8_0", 2, 96)[0]])


# --- linear ---------------------------------------------------------------------------------


def _assert_close_to_float64(got, x, weight, bias=None):
    """Within the textbook bound of a float32 sum of K products in any order:
    |error| <= K u (|x| @ |W|^T) (+ u |result| for the bias), u = 2^-24."""
    w = torch.from_numpy(np.asarray(weight)).double()
    want = x.double() @ w.T
    bound = x.shape[1] * 2.0**-24 * (x.double().abs() @ w.abs().T)
    if bias is not None:
        want += bias.double()
        bound += 2.0**-24 * want.abs()
    assert got.dtype == torch.float32 and got.shape == want.shape
    excess = (got.double() - want).abs() - bound
    assert excess.max() <= 0, f"off by {excess.max():.3g} beyond the bound at {excess.argmax()}"


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 64, 300])
@pytest.mark.parametrize("format", FORMATS)
def test_linear_equals_a_float64_product(format, rows, num_threads):
    """N = 13: a full tile of 8 and a short one; K = 96 or 768: not a multiple of 64; odd rows
    of x (a lone last row), rows that dequantize a tile once (64), and the banded path (300)."""
    weight, want = _weight(format, 13, _k(format), seed=rows)
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows))
    _assert_close_to_float64(cpu_quant.linear(x, weight, num_threads=num_threads), x, want)


@pytest.mark.skipif(
    not cpu_quant._NIBBLE_TABLES, reason="no AVX-512 here: the tests above run the other path"
)
def test_4_bit_blocks_without_avx512_give_the_same_values():
    """With AVX-512, 4-bit codes are looked up in their block's 16 values; without it, each is
    converted and scaled. The tests above, run in a process whose numba compiles without
    AVX-512, check the second path against gguf-py and float64 products too."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features().flatten().replace("+avx512", "-avx512")
    env = {**os.environ, "NUMBA_CPU_FEATURES": features}
    probe = "from engram_serve.kernels import cpu_quant; print(cpu_quant._NIBBLE_TABLES)"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
    tests = "(bit_for_bit or float64_product) and (q4_0 or q4_1 or q4_k)"
    pytest_args = [__file__, "-q", "-p", "no:cacheprovider", "-k", tests]
    run = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:]


@pytest.mark.parametrize("rows", [1, 64, 300])
def test_linear_adds_the_bias_and_takes_strided_rows(rows):
    weight, want = _weight("q4_1", 40, 64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, rows, generator=gen).t()  # not contiguous
    bias = torch.randn(40, generator=gen)
    _assert_close_to_float64(cpu_quant.linear(x, weight, bias), x, want, bias)


def test_the_banded_path_crosses_bands(monkeypatch):
    monkeypatch.setattr(cpu_quant, "BAND_ELEMENTS", 64 * 24)  # bands of 24 rows
    weight, want = _weight("q4_0", 50, 64)
    x = torch.randn(cpu_quant.BAND_MIN_ROWS + 1, 64, generator=torch.Generator().manual_seed(4))
    _assert_close_to_float64(cpu_quant.linear(x, weight), x, want)


def test_batched_decode_layer_runs_its_products_in_bfloat16_bands(monkeypatch):
    """From cpu_quant.BFLOAT16_BAND_MIN_ROWS sequences, a layer of quantized matrices decodes
    with its four products banded in bfloat16 (torch) between compiled steps: the fused float32
    layer's output and K/V within bfloat16's rounding (x and W rounded to 8 bits, the products'
    sums too), where a misplaced norm, RoPE or residual would be off by O(1)."""
    from engram_serve.kernels import cpu_decode

    dim, heads, kv_heads, hd, ff = 256, 4, 2, 64, 256
    num_seqs = cpu_quant.BFLOAT16_BAND_MIN_ROWS + 3
    parts = {"qkv": ((heads + 2 * kv_heads) * hd, dim), "o_proj": (dim, heads * hd),
             "gate_up": (2 * ff, dim), "down": (dim, ff)}  # fmt: skip
    weights = {}
    for seed, (name, (n, k)) in enumerate(parts.items()):
        weight, values = _weight("q8_0", n, k, seed=seed)
        # A power of two (exact) that keeps the activations moderate through the layer.
        weights[name] = _scaled(
            weight, np.float32(2.0 ** np.floor(np.log2(0.5 / np.abs(values).max())))
        )
    banded = []
    monkeypatch.setattr(cpu_quant, "_banded", counting(cpu_quant._banded, banded))
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        h, layer, rope, (k, v), meta = _decode_case(weights, dim, kv_heads, hd, num_seqs, num_seqs)
        step = cpu_decode.decode_step(*rope, **meta, k_cache=k)
        fused = cpu_decode.bind(layer, 1e-6, k, v, scale=hd**-0.5)
        outputs[dtype] = (cpu_decode.decode_layer(h, fused, step, dtype), k, v)
    assert len(banded) == 4  # the bfloat16 layer's four products, none of the float32 one's
    (want, want_k, want_v), (got, got_k, got_v) = outputs.values()
    assert not torch.equal(got, want)
    for a, b in ((got, want), (got_k, want_k), (got_v, want_v)):
        torch.testing.assert_close(a, b, atol=0.03 * b.abs().max().item(), rtol=0.02)


def test_bfloat16_stores_round_as_torch_converts():
    """cpu_vector.store_bf16 against torch's float32 -> bfloat16 conversion, bit for bit: ties
    (half a bfloat16 step) to even both ways, signs, a subnormal, the largest finite values."""
    import numba

    from engram_serve.kernels.cpu_vector import load, store_bf16

    @numba.njit
    def to_bf16(values, out):
        store_bf16(out, 0, 0, load(values, 0, 0))

    one = np.float32(1.0)
    step = np.float32(2.0**-7)  # a bfloat16 step at 1
    cases = [one + step / 2, one + 3 * step / 2, one + step / 2 + np.float32(2.0**-23),
             -(one + step / 2), np.float32(1e-40), np.float32(3.0e38), np.float32(-0.0),
             np.float32(np.pi)]  # fmt: skip
    values = np.array([cases * 2], dtype=np.float32)  # [1, 16]
    got = np.zeros((1, 16), np.uint16)
    to_bf16(values, got)
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.uint16).numpy()
    assert (got == want).all(), f"{got} != {want}"


@pytest.mark.parametrize("format", ["q4_1", "q6_k"])
def test_bfloat16_prefill_products_cross_bands(format, monkeypatch):
    """Prefill-sized products in bfloat16: the weight dequantized straight into bfloat16 holds
    gguf-py's values as torch rounds them, and the product, banded, is that of the rounded x
    and W, its float32 sums rounded to bfloat16 once."""
    k = _k(format)
    monkeypatch.setattr(cpu_quant, "BAND_ELEMENTS", k * 24)  # bands of 24 rows
    weight, want = _weight(format, 50, k)
    bits = torch.empty(50, k, dtype=torch.bfloat16)
    cpu_quant._dequantize_rows(weight.arrays, np.arange(50), bits.view(torch.uint16).numpy())
    assert torch.equal(
        bits.view(torch.uint16), torch.from_numpy(want).bfloat16().view(torch.uint16)
    )
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(cpu_quant.BAND_MIN_ROWS + 1, k, generator=gen)
    got = cpu_quant.linear(x, weight, prefill_dtype=torch.bfloat16)
    x64, w64 = x.bfloat16().double(), bits.double()
    exact = x64 @ w64.T
    bound = 2.0**-8 * exact.abs() + k * 2.0**-24 * (x64.abs() @ w64.abs().T)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert ((got.double() - exact).abs() <= bound).all()


def test_linear_refuses_what_it_cannot_run():
    weight, _ = _weight("q4_1", 8, 64)
    assert cpu_quant.supports(torch.randn(1, 64), weight)
    assert cpu_quant.supports(torch.randn(1000, 64), weight)
    for x in (torch.randn(2, 64).double(), torch.randn(64), torch.randn(0, 64), torch.randn(2, 32)):
        assert not cpu_quant.supports(x, weight)
        with pytest.raises(ValueError, match=r"linear needs float32 CPU x \[M >= 1, K\]"):
            cpu_quant.linear(x, weight)
    assert not cpu_quant.supports(torch.randn(2, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match="and a QuantizedWeight"):
        cpu_quant.linear(torch.randn(2, 64), torch.randn(8, 64))


# --- the fused decode layer ---------------------------------------------------------------


def _decode_case(weights, dim, kv_heads, hd, num_seqs=3, block_size=4):
    from engram_serve.kernels.cpu_decode import LayerWeights

    gen = torch.Generator().manual_seed(5)
    layer = LayerWeights(
        torch.rand(dim, generator=gen) + 0.5, weights["qkv"], None, None, None,
        weights["o_proj"], torch.rand(dim, generator=gen) + 0.5, weights["gate_up"],
        weights["down"],
    )  # fmt: skip
    h = torch.randn(num_seqs, dim, generator=gen)
    angles = torch.rand(num_seqs, 1, hd // 2, generator=gen) * 6
    caches = [torch.zeros(1 + num_seqs, block_size, kv_heads, hd) for _ in range(2)]
    # Sequence s: s earlier tokens already cached in its block, the new one at position s.
    for cache in caches:
        cache.normal_(generator=gen)
    meta = dict(
        slot_mapping=torch.arange(num_seqs) * (block_size + 1) + block_size,
        block_tables=torch.arange(1, 1 + num_seqs)[:, None],
        seq_lens=torch.arange(1, 1 + num_seqs),
    )
    return h, layer, (angles.cos(), angles.sin()), caches, meta


QUANTIZED_LAYERS = {
    # Each matrix on its own: quantized ones beside float32 ones.
    "q4_0 qkv, q8_0 o, q4_1 gate_up, float32 down": dict(
        qkv="q4_0", o_proj="q8_0", gate_up="q4_1", down=None
    ),
    # A Q4_K_M-like layer: K-quants, v in Q6_K fused with q/k in Q4_K.
    "q4_k and q6_k": dict(qkv=("q4_k", "q4_k", "q6_k"), o_proj="q4_k", gate_up="q4_k", down="q6_k"),
}


@pytest.mark.parametrize("layout", QUANTIZED_LAYERS.values(), ids=QUANTIZED_LAYERS.keys())
def test_decode_layer_with_quantized_weights_equals_their_float32_values(layout):
    from engram_serve.kernels import cpu_decode

    dim, heads, kv_heads, hd, ff = 256, 4, 2, 64, 256  # every K a multiple of 256 (K-quants)
    rows = {
        "qkv": ((heads * hd, kv_heads * hd, kv_heads * hd), dim),
        "o_proj": ((dim,), heads * hd),
        "gate_up": ((2 * ff,), dim),
        "down": ((dim,), ff),
    }
    quantized, dense = {}, {}
    for seed, (name, (parts, k)) in enumerate(rows.items()):
        formats = layout[name]
        if formats is None:
            dense[name] = quantized[name] = torch.randn(sum(parts), k) * 0.05
            continue
        formats = (formats,) * len(parts) if isinstance(formats, str) else formats
        pieces = [
            _weight(f, n, k, seed=10 * seed + i) for i, (f, n) in enumerate(zip(formats, parts))
        ]
        values = np.concatenate([w for _, w in pieces])
        # A power of two (exact) that keeps the activations moderate through the layer.
        factor = np.float32(2.0 ** np.floor(np.log2(0.5 / np.abs(values).max())))
        quantized[name] = _scaled(QuantizedWeight.concat([p for p, _ in pieces]), factor)
        dense[name] = torch.from_numpy(values * factor)
        _assert_bitwise(quantized[name].dequantize(), dense[name].numpy())

    outputs = []
    for weights in (quantized, dense):
        h, layer, rope, (k, v), meta = _decode_case(weights, dim, kv_heads, hd)
        assert cpu_decode.supports(h)
        step = cpu_decode.decode_step(*rope, **meta, k_cache=k)
        fused = cpu_decode.bind(layer, 1e-6, k, v, scale=hd**-0.5)
        out = cpu_decode.decode_layer(h, fused, step)
        outputs.append((out, k, v))
    (out, k, v), (want, want_k, want_v) = outputs
    assert not torch.equal(out, h)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(k, want_k, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(v, want_v, atol=2e-6, rtol=1e-5)


def _scaled(weight: QuantizedWeight, factor: np.float32) -> QuantizedWeight:
    """The weight times a power of two: each value scaled exactly."""
    offset = None if weight.offset is None else weight.offset * factor
    return QuantizedWeight(weight.format, weight.codes, weight.scale * factor, offset)
