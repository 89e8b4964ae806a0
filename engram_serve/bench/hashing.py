"""Hashing benchmark: our packed hasher against a plain NumPy transcription of the reference
algorithm (per layer: shifted copies with np.pad, one multiply/XOR chain per order, one `%` per
head), on the DeepSeek-V4.1 configuration."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from engram_serve.bench.harness import machine, save
from engram_serve.engram.config import EngramConfig
from engram_serve.engram.ngram_hash import NgramHasher

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
    compressed: np.ndarray,
    multipliers: np.ndarray,
    primes: np.ndarray,
    config: EngramConfig,
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


def _time(repeat: int, fn, *args) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - start) / repeat


def run(decode_seqs: int = 64, prefill_seqs: int = 32, prefill_len: int = 1024) -> dict:
    lookup = np.arange(V41_COMPRESSED_VOCAB, dtype=np.int64)
    hasher = NgramHasher(V41_ENGRAM, lookup)
    rng = np.random.default_rng(0)
    results = {}
    for case, (batch, seq_len, repeat) in {
        "decode": (decode_seqs, 1, 200),
        "prefill": (prefill_seqs, prefill_len, 20),
    }.items():
        ids = rng.integers(0, V41_COMPRESSED_VOCAB, size=(batch, seq_len))
        flat = ids.reshape(-1)
        qsl = np.arange(batch + 1, dtype=np.int64) * seq_len
        lookback = rng.integers(0, V41_COMPRESSED_VOCAB, size=(batch, hasher.lookback_len))
        ours = _time(repeat, hasher.hash_packed, flat, qsl, lookback)
        # The reference sees decode steps as one-token sequences with their lookback prepended.
        history = np.concatenate([lookback, ids], axis=1)
        ref = _time(
            repeat,
            reference_hash,
            history,
            hasher.multipliers,
            hasher.primes,
            V41_ENGRAM,
            hasher.pad_id,
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


def synthetic_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer of `vocab_size` random tokens: a stand-in for a 128k
    vocabulary, which no model on this machine has."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(seed)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    while len(vocab) < vocab_size:
        token = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8)))
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def compression_seconds(vocab_size: int = 128_000) -> float:
    from engram_serve.engram.compression import build_compression

    tokenizer = synthetic_tokenizer(vocab_size)
    start = time.perf_counter()
    build_compression(tokenizer)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="engram-serve bench hashing", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("results/hashing.json"))
    args = parser.parse_args(argv)
    started = machine()
    hashing = run()
    for case, r in hashing.items():
        print(
            f"{case:8s} {r['tokens']:6d} tokens  ours {r['ours_ms']:8.3f} ms "
            f"({r['ours_mtok_s']:.2f} Mtok/s)  reference {r['reference_ms']:8.3f} ms "
            f"({r['reference_mtok_s']:.2f} Mtok/s)  speedup {r['speedup']:.1f}x"
        )
    seconds = compression_seconds()
    print(f"compression lookup for a 128k vocabulary: {seconds:.2f} s")
    results = {"machine": started, "hashing": hashing, "compression_128k_vocab_s": seconds}
    print(json.dumps(results, indent=2))
    save(results, args.out)
    return results


if __name__ == "__main__":
    main()
