"""The CPU path's paged decode attention: `model/attention.decode_attention` reading the KV
cache in place.

    out[s, h] = softmax(scale * q[s, h] . K_s^T) V_s      (K_s, V_s: sequence s's first
                                                           seq_lens[s] cached tokens, KV head
                                                           h // G)

The torch twin first copies every sequence's blocks into a contiguous `[S, L, KVH, hd]` tensor
padded to the longest context, then runs a masked SDPA over the padding too. Decoding is bound by
memory traffic (a 64-sequence step of the default model reads ~0.5 GB of K/V), so this kernel
reads each sequence's own blocks once, where they lie, and nothing past its length. One job is
one sequence: each cached token's K (then V) record, all KV heads side by side, is read whole
once and serves all H query heads (a job per KV head instead read every record in pieces and
measured 2.4x slower). Each pass prefetches the record `_PREFETCH_POSITIONS` positions ahead:
blocks lie anywhere in the pool, so the hardware's prefetcher, which stops at page boundaries,
leaves each block's first reads waiting on DRAM; with the hints a 64-sequence step's attention
took ~1.3x less time (`python -m engram_serve.bench.kernels --attention`). Sequences are split
across threads in contiguous runs of about equal context (kernels/cpu_threads.py).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from engram_serve.kernels.cpu_half import CACHE_DTYPES, as_bits, load
from engram_serve.kernels.cpu_prefetch import prefetch_bytes
from engram_serve.kernels.cpu_threads import run_split, thread_count

_MIN_SEQS_PER_THREAD = 2
_PREFETCH_POSITIONS = 4  # 2 to 32 measured alike; 4 reaches into the next block early enough
_POW2 = np.array([2.0**n for n in range(-126, 1)], np.float32)  # 2^n for n in [-126, 0]
_LOG2E = np.float32(math.log2(math.e))
# ln 2 split Cody-Waite style: a high part of 9 significant bits, so n * high is exact for
# |n| <= 126, and the float32 nearest to the rest.
_LN2_HIGH = np.float32(0.693359375)
_LN2_LOW = np.float32(math.log(2.0) - 0.693359375)


@numba.njit(inline="always", fastmath=True)
def _exp_nonpositive(x):
    """exp(x) for x <= 0 within 1.0e-7 relative (NumPy's float32 exp: 2.0e-7; measured over
    [-87, 0] by tests/test_kernels.py), in a form the compiler vectorizes: libm's is a call per
    value, 5-6x slower here, and took a sixth of a 64-sequence step's attention. exp(x) = 2^n
    e^f with n = round(x / ln 2) and |f| <= ln 2 / 2: e^f by its Taylor series to f^7 (error <
    6e-9), 2^n from a table. Below -87, where exp(x) leaves float32's normal range, it returns
    exp(-87) ~ 1.6e-38: a softmax weight that small changes no sum it joins."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * _LOG2E + np.float32(0.5))
    f = (x - n * _LN2_HIGH) - n * _LN2_LOW  # n * _LN2_HIGH is exact: f loses no bits
    e = np.float32(1.0 / 5040)
    for coefficient in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        e = e * f + np.float32(coefficient)
    return e * _POW2[int(n) + 126]


@numba.njit(inline="always")
def _prefetch_record(cache, block_tables, seq, pos, length):
    """Prefetch position `pos`'s record (every KV head) of sequence `seq`, if it has one."""
    if pos < length:
        block_size = cache.shape[1]
        record_bytes = cache.shape[2] * cache.shape[3] * cache.itemsize
        slot = block_tables[seq, pos // block_size] * block_size + pos % block_size
        prefetch_bytes(cache.ctypes.data + slot * record_bytes, record_bytes)


@numba.njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
def attention_kernel(
    q, k_cache, v_cache, block_tables, seq_lens, scale, first, last, heads_first, heads_last, out
):
    """Sequences [first, last) of q `[S, KVH, G, hd]` into out (same shape), KV heads
    [heads_first, heads_last) of each, in float32; the caches float32 or float16 bits
    (kernels/cpu_half.py)."""
    _, _, group, hd = q.shape
    block_size = k_cache.shape[1]
    num_heads = heads_last - heads_first  # scores and sums of these heads only
    for seq in range(first, last):
        length = seq_lens[seq]
        scores = np.empty((num_heads, group, length), np.float32)
        for pos in range(length):
            _prefetch_record(k_cache, block_tables, seq, pos + _PREFETCH_POSITIONS, length)
            block, offset = block_tables[seq, pos // block_size], pos % block_size
            for h in range(num_heads):
                head = heads_first + h
                for g in range(group):
                    dot = np.float32(0.0)
                    for d in range(hd):
                        dot += q[seq, head, g, d] * load(k_cache[block, offset, head, d])
                    scores[h, g, pos] = dot * scale
        # Softmax with the maximum subtracted, as SDPA does: exp never overflows.
        for h in range(num_heads):
            for g in range(group):
                peak = scores[h, g, 0]
                for pos in range(1, length):
                    peak = max(peak, scores[h, g, pos])
                total = np.float32(0.0)
                for pos in range(length):
                    weight = _exp_nonpositive(scores[h, g, pos] - peak)
                    scores[h, g, pos] = weight
                    total += weight
                for pos in range(length):
                    scores[h, g, pos] /= total
        acc = np.zeros((num_heads, group, hd), np.float32)
        for pos in range(length):
            _prefetch_record(v_cache, block_tables, seq, pos + _PREFETCH_POSITIONS, length)
            block, offset = block_tables[seq, pos // block_size], pos % block_size
            for h in range(num_heads):
                head = heads_first + h
                for g in range(group):
                    weight = scores[h, g, pos]
                    for d in range(hd):
                        acc[h, g, d] += weight * load(v_cache[block, offset, head, d])
        out[seq, heads_first:heads_last] = acc


def check_in_pool(tables: np.ndarray, lens: np.ndarray, k_cache: torch.Tensor) -> None:
    """The kernel reads without bounds checks: every length must fit its block table and every
    block id must lie in the pool, or this raises ValueError."""
    capacity = tables.shape[1] * k_cache.shape[1]
    if lens.min() < 1 or lens.max() > capacity:
        raise ValueError(f"seq_lens span [{lens.min()}, {lens.max()}], outside [1, {capacity}]")
    if tables.min() < 0 or tables.max() >= k_cache.shape[0]:
        raise ValueError(f"block ids span [{tables.min()}, {tables.max()}], outside the pool")


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether this kernel can run the call: float32 CPU queries, a float32 or float16 cache."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype in CACHE_DTYPES


def decode_attention_cpu(
    q: torch.Tensor,  # [S, H, hd], one query per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, hd]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int64
    seq_lens: torch.Tensor,  # [S] int64, each >= 1
    scale: float,
    num_threads: int | None = None,  # None: torch's thread count
) -> torch.Tensor:  # [S, H, hd]
    num_seqs, num_heads, hd = q.shape
    kv_heads = k_cache.shape[2]
    if not supports(q, k_cache) or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"decode_attention_cpu needs float32 CPU queries and float32 or float16 caches, got "
            f"{q.dtype} {q.device}, caches {k_cache.dtype}/{v_cache.dtype}"
        )
    if num_heads % kv_heads or k_cache.shape[3] != hd or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
    out = torch.empty(num_seqs, kv_heads, num_heads // kv_heads, hd)
    if num_seqs == 0:
        return out.view(num_seqs, num_heads, hd)
    q_np = q.contiguous().view(num_seqs, kv_heads, num_heads // kv_heads, hd).numpy()
    tables, lens = block_tables.contiguous().numpy(), seq_lens.contiguous().numpy()
    check_in_pool(tables, lens, k_cache)
    k_np, v_np, out_np = as_bits(k_cache), as_bits(v_cache), out.numpy()
    run_split(
        num_seqs,
        thread_count(num_seqs, _MIN_SEQS_PER_THREAD, num_threads),
        lambda lo, hi: attention_kernel(
            q_np, k_np, v_np, tables, lens, scale, lo, hi, 0, kv_heads, out_np
        ),
        costs=lens,
    )
    return out.view(num_seqs, num_heads, hd)
