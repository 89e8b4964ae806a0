from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_serve.bench.hashing import V41_COMPRESSED_VOCAB, V41_ENGRAM, reference_hash
from engram_serve.engram.config import EngramConfig
from engram_serve.engram.ngram_hash import NgramHasher, find_multipliers, find_primes, is_prime

SMALL = EngramConfig(
    layer_ids=(1, 4),
    max_ngram_size=4,
    n_head_per_ngram=3,
    engram_vocab_size=(101, 211, 307),
    head_dim=8,
    pad_id=2,
)
LOOKUP = np.random.default_rng(0).permutation(500) % 400  # 500 raw ids -> 400 compressed


def test_is_prime_agrees_with_a_sieve():
    limit = 20_000
    sieve = np.ones(limit, dtype=bool)
    sieve[:2] = False
    for i in range(2, int(limit**0.5) + 1):
        sieve[i * i :: i] = False
    assert [n for n in range(limit) if is_prime(n)] == list(np.flatnonzero(sieve))
    # Strong pseudoprimes to several small bases, and large primes near int64's range.
    assert not is_prime(3215031751) and not is_prime(3825123056546413051)
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1)


def test_v41_layout_reproduces_released_table_heights():
    primes = find_primes(V41_ENGRAM)
    assert primes.sum(axis=1).tolist() == [384_006_168, 384_016_682]
    assert len(set(primes.reshape(-1).tolist())) == primes.size
    bound = np.iinfo(np.int64).max // V41_COMPRESSED_VOCAB
    multipliers = find_multipliers(V41_ENGRAM, V41_COMPRESSED_VOCAB)
    assert (multipliers % 2 == 1).all() and (multipliers < bound).all()


def test_hash_batch_matches_the_reference_transcription():
    hasher = NgramHasher(SMALL, LOOKUP)
    ids = np.random.default_rng(1).integers(0, 500, size=(4, 3000))  # big enough for per-head path
    expected = reference_hash(LOOKUP[ids], hasher.multipliers, hasher.primes, SMALL, hasher.pad_id)
    np.testing.assert_array_equal(hasher.hash_batch(ids), expected)
    np.testing.assert_array_equal(hasher.hash_batch(ids[:, :7]), expected[:, :, :7])


def test_row_ids_lie_inside_each_heads_range():
    hasher = NgramHasher(SMALL, LOOKUP)
    ids = hasher.compress(np.random.default_rng(2).integers(0, 500, size=50))
    lookback = np.full((1, 3), hasher.pad_id)
    rows = hasher.row_ids(ids, np.array([0, 50]), lookback)  # [L, T, C]
    low, high = hasher.offsets[:, None, :], (hasher.offsets + hasher.primes)[:, None, :]
    assert ((rows >= low) & (rows < high)).all()
    assert (rows.max(axis=(1, 2)) < hasher.table_rows).all()


def test_an_empty_step_hashes_to_no_rows():
    hasher = NgramHasher(SMALL, LOOKUP)
    empty = np.zeros(0, dtype=np.int64)
    rows = hasher.row_ids(empty, np.zeros(1, dtype=np.int64), np.zeros((0, 3), dtype=np.int64))
    assert rows.shape == (2, 0, SMALL.num_heads)


def test_out_of_vocabulary_ids_are_refused():
    hasher = NgramHasher(SMALL, LOOKUP)
    with pytest.raises(ValueError, match="token id 500 is outside the vocabulary"):
        hasher.compress(np.array([1, 500]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        hasher.compress(np.array([-1]))


def _hash_in_pieces(hasher, sequences, splits):
    """Hash every sequence in steps: at each step each unfinished sequence contributes its next
    piece (sizes from `splits`), packed together with the others, carrying its lookback."""
    outputs = [[] for _ in sequences]
    done = [0] * len(sequences)
    step = 0
    while any(d < len(s) for d, s in zip(done, sequences)):
        active = [i for i, s in enumerate(sequences) if done[i] < len(s)]
        pieces, lookbacks = [], []
        for i in active:
            size = splits[(step + i) % len(splits)]
            pieces.append(sequences[i][done[i] : done[i] + size])
            lookbacks.append(hasher.lookback(sequences[i][: done[i]]))
        qsl = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
        hashes = hasher.hash_packed(np.concatenate(pieces), qsl, np.stack(lookbacks))
        for j, i in enumerate(active):
            outputs[i].append(hashes[:, qsl[j] : qsl[j + 1]])
            done[i] += len(pieces[j])
        step += 1
    return [np.concatenate(o, axis=1) for o in outputs]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    splits=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_any_split_and_packing_gives_the_whole_sequence_hashes(lengths, splits, seed):
    hasher = NgramHasher(SMALL, LOOKUP)
    rng = np.random.default_rng(seed)
    raw = [rng.integers(0, 500, size=n) for n in lengths]
    compressed = [hasher.compress(r) for r in raw]
    pieces = _hash_in_pieces(hasher, compressed, splits)
    for r, got in zip(raw, pieces):
        np.testing.assert_array_equal(got, hasher.hash_batch(r[None])[:, 0])


def test_lookback_pads_the_sequence_start():
    hasher = NgramHasher(SMALL, LOOKUP)
    pad = hasher.pad_id
    assert hasher.lookback(np.array([], dtype=np.int64)).tolist() == [pad, pad, pad]
    assert hasher.lookback(np.array([7])).tolist() == [pad, pad, 7]
    assert hasher.lookback(np.array([6, 7])).tolist() == [pad, 6, 7]
    assert hasher.lookback(np.array([1, 2, 3, 4, 5])).tolist() == [3, 4, 5]


def test_raw_lookback_compresses_to_the_lookback_of_the_compressed_history():
    hasher = NgramHasher(SMALL, LOOKUP)
    raw = [11, 42, 7, 300, 5]
    for start in range(len(raw) + 1):
        want = hasher.lookback(hasher.compress(np.array(raw[:start], dtype=np.int64)))
        np.testing.assert_array_equal(hasher.compress(hasher.raw_lookback(raw, start)), want)
