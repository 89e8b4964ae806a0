"""N-gram hashing: compressed token ids -> Engram table rows, exactly as the reference.

For Engram layer L, lookback position k (0 = current token) and order n = 2..N:

    m[L, k]        odd random multipliers, default_rng(seed + 10007 * L), each < int64_max // V'
    mix_n[t]       = XOR_{k<n} (x[t-k] * m[L, k])   (x before a sequence's start: compressed pad)
    hash[t, n, j]  = mix_n[t] mod p[L, n, j]         (one distinct prime per head)
    row[t, n, j]   = hash[t, n, j] + offset[L, n, j] (offset: exclusive cumsum of layer primes)

Because compressed ids are < V', every product stays below int64 overflow by construction.

The engine packs sequences flat and hashes only each step's new tokens; each sequence brings its
lookback (the N-1 compressed ids before its chunk), so any split of a sequence gives the rows of
hashing it whole. The function is pure: no model, no device state.
"""

from __future__ import annotations

import numpy as np

from engram_serve.engram.config import EngramConfig
from engram_serve.kernels.cpu_hash import ngram_hash_cpu

PRIME_1 = 10007
_INT64_MAX = np.iinfo(np.int64).max
# Bases that make Miller-Rabin deterministic for every n < 3.3e24 (all int64 values).
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def find_multipliers(config: EngramConfig, num_compressed: int) -> np.ndarray:
    """`[L, N]` int64 odd multipliers, one row per Engram layer."""
    half = max(1, (_INT64_MAX // num_compressed) // 2)
    rows = []
    for layer_id in config.layer_ids:
        rng = np.random.default_rng(config.seed + PRIME_1 * layer_id)
        rows.append(rng.integers(0, half, size=(config.max_ngram_size,), dtype=np.int64) * 2 + 1)
    return np.stack(rows)


def find_primes(config: EngramConfig) -> np.ndarray:
    """`[L, (N-1)*H]` int64 per-head table heights, order-major within a layer.

    Searched layer by layer, order by order, head by head: each is the next prime above the
    previous one (starting just below the order's vocab size) not used anywhere before.
    """
    seen: set[int] = set()
    layers = []
    for _ in config.layer_ids:
        primes = []
        for vocab_size in config.engram_vocab_size:
            candidate = vocab_size - 1
            for _ in range(config.n_head_per_ngram):
                candidate += 1
                while candidate in seen or not is_prime(candidate):
                    candidate += 1
                seen.add(candidate)
                primes.append(candidate)
        layers.append(primes)
    return np.array(layers, dtype=np.int64)


class NgramHasher:
    """Row ids of every Engram layer for a batch of tokens. Usable on its own, e.g. to
    pre-compute rows offline in a data pipeline.

    `lookup` maps raw token ids to compressed ids (engram/compression.py).
    """

    def __init__(self, config: EngramConfig, lookup: np.ndarray):
        self.config = config
        self.lookup = np.ascontiguousarray(lookup, dtype=np.int64)
        self.num_compressed = int(self.lookup.max()) + 1
        self.pad_id = int(self.lookup[config.pad_id])
        self.multipliers = find_multipliers(config, self.num_compressed)  # [L, N]
        self.primes = find_primes(config)  # [L, (N-1)*H]
        self.offsets = np.cumsum(self.primes, axis=1) - self.primes  # [L, (N-1)*H]
        self.table_rows = self.primes.sum(axis=1)  # [L]

    @property
    def lookback_len(self) -> int:
        return self.config.max_ngram_size - 1

    def compress(self, raw_ids: np.ndarray) -> np.ndarray:
        """Raw ids -> compressed ids. Ids outside the vocabulary raise instead of wrapping."""
        raw_ids = np.asarray(raw_ids, dtype=np.int64)
        if raw_ids.size and (raw_ids.min() < 0 or raw_ids.max() >= len(self.lookup)):
            bad = raw_ids[(raw_ids < 0) | (raw_ids >= len(self.lookup))][0]
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {len(self.lookup)})")
        return self.lookup[raw_ids]

    def lookback(self, compressed_history: np.ndarray) -> np.ndarray:
        """The N-1 compressed ids before a chunk, oldest first, pad-filled at the start."""
        n = self.lookback_len
        out = np.full(n, self.pad_id, dtype=np.int64)
        tail = compressed_history[max(0, len(compressed_history) - n) :]
        out[n - len(tail) :] = tail
        return out

    def raw_lookback(self, raw_ids: list[int], start: int) -> list[int]:
        """The N-1 raw ids before position `start` of a sequence's `raw_ids`, the pad token's
        before its first: compressed, `lookback` of the compressed history (so a caller can
        compress them with its tokens in one call)."""
        n = self.lookback_len
        return [self.config.pad_id] * (n - min(n, start)) + list(raw_ids[max(0, start - n) : start])

    def hash_packed(
        self, compressed_ids: np.ndarray, query_start_loc: np.ndarray, lookback: np.ndarray
    ) -> np.ndarray:
        """Per-head hashes before offsets, `[L, T, (N-1)*H]` int64.

        compressed_ids [T]: S sequences' new tokens packed flat; query_start_loc [S+1];
        lookback [S, N-1]: each sequence's previous compressed ids, oldest first.
        """
        return ngram_hash_cpu(
            compressed_ids, query_start_loc, lookback, self.multipliers, self.primes
        )

    def row_ids(
        self, compressed_ids: np.ndarray, query_start_loc: np.ndarray, lookback: np.ndarray
    ) -> np.ndarray:
        """Table rows `[L, T, (N-1)*H]` int64 (hashes plus per-head offsets)."""
        return ngram_hash_cpu(
            compressed_ids, query_start_loc, lookback, self.multipliers, self.primes, self.offsets
        )

    def hash_batch(self, raw_ids: np.ndarray) -> np.ndarray:
        """Raw ids `[B, T]` of B whole sequences -> hashes `[L, B, T, (N-1)*H]` before offsets."""
        raw_ids = np.asarray(raw_ids, dtype=np.int64)
        batch, seq_len = raw_ids.shape
        query_start_loc = np.arange(batch + 1, dtype=np.int64) * seq_len
        lookback = np.full((batch, self.lookback_len), self.pad_id, dtype=np.int64)
        hashes = self.hash_packed(self.compress(raw_ids.reshape(-1)), query_start_loc, lookback)
        return hashes.reshape(len(self.config.layer_ids), batch, seq_len, -1)
