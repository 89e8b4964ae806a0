"""Triton n-gram hashing: every Engram layer, order and head of a packed batch in one launch.

The twin is `reference.ngram_hash`; the CPU path is its compiled twin `cpu_hash.ngram_hash_cpu`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engram_serve.kernels.launch import check_launch_device, check_tensor

_BLOCK_T = 64  # tokens per program


@triton.jit
def _ngram_hash_kernel(
    ids_ptr,  # [T] int64 compressed ids of S sequences packed flat
    qsl_ptr,  # [S+1] int64 query_start_loc
    lookback_ptr,  # [S, N-1] int64, oldest first
    mult_ptr,  # [L, N] int64
    primes_ptr,  # [L, C] int64, C = (N-1)*H, order-major
    offsets_ptr,  # [L, C] int64 (read only when HAS_OFFSETS)
    out_ptr,  # [L, T, C] int64
    num_tokens,
    num_seqs,
    search_steps,  # binary-search steps to find a token's sequence: S.bit_length()
    N: tl.constexpr,
    H: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[l, t, c] = (XOR_{k < n(c)} x[t-k] * m[l, k]) mod p[l, c] (+ offset[l, c]),
    n(c) = c // H + 2 the order of column c, x[t-k] read from the lookback before a chunk."""
    layer = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    t_mask = t < num_tokens
    # Sequence of each token: the largest s with qsl[s] <= t (this skips empty sequences).
    lo = tl.zeros([BLOCK_T], tl.int64)
    hi = lo + num_seqs
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(qsl_ptr + mid, mask=t_mask, other=0) <= t
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    pos = t - tl.load(qsl_ptr + lo, mask=t_mask, other=0)  # [BT] position within the chunk
    cols = tl.arange(0, BLOCK_C)
    c_mask = cols < (N - 1) * H
    order = cols // H + 2  # [BC]
    mix = tl.zeros([BLOCK_T, BLOCK_C], tl.int64)
    for k in tl.static_range(N):
        in_chunk = pos >= k
        x_new = tl.load(ids_ptr + t - k, mask=t_mask & in_chunk, other=0)
        x_old = tl.load(
            lookback_ptr + lo * (N - 1) + (N - 1) + pos - k, mask=t_mask & ~in_chunk, other=0
        )
        # Ids < V' and multipliers < int64_max // V': the product never overflows.
        prod = tl.where(in_chunk, x_new, x_old) * tl.load(mult_ptr + layer * N + k)  # [BT]
        mix = mix ^ tl.where(k < order[None, :], prod[:, None], 0)
    num_cols = (N - 1) * H
    # XOR of non-negative products is non-negative, so `%` agrees with NumPy's floor remainder.
    rows = mix % tl.load(primes_ptr + layer * num_cols + cols, mask=c_mask, other=1)[None, :]
    if HAS_OFFSETS:
        rows += tl.load(offsets_ptr + layer * num_cols + cols, mask=c_mask, other=0)[None, :]
    out = out_ptr + (layer * num_tokens + t[:, None]) * num_cols + cols[None, :]
    tl.store(out, rows, mask=t_mask[:, None] & c_mask[None, :])


def ngram_hash(
    compressed_ids: torch.Tensor,
    query_start_loc: torch.Tensor,
    lookback: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    offsets: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows (offsets given) or per-head hashes of every Engram layer, `[L, T, (N-1)*H]` int64.

    For layer l, order n = 2..N, head j (column c = (n-2)*H + j):
        out[l, t, c] = (XOR_{k<n} x[t-k] * multipliers[l, k]) mod primes[l, c] + offsets[l, c]
    where x[t-k] before a sequence's chunk start is read from its lookback.

    compressed_ids [T], query_start_loc [S+1] (qsl[0] = 0, qsl[S] = T, non-decreasing),
    lookback [S, N-1], multipliers [L, N], primes [L, (N-1)*H], offsets [L, (N-1)*H]: int64,
    contiguous, on one device. Preconditions not checked (they would need a device sync): ids
    lie in [0, V') and multipliers below int64_max // V', as NgramHasher builds them.
    """
    device = compressed_ids.device
    check_launch_device(_ngram_hash_kernel, device)
    check_tensor("compressed_ids", compressed_ids, device, (torch.int64,), dim=1)
    check_tensor("query_start_loc", query_start_loc, device, (torch.int64,), dim=1)
    check_tensor("lookback", lookback, device, (torch.int64,), dim=2)
    check_tensor("multipliers", multipliers, device, (torch.int64,), dim=2)
    check_tensor("primes", primes, device, (torch.int64,), dim=2)
    num_layers, max_ngram = multipliers.shape
    num_seqs, num_tokens = query_start_loc.shape[0] - 1, compressed_ids.shape[0]
    num_cols = primes.shape[1]  # (N-1)*H
    if max_ngram < 2 or primes.shape[0] != num_layers or num_cols % (max_ngram - 1):
        raise ValueError(
            f"multipliers [L, N] = {tuple(multipliers.shape)} need primes [L, (N-1)*H], "
            f"got {tuple(primes.shape)}"
        )
    if num_seqs < 0 or (num_tokens and num_seqs == 0):
        raise ValueError(f"query_start_loc must be [S+1] with S >= 1 for {num_tokens} tokens")
    if tuple(lookback.shape) != (num_seqs, max_ngram - 1):
        raise ValueError(
            f"lookback must be [S, N-1] = {(num_seqs, max_ngram - 1)}, got {tuple(lookback.shape)}"
        )
    if offsets is not None:
        check_tensor("offsets", offsets, device, (torch.int64,), dim=2)
        if offsets.shape != primes.shape:
            raise ValueError(
                f"offsets must match primes {tuple(primes.shape)}, got {tuple(offsets.shape)}"
            )
    want = (num_layers, num_tokens, num_cols)
    if out is None:
        out = torch.empty(want, dtype=torch.int64, device=device)
    else:
        check_tensor("out", out, device, (torch.int64,))
        if tuple(out.shape) != want:
            raise ValueError(f"out must be [L, T, (N-1)*H] = {want}, got {tuple(out.shape)}")
    if num_tokens == 0:
        return out
    grid = (triton.cdiv(num_tokens, _BLOCK_T), num_layers)
    _ngram_hash_kernel[grid](
        compressed_ids, query_start_loc, lookback, multipliers, primes,
        primes if offsets is None else offsets, out,
        num_tokens, num_seqs, max(1, num_seqs.bit_length()),
        N=max_ngram, H=num_cols // (max_ngram - 1), HAS_OFFSETS=offsets is not None,
        BLOCK_T=_BLOCK_T, BLOCK_C=triton.next_power_of_2(num_cols),
    )  # fmt: skip
    return out
