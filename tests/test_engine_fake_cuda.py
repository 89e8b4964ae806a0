"""The whole engine with `device="cuda"` on this CPU machine, under FakeTensorMode and the
recording fake of the device runtime (tests/fake_cuda.py).

What it proves without a GPU: every tensor of a step (weights, KV cache, the step's inputs,
Engram rows of every tier, sampling) is on the device, or FakeTensorMode raises a device
mismatch; no step reads a device value on the host, or `.item()`/`.tolist()` raise; the only
synchronisation of a step is the one download of its sampled tokens; rows made on a layer's
stream are read on the compute stream only after their event, and pinned staging is refilled
only after its copy (the fake raises OrderingError otherwise); nothing is in flight once the
engine is closed. What it cannot prove: numbers (fake tensors have no values), timings, and the
driver's own behaviour (tests/gpu and `make gpu-check` on a GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_cuda import FakeCudaRuntime

from engram_serve.config import EngineConfig, OffloadConfig
from engram_serve.engine.request import SamplingParams
from engram_serve.llm import build_engine

pytestmark = pytest.mark.fake_cuda

CACHE_ROWS = 4096
TIERS = {
    "device": OffloadConfig(tier="device"),
    "host uva + cache + look-ahead": OffloadConfig(
        tier="host", host_gather="uva", cache_rows=CACHE_ROWS, lookahead=True
    ),
    "host staged + cache + look-ahead": OffloadConfig(
        tier="host", host_gather="staged", cache_rows=CACHE_ROWS, lookahead=True
    ),
    "disk + cache + look-ahead": OffloadConfig(tier="disk", cache_rows=CACHE_ROWS),
    "disk, no prefetch": OffloadConfig(tier="disk", cache_rows=CACHE_ROWS, prefetch=False),
}
# Prompts of mixed lengths, prefilled in chunks of at most 32 tokens; 8 KV blocks of 16 tokens
# hold fewer than the four requests need at their longest (1 + 4 + 5 + 4 blocks), so the
# scheduler preempts and recomputes.
PROMPT_LENS = (5, 55, 70, 45)
MAX_TOKENS = 6
ENGINE = EngineConfig(
    device="cuda", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, num_kv_blocks=8
)
SAMPLING = [
    SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
    SamplingParams(temperature=0.7, top_k=50, top_p=0.9, max_tokens=MAX_TOKENS, ignore_eos=True),
    SamplingParams(temperature=1.0, min_p=0.1, presence_penalty=0.5, repetition_penalty=1.2,
                   logprobs=3, max_tokens=MAX_TOKENS, min_tokens=2, seed=7),
    SamplingParams(temperature=0.5, frequency_penalty=0.3, logprobs=0, max_tokens=MAX_TOKENS),
]  # fmt: skip


def sampled_tokens(seed: int):
    """The fake's download contents: token ids a model could sample (not EOS), zeros else."""
    rng = np.random.default_rng(seed)

    def fill(tensor: torch.Tensor) -> np.ndarray:
        if tensor.dtype == torch.int64:
            return rng.integers(100, 1000, tensor.shape)
        return np.zeros(tensor.shape)

    return fill


@pytest.mark.parametrize("tier", TIERS)
def test_engine_on_cuda_syncs_once_a_step(default_model_dir, tier):
    fake = FakeCudaRuntime(fill=sampled_tokens(0))
    engine = build_engine(default_model_dir, ENGINE, TIERS[tier], runtime=fake)
    assert engine.cache.k[0].device.type == "cuda"
    assert engine.model.lm_head.weight.device.type == "cuda"
    syncs_per_step, decode_only, finished = [], [], {}
    with fake.active():
        for length, sampling in zip(PROMPT_LENS, SAMPLING, strict=True):
            engine.add_request(list(range(10, 10 + length)), sampling)
        while engine.has_unfinished_requests():
            fake.reset_counts()
            decoding = all(r.num_tokens - r.num_computed_tokens == 1
                           for r in engine.scheduler.running)  # fmt: skip
            outputs = engine.step()
            syncs_per_step.append(dict(fake.sync_kinds))
            decode_only.append(decoding and not engine.scheduler.waiting)
            finished.update({o.request_id: o for o in outputs if o.finished})
        stats = engine.engram.prefetcher.stats
        engine.close()
    fake.assert_idle()

    assert all(s == {"download": 1} for s in syncs_per_step), syncs_per_step
    assert any(decode_only) and not all(decode_only)  # chunked prefill, mixed, then decode
    assert engine.scheduler.num_preemptions > 0
    assert len(finished) == len(PROMPT_LENS)
    for output in finished.values():
        completion = output.outputs[0]
        assert len(completion.token_ids) == MAX_TOKENS and completion.finish_reason == "length"
    logprobs = finished["req-2"].outputs[0].logprobs
    assert all(len(step) >= 1 for step in logprobs) and len(logprobs) == MAX_TOKENS
    assert stats["steps"] == len(syncs_per_step) and stats["lookups"] > 0
    offload = TIERS[tier]
    if offload.cache_rows:
        assert stats["cache_hits"] > 0
    if offload.looks_ahead and offload.prefetch:
        assert stats["warmed"] > 0, "the look-ahead read rows into the cache"
