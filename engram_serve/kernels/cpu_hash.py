"""The CPU path's n-gram hash: `reference.ngram_hash` compiled with numba, one pass per token.

Each token's window, its multiply/XOR chain and all its heads' remainders are computed in
registers and written once, instead of NumPy's one array pass per operation and head. The
remainder by each head's prime uses a float64 reciprocal instead of a 64-bit division (see
`remainder`); the head loop vectorizes. `engram-serve bench hashing` has the speed.
"""

from __future__ import annotations

import numba
import numpy as np

# From this prime on, one reciprocal estimate is within one of the quotient (see `remainder`).
ONE_ESTIMATE_MIN_PRIME = 4096


@numba.njit(inline="always")
def remainder(x, p, inv_p, small_p):
    """x mod p for 0 <= x < 2**63 and 2 <= p < 2**50, exactly, with inv_p = 1 / p in float64.

    q = trunc(x * inv_p) carries two float roundings of relative size 2**-53 each and x's own,
    so it is within 3 * 2**10 / p of x / p: for p >= ONE_ESTIMATE_MIN_PRIME within one of
    floor(x / p), and r = x - q * p lies in [-p, 2p) (int64 arithmetic wraps to the right
    value). For smaller primes (`small_p`) a second estimate on r, which float64 holds exactly,
    brings it to [-p, p]. One correction each way finishes.
    """
    r = x - np.int64(np.float64(x) * inv_p) * p
    if small_p:
        r -= np.int64(np.float64(r) * inv_p) * p
    if r < 0:
        r += p
    if r >= p:
        r -= p
    return r


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _hash_kernel(ids, starts, lookback, multipliers, primes, inv_primes, offsets, small_p, out):
    num_layers, max_ngram = multipliers.shape
    heads = primes.shape[1] // (max_ngram - 1)
    window = np.empty(max_ngram, np.int64)
    for seq in range(starts.shape[0] - 1):
        begin = starts[seq]
        for t in range(begin, starts[seq + 1]):
            for k in range(max_ngram):  # window[k] = x[t-k], from the lookback before `begin`
                pos = t - k
                window[k] = ids[pos] if pos >= begin else lookback[seq, max_ngram - 1 + pos - begin]
            for layer in range(num_layers):
                mix = window[0] * multipliers[layer, 0]
                for order in range(max_ngram - 1):
                    mix ^= window[order + 1] * multipliers[layer, order + 1]
                    for head in range(heads):  # (a loop from 0 vectorizes; range(a, b) did not)
                        col = order * heads + head
                        row = remainder(mix, primes[layer, col], inv_primes[layer, col], small_p)
                        out[layer, t, col] = row + offsets[layer, col]


def ngram_hash_cpu(
    compressed_ids: np.ndarray,
    query_start_loc: np.ndarray,
    lookback: np.ndarray,
    multipliers: np.ndarray,
    primes: np.ndarray,
    offsets: np.ndarray | None = None,
) -> np.ndarray:
    """`reference.ngram_hash` on NumPy arrays: `[L, T, (N-1)*H]` int64 rows (offsets given)
    or per-head hashes.

    compressed_ids [T], query_start_loc [S+1], lookback [S, N-1], multipliers [L, N],
    primes and offsets [L, (N-1)*H]; ids below V' and multipliers below int64_max // V', as
    NgramHasher builds them. The packing is checked: the kernel reads without bounds checks.
    """
    ids = np.ascontiguousarray(compressed_ids, dtype=np.int64)
    starts = np.ascontiguousarray(query_start_loc, dtype=np.int64)
    lookback = np.ascontiguousarray(lookback, dtype=np.int64).reshape(-1, multipliers.shape[1] - 1)
    num_seqs = starts.shape[0] - 1
    if num_seqs < 0 or lookback.shape[0] != num_seqs:
        raise ValueError(
            f"query_start_loc [S+1] = {starts.shape} and lookback [S, N-1] = {lookback.shape} "
            "must describe the same sequences"
        )
    if starts[0] != 0 or starts[-1] != ids.shape[0] or (np.diff(starts) < 0).any():
        raise ValueError(
            f"query_start_loc must rise from 0 to the {ids.shape[0]} packed tokens, got {starts}"
        )
    if offsets is None:
        offsets = np.zeros_like(primes)
    out = np.empty((multipliers.shape[0], ids.shape[0], primes.shape[1]), dtype=np.int64)
    _hash_kernel(
        ids,
        starts,
        lookback,
        multipliers,
        primes,
        1.0 / primes,
        offsets,
        primes.min() < ONE_ESTIMATE_MIN_PRIME,
        out,
    )
    return out
