"""Every Engram tier and cache setting gives the device tier's outputs, bit for bit, through the
whole engine: a non-zero Engram on the default backbone, many steps, preemptions included."""

from __future__ import annotations

import dataclasses
import os

import pytest

from engram_serve.config import EngineConfig, OffloadConfig
from engram_serve.engine.compression import load_compression, num_compressed
from engram_serve.engine.request import SamplingParams
from engram_serve.engine.tokenizer import Tokenizer
from engram_serve.llm import build_engine
from engram_serve.model.default_model import DEFAULT_ENGRAM
from engram_serve.model.tables import init_tables

BACKBONE_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
ENGINE = EngineConfig(
    max_num_seqs=8, max_num_batched_tokens=64, kv_block_size=16, num_kv_blocks=8, max_model_len=128
)
TIERS = {
    "host": OffloadConfig(tier="host"),
    "disk": OffloadConfig(tier="disk", cache_rows=0),
    "disk+lfu": OffloadConfig(tier="disk", cache_rows=3000, cache_policy="lfu"),
    "disk+lru": OffloadConfig(tier="disk", cache_rows=3000, cache_policy="lru"),
    "disk+cache-no-prefetch": OffloadConfig(tier="disk", cache_rows=3000, prefetch=False),
    "disk+direct-io": OffloadConfig(tier="disk", cache_rows=3000, direct_io=True),
}


@pytest.fixture(scope="module")
def engram_model_dir(default_model_dir, tmp_path_factory):
    """The default backbone with a random, non-zero Engram (small tables, so rows repeat)."""
    path = tmp_path_factory.mktemp("engram-model")
    for name in BACKBONE_FILES:
        os.symlink(default_model_dir / name, path / name)
    config = dataclasses.replace(DEFAULT_ENGRAM, engram_vocab_size=(2003, 2011))
    lookup = load_compression(Tokenizer(path).hf_tokenizer)
    init_tables(path, config, num_compressed(lookup), seed=1, identity=False, progress=False)
    return path


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
    engine.engram.prefetcher.close()
