"""`bench throughput`'s accounting: the workload's FLOPs, the recorded schedule and the
replay (matmuls and KV reads alone) that gives the schedule's MFU ceiling."""

from __future__ import annotations

from engram_serve.bench.throughput import (
    ScheduleRecorder,
    Step,
    ceiling_seconds,
    make_workload,
    model_flops,
    record_schedule,
    single_stream_decode,
    text_corpus,
)
from engram_serve.config import EngineConfig, ModelConfig
from engram_serve.llm import build_engine

TINY = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_model_flops_counts_weights_lm_head_and_attention():
    workload = make_workload(3, 4, 9, TINY.vocab_size)
    d, ff, layers, hd = 64, 128, 2, 16
    weights = d * hd * (4 + 4 + 2 + 2) + 3 * d * ff
    expected = 0.0
    for prompt, out_len in zip(workload.prompts, workload.output_lens):
        n = len(prompt) + out_len
        expected += 2 * layers * weights * n + 2 * d * TINY.vocab_size * out_len
        expected += 4 * layers * (4 * hd) * n * (n + 1) / 2
    assert model_flops(TINY, workload) == expected


def test_the_recorded_schedule_covers_every_token_once(default_model_dir):
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)
    engine = build_engine(default_model_dir, config, enable_engram=False)
    workload = make_workload(6, 20, 90, engine.model_config.vocab_size)
    steps = record_schedule(engine, workload)
    assert engine.scheduler.num_preemptions == 0
    assert not isinstance(engine.model, ScheduleRecorder)
    # Each request computes its prompt and every output token but the last (never fed back),
    # and samples each output token once.
    computed = workload.num_prompt_tokens + workload.num_output_tokens - 6
    assert sum(step.num_tokens for step in steps) == computed
    assert sum(step.num_sampled for step in steps) == workload.num_output_tokens
    assert max(step.num_tokens for step in steps) <= 64
    assert max(step.num_sampled for step in steps) <= 4
    # A lone request's steps: contexts grow by the tokens each step computes.
    model = engine.model_config
    element = engine.cache.k[0].element_size()  # the float16 KV cache: 2 bytes
    token_bytes = (
        2 * model.num_hidden_layers * model.num_key_value_heads * model.attn_head_dim * element
    )
    steps = record_schedule(engine, make_workload(1, 70, 70, model.vocab_size))
    assert [s.kv_bytes // token_bytes for s in steps[:3]] == [64, 70, 71]


def test_matmul_replay_takes_the_faster_kernel_per_step_and_adds_the_kv_reads():
    """The KV-read time is bytes over a bandwidth the replay measures itself; no figure here
    is independent of that measurement, so only what holds whatever it is gets checked: a
    schedule without KV bytes reads nothing, and the total adds the parts."""
    steps = [Step(100, 4, 0), Step(4, 4, 1 << 30), Step(1, 0, 1 << 30)]
    replay = ceiling_seconds(TINY, steps)
    parts = replay["parts"]
    assert 0 < parts["best"] <= min(parts["mkl"], parts["ours"])
    assert parts["kv_read"] > 0 and replay["read_gbps"] > 0
    assert replay["seconds"] == parts["best"] + parts["kv_read"]
    no_kv = ceiling_seconds(TINY, [Step(100, 4, 0), Step(4, 4, 0)])
    assert no_kv["parts"]["kv_read"] == 0 and no_kv["seconds"] == no_kv["parts"]["best"]


def test_single_stream_decode_fits_a_short_context(default_model_dir):
    config = EngineConfig(max_num_seqs=2, max_model_len=40)
    engine = build_engine(default_model_dir, config, enable_engram=False)
    assert single_stream_decode(engine) > 0
    assert engine.stats.num_generation_tokens == 36  # the 4-token prompt and 36 fill 40


def test_text_workload_cuts_prompts_from_the_corpus_and_fixes_outputs(default_model_dir):
    """`--prompts text --output-len N`: each prompt is a run of the tokenized text (decoded, it
    is a piece of the pydoc topics), every output N tokens."""
    from pydoc_data.topics import topics

    from engram_serve.engine.tokenizer import Tokenizer

    corpus = text_corpus(default_model_dir)
    workload = make_workload(8, 16, 32, 49152, output_len=5, corpus=corpus)
    assert workload.output_lens == [5] * 8
    text = "\n".join(topics.values())
    tokenizer = Tokenizer(default_model_dir)
    for prompt in workload.prompts:
        assert 16 <= len(prompt) <= 32
        inner = tokenizer.decode(prompt[1:-1])  # the ends may be parts of a longer piece
        assert inner in text
