"""The assembled model against a slow composition: transformers' own decoder layers, run one by
one, with the reference-checked Engram module (model/engram.py) applied before the attention of
each Engram layer, on rows gathered by the reference twin from a hashed table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import PagedRun, randomize_, save_tiny_hf
from transformers import LlamaConfig

from engram_serve.engram.config import EngramConfig
from engram_serve.engram.ngram_hash import NgramHasher
from engram_serve.kernels.reference import gather_rows
from engram_serve.model.loader import load_model, load_model_config

VOCAB = 96
HF_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
ENGRAM = dict(
    layer_ids=(1, 3), max_ngram_size=3, n_head_per_ngram=2, head_dim=8, engram_vocab_size=(53, 59)
)


class HashedRows:
    """Rows of a step, hashed from its tokens and gathered from per-layer random tables."""

    def __init__(self, hasher: NgramHasher, tables: dict[int, torch.Tensor], batch_tokens):
        ids, qsl, lookback = batch_tokens
        rows = hasher.row_ids(hasher.compress(ids), qsl, lookback)  # [L, T, C]
        self.rows = {
            layer: gather_rows(tables[layer], torch.from_numpy(np.ascontiguousarray(rows[i])))
            for i, layer in enumerate(hasher.config.layer_ids)
        }

    def wait(self, layer_id: int) -> torch.Tensor:
        return self.rows[layer_id]


def slow_logits(hf_model, engram_modules, rows, token_ids) -> torch.Tensor:
    """transformers' embedding, decoder layers, norm and head, with Engram between them."""
    inner = hf_model.model
    seq_len = len(token_ids)
    h = inner.embed_tokens(torch.tensor([token_ids]))  # [1, T, D]
    positions = torch.arange(seq_len)[None]
    rope = inner.rotary_emb(h, positions)
    causal = torch.full((seq_len, seq_len), float("-inf")).triu(1)[None, None]  # [1, 1, T, T]
    for i, layer in enumerate(inner.layers):
        if i in engram_modules:
            h = engram_modules[i](h[0, :, None, :], rows[i])[None, :, 0, :]
        h = layer(h, attention_mask=causal, position_ids=positions, position_embeddings=rope)
        h = h[0] if isinstance(h, tuple) else h
    return hf_model.lm_head(inner.norm(h))[0]  # [T, vocab]


@pytest.mark.parametrize("variant", ["demo", "v41"])
def test_assembled_model_equals_slow_composition(variant, tmp_path):
    hf_model = save_tiny_hf(tmp_path, LlamaConfig(**HF_CONFIG), seed=1)
    engram = EngramConfig(variant=variant, **ENGRAM)
    model = load_model(tmp_path, engram_config=engram)
    for layer_id in engram.layer_ids:  # random, non-zero Engram weights
        randomize_(model.model.layers[layer_id].engram, std=0.3, seed=10 + layer_id)
    hasher = NgramHasher(engram, np.arange(VOCAB) % 71)  # a compression merging some ids
    gen = torch.Generator().manual_seed(2)
    tables = {
        layer: torch.randn(int(rows), engram.head_dim, generator=gen)
        for layer, rows in zip(engram.layer_ids, hasher.table_rows)
    }
    sequence = torch.randint(0, VOCAB, (23,), generator=gen).tolist()

    def rows_for(where):  # one sequence, run whole: no lookback but pads
        ids = np.array([sequence[p] for _, p in where])
        lookback = np.full((1, hasher.lookback_len), hasher.pad_id)
        return HashedRows(hasher, tables, (ids, np.array([0, len(ids)]), lookback))

    config = load_model_config(tmp_path)
    conv = {}
    if variant == "demo":
        history = model.model.layers[1].engram.history_len
        conv = {i: torch.zeros(1, history, config.hidden_size) for i in engram.layer_ids}
    ours = PagedRun(model, config, [sequence], engram_conv=conv, make_rows=rows_for).run(
        [{0: len(sequence)}]
    )[0]

    rows = rows_for([(0, p) for p in range(len(sequence))]).rows
    engram_modules = {i: model.model.layers[i].engram for i in engram.layer_ids}
    with torch.no_grad():
        want = slow_logits(hf_model, engram_modules, rows, sequence)
        plain = slow_logits(hf_model, {}, rows, sequence)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
    assert (want - plain).abs().max() > 1e-2  # the Engram layers changed the result
