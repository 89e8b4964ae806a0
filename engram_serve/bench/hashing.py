"""Hashing benchmark: our packed hasher against a plain NumPy transcription of the reference
algorithm (per layer: shifted copies with np.pad, one multiply/XOR chain per order, one `%` per
head), on the DeepSeek-V4.1 configuration."""

from __future__ import annotations

import json
import time

import numpy as np

from engram_serve.config import EngramConfig
from engram_serve.engine.ngram_hash import NgramHasher

V41_ENGRAM = EngramConfig(
    variant="v41",
    layer_ids=(1, 14),
    max_ngram_size=4,
    n_head_per_ngram=8,
    engram_vocab_size=(16_000_000,) * 3,
    head_dim=256,
    table_dtype="fp8_e4m3",
)
V41_COMPRESSED_VOCAB = 99_092


def reference_hash(
    compressed: np.ndarray, multipliers: np.ndarray, primes: np.ndarray, config: EngramConfig,
    pad_id: int,
) -> np.ndarray:
    """The reference's own loop, `[L, B, T, (N-1)*H]` for whole sequences `compressed [B, T]`."""
    layers = []
    for layer in range(len(config.layer_ids)):
        shifted = [compressed] + [
            np.pad(compressed, ((0, 0), (k, 0)), constant_values=pad_id)[:, : compressed.shape[1]]
            for k in range(1, config.max_ngram_size)
        ]
        heads, column = [], 0
        for n in range(2, config.max_ngram_size + 1):
            mix = shifted[0] * multipliers[layer, 0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifted[k] * multipliers[layer, k])
            for _ in range(config.n_head_per_ngram):
                heads.append(mix % primes[layer, column])
                column += 1
        layers.append(np.stack(heads, axis=-1))
    return np.stack(layers)


def _time(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def run(decode_seqs: int = 64, prefill_seqs: int = 32, prefill_len: int = 1024) -> dict:
    lookup = np.arange(V41_COMPRESSED_VOCAB, dtype=np.int64)
    hasher = NgramHasher(V41_ENGRAM, lookup)
    rng = np.random.default_rng(0)
    results = {}
    for case, (batch, seq_len, repeat) in {
        "decode": (decode_seqs, 1, 200),
        "prefill": (prefill_seqs, prefill_len, 5),
    }.items():
        ids = rng.integers(0, V41_COMPRESSED_VOCAB, size=(batch, seq_len))
        flat = ids.reshape(-1)
        qsl = np.arange(batch + 1, dtype=np.int64) * seq_len
        lookback = rng.integers(0, V41_COMPRESSED_VOCAB, size=(batch, hasher.lookback_len))
        ours = _time(lambda: hasher.hash_packed(flat, qsl, lookback), repeat)
        # The reference sees decode steps as one-token sequences with their lookback prepended.
        history = np.concatenate([lookback, ids], axis=1)
        ref = _time(
            lambda: reference_hash(
                history, hasher.multipliers, hasher.primes, V41_ENGRAM, hasher.pad_id
            ),
            repeat,
        )
        num_tokens = batch * seq_len
        results[case] = {
            "tokens": num_tokens,
            "ours_ms": ours * 1e3,
            "reference_ms": ref * 1e3,
            "ours_mtok_s": num_tokens / ours / 1e6,
            "reference_mtok_s": num_tokens / ref / 1e6,
            "speedup": ref / ours,
        }
    return results


def main(argv: list[str] | None = None) -> None:
    results = run()
    for case, r in results.items():
        print(
            f"{case:8s} {r['tokens']:6d} tokens  ours {r['ours_ms']:8.3f} ms "
            f"({r['ours_mtok_s']:.2f} Mtok/s)  reference {r['reference_ms']:8.3f} ms "
            f"({r['reference_mtok_s']:.2f} Mtok/s)  speedup {r['speedup']:.1f}x"
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
