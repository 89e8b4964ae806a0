"""The CPU path's decoder layer for decode-only steps (every sequence one new token), float32,
in one compiled call:

    x = RMSNorm_1(h);  q, k, v = x W_qkv^T (+ b);  q, k = RoPE(q, k)   (Qwen3: q/k norm first)
    cache[slot] = k, v;  h += W_o attention(q, cache)
    x = RMSNorm_2(h);  h += W_down (SiLU(x W_gate^T) * x W_up^T)

Decoding one sequence reads all the weights for a single row, so a token costs what reading 540
MB of the default model costs (~43 ms on this project's machines), plus the layers' small
operations: norms, RoPE, the KV write, residual adds, SiLU. In eager torch those are ~12 calls a
layer that took ~30 ms a token together, each 20-80 us because the weight stream between them
evicts the caches that torch's dispatch runs from. Here they are a few loops between the
matrix products, which are kernels/cpu_linear.py's tiles and kernels/cpu_attention.py's
per-sequence attention, so the arithmetic is theirs; norms and RoPE sum in another order than
torch's, so results differ from the unfused layer in the last bits (tests/test_llama.py bounds
it). Single-stream decode of the default model: 21.0-24.5 tok/s, against 15.5-19.0 with the
eager layers (3 runs of 64 tokens each, alternating, same process).

Any of the four matrices may be a QuantizedWeight instead (kernels/cpu_quant.py's block-quantized
tiles, picked by the weight tuple's type when numba compiles the layer: one compiled layer per
combination of weight kinds); float32 ones run cpu_linear's tiles as before. From
cpu_quant.BFLOAT16_BAND_MIN_ROWS sequences, when the model's products run in bfloat16, a layer of
quantized matrices runs them banded in torch (AMX) between the same compiled steps instead
(`_banded_layer`).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import torch

from engram_serve.kernels import cpu_quant
from engram_serve.kernels.cpu_attention import attention_kernel, check_in_pool
from engram_serve.kernels.cpu_half import CACHE_DTYPES, as_bits, store
from engram_serve.kernels.cpu_linear import MAX_ROWS
from engram_serve.kernels.cpu_quant import QuantizedWeight, kernel_arrays, matmul_tile, tile_count
from engram_serve.kernels.cpu_threads import launch_parallel

MATMUL_WEIGHTS = ("qkv", "o_proj", "gate_up", "down")
# An absent bias or q/k norm, as the kernels take it: an empty vector rather than None, so that
# Llama, Qwen2 and Qwen3 layers share one compiled kernel (each is ~20 s of compilation).
_ABSENT = np.empty(0, np.float32)


class LayerWeights(NamedTuple):
    """One decoder layer's parameters, float32 (names as in model/llama.py); each matrix may be
    a QuantizedWeight instead (kernels/cpu_quant.py), each independently."""

    input_norm: torch.Tensor  # [D]
    qkv: torch.Tensor | QuantizedWeight  # [(H + 2 KVH) hd, D]
    qkv_bias: torch.Tensor | None  # [(H + 2 KVH) hd] (Qwen2)
    q_norm: torch.Tensor | None  # [hd] (Qwen3)
    k_norm: torch.Tensor | None  # [hd]
    o_proj: torch.Tensor | QuantizedWeight  # [D, H hd]
    post_norm: torch.Tensor  # [D]
    gate_up: torch.Tensor | QuantizedWeight  # [2 FF, D]
    down: torch.Tensor | QuantizedWeight  # [D, FF]


@numba.njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
def _rms_norm(x, weight, eps, out):
    """out[m] = weight * x[m] / sqrt(mean(x[m]^2) + eps) for x `[M, D]`; out may be x."""
    rows, dim = x.shape
    for m in range(rows):
        total = np.float32(0.0)
        for i in range(dim):
            total += x[m, i] * x[m, i]
        inv = np.float32(1.0) / np.sqrt(total / np.float32(dim) + eps)
        for i in range(dim):
            out[m, i] = weight[i] * (x[m, i] * inv)


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=True, boundscheck=False)
def _decode_layer_kernel(
    h, input_norm, qkv_w, qkv_b, q_norm, k_norm, o_w, post_norm, gate_up_w, down_w,
    cos, sin, k_cache, v_cache, slots, block_tables, seq_lens, eps, scale, out,
):  # fmt: skip
    """out = the layer applied to h `[S, D]` (token s is sequence s's); K/V written to the cache.
    The matrices are cpu_quant.matmul_tile's weight tuples; cos, sin `[S, hd/2]`; q/k norms and
    the bias may be empty (`_ABSENT`)."""
    num_seqs, dim = h.shape
    x = np.empty((num_seqs, dim), np.float32)
    _rms_norm(h, input_norm, eps, x)
    qkv = np.empty((num_seqs, qkv_w[0].shape[0]), np.float32)
    for tile in numba.prange(tile_count(qkv_w, dim)):
        matmul_tile(x, qkv_w, qkv, tile)
    attn_rows = _attention(qkv, qkv_b, q_norm, k_norm, cos, sin, k_cache, v_cache, slots,
                           block_tables, seq_lens, eps, scale)  # fmt: skip
    proj = np.empty((num_seqs, dim), np.float32)
    for tile in numba.prange(tile_count(o_w, attn_rows.shape[1])):
        matmul_tile(attn_rows, o_w, proj, tile)
    for s in numba.prange(num_seqs):
        for i in range(dim):
            out[s, i] = h[s, i] + proj[s, i]

    _rms_norm(out, post_norm, eps, x)
    gate_up = np.empty((num_seqs, gate_up_w[0].shape[0]), np.float32)
    for tile in numba.prange(tile_count(gate_up_w, dim)):
        matmul_tile(x, gate_up_w, gate_up, tile)
    act = _swiglu(gate_up)
    for tile in numba.prange(tile_count(down_w, act.shape[1])):
        matmul_tile(act, down_w, proj, tile)
    for s in numba.prange(num_seqs):
        for i in range(dim):
            out[s, i] += proj[s, i]


@numba.njit(inline="always", fastmath=True, boundscheck=False)
def _attention(qkv, qkv_b, q_norm, k_norm, cos, sin, k_cache, v_cache, slots, block_tables,
               seq_lens, eps, scale):  # fmt: skip
    """The attention outputs `[S, H hd]` of q, k, v `qkv [S, (H + 2 KVH) hd]` (changed: bias,
    q/k norms and RoPE applied in place), each sequence's K and V written to its cache slot."""
    num_seqs = qkv.shape[0]
    _, block_size, kv_heads, hd = k_cache.shape
    heads = (qkv.shape[1] // hd) - 2 * kv_heads
    group, half = heads // kv_heads, hd // 2
    # Bias, q/k norms, RoPE (pairs (j, j + hd/2)), then K and V into their cache slots: a
    # sequence a thread, as every step below that is not a matrix product (on one thread these
    # small loops took a quarter of a 64-sequence layer).
    q = np.empty((num_seqs, kv_heads, group, hd), np.float32)
    for s in numba.prange(num_seqs):
        if qkv_b.shape[0] > 0:
            for j in range(qkv.shape[1]):
                qkv[s, j] += qkv_b[j]
        block, offset = slots[s] // block_size, slots[s] % block_size
        rotated = np.empty(hd, np.float32)
        for head in range(heads + kv_heads):
            vector = qkv[s : s + 1, head * hd : (head + 1) * hd]
            if q_norm.shape[0] > 0:
                _rms_norm(vector, q_norm if head < heads else k_norm, eps, vector)
            for d in range(half):
                x1, x2 = vector[0, d], vector[0, half + d]
                rotated[d] = x1 * cos[s, d] - x2 * sin[s, d]
                rotated[half + d] = x2 * cos[s, d] + x1 * sin[s, d]
            if head < heads:
                q[s, head // group, head % group, :] = rotated
            else:
                for d in range(hd):
                    k_cache[block, offset, head - heads, d] = store(k_cache, rotated[d])
        for kv in range(kv_heads):
            base = (heads + kv_heads + kv) * hd
            for d in range(hd):
                v_cache[block, offset, kv, d] = store(v_cache, qkv[s, base + d])

    # A sequence a task, all its KV heads read together; a lone sequence a KV head a task, so
    # that it takes every thread.
    attn = np.empty((num_seqs, kv_heads, group, hd), np.float32)
    heads_per_task = kv_heads if num_seqs > 1 else 1
    tasks_per_seq = kv_heads // heads_per_task
    for task in numba.prange(num_seqs * tasks_per_seq):
        s, first = task // tasks_per_seq, (task % tasks_per_seq) * heads_per_task
        attention_kernel(q, k_cache, v_cache, block_tables, seq_lens, scale, s, s + 1, first,
                         first + heads_per_task, attn)  # fmt: skip
    return attn.reshape((num_seqs, heads * hd))


@numba.njit(inline="always", fastmath=True, boundscheck=False)
def _swiglu(gate_up):
    """SiLU(gate) * up for gate_up `[S, 2 FF]` (gate first)."""
    num_seqs, ff = gate_up.shape[0], gate_up.shape[1] // 2
    act = np.empty((num_seqs, ff), np.float32)
    for s in numba.prange(num_seqs):
        for j in range(ff):
            gate = gate_up[s, j]
            act[s, j] = gate / (np.float32(1.0) + np.exp(-gate)) * gate_up[s, ff + j]
    return act


def supports(h: torch.Tensor) -> bool:
    """Whether the kernel takes these hidden states: float32 CPU rows, 1..MAX_ROWS of them (the
    weights and caches it takes: `bind`)."""
    return (
        h.device.type == "cpu"
        and h.dtype == torch.float32
        and h.dim() == 2
        and 0 < h.shape[0] <= MAX_ROWS
    )


class DecodeStep(NamedTuple):
    """A decode step's inputs that every layer shares, checked against the KV pool and
    converted for the kernel once a step (per layer they were ~1.5 ms of a ~14 ms step)."""

    cos: np.ndarray  # [S, hd/2]
    sin: np.ndarray
    slots: np.ndarray  # [S] int64
    tables: np.ndarray  # [S, max_blocks] int64
    lens: np.ndarray  # [S] int64


def decode_step(
    cos: torch.Tensor,  # [S, 1, hd/2] (model/llama.RotaryEmbedding)
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,  # [S] int64
    block_tables: torch.Tensor,  # [S, max_blocks] int64
    seq_lens: torch.Tensor,  # [S] int64, each >= 1, the new token included
    k_cache: torch.Tensor,  # any layer's: they share one shape
) -> DecodeStep:
    num_seqs = cos.shape[0]  # a token a sequence
    if not (slot_mapping.shape == seq_lens.shape == (num_seqs,) == block_tables.shape[:1]):
        raise ValueError(
            f"{num_seqs} tokens need {num_seqs} slots, lengths and block tables, got "
            f"{tuple(slot_mapping.shape)}, {tuple(seq_lens.shape)}, {tuple(block_tables.shape)}"
        )
    # The kernel reads and writes without bounds checks: every slot, length and block id must
    # lie in the pool.
    slots, tables, lens = (t.contiguous().numpy() for t in (slot_mapping, block_tables, seq_lens))
    check_in_pool(tables, lens, k_cache)
    if slots.min() < 0 or slots.max() >= k_cache.shape[0] * k_cache.shape[1]:
        raise ValueError(f"slots span [{slots.min()}, {slots.max()}], outside the pool")
    rope = (t.reshape(num_seqs, -1).contiguous().numpy() for t in (cos, sin))
    return DecodeStep(*rope, slots, tables, lens)


class FusedLayer(NamedTuple):
    """One layer's weights and KV caches as the kernel takes them, checked and converted once
    (`bind`): done on every call, that was ~50 us a layer, 1.5 ms of the default model's 13 ms
    single-stream step."""

    weights: tuple  # LayerWeights' fields: cpu_quant.matmul_tile's tuples for the matrices
    source: LayerWeights  # the tensors and QuantizedWeights themselves
    k_cache: np.ndarray  # [num_blocks, block_size, KVH, hd] float32, or float16 bits
    v_cache: np.ndarray
    eps: np.float32
    scale: np.float32


def bind(
    weights: LayerWeights,
    eps: float,
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, hd], written by decode_layer
    v_cache: torch.Tensor,
    scale: float,
) -> FusedLayer | None:
    """The layer as decode_layer takes it, valid while these tensors are the layer's; None where
    the kernel does not run it (a weight neither float32 on the CPU nor a QuantizedWeight, or a
    cache neither float32 nor float16)."""
    tensors = [w for w in weights if isinstance(w, torch.Tensor)]
    if k_cache.dtype not in CACHE_DTYPES or any(
        w.dtype != torch.float32 or w.device.type != "cpu" for w in tensors
    ):
        return None
    if v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"the K and V caches differ: {k_cache.dtype} {tuple(k_cache.shape)} against "
            f"{v_cache.dtype} {tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
    if (weights.q_norm is None) != (weights.k_norm is None):
        raise ValueError("q_norm and k_norm come together")
    # The kernel reads without bounds checks: the matrices must fit the hidden size.
    dim = weights.input_norm.shape[0]
    shapes = {name: tuple(getattr(weights, name).shape) for name in MATMUL_WEIGHTS}
    if not (shapes["qkv"][1] == shapes["gate_up"][1] == shapes["o_proj"][0] == shapes["down"][0]
            == dim and shapes["down"][1] * 2 == shapes["gate_up"][0]):  # fmt: skip
        raise ValueError(f"the layer's matrices do not fit its hidden size {dim}: {shapes}")
    arrays = tuple(
        kernel_arrays(w) if name in MATMUL_WEIGHTS
        else _ABSENT if w is None else w.detach().contiguous().numpy()
        for name, w in zip(LayerWeights._fields, weights, strict=True)
    )  # fmt: skip
    caches = as_bits(k_cache), as_bits(v_cache)
    return FusedLayer(arrays, weights, *caches, np.float32(eps), np.float32(scale))


def decode_layer(
    h: torch.Tensor,  # [S, D] float32 (`supports`), token s is sequence s's one new token
    layer: FusedLayer,
    step: DecodeStep,
    products_dtype: torch.dtype = torch.float32,  # of quantized products cpu_quant.banded runs
) -> torch.Tensor:  # [S, D], the layer's output (h is not changed)
    """The layer in one compiled call; or, where its four matrices are quantized and this many
    rows' products run banded in bfloat16 (cpu_quant.banded: batched decode on AMX), with those
    products by torch between the compiled steps."""
    if not (supports(h) and h.shape[0] == step.slots.shape[0]):
        raise ValueError(
            f"decode_layer needs float32 CPU tensors and 1..{MAX_ROWS} sequences, one a slot, got "
            f"h {h.dtype} {tuple(h.shape)} on {h.device} for {step.slots.shape[0]} slots"
        )
    if cpu_quant.banded(h.shape[0], products_dtype) and all(
        isinstance(getattr(layer.source, name), QuantizedWeight) for name in MATMUL_WEIGHTS
    ):
        return _banded_layer(h, layer, step, products_dtype)
    out = torch.empty_like(h)
    launch_parallel(
        _decode_layer_kernel,
        h.contiguous().numpy(),
        *layer.weights,
        step.cos,
        step.sin,
        layer.k_cache,
        layer.v_cache,
        step.slots,
        step.tables,
        step.lens,
        layer.eps,
        layer.scale,
        out.numpy(),
    )
    return out


def _banded_layer(
    h: torch.Tensor, layer: FusedLayer, step: DecodeStep, dtype: torch.dtype
) -> torch.Tensor:
    """_decode_layer_kernel's steps with its four products banded in `dtype` by
    cpu_quant.linear. At 64 sequences of the default model on AMX: 1.65 ms of products a layer
    against 2.85 on the float32 tiles."""
    w, arrays = layer.source, LayerWeights(*layer.weights)
    x = torch.empty_like(h)
    _rms_norm(h.contiguous().numpy(), arrays.input_norm, layer.eps, x.numpy())
    qkv = cpu_quant.linear(x, w.qkv, w.qkv_bias, prefill_dtype=dtype)  # the bias added here
    attn = launch_parallel(
        _attention_step, qkv.numpy(), arrays.q_norm, arrays.k_norm, step.cos, step.sin,
        layer.k_cache, layer.v_cache, step.slots, step.tables, step.lens, layer.eps, layer.scale,
    )  # fmt: skip
    h = h + cpu_quant.linear(torch.from_numpy(attn), w.o_proj, prefill_dtype=dtype)
    _rms_norm(h.numpy(), arrays.post_norm, layer.eps, x.numpy())
    gate_up = cpu_quant.linear(x, w.gate_up, prefill_dtype=dtype)
    act = launch_parallel(_swiglu_step, gate_up.numpy())
    return h.add_(cpu_quant.linear(torch.from_numpy(act), w.down, prefill_dtype=dtype))


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=True, boundscheck=False)
def _attention_step(qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, slots, block_tables,
                    seq_lens, eps, scale):  # fmt: skip
    return _attention(qkv, _ABSENT, q_norm, k_norm, cos, sin, k_cache, v_cache, slots,
                      block_tables, seq_lens, eps, scale)  # fmt: skip


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=True, boundscheck=False)
def _swiglu_step(gate_up):
    return _swiglu(gate_up)
