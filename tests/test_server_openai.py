"""The HTTP server on the real default model, driven by the official `openai` client (and raw
HTTP where the wire format itself is checked). One live server for the module."""

from __future__ import annotations

import logging
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from test_server_support import (
    Scrape,
    engram_columns,
    in_process_server,
    metric,
    post_then_leave,
    sse_data,
    table_file_bytes,
    wait_for,
)

import engram_serve
from engram_serve.config import EngineConfig
from engram_serve.server.metrics import FINISH_REASONS

API_KEY = "test-key"
MODEL = "smol-test"
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS, MAX_WAITING = 8, 8
PROMPT = "The capital of France is"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(default_model_dir):
    config = EngineConfig(
        max_num_seqs=MAX_NUM_SEQS, max_waiting=MAX_WAITING, kv_cache_bytes=256 << 20,
        max_model_len=MAX_MODEL_LEN,
    )  # fmt: skip
    server = dict(api_key=API_KEY, served_model_name=MODEL, max_request_bytes=1 << 20)
    with in_process_server(default_model_dir, config, **server) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def _post(server, path: str, body, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=timeout)


def _greedy(client, prompt=PROMPT, max_tokens=8, **kwargs):
    return client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs
    )


# -- completions ------------------------------------------------------------------------------


def test_text_and_token_id_prompts_give_the_same_completion(server, client):
    by_text = _greedy(client)
    tokens = _post(server, "/tokenize", {"prompt": PROMPT}).json()
    assert tokens["count"] == len(tokens["tokens"]) == by_text.usage.prompt_tokens
    assert _post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"] == PROMPT

    by_ids = _greedy(client, prompt=tokens["tokens"])
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_text.choices[0].text.strip(), "the model should say something"
    assert by_text.choices[0].finish_reason == "length"
    assert by_text.usage.completion_tokens == 8
    assert by_text.usage.total_tokens == by_text.usage.prompt_tokens + 8
    assert by_text.model == MODEL and by_text.object == "text_completion"


def test_several_prompts_and_n_with_derived_seeds(client):
    prompts = [PROMPT, "Once upon a time"]
    args = dict(model=MODEL, prompt=prompts, n=2, max_tokens=12, temperature=1.0, seed=7)
    first = client.completions.create(**args)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in client.completions.create(**args).choices], "seeded"
    assert texts[0] != texts[1], "the n choices of one prompt sample differently"
    # Choice j of a seeded request uses seed + j.
    second_seed = client.completions.create(**{**args, "prompt": PROMPT, "n": 1, "seed": 8})
    assert second_seed.choices[0].text == texts[1]
    # Each prompt's tokens are counted once, every choice's completion tokens.
    lengths = [client.completions.create(model=MODEL, prompt=p, max_tokens=1).usage.prompt_tokens
               for p in prompts]  # fmt: skip
    assert first.usage.prompt_tokens == sum(lengths)
    assert first.usage.completion_tokens == 4 * 12


def test_echo_prepends_the_prompt(client):
    plain = _greedy(client).choices[0].text
    assert _greedy(client, echo=True).choices[0].text == PROMPT + plain


def test_stop_string_cuts_the_text_before_it(server, client):
    text = _greedy(client, max_tokens=16).choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    expected = text[: text.index(stop)]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stop": [stop]}
    raw = _post(server, "/v1/completions", body).json()["choices"][0]
    assert (raw["text"], raw["finish_reason"], raw["stop_reason"]) == (expected, "stop", stop)

    stream = _greedy(client, max_tokens=16, stop=stop, stream=True)
    chunks = [c.choices[0] for c in stream]
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == "stop"


def test_completion_logprobs_in_the_legacy_format(client):
    choice = _greedy(client, logprobs=3).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == choice.text
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == logprob <= 0.0
        assert logprob == max(top.values()), "greedy picks the most likely token"
        assert 1 <= len(top) <= 4  # the top 3 plus the sampled one (here among them)


def test_streamed_completion_with_logprobs_matches_the_whole(client):
    whole = _greedy(client, max_tokens=10, logprobs=1).choices[0]
    stream = _greedy(
        client, max_tokens=10, logprobs=1, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    choices = [c.choices[0] for c in chunks[:-1]]
    assert "".join(c.text for c in choices) == whole.text
    streamed = [t for c in choices if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in choices if c.logprobs for o in c.logprobs.text_offset]
    assert streamed == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert choices[-1].finish_reason == "length"


def test_sse_wire_format(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    frames = raw.split("\n\n")[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames)
    events = sse_data(raw.split("\n"))
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert all(e["usage"] is None for e in events[:-2])


# -- chat -------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_with_logprobs(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens <= 6
    assert "".join(t.token for t in content) == choice.message.content
    for item in content:
        assert item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].token == item.token, "greedy picks the most likely token"
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob


def test_chat_max_tokens_alias_and_template(server, client):
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 3
    templated = _post(server, "/tokenize", {"messages": MESSAGES}).json()
    assert reply.usage.prompt_tokens == templated["count"]
    plain = _post(server, "/tokenize", {"prompt": MESSAGES[0]["content"]}).json()
    assert templated["count"] > plain["count"], "the chat template wraps the message"


def test_chat_stream_with_usage(client):
    whole = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=8, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_completion_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    first, usage = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert usage.choices == [] and usage.usage == whole.usage
    body = [c.choices[0] for c in chunks[1:-1]]
    assert all(c.delta.role is None for c in body)
    assert "".join(c.delta.content or "" for c in body) == whole.choices[0].message.content
    assert body[-1].finish_reason == whole.choices[0].finish_reason
    assert all(c.finish_reason is None for c in body[:-1])


# -- the rest of the API and errors -----------------------------------------------------------


def test_models_health_version(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed off /v1
    assert httpx.get(f"{server.url}/version").json() == {"version": engram_serve.__version__}


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def test_openai_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=1)
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048 tokens"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_MODEL_LEN)

    url = f"{server.url}/v1/completions"
    assert _error(httpx.post(url, json={"prompt": PROMPT}), 401)
    assert (
        _error(_post(server, "/v1/completions", {"prompt": PROMPT, "model": "x"}), 404)["param"]
        == "model"
    )
    error = _error(_post(server, "/v1/completions", {"prompt": PROMPT, "temperature": 5}), 400)
    assert "temperature" in error["message"]
    error = _error(_post(server, "/v1/completions", {"prompt": PROMPT, "n": "many"}), 400)
    assert error["param"] == "n"  # a type error: 400, never FastAPI's 422
    assert _error(_post(server, "/v1/chat/completions", {"messages": "hi"}), 400)
    error = _error(_post(server, "/v1/completions", {"prompt": "x", "stream_options": {}}), 400)
    assert "stream" in error["message"]
    json_headers = {**AUTH, "content-type": "application/json"}
    malformed = httpx.post(url, content=b'{"prompt": ', headers=json_headers)
    assert "JSON" in _error(malformed, 400)["message"]
    too_big = _post(server, "/v1/completions", {"prompt": "x" * (2 << 20)})
    assert "exceeds" in _error(too_big, 413)["message"]
    assert _error(_post(server, "/v1/no-such-route", {}), 404)
    assert _error(_post(server, "/v1/completions", {"prompt": [10**9]}), 400)


def test_full_waiting_queue_answers_503_with_retry_after(server):
    # More choices than the waiting queue holds: refused whole, nothing left queued.
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "n": MAX_WAITING + 1}
    response = _post(server, "/v1/completions", body)
    assert _error(response, 503) and int(response.headers["retry-after"]) > 0
    assert metric(server.url, "engram_serve_num_requests_waiting") == 0
    assert _post(server, "/v1/completions", {**body, "n": 2}).status_code == 200


def test_unknown_fields_are_ignored_with_a_log_line(server, caplog):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "frobnicate": True}
    with caplog.at_level(logging.WARNING):
        assert _post(server, "/v1/completions", body).status_code == 200
    assert any("frobnicate" in r.getMessage() for r in caplog.records)


# -- cancellation -----------------------------------------------------------------------------


def _idle(url: str) -> bool:
    return (
        metric(url, "engram_serve_num_requests_running") == 0
        and metric(url, "engram_serve_kv_cache_usage_perc") == 0
    )


def test_closing_a_stream_aborts_the_request_and_frees_its_blocks(server, client):
    assert _idle(server.url)
    aborted = metric(server.url, "engram_serve_request_success_total", finished_reason="abort")
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=1000, stream=True, extra_body={"ignore_eos": True}
    )
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert metric(server.url, "engram_serve_num_requests_running") == 1
    assert metric(server.url, "engram_serve_kv_cache_usage_perc") > 0
    stream.close()  # 1000 tokens would take ~a minute; the abort counter shows it was cut
    wait_for(lambda: _idle(server.url), timeout_s=30)
    wait_for(
        lambda: (
            metric(server.url, "engram_serve_request_success_total", finished_reason="abort")
            == aborted + 1
        )
    )


def test_a_client_leaving_a_non_streaming_request_aborts_it(server):
    wait_for(lambda: _idle(server.url))
    aborted = metric(server.url, "engram_serve_request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True}

    def running() -> bool:
        return metric(server.url, "engram_serve_num_requests_running") == 1

    post_then_leave(server.url, "/v1/completions", body, running, headers=AUTH)
    wait_for(lambda: _idle(server.url), timeout_s=30)  # aborted: 1000 tokens take ~a minute
    assert (
        metric(server.url, "engram_serve_request_success_total", finished_reason="abort")
        == aborted + 1
    )


def test_metrics_count_each_request_as_its_response_reports(server, client, default_model_dir):
    """Deltas of /metrics over two requests on an idle server, against what the responses say:
    tokens from `usage`, finished requests by their `finish_reason`, one latency observation
    per request (per further token for the inter-token latency), each inside the client's own
    clock, and Engram lookups of every computed token."""
    wait_for(lambda: _idle(server.url))
    first = _greedy(client, max_tokens=5, extra_body={"ignore_eos": True})
    stop = first.choices[0].text[-2:]  # greedy again: the same text, cut where `stop` occurs
    before, started = Scrape(server.url), time.monotonic()
    replies = [_greedy(client, max_tokens=5, extra_body={"ignore_eos": True}),
               _greedy(client, max_tokens=5, stop=[stop])]  # fmt: skip
    elapsed = time.monotonic() - started
    after = Scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        return after.delta(before, f"engram_serve_{name}", **labels)

    reasons = [r.choices[0].finish_reason for r in replies]
    assert reasons == ["length", "stop"]
    prompt = sum(r.usage.prompt_tokens for r in replies)
    generated = [r.usage.completion_tokens for r in replies]
    assert generated[0] == 5 and 1 <= generated[1] <= 5
    assert delta("num_preemptions_total") == 0  # so each prompt token was computed once
    assert delta("prompt_tokens_total") == prompt
    assert delta("generation_tokens_total") == sum(generated)
    for reason in FINISH_REASONS:
        assert delta("request_success_total", finished_reason=reason) == reasons.count(reason)
    assert delta("request_prompt_tokens_sum") == prompt
    assert delta("request_generation_tokens_sum") == sum(generated)
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):  # fmt: skip
        assert delta(f"{name}_count") == 2, name
    assert delta("inter_token_latency_seconds_count") == sum(generated) - 2
    # Latencies: queue <= first token <= end of request, all within the client's wall time.
    queue, ttft = delta("request_queue_time_seconds_sum"), delta("time_to_first_token_seconds_sum")
    e2e = delta("e2e_request_latency_seconds_sum")
    assert 0 <= queue <= ttft + 1e-9 and ttft <= e2e + 1e-9 and e2e <= elapsed
    # Engram: every computed token (the prompt, then each sampled token but the last) is looked
    # up once per hash column and layer; the device tier reads every looked-up row. One engine
    # step per output token (a prompt is one prefill chunk), one stall observation per step.
    computed = prompt + sum(generated) - len(replies)
    lookups = computed * engram_columns(default_model_dir)
    assert delta("engram_lookups_total") == lookups
    assert delta("engram_rows_read_total") == lookups
    assert delta("engram_prefetch_stall_seconds_count") == sum(generated)
    assert after.value("engram_serve_engram_table_bytes") == table_file_bytes(default_model_dir)
    assert after.value("engram_serve_num_requests_running") == 0


def test_sse_json_is_valid_per_frame(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True, "n": 2}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH) as r:
        events = sse_data(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
    roles = [c for c in chunks if c["choices"][0]["delta"].get("role")]
    assert [c["choices"][0]["index"] for c in roles] == [0, 1]
    # Each frame is a chunk as the OpenAI SDK's own types define it (not just some JSON).
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert {c.id for c in parsed} == {parsed[0].id} and parsed[0].model == MODEL
    finished = [c.choices[0] for c in parsed if c.choices[0].finish_reason is not None]
    assert sorted(c.index for c in finished) == [0, 1]
