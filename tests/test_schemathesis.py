"""schemathesis against the live server's own OpenAPI schema: generated requests (valid and
invalid) must never get a 5xx, must get a documented status and body, and must not hang. The
engine runs a tiny random-weight model with the real tokenizer and a short context, so every
request is cheap. Each operation and mode runs a fixed number of derandomized examples (the same
ones on every machine, however fast) and must reach its minimum of distinct requests sent; each
call has a timeout.

Also here: a dead engine (a fault inside a step) answers 503, on /health too."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode
from test_server_support import tiny_model_dir

from engram_serve.config import EngineConfig, ServerConfig
from engram_serve.llm import build_engine
from engram_serve.server.api import build_app
from engram_serve.server.process import BackgroundServer

MAX_EXAMPLES = 100  # asked of hypothesis per operation and mode: ~40 s for all, on 2 cores
# Distinct requests each operation with a body must have sent, per mode (the derandomized runs
# send 51 (detokenize, negative) to 97 of their 100).
MIN_EXAMPLES = 40
REQUEST_TIMEOUT_S = 30  # a hang fails the example
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SMALL = EngineConfig(max_num_seqs=16, kv_cache_bytes=32 << 20, max_model_len=64)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), default_model_dir)


@pytest.fixture(scope="module")
def live_server(tiny_dir):
    app = build_app(build_engine(tiny_dir, SMALL, enable_engram=False), ServerConfig())
    with BackgroundServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(live_server):
    return schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")


OPERATIONS = {  # operation -> whether it takes a body (then schema-invalid bodies are sent too;
    # an operation without body or parameters has one request to send)
    "POST /v1/completions": True,
    "POST /v1/chat/completions": True,
    "POST /tokenize": True,
    "POST /detokenize": True,
    "GET /v1/models": False,
    "GET /health": False,
    "GET /version": False,
    "GET /metrics": False,
}


def test_every_operation_is_fuzzed(api_schema):
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


@pytest.mark.parametrize(
    ("label", "mode"),
    [(label, mode) for label, has_body in OPERATIONS.items()
     for mode in (["positive", "negative"] if has_body else ["positive"])],
)  # fmt: skip
def test_generated_requests(api_schema, live_server, label, mode):
    """schemathesis's cases for one operation; `negative` cases violate the schema."""
    method, path = label.split(" ")
    operation = api_schema[path][method]
    sent: list[str] = []

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(
        max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    def run(case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
        sent.append(_request_key(case))

    run()
    minimum = MIN_EXAMPLES if OPERATIONS[label] else 1
    assert len(set(sent)) >= minimum, f"{len(set(sent))} distinct requests of {len(sent)} sent"


def _request_key(case) -> str:
    parts = {"query": case.query, "headers": case.headers, "body": case.body}
    return json.dumps(parts, sort_keys=True, default=repr)


def test_the_server_survives_the_fuzzing(live_server):
    assert httpx.get(f"{live_server.url}/health").status_code == 200
    reply = httpx.post(
        f"{live_server.url}/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=30
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3


def test_a_dead_engine_answers_503(tiny_dir):
    engine = build_engine(tiny_dir, SMALL, enable_engram=False)
    with BackgroundServer(build_app(engine, ServerConfig())) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        engine.cache.k.clear()  # a real fault in the next step (the engine thread is idle now)
        body = {"prompt": "hello", "max_tokens": 3}
        for stream in (False, True, False):
            reply = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": stream})
            assert reply.status_code == 503, reply.text
            assert "engine has stopped" in reply.json()["error"]["message"]
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == 503
