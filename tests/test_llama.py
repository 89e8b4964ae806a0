"""The Llama-family decoder and paged attention against Hugging Face transformers.

Each tiny checkpoint is written by transformers itself, loaded by our loader, and run through
the paged path two ways: every sequence's whole prompt in one packed prefill, and a schedule of
chunked prefills and decodes of several sequences packed together (mixed steps, decode-only
steps, idle sequences). Every position's logits must equal transformers' full-sequence logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import (
    PagedRun,
    attention_metadata,
    counting,
    hf_logits,
    model_config_of,
    randomize_,
    save_tiny_hf,
)
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from engram_serve.engram.config import EngramConfig
from engram_serve.model.attention import paged_attention
from engram_serve.model.llama import LlamaForCausalLM
from engram_serve.model.loader import load_model, load_model_config

ATOL = 1e-4
SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,  # short, so the test's positions reach every band
}
CASES = {
    "llama": lambda: LlamaConfig(**SMALL, tie_word_embeddings=False),
    "llama-tied": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
    "llama3-rope": lambda: LlamaConfig(
        **SMALL, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True
    ),
    "qwen2-bias": lambda: Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen3-qknorm": lambda: Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False),
}
LENGTHS = (14, 12, 11)
# Per step, new tokens per sequence: chunks that start mid-prompt, decodes beside chunks,
# decode-only steps, steps that leave a sequence out.
SCHEDULE = [
    {0: 5, 1: 6},
    {0: 4, 1: 1, 2: 3},
    {0: 1, 1: 1, 2: 5},
    {0: 1, 1: 1, 2: 1},
    {1: 1, 2: 1},
    {0: 3, 1: 1, 2: 1},
    {1: 1},
]


def test_schedule_covers_every_token():
    for s, length in enumerate(LENGTHS):
        assert sum(step.get(s, 0) for step in SCHEDULE) == length


def make_sequences(vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(our model, transformers' logits per sequence) for one tiny checkpoint."""
    path = tmp_path_factory.mktemp(request.param)
    hf_model = save_tiny_hf(path, CASES[request.param]())
    sequences = make_sequences(SMALL["vocab_size"])
    expected = [hf_logits(hf_model, seq) for seq in sequences]
    return path, load_model(path), sequences, expected


def test_whole_prompts_in_one_prefill(case):
    path, model, sequences, expected = case
    run = PagedRun(model, model.config, sequences)
    got = run.run([{s: len(seq) for s, seq in enumerate(sequences)}])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def test_chunked_prefill_and_decode_packed(case):
    path, model, sequences, expected = case
    run = PagedRun(model, model.config, sequences, block_size=4)
    got = run.run(SCHEDULE)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def test_rope_is_exercised(case):
    """With other RoPE frequencies (no llama3 scaling, or another theta) our logits move far
    from transformers': the comparisons above really check positions and rope_scaling."""
    path, model, sequences, expected = case
    config = model.config
    if config.rope_scaling:
        other = dataclasses.replace(config, rope_scaling=None)
    else:
        other = dataclasses.replace(config, rope_theta=config.rope_theta * 3)
    plain = LlamaForCausalLM(other)
    plain.load_state_dict(model.state_dict())
    got = PagedRun(plain, other, sequences[:1]).run([{0: len(sequences[0])}])[0]
    assert (got - expected[0]).abs().max() > 1e-2


def test_logits_only_for_requested_positions(case):
    path, model, sequences, expected = case
    run = PagedRun(model, model.config, sequences[:1])
    batch = run.build_batch({0: len(sequences[0])})
    batch.logits_indices = torch.tensor([len(sequences[0]) - 1, 2])
    logits = model(batch)
    assert logits.shape == (2, SMALL["vocab_size"]) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected[0][[-1, 2]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=str)
def test_decode_steps_run_the_fused_layer_and_equal_the_unfused_one(case, monkeypatch, cache_dtype):
    """A decode-only step runs each layer as one compiled call (kernels/cpu_decode.py); the
    same step without the decode inputs runs the eager layers. Both give the same hidden
    states and write the same K/V into the cache (a float16 cache: the same float16 values, but
    for the rare one that the float32 sums' last bits round to the neighbouring float16)."""
    from engram_serve.kernels import cpu_decode

    path, model, sequences, expected = case
    run = PagedRun(model, model.config, sequences, block_size=4, dtype=cache_dtype)
    cache_tolerance = {"atol": 2e-6, "rtol": 1e-5} if cache_dtype == torch.float32 else {
        "atol": 1e-3, "rtol": 1e-3}  # fmt: skip
    run.run([{s: len(seq) - 2 for s, seq in enumerate(sequences)}])
    batch = run.build_batch({s: 1 for s in range(len(sequences))})
    assert batch.attn.is_decode_only
    calls = []
    monkeypatch.setattr(cpu_decode, "decode_layer", counting(cpu_decode.decode_layer, calls))
    h = model.model.embed_tokens(batch.token_ids)
    rope = model.model.rotary_emb(batch.positions, h.dtype)
    meta = batch.attn
    decode = cpu_decode.decode_step(
        *rope, meta.slot_mapping, meta.block_tables, meta.seq_lens, batch.cache.k[0]
    )
    with torch.inference_mode():
        for layer in model.model.layers:
            caches = (batch.cache.k[layer.layer_id], batch.cache.v[layer.layer_id])
            before = [c.clone() for c in caches]
            fused = layer(h, rope, batch, decode)
            fused_caches = [c.clone() for c in caches]
            for cache, old in zip(caches, before, strict=True):
                cache.copy_(old)
            unfused = layer(h, rope, batch)  # no decode step given: the eager layer
            torch.testing.assert_close(fused, unfused, atol=2e-5, rtol=1e-5)
            for got, want, old in zip(fused_caches, caches, before, strict=True):
                assert got.dtype == cache_dtype
                torch.testing.assert_close(got, want, **cache_tolerance)
                assert not torch.equal(got, old)  # this step's K/V were written
            h = unfused
    assert len(calls) == model.config.num_hidden_layers


def test_config_read_from_directory(case):
    path, model, _, _ = case
    assert model.config == load_model_config(path)


# ---------------------------------------------------------------- paged attention alone


def reference_attention(q, k, v, scale):  # one sequence, contiguous: [L, H, hd], [L, KVH, hd]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    past = k.shape[0] - q.shape[0]
    causal = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(past)
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, -torch.inf).softmax(-1), v)


SEQ_LENS = {
    "five": ([9, 1, 17, 5, 12], [3, 1, 17, 1, 12]),
    # Twelve of very different lengths, padded in one decode call to the longest.
    "twelve": ([3, 40, 7, 1, 33, 18, 2, 25, 9, 38, 4, 12], [1, 5, 1, 1, 33, 1, 2, 1, 1, 4, 1, 1]),
    # Whole prompts of one length in runs (one attention call each run), broken by a sequence
    # with a past, a decoder and a prompt of another length.
    "runs": ([6, 6, 6, 9, 6, 6, 3, 6, 5, 6], [6, 6, 6, 4, 6, 6, 1, 6, 5, 6]),
}


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("lens", SEQ_LENS.values(), ids=SEQ_LENS.keys())
def test_paged_attention_matches_contiguous(decode_only, lens):
    """Random sequences in a shuffled block pool: each output equals plain causal attention
    over that sequence's own contiguous K/V."""
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, hd, block_size = 6, 2, 8, 4
    seq_lens, query_lens = lens
    query_lens = [1] * len(seq_lens) if decode_only else query_lens
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    num_blocks = 1 + sum(-(-n // block_size) for n in seq_lens)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, hd, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, hd, generator=gen)
    pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0: padding
    tables, slots, ks, vs = [], [], [], []
    for n, q_len in zip(seq_lens, query_lens, strict=True):
        blocks = [pool.pop() for _ in range(-(-n // block_size))]
        tables.append(blocks + [0] * (max_blocks - len(blocks)))
        flat = torch.tensor(
            [blocks[p // block_size] * block_size + p % block_size for p in range(n)]
        )
        ks.append(torch.randn(n, kv_heads, hd, generator=gen))
        vs.append(torch.randn(n, kv_heads, hd, generator=gen))
        k_cache.view(-1, kv_heads, hd)[flat[: n - q_len]] = ks[-1][: n - q_len]  # the past
        v_cache.view(-1, kv_heads, hd)[flat[: n - q_len]] = vs[-1][: n - q_len]
        slots.append(flat[n - q_len :])
    qs = [torch.randn(q_len, heads, hd, generator=gen) for q_len in query_lens]
    attn = attention_metadata(query_lens, seq_lens, tables, torch.cat(slots))
    assert attn.is_decode_only == decode_only
    new_k = torch.cat([k[n - q :] for k, n, q in zip(ks, seq_lens, query_lens, strict=True)])
    new_v = torch.cat([v[n - q :] for v, n, q in zip(vs, seq_lens, query_lens, strict=True)])
    out = paged_attention(torch.cat(qs), new_k, new_v, k_cache, v_cache, attn, scale=0.3)
    want = [reference_attention(q, k, v, 0.3) for q, k, v in zip(qs, ks, vs, strict=True)]
    torch.testing.assert_close(out, torch.cat(want), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Engram layers


class TokenRows:
    """Rows as the offload tier would deliver them: fixed per (sequence, position, layer)."""

    def __init__(self, table: dict[tuple[int, int, int], torch.Tensor], where, layers):
        self.rows = {i: torch.stack([table[(s, p, i)] for s, p in where]) for i in layers}

    def wait(self, layer_id: int) -> torch.Tensor:
        return self.rows[layer_id]  # [T, (N-1)*H, W]


@pytest.mark.parametrize("variant", ["demo", "v41"])
def test_engram_layers_chunked_equals_whole(variant):
    """Packed chunks and decodes give each sequence the logits of its whole-prompt run: the
    short conv's per-sequence history is kept across steps in its slot, and a fresh sequence
    starts from zeros even when its slot holds garbage."""
    config = model_config_of(LlamaConfig(**SMALL, tie_word_embeddings=True))
    engram = EngramConfig(
        variant=variant, layer_ids=(0, 2), max_ngram_size=3, n_head_per_ngram=2,
        head_dim=8, engram_vocab_size=(101, 103),
    )  # fmt: skip
    model = LlamaForCausalLM(config, engram)
    randomize_(model, seed=3)
    sequences = make_sequences(config.vocab_size, seed=4)
    gen = torch.Generator().manual_seed(5)
    table = {
        (s, p, i): torch.randn(engram.num_heads, engram.head_dim, generator=gen)
        for s, seq in enumerate(sequences)
        for p in range(len(seq))
        for i in engram.layer_ids
    }
    history = model.model.layers[0].engram.history_len

    def run(seqs, schedule, seq_ids, stale):  # stale: the conv state slots' prior contents
        conv = {} if history == 0 else {
            i: torch.full((len(seqs), history, config.hidden_size), stale) for i in engram.layer_ids
        }  # fmt: skip

        def rows(where):
            return TokenRows(table, [(seq_ids[s], p) for s, p in where], engram.layer_ids)

        return PagedRun(model, config, seqs, engram_conv=conv, make_rows=rows).run(schedule)

    got = run(sequences, SCHEDULE, [0, 1, 2], stale=7.0)
    for s, seq in enumerate(sequences):
        want = run([seq], [{0: len(seq)}], [s], stale=0.0)[0]
        torch.testing.assert_close(got[s], want, atol=ATOL, rtol=0)

    for layer in model.model.layers:  # the Engram path must matter, or the above proves little
        layer.engram = None
    plain = PagedRun(model, config, sequences[:1]).run([{0: len(sequences[0])}])[0]
    assert (plain - got[0]).abs().max() > 1e-2


def test_engram_layer_without_rows_is_an_error():
    config = model_config_of(LlamaConfig(**SMALL))
    model = LlamaForCausalLM(config, EngramConfig(variant="v41", layer_ids=(1,)))
    run = PagedRun(model, config, [[1, 2, 3]])
    with pytest.raises(ValueError, match="layer 1 is an Engram layer"):
        run.step({0: 3})


def test_rejects_engram_layers_outside_the_model():
    config = model_config_of(LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match=r"layer_ids \[5\] outside"):
        LlamaForCausalLM(config, EngramConfig(variant="v41", layer_ids=(1, 5)))
    with pytest.raises(ValueError, match="hc_mult is 4"):
        LlamaForCausalLM(config, EngramConfig(variant="v41", layer_ids=(1,), hc_mult=4))
