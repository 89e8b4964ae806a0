"""The engine on the real default model: continuous batching, preemption, sampling, finishing."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import counting

from engram_serve.config import EngineConfig
from engram_serve.engine.engine import RequestTooLongError
from engram_serve.engine.request import SamplingParams
from engram_serve.engine.scheduler import QueueFullError
from engram_serve.llm import LLM, build_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(default_model_dir) -> LLM:
    return LLM(default_model_dir, max_num_seqs=8, kv_cache_bytes=256 << 20, max_model_len=2048)


def _prompts(tokenizer, count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    """`count` different prompts of real words, lengths spread evenly over [low, high] tokens."""
    words = (
        "the engine keeps every request moving while memory tables live on disk and hot rows "
        "stay in a cache near the model so that each step reads only what it needs from storage"
    ).split()
    rng = random.Random(seed)
    ids = tokenizer.encode(" ".join(rng.choice(words) for _ in range(high * 3)))
    lengths = [low + (high - low) * i // max(1, count - 1) for i in range(count)]
    starts = [rng.randrange(len(ids) - n) for n in lengths]
    return [ids[start : start + n] for start, n in zip(starts, lengths)]


def _run_all(engine, prompts, sampling) -> dict[str, list[int]]:
    ids = [engine.add_request(p, sampling).request_id for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


def test_batched_greedy_equals_one_at_a_time_under_preemption(default_model_dir):
    config = EngineConfig(
        max_num_seqs=32,
        max_num_batched_tokens=512,
        kv_block_size=16,
        num_kv_blocks=80,  # 1,280 tokens for prompts of 3,630
        max_model_len=1024,
        dtype="float32",  # bfloat16 prefill products round by batch: not batch-invariant
    )
    engine = build_engine(default_model_dir, config)
    prompts = _prompts(engine.tokenizer, 12, 5, 600)
    assert min(map(len, prompts)) == 5 and max(map(len, prompts)) == 600
    batched = _run_all(engine, prompts, GREEDY)
    assert engine.scheduler.num_preemptions > 0, "the KV budget should have forced preemptions"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    alone = [_run_all(engine, [p], GREEDY)[0] for p in prompts]
    assert batched == alone


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llm):
    tok = llm.get_tokenizer()
    prompts = _prompts(tok, 6, 5, 60, seed=1)
    sampling = [
        SamplingParams(
            temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, max_tokens=12, ignore_eos=True
        )
        for i in range(len(prompts))
    ]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, sampling)]
    alone = [llm.generate([p], s)[0].outputs[0].token_ids for p, s in zip(prompts, sampling)]
    assert together == alone
    reseeded = llm.generate(prompts[:1], sampling[0])[0].outputs[0].token_ids
    assert reseeded == alone[0]
    other_seed = SamplingParams(temperature=0.9, seed=7, max_tokens=12, ignore_eos=True)
    assert llm.generate(prompts[:1], other_seed)[0].outputs[0].token_ids != alone[0]


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(llm):
    tok = llm.get_tokenizer()
    prompt = "The capital of France is Paris. The capital of Germany is"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    ids = free.outputs[0].token_ids
    # A stop string made of the end of one token and the start of the next.
    for i in range(2, len(ids) - 1):
        left, right = tok.decode(ids[:i]), tok.decode(ids[: i + 1])
        if len(left) >= 2 and len(right) - len(left) >= 2 and left.strip():
            stop = left[-2:] + right[len(left) : len(left) + 2]
            break
    else:
        pytest.fail("no suitable token boundary in the continuation")
    full_text = free.outputs[0].text
    expected = full_text[: full_text.index(stop)]
    streamed = []
    request = llm.engine.add_request(
        tok.encode(prompt), SamplingParams(temperature=0, max_tokens=24, stop=[stop])
    )
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.request_id == request.request_id:
                streamed.append(out.delta_text)
                final = out
    assert final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].stop_reason == stop
    assert final.outputs[0].text == expected
    assert "".join(streamed) == expected


def test_finish_reasons_length_stop_token_eos_and_abort(llm):
    tok = llm.get_tokenizer()
    prompt = tok.encode("List three colors:")
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert free.outputs[0].finish_reason == "length" and len(free.outputs[0].token_ids) == 6

    third = free.outputs[0].token_ids[2]
    first_hit = free.outputs[0].token_ids.index(third)
    stopped = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[third])
    )[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == third
    assert stopped.token_ids == free.outputs[0].token_ids[: first_hit + 1]

    held = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=6, min_tokens=6, stop_token_ids=[third])
    )[0].outputs[0]
    assert held.finish_reason == "length" and len(held.token_ids) == 6

    chat = llm.chat(
        [{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=200)
    )[0].outputs[0]
    assert chat.finish_reason == "stop" and chat.stop_reason is None
    assert chat.token_ids[-1] in tok.eos_token_ids


def test_abort_frees_kv_blocks(llm):
    engine = llm.engine
    free_before = engine.blocks.num_free_blocks
    request = engine.add_request(list(range(100, 400)), SamplingParams(max_tokens=100))
    engine.step()
    engine.step()
    assert engine.blocks.num_free_blocks < free_before
    out = engine.abort_request(request.request_id)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.blocks.num_free_blocks == free_before
    assert not engine.has_unfinished_requests()
    assert engine.abort_request(request.request_id) is None


def test_warm_up_builds_the_batched_decode_kernels_where_they_run(default_model_dir, monkeypatch):
    """A CPU with bfloat16 products decodes a batch of 32 through the banded layer
    (kernels/cpu_decode._banded_layer): the warm-up's batch runs it, so that it compiles before
    a client's batch does. Without bfloat16 products it never runs."""
    from engram_serve.kernels import cpu_decode

    llm = LLM(default_model_dir, max_num_seqs=32, kv_cache_bytes=256 << 20, max_model_len=2048)
    banded = []
    monkeypatch.setattr(cpu_decode, "_banded_layer", counting(cpu_decode._banded_layer, banded))
    llm.engine.warm_up()
    assert bool(banded) == (llm.engine.model.prefill_dtype == torch.bfloat16)
    llm.engine.close()


def test_warm_up_runs_a_decode_step_and_leaves_the_engine_as_it_was(llm, monkeypatch):
    from engram_serve.kernels import cpu_decode

    engine = llm.engine
    prompt = "Water boils at"
    before = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    free, stats = engine.blocks.num_free_blocks, engine.stats
    fused = []
    monkeypatch.setattr(cpu_decode, "decode_layer", counting(cpu_decode.decode_layer, fused))
    engine.warm_up()
    assert fused, "the warm-up ran no decode step"
    assert not engine.has_unfinished_requests() and not engine.trackers
    assert engine.blocks.num_free_blocks == free
    assert engine.stats.num_prompt_tokens == engine.stats.num_generation_tokens == 0
    assert stats.num_generation_tokens > 0  # the counters it replaced had counted something
    assert llm.generate(prompt, GREEDY)[0].outputs[0].token_ids == before
    engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(RuntimeError, match="before any request"):
        engine.warm_up()
    while engine.has_unfinished_requests():
        engine.step()


def test_greedy_equivalents_top_k_one_and_min_p_one(llm):
    prompt = "Water boils at"
    greedy = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    for params in (dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)):
        sampled = (
            llm.generate(
                prompt,
                SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, **params),
            )[0]
            .outputs[0]
            .token_ids
        )
        assert sampled == greedy, params


def test_logprobs_rank_and_top_alternatives(llm):
    out = llm.generate(
        "One, two, three,", SamplingParams(temperature=0, max_tokens=4, logprobs=5, ignore_eos=True)
    )[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 4
    for token_id, entry in zip(completion.token_ids, completion.logprobs):
        assert entry[token_id].rank == 1  # greedy picks the top token
        assert len(entry) == 5
        values = sorted((lp.logprob for lp in entry.values()), reverse=True)
        assert values[0] == entry[token_id].logprob and all(v <= 0 for v in values)


def test_limits_are_enforced_with_messages(default_model_dir):
    engine = build_engine(
        default_model_dir, EngineConfig(max_waiting=2, max_model_len=64, num_kv_blocks=8)
    )
    with pytest.raises(RequestTooLongError, match="maximum context length is 64 tokens"):
        engine.add_request(list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="out of vocabulary"):
        engine.add_request([1, 10**7], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request([], SamplingParams(max_tokens=1))
    engine.add_request([1, 2], SamplingParams(max_tokens=1))
    engine.add_request([1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        engine.add_request([1, 2], SamplingParams(max_tokens=1))
