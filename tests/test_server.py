"""Server pieces without the OpenAI client: request -> SamplingParams conversion, the logprob
formats, the Engram metrics exporter (against the real prefetcher of a disk-tier engine with a
row cache), and the stats log line."""

from __future__ import annotations

import logging
import re

import httpx
import pytest
from prometheus_client import CollectorRegistry
from test_server_support import metric, wait_for

from engram_serve.config import EngineConfig, OffloadConfig, ServerConfig
from engram_serve.engine.request import Logprob
from engram_serve.llm import build_engine
from engram_serve.server import protocol as p
from engram_serve.server.api import build_app
from engram_serve.server.metrics import EngramMetrics, length_buckets
from engram_serve.server.process import (
    API_KEY_ENV,
    DEFAULT_SERVED_MODEL_NAME,
    BackgroundServer,
    server_config_from_args,
)

VOCAB = 1000


def _completion(**fields) -> p.CompletionRequest:
    return p.CompletionRequest(prompt="hi", **fields)


def test_serve_flags_and_defaults(monkeypatch):
    from engram_serve.cli import build_parser

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    config = server_config_from_args(build_parser().parse_args(["serve"]))
    assert (config.host, config.port, config.workers) == ("127.0.0.1", 8000, 1)
    assert config.api_key is None and config.served_model_name == DEFAULT_SERVED_MODEL_NAME
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    args = build_parser().parse_args(["serve", "--port", "9000", "--shutdown-timeout", "2"])
    config = server_config_from_args(args)
    assert (config.api_key, config.port, config.shutdown_timeout_s) == ("from-env", 9000, 2.0)
    flag = build_parser().parse_args(["serve", "--api-key", "flag", "--model", "/m/x"])
    assert server_config_from_args(flag).api_key == "flag"
    assert server_config_from_args(flag).served_model_name == "/m/x"


# -- requests -> SamplingParams ---------------------------------------------------------------


def test_seeds_are_derived_per_choice_and_stay_in_the_generator_range():
    params = _completion(n=3, seed=p.SEED_MAX).sampling_params(4, None, VOCAB)
    seeds = [s.seed for s in params]
    assert seeds[0] == p.SEED_MAX and len(set(seeds)) == 3
    assert all(0 <= s < p.SEED_SPACE for s in seeds)
    assert [s.seed for s in _completion(n=2).sampling_params(4, None, VOCAB)] == [None, None]
    negative = _completion(n=1, seed=-1).sampling_params(4, None, VOCAB)[0].seed
    assert negative == p.SEED_SPACE - 1


def test_request_values_map_onto_the_engine():
    params = _completion(
        temperature=p.GREEDY_TEMPERATURE / 2, top_k=VOCAB, stop="x", stop_token_ids=[3],
        min_tokens=2, ignore_eos=True,
    ).sampling_params(8, 2, VOCAB)[0]  # fmt: skip
    assert params.is_greedy and params.top_k == 0 and params.stop == ("x",)
    assert (params.stop_token_ids, params.min_tokens, params.max_tokens) == ((3,), 2, 8)
    assert params.ignore_eos and params.logprobs == 2
    defaults = _completion().sampling_params(16, None, VOCAB)[0]
    assert (defaults.temperature, defaults.top_p, defaults.repetition_penalty) == (1.0, 1.0, 1.0)


def test_the_limits_of_the_mapping_are_inclusive():
    """A string stop is one stop string; MAX_STOP strings, token ids 0 and VOCAB - 1, and a
    temperature of GREEDY_TEMPERATURE itself all pass as sent."""
    (params,) = _completion(stop="ab", temperature=p.GREEDY_TEMPERATURE).sampling_params(
        8, None, VOCAB
    )
    assert params.stop == ("ab",) and params.temperature == p.GREEDY_TEMPERATURE
    stops = [f"s{i}" for i in range(p.MAX_STOP)]
    ends = [0, VOCAB - 1]
    params = _completion(stop=stops, stop_token_ids=ends).sampling_params(8, None, VOCAB)[0]
    assert params.stop == tuple(stops) and params.stop_token_ids == tuple(ends)
    assert _completion(temperature=0).sampling_params(8, None, VOCAB)[0].is_greedy


@pytest.mark.parametrize(
    ("fields", "max_tokens", "param", "message"),
    [
        ({"min_tokens": 9}, 8, "min_tokens", "min_tokens must be in [0, max_tokens], got 9"),
        ({"stop_token_ids": [VOCAB]}, 8, "stop_token_ids", f"stop token id {VOCAB} is outside"),
        ({"stop": ["a"] * (p.MAX_STOP + 1)}, 8, "stop", f"at most {p.MAX_STOP} stop strings"),
    ],
)
def test_invalid_values_are_400_with_the_field_named(fields, max_tokens, param, message):
    with pytest.raises(p.APIError) as error:
        _completion(**fields).sampling_params(max_tokens, None, VOCAB)
    assert error.value.status == 400 and error.value.param == param
    assert error.value.message.startswith(message)


def test_prompt_forms():
    assert p.CompletionRequest(prompt="a").prompts() == ["a"]
    assert p.CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert p.CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert p.CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert p.CompletionRequest(prompt=[5.0]).prompts() == [[5]]
    for bad in ([], ["a"] * (p.MAX_PROMPTS + 1)):
        with pytest.raises(p.APIError):
            p.CompletionRequest(prompt=bad).prompts()
    with pytest.raises(p.APIError, match="prompts x n"):
        p.CompletionRequest(prompt=["a"] * 10, n=p.MAX_N).prompts()
    with pytest.raises(ValueError):
        p.CompletionRequest(prompt=[True])


def test_cross_field_rules():
    with pytest.raises(p.APIError, match="stream=True"):
        _completion(stream_options={"include_usage": True}).check()
    with pytest.raises(p.APIError, match="logprobs"):
        _completion(echo=True, logprobs=1).check()
    chat = p.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    with pytest.raises(p.APIError, match="top_logprobs"):
        chat.check()
    assert _completion(stream=True, stream_options={}).include_usage
    assert not _completion(stream=True).include_usage


# -- logprob formats --------------------------------------------------------------------------


def _lp(logprob: float, rank: int, token: str) -> Logprob:
    return Logprob(logprob, rank, decoded_token=token)


def test_legacy_completion_logprobs_offsets_and_alternatives():
    steps = [
        {7: _lp(-0.1, 1, " a"), 8: _lp(-2.0, 2, " b")},
        {9: _lp(-3.0, 4, "é"), 1: _lp(-0.5, 1, "x"), 2: _lp(-0.9, 2, "y")},
    ]
    out = p.completion_logprobs([7, 9], steps, text_offset=5)
    assert out.tokens == [" a", "é"] and out.token_logprobs == [-0.1, -3.0]
    assert out.text_offset == [5, 7]
    assert out.top_logprobs[1] == {"é": -3.0, "x": -0.5, "y": -0.9}


def test_chat_logprobs_keep_the_top_k_by_rank_with_bytes():
    step = {9: _lp(-3.0, 4, "é"), 2: _lp(-0.9, 2, "y"), 1: _lp(-0.5, 1, "x")}
    (token,) = p.chat_logprobs([9], [step], num_top=2).content
    assert (token.token, token.logprob, token.bytes) == ("é", -3.0, [0xC3, 0xA9])
    assert [t.token for t in token.top_logprobs] == ["x", "y"]  # the sampled one is rank 4
    assert p.chat_logprobs([9], [step], num_top=0).content[0].top_logprobs == []


def test_error_body_is_openai_shaped():
    body = p.APIError(404, "no such model", "model").body()
    error = {"message": "no such model", "type": "NotFoundError", "param": "model", "code": 404}
    assert body == {"error": error}


# -- metrics ----------------------------------------------------------------------------------


def test_length_buckets():
    assert length_buckets(2048) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert length_buckets(1) == [1]


def test_engram_metrics_accept_scalar_or_per_tier_counters_and_resets():
    registry = CollectorRegistry()
    engram = EngramMetrics(registry, "m")

    def value(name: str, **labels) -> float | None:
        return registry.get_sample_value(f"engram_serve_{name}", {"model_name": "m", **labels})

    engram.update({"lookups": 10, "cache_hits": 4, "rows_read": {"disk": 6}, "stall_s": 0.0,
                   "steps": 1, "table_bytes": {"disk": 100, "cache": 10}})  # fmt: skip
    engram.update({"lookups": 30, "cache_hits": {"hbm": 5, "dram": 2}, "rows_read": {"disk": 9},
                   "stall_s": 0.25, "steps": 2, "table_bytes": {"disk": 100}})  # fmt: skip
    assert value("engram_lookups_total", tier="all") == 30
    assert value("engram_cache_hits_total", tier="cache") == 4
    assert value("engram_cache_hits_total", tier="hbm") == 5
    assert value("engram_rows_read_total", tier="disk") == 9
    assert value("engram_table_bytes", tier="disk") == 100
    assert value("engram_prefetch_stall_seconds_count") == 2
    assert value("engram_prefetch_stall_seconds_sum") == 0.25
    engram.update({"lookups": 4, "unknown_key": object()})  # a restarted prefetcher counts anew
    assert value("engram_lookups_total", tier="all") == 34
    engram.update({})
    assert value("engram_lookups_total", tier="all") == 34


@pytest.fixture(scope="module")
def disk_server(default_model_dir):
    engine = build_engine(
        default_model_dir,
        EngineConfig(max_num_seqs=4, kv_cache_bytes=128 << 20, max_model_len=512),
        OffloadConfig(tier="disk", cache_rows=20_000),
    )
    app = build_app(engine, ServerConfig(served_model_name="m", stats_interval_s=0.5))
    with BackgroundServer(app) as server:
        yield server, engine


def test_engram_metrics_follow_the_prefetcher_counters(disk_server, caplog):
    server, engine = disk_server
    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    with caplog.at_level(logging.INFO, logger="engram_serve.stats"):
        for _ in range(2):  # the second run reads the rows the first one cached
            assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).is_success
        stats = engine.engram.prefetcher.stats  # the engine is idle: its counters are final
        assert stats["cache_hits"] > 0 and stats["cache_misses"] > 0
        assert metric(server.url, "engram_serve_engram_lookups_total") == stats["lookups"]
        assert metric(server.url, "engram_serve_engram_cache_hits_total") == stats["cache_hits"]
        assert metric(server.url, "engram_serve_engram_cache_misses_total") == stats["cache_misses"]
        for tier, rows in stats["rows_read"].items():
            assert metric(server.url, "engram_serve_engram_rows_read_total", tier=tier) == rows
        for tier, size in stats["bytes_read"].items():
            assert metric(server.url, "engram_serve_engram_bytes_read_total", tier=tier) == size
        for tier, size in stats["table_bytes"].items():
            assert metric(server.url, "engram_serve_engram_table_bytes", tier=tier) == size
        assert (
            metric(server.url, "engram_serve_engram_prefetch_stall_seconds_count") == stats["steps"]
        )
        line = wait_for(
            lambda: next((r.getMessage() for r in caplog.records
                          if re.search(r"Engram cache hit rate: \d+\.\d%", r.getMessage())), None),
            timeout_s=5,
        )  # fmt: skip
    assert "Avg prompt throughput" in line and "KV cache usage" in line
