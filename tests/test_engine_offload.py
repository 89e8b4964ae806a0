"""Every Engram tier and cache setting gives the device tier's outputs, bit for bit, through the
whole engine: a non-zero Engram on the default backbone, many steps, preemptions included. The
engine's look-ahead (the next step's prompt rows read into the cache during this step; on by
default for the disk tier) warms exactly those rows, raises the next step's hit rate and changes
no output."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engram_serve.config import EngineConfig, OffloadConfig
from engram_serve.engine.request import SamplingParams
from engram_serve.llm import build_engine

ENGINE = EngineConfig(
    max_num_seqs=8, max_num_batched_tokens=64, kv_block_size=16, num_kv_blocks=8, max_model_len=128
)
TIERS = {
    "host": OffloadConfig(tier="host"),
    # The look-ahead through the per-layer job queue (what CUDA runs; on CPU the disk tier
    # splits its fetches instead).
    "host+cache+lookahead": OffloadConfig(tier="host", cache_rows=3000, lookahead=True),
    "disk": OffloadConfig(tier="disk", cache_rows=0),
    "disk+lfu": OffloadConfig(tier="disk", cache_rows=3000, cache_policy="lfu"),
    "disk+lru": OffloadConfig(tier="disk", cache_rows=3000, cache_policy="lru"),
    "disk+lfu,no lookahead": OffloadConfig(tier="disk", cache_rows=3000, lookahead=False),
    "disk+cache-no-prefetch": OffloadConfig(
        tier="disk", cache_rows=3000, prefetch=False, lookahead=True
    ),
    "disk+direct-io": OffloadConfig(tier="disk", cache_rows=3000, direct_io=True),
}


def _generate(engine) -> list[tuple[list[int], list[float]]]:
    tok = engine.tokenizer
    texts = [
        "The history of the printing press",
        "def merge_sort(items):",
        "Dear diary, today",
        "Photosynthesis converts",
    ]
    prompts = [tok.encode(t * 6)[: 30 + 9 * i] for i, t in enumerate(texts)]
    sampling = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    ids = [engine.add_request(p, sampling).request_id for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                done[out.request_id] = (
                    c.token_ids,
                    [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                )
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def device_outputs(engram_model_dir):
    engine = build_engine(engram_model_dir, ENGINE, OffloadConfig(tier="device"))
    outputs = _generate(engine)
    assert engine.scheduler.num_preemptions > 0, "the KV budget should force preemptions"
    plain = _generate(build_engine(engram_model_dir, ENGINE, enable_engram=False))
    assert outputs != plain, "the Engram rows must reach the logits"
    return outputs


@pytest.mark.parametrize("name", list(TIERS))
def test_tier_outputs_equal_the_device_tier(name, engram_model_dir, device_outputs):
    engine = build_engine(engram_model_dir, ENGINE, TIERS[name])
    assert _generate(engine) == device_outputs
    stats = engine.engram.prefetcher.stats
    assert stats["lookups"] > 0
    # The look-ahead ran (and changed nothing above) exactly where it is on by default or asked
    # for, with a cache and prefetch.
    looked_ahead = {"host+cache+lookahead", "disk+lfu", "disk+lru", "disk+direct-io"}
    assert (stats["warmed"] > 0) == (name in looked_ahead)
    engine.engram.prefetcher.close()


def test_lookahead_is_on_by_default_for_the_disk_tier_alone():
    import argparse

    from engram_serve.engine_args import add_engine_args, configs_from_args

    assert OffloadConfig(tier="disk").looks_ahead
    assert not OffloadConfig(tier="host").looks_ahead and not OffloadConfig().looks_ahead
    assert not OffloadConfig(tier="disk", lookahead=False).looks_ahead
    assert OffloadConfig(tier="host", lookahead=True).looks_ahead
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for flags, expected in (([], True), (["--no-engram-lookahead"], False)):
        _, offload = configs_from_args(parser.parse_args(["--engram-tier", "disk", *flags]))
        assert offload.looks_ahead is expected


# ---------------------------------------------------------------------------------------------
# look-ahead: with KV blocks to spare and no request finishing during prefill, the scheduler's
# next batch is exactly predictable, so the warmed rows can be checked exactly.

LOOKAHEAD_ENGINE = dataclasses.replace(ENGINE, num_kv_blocks=64)
# A cache never full: nothing evicted.
LOOKAHEAD_TIER = OffloadConfig(tier="disk", cache_rows=100_000, lookahead=True)


def _trace(engine) -> list[dict]:
    """Run four prompts to the end, recording per step the scheduled chunks
    `(request, start, num_tokens)`, the row ids warmed (None: no warm-up) and the cumulative
    cache misses of the steps' own fetches. The spies call through to the real methods."""
    scheduler, prefetcher = engine.scheduler, engine.engram.prefetcher
    schedule, warm = scheduler.schedule, prefetcher.warm
    steps: list[dict] = []

    def traced_schedule():
        batch = schedule()
        chunks = [
            (r, r.num_computed_tokens, n) for r, n in zip(batch.requests, batch.num_new_tokens)
        ]
        steps.append({"chunks": chunks, "warmed": None})
        return batch

    def traced_warm(row_ids):
        assert steps[-1]["warmed"] is None, "one warm-up per step"
        steps[-1]["warmed"] = np.array(row_ids)
        warm(row_ids)

    scheduler.schedule, prefetcher.warm = traced_schedule, traced_warm
    tok = engine.tokenizer
    texts = ["The printing press", "def merge_sort(items):", "Dear diary,", "Photosynthesis"]
    prompts = [tok.encode(t * 20)[: 30 + 13 * i] for i, t in enumerate(texts)]  # 198 tokens
    sampling = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    requests = [engine.add_request(p, sampling) for p in prompts]
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps[-1]["misses"] = prefetcher.stats["cache_misses"]
        steps[-1]["outputs"] = [(o.request_id, o.outputs[0].token_ids[-1]) for o in outputs]
    assert engine.scheduler.num_preemptions == 0
    assert all(len(r.output_token_ids) == 10 for r in requests)
    return steps


def _whole_sequence_rows(engine, request) -> np.ndarray:
    """Row ids `[L, T, C]` of the request's whole sequence hashed in one piece from its start:
    the oracle for rows of any of its chunks."""
    hasher = engine.engram.hasher
    compressed = hasher.compress(np.array(request.all_token_ids))
    no_history = hasher.lookback(compressed[:0])[None]
    return hasher.row_ids(compressed, np.array([0, len(compressed)]), no_history)


def _known_rows(engine, chunks, known: bool) -> np.ndarray:
    """Rows `[L, T, C]` of the chunks' prompt tokens (known: True; known a step ahead) or of
    their generated tokens (False: decode tokens, known only once sampled), in batch order."""
    parts = []
    for request, start, num in chunks:
        if (start < len(request.prompt_token_ids)) == known:
            parts.append(_whole_sequence_rows(engine, request)[:, start : start + num])
    num_layers, num_cols = (
        len(engine.engram.hasher.config.layer_ids),
        engine.engram.hasher.config.num_heads,
    )
    return np.concatenate(parts, axis=1) if parts else np.empty((num_layers, 0, num_cols), np.int64)


@pytest.fixture(scope="module")
def lookahead_traces(engram_model_dir):
    traces = {}
    for lookahead in (True, False):
        tier = dataclasses.replace(LOOKAHEAD_TIER, lookahead=lookahead)  # off: the ablation
        engine = build_engine(engram_model_dir, LOOKAHEAD_ENGINE, tier)
        assert engine.engram.prefetcher.warms == lookahead
        steps = _trace(engine)
        engine.engram.prefetcher.close()
        traces[lookahead] = (engine, steps, engine.engram.prefetcher.stats)
    return traces


def test_lookahead_warms_exactly_the_next_steps_prompt_rows(lookahead_traces):
    engine, steps, _ = lookahead_traces[True]
    num_warmed = 0
    for step, following in zip(steps, steps[1:]):
        expected = _known_rows(engine, following["chunks"], known=True)
        if expected.shape[1] == 0:
            assert step["warmed"] is None, "nothing to read ahead: no warm-up"
        else:
            np.testing.assert_array_equal(step["warmed"], expected)
            num_warmed += 1
    assert num_warmed >= 2, "the prompts should take several steps of prefill"
    assert steps[-1]["warmed"] is None


def test_lookahead_changes_no_output_and_raises_the_next_steps_hit_rate(lookahead_traces):
    (engine, with_, stats), (_, without, stats_without) = (
        lookahead_traces[True],
        lookahead_traces[False],
    )
    assert [s["outputs"] for s in with_] == [s["outputs"] for s in without]
    misses = {
        name: np.diff([0] + [s["misses"] for s in steps])
        for name, steps in (("with", with_), ("without", without))
    }
    for k in range(1, len(with_)):
        # Every row of a prompt chunk was warmed a step ahead: only decode rows may miss.
        decode_rows = _known_rows(engine, with_[k]["chunks"], known=False)
        bound = sum(len(np.unique(layer)) for layer in decode_rows)
        assert misses["with"][k] <= bound, f"step {k}"
    prefill_steps = [k for k in range(1, len(with_)) if with_[k - 1]["warmed"] is not None]
    assert all(misses["without"][k] > misses["with"][k] for k in prefill_steps)
    assert stats["hit_rate"] > stats_without["hit_rate"]
    assert stats["warmed"] > 0 and stats_without["warmed"] == 0
    # Read-ahead moves reads, it does not add any: each row is read from disk once either way.
    assert stats["rows_read"]["disk"] == stats_without["rows_read"]["disk"]
