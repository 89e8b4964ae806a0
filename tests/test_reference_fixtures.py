"""Golden values from the Engram reference: every `*.npz` in $ENGRAM_FIXTURES_DIR is checked by
the handler its file-name prefix names. The handlers must also reject files that do not match."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_serve.engram.compression import build_compression
from engram_serve.engram.config import EngramConfig
from engram_serve.engram.ngram_hash import NgramHasher
from engram_serve.kernels.reference import gather_rows
from engram_serve.model.engram import EngramDemo, EngramV41, load_v41_checkpoint
from tests.conftest import FIXTURES_DIR


def smollm2_lookup(fixtures_dir: Path) -> np.ndarray:
    """The hash and module fixtures all use the SmolLM2 compression."""
    return np.load(fixtures_dir / "compress_smollm2.npz")["lookup"]


def check_compress(path: Path, tokenizer) -> None:
    data = np.load(path, allow_pickle=False)
    lookup = build_compression(tokenizer)
    assert int(data["num_compressed"]) == lookup.max() + 1
    np.testing.assert_array_equal(lookup, data["lookup"])


def check_hash(path: Path, tokenizer) -> None:
    data = np.load(path, allow_pickle=False)
    config = EngramConfig.from_dict(json.loads(str(data["config"])))
    hasher = NgramHasher(config, build_compression(tokenizer))
    np.testing.assert_array_equal(hasher.multipliers, data["multipliers"])
    np.testing.assert_array_equal(hasher.primes, data["primes"])
    np.testing.assert_array_equal(hasher.hash_batch(data["input_ids"]), data["hashes"])


def _weights(data) -> dict[str, torch.Tensor]:
    return {k.removeprefix("weight/"): torch.from_numpy(data[k]) for k in data if "weight/" in k}


def check_module(path: Path, tokenizer) -> None:
    """Demo variant: hash with the engine's hasher, gather from the fixture's table, run
    EngramDemo on the batch packed flat (each row one sequence, zero conv history)."""
    data = np.load(path, allow_pickle=False)
    raw = json.loads(str(data["config"]))
    config = EngramConfig.from_dict({**raw, "layer_ids": [raw["layer_id"]]})
    hasher = NgramHasher(config, smollm2_lookup(FIXTURES_DIR))
    weights = _weights(data)
    table = weights.pop("multi_head_embedding.embedding.weight")
    np.testing.assert_array_equal(hasher.offsets[0], weights.pop("multi_head_embedding.offsets"))
    row_ids = hasher.hash_batch(data["input_ids"])[0] + hasher.offsets[0]  # [B, T, (N-1)*H]
    rows = gather_rows(table, torch.from_numpy(row_ids)).flatten(0, 1)  # [B*T, (N-1)*H, W]
    module = EngramDemo(config, raw["hidden_size"])
    module.load_state_dict(weights)  # strict: every non-table tensor, nothing else
    hidden = torch.from_numpy(data["hidden_states"])  # [B, T, hc, D]
    batch, seq_len = hidden.shape[:2]
    with torch.no_grad():
        new = module(hidden.flatten(0, 1), rows, torch.arange(batch + 1) * seq_len)
    # The fixture holds the module's contribution; our module returns h + contribution.
    np.testing.assert_allclose((new.view_as(hidden) - hidden).numpy(), data["output"], atol=1e-5)


def check_v41(path: Path, tokenizer) -> None:
    """V4.1 variant: the engine's hasher must reproduce the fixture's hashing; then FP8 rows
    from the fixture's hashes, EngramV41 loaded from the checkpoint tensors."""
    data = np.load(path, allow_pickle=False)
    raw = json.loads(str(data["config"]))
    config = EngramConfig.from_dict(raw)
    hasher = NgramHasher(config, smollm2_lookup(FIXTURES_DIR))
    np.testing.assert_array_equal(hasher.multipliers[0], data["multipliers"])
    np.testing.assert_array_equal(hasher.primes[0], data["primes"])
    np.testing.assert_array_equal(hasher.hash_batch(data["input_ids"])[0], data["hashes"])
    assert hasher.table_rows[0] == raw["num_embeddings"]
    module = EngramV41(config, raw["hidden_size"])
    table = load_v41_checkpoint(module, _weights(data), f"layers.{raw['layer_id']}.engram.")
    offsets = np.cumsum(data["primes"]) - data["primes"]
    row_ids = torch.from_numpy(data["hashes"] + offsets)  # [B, T, (N-1)*H]
    rows = gather_rows(table["embed.weight"], row_ids, table["embed.scale"], config.quant_block)
    hidden = torch.from_numpy(data["hidden_states"])  # [B, T, hc, D]
    with torch.no_grad():
        new = module(hidden.flatten(0, 1), rows.flatten(0, 1)).view_as(hidden)
    np.testing.assert_allclose(new.numpy(), data["output"], atol=1e-4)


HANDLERS = {
    "compress_": check_compress,
    "hash_": check_hash,
    "module_": check_module,
    "v41_": check_v41,
}


def handler_for(path: Path):
    for prefix, handler in HANDLERS.items():
        if path.name.startswith(prefix):
            return handler
    raise AssertionError(f"no handler for fixture {path.name}; known prefixes: {list(HANDLERS)}")


FIXTURE_FILES = sorted(FIXTURES_DIR.glob("*.npz"))


def test_fixtures_present():
    assert FIXTURE_FILES, f"no *.npz fixtures in {FIXTURES_DIR}"


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_fixture(path, smollm2_hf_tokenizer):
    handler_for(path)(path, smollm2_hf_tokenizer)


def _tampered_copy(src: Path, dst_dir: Path, key: str) -> Path:
    data = dict(np.load(src, allow_pickle=False))
    flat = data[key].reshape(-1).copy()
    flat[len(flat) // 2] += 1
    data[key] = flat.reshape(data[key].shape)
    dst = dst_dir / src.name
    np.savez(dst, **data)
    return dst


TAMPER_KEYS = {"compress_": "lookup", "hash_": "hashes", "module_": "output", "v41_": "output"}


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_handler_rejects_a_file_that_does_not_match(path, tmp_path, smollm2_hf_tokenizer):
    key = next(k for prefix, k in TAMPER_KEYS.items() if path.name.startswith(prefix))
    tampered = _tampered_copy(path, tmp_path, key)
    with pytest.raises(AssertionError):
        handler_for(tampered)(tampered, smollm2_hf_tokenizer)


# -- an unseen fixture, made without the engine --------------------------------------------------


class ReferenceHashMapping:
    """A transcription of the reference demo's `NgramHashMapping` (engram_demo_v1.py) that shares
    no code with the engine: multipliers from `default_rng(seed + 10007 * layer)` below
    (int64_max // V') // 2, times 2 plus 1; per head the next prime (sympy) after the previous
    one, starting at the order's vocab size, distinct over the whole model; hashes as Python
    integers, one XOR of products per order and one `%` per head."""

    def __init__(self, config: dict, lookup: np.ndarray):
        from sympy import isprime

        self.config, self.lookup = config, lookup
        self.pad = int(lookup[config["pad_id"]])
        half_bound = max(1, (np.iinfo(np.int64).max // (int(lookup.max()) + 1)) // 2)
        self.multipliers = np.stack([
            np.random.default_rng(config["seed"] + 10007 * layer).integers(
                0, half_bound, size=(config["max_ngram_size"],), dtype=np.int64) * 2 + 1
            for layer in config["layer_ids"]
        ])  # fmt: skip
        seen, self.primes = set(), []
        for _ in config["layer_ids"]:
            layer_primes = []
            for vocab_size in config["engram_vocab_size"]:
                candidate = vocab_size - 1
                for _ in range(config["n_head_per_ngram"]):
                    candidate += 1
                    while not isprime(candidate) or candidate in seen:
                        candidate += 1
                    seen.add(candidate)
                    layer_primes.append(candidate)
            self.primes.append(layer_primes)
        self.primes = np.array(self.primes, dtype=np.int64)

    def hashes(self, raw_ids: np.ndarray) -> np.ndarray:
        """`[layers, B, T, (N-1)*H]` for whole sequences of raw ids `[B, T]`."""
        n_max = self.config["max_ngram_size"]
        out = np.zeros((len(self.multipliers), *raw_ids.shape, self.primes.shape[1]), np.int64)
        for layer, (multipliers, primes) in enumerate(zip(self.multipliers, self.primes)):
            for b, row in enumerate(raw_ids):
                ids = [int(self.lookup[t]) for t in row]
                for t in range(len(ids)):
                    back = [ids[t - k] if t - k >= 0 else self.pad for k in range(n_max)]
                    column = 0
                    for n in range(2, n_max + 1):
                        mix = 0
                        for k in range(n):
                            mix ^= back[k] * int(multipliers[k])
                        for _ in range(self.config["n_head_per_ngram"]):
                            out[layer, b, t, column] = mix % int(primes[column])
                            column += 1
        return out


HASH_FIXTURES = [path for path in FIXTURE_FILES if path.name.startswith("hash_")]


@pytest.mark.parametrize("path", HASH_FIXTURES, ids=lambda p: p.name)
def test_the_reference_transcription_reproduces_the_golden_hash_fixtures(path):
    """The transcription below is itself checked against the reference's own output."""
    data = np.load(path, allow_pickle=False)
    mapping = ReferenceHashMapping(json.loads(str(data["config"])), smollm2_lookup(FIXTURES_DIR))
    np.testing.assert_array_equal(mapping.multipliers, data["multipliers"])
    np.testing.assert_array_equal(mapping.primes, data["primes"])
    np.testing.assert_array_equal(mapping.hashes(data["input_ids"]), data["hashes"])


def test_unseen_fixture_of_the_same_form_passes(tmp_path, smollm2_hf_tokenizer):
    """A hash fixture of a configuration the suite has never seen (four layers, odd seed and
    pad, orders up to 4), made by the transcription: multipliers, primes and hashes, none of
    them from the engine's hasher."""
    config_raw = {
        "engram_vocab_size": [733, 1499, 2027],
        "max_ngram_size": 4,
        "n_head_per_ngram": 3,
        "layer_ids": [0, 7, 2, 11],
        "seed": 11,
        "pad_id": 5,
    }
    mapping = ReferenceHashMapping(config_raw, smollm2_lookup(FIXTURES_DIR))
    input_ids = np.random.default_rng(3).integers(0, len(mapping.lookup), size=(3, 29))
    path = tmp_path / "hash_new.npz"
    np.savez(
        path,
        config=np.array(json.dumps(config_raw)),
        input_ids=input_ids,
        multipliers=mapping.multipliers,
        primes=mapping.primes,
        hashes=mapping.hashes(input_ids),
    )
    handler_for(path)(path, smollm2_hf_tokenizer)
    shutil.copy(FIXTURES_DIR / "compress_smollm2.npz", tmp_path / "compress_copy.npz")
    handler_for(tmp_path / "compress_copy.npz")(
        tmp_path / "compress_copy.npz", smollm2_hf_tokenizer
    )
