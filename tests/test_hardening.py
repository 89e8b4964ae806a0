"""Hardening of the live server on the default model: every kind of bad input in one table (each
case with its status and OpenAI error body, never a 422 or a 500), overload (503 with
Retry-After while /health answers and running requests finish), and random client disconnects
(nothing left running, no KV block held)."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from test_server_support import metric, post_then_leave, sse_data, wait_for

from engram_serve.bench import soak
from engram_serve.config import EngineConfig, ServerConfig
from engram_serve.llm import build_engine
from engram_serve.server import protocol as p
from engram_serve.server.api import build_app
from engram_serve.server.process import BackgroundServer

MODEL = "smol-hardening"
MAX_MODEL_LEN = 512
MAX_REQUEST_BYTES = 256 << 10
VOCAB = 49152
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
ANY = object()  # a case that does not pin `param`


def _server(default_model_dir, max_num_seqs: int, max_waiting: int):
    config = EngineConfig(
        max_num_seqs=max_num_seqs, max_waiting=max_waiting, kv_cache_bytes=64 << 20,
        max_model_len=MAX_MODEL_LEN,
    )  # fmt: skip
    engine = build_engine(default_model_dir, config)
    app = build_app(
        engine, ServerConfig(served_model_name=MODEL, max_request_bytes=MAX_REQUEST_BYTES)
    )
    return engine, BackgroundServer(app)


@pytest.fixture(scope="module")
def small(default_model_dir):
    """2 running + 2 waiting at most: easy to overload."""
    engine, server = _server(default_model_dir, max_num_seqs=2, max_waiting=2)
    with server:
        yield server


@pytest.fixture(scope="module")
def roomy(default_model_dir):
    """Room for every client of the disconnect test (4 running, the rest waiting)."""
    engine, server = _server(default_model_dir, max_num_seqs=4, max_waiting=64)
    with server:
        yield server, engine


# -- bad input --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    message: str  # a regex the error message must match
    body: Any = None  # sent as JSON, unless `raw` is given
    path: str = "/v1/completions"
    raw: bytes | None = None
    param: Any = ANY
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)


def _chunks(data: bytes, size: int = 64 << 10):
    for start in range(0, len(data), size):  # an iterator: httpx sends it chunked, no length
        yield data[start : start + size]


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **fields}


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields}


JSON = {"content-type": "application/json"}
OVERSIZED = b'{"prompt": "' + b"x" * MAX_REQUEST_BYTES + b'"}'
CONTEXT = r"maximum context length is 512 tokens"
CASES = [
    # the body itself
    Case("malformed JSON", 400, r"malformed JSON", raw=b'{"prompt": "hi",', headers=JSON),
    Case("trailing garbage", 400, r"malformed JSON", raw=b'{"prompt": "hi"} x', headers=JSON),
    Case("invalid UTF-8", 400, r"UTF-8|utf-8|parsing the body",
         raw=b'{"prompt": "\xff\xfe"}', headers=JSON),
    Case("JSON array body", 400, r"dictionary|object", body=[1, 2, 3]),
    Case("NaN temperature", 400, r"temperature", raw=b'{"prompt": "hi", "temperature": NaN}',
         headers=JSON, param="temperature"),
    Case("oversized body", 413, r"exceeds 262144 bytes", raw=OVERSIZED, headers=JSON),
    Case("oversized chunked body", 413, r"exceeds", raw=OVERSIZED, headers={**JSON, "chunked": ""}),
    # wrong types
    Case("max_tokens a string", 400, r"max_tokens", _body(max_tokens="ten"), param="max_tokens"),
    Case("prompt a number", 400, r"^prompt: .*a valid string or a valid list", {"prompt": 5},
         param="prompt"),
    Case("prompt an object", 400, r"^prompt: .*a valid string or", {"prompt": {"text": "hi"}}),
    Case("token id true", 400, r"^prompt\.0: .*a token id must be an integer", {"prompt": [True]},
         param="prompt.0"),
    Case("two fields wrong", 400, r"^n: .*integer \(and 1 more field wrong\)",
         _body(n="a", max_tokens="b"), param="n"),
    Case("n a fraction", 400, r"n: ", _body(n=1.5), param="n"),
    Case("messages a string", 400, r"messages", {"messages": "hi"}, CHAT),
    Case("unknown role", 400, r"^messages\.0\.role: .*'user'",
         {"messages": [{"role": "wizard", "content": "x"}]}, CHAT, param="messages.0.role"),
    Case("content a number", 400, r"^messages\.0\.content: .*string or a valid list",
         {"messages": [{"role": "user", "content": 5}]}, CHAT, param="messages.0.content"),
    Case("stop a list of numbers", 400, r"^stop\.0: .*valid string", _body(stop=[1]),
         param="stop.0"),
    Case("image content part", 400, r"only text content parts", _chat(messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         path=CHAT, param="messages"),
    # missing fields
    Case("no prompt", 400, r"prompt: Field required", {"model": MODEL}, param="prompt"),
    Case("no messages", 400, r"messages: Field required", {"model": MODEL}, CHAT,
         param="messages"),
    Case("no messages in the list", 400, r"messages", {"messages": []}, CHAT, param="messages"),
    # lengths
    Case("negative max_tokens", 400, r"max_tokens", _body(max_tokens=-1), param="max_tokens"),
    Case("zero max_tokens", 400, r"max_tokens", _body(max_tokens=0), param="max_tokens"),
    Case("huge max_tokens", 400, CONTEXT, _body(max_tokens=10**9)),
    Case("enormous max_tokens", 400, CONTEXT + "|max_tokens", _body(max_tokens=10**40)),
    Case("negative max_completion_tokens", 400, r"max_completion_tokens",
         _chat(max_completion_tokens=-5), CHAT, param="max_completion_tokens"),
    Case("min_tokens over max_tokens", 400, r"min_tokens", _body(min_tokens=9),
         param="min_tokens"),
    Case("n over the limit", 400, r"n: .*16", _body(n=17), param="n"),
    Case("n zero", 400, r"n: ", _body(n=0), param="n"),
    Case("prompts x n over the limit", 400, r"prompts x n", _body(prompt=["a"] * 10, n=16),
         param="n"),
    Case("empty prompt", 400, r"the prompt is empty", _body(prompt="")),
    Case("empty prompt list", 400, r"the prompt is empty", _body(prompt=[]), param="prompt"),
    Case("empty token list in a batch", 400, r"the prompt is empty", _body(prompt=[[1], []])),
    Case("text prompt over the context", 400, CONTEXT, _body(prompt="hello " * 600)),
    Case("token prompt over the context", 400, CONTEXT, _body(prompt=[100] * 600)),
    Case("prompt fits, output does not", 400, CONTEXT, _body(prompt=[100] * 500, max_tokens=13)),
    Case("chat over the context", 400, CONTEXT, _chat(messages=[
        {"role": "user", "content": "hello " * 600}]), CHAT),
    # token ids
    Case("token id = vocab size", 400, rf"token id {VOCAB} is out of vocabulary",
         _body(prompt=[1, VOCAB])),
    Case("negative token id", 400, r"^prompt\.0: .*greater than or equal to 0",
         _body(prompt=[-1]), param="prompt.0"),
    Case("token id past int64", 400, r"out of vocabulary|prompt", _body(prompt=[2**63])),
    Case("stop token id outside", 400, r"stop token id", _body(stop_token_ids=[VOCAB]),
         param="stop_token_ids"),
    Case("detokenize outside", 400, r"outside the vocabulary", {"tokens": [VOCAB]},
         "/detokenize", param="tokens"),
    Case("tokenize prompt and messages", 400, r"exactly one",
         {"prompt": "a", "messages": MESSAGES}, "/tokenize", param="prompt"),
    # stop strings
    Case("65 stop strings", 400, r"at most 64 stop strings", _body(stop=["a"] * 65),
         param="stop"),
    Case("5000 stop strings", 400, r"at most 64 stop strings",
         _body(stop=[f"s{i}" for i in range(5000)]), param="stop"),
    Case("empty stop string", 400, r"stop strings must not be empty", _body(stop=[""]),
         param="stop"),
    # the model
    Case("unknown model", 404, r"`gpt-4` does not exist", _body(model="gpt-4"), param="model"),
    Case("unknown model (chat)", 404, r"does not exist", _chat(model="x"), CHAT, param="model"),
    # logprobs
    Case("logprobs 21", 400, r"logprobs", _body(logprobs=21), param="logprobs"),
    Case("logprobs -1", 400, r"logprobs", _body(logprobs=-1), param="logprobs"),
    Case("top_logprobs 21", 400, r"top_logprobs", _chat(logprobs=True, top_logprobs=21), CHAT,
         param="top_logprobs"),
    Case("top_logprobs without logprobs", 400, r"`logprobs` must be set",
         _chat(top_logprobs=2), CHAT, param="top_logprobs"),
    Case("echo with logprobs", 400, r"echo", _body(echo=True, logprobs=1), param="echo"),
    # sampling ranges
    Case("top_p 0", 400, r"top_p", _body(top_p=0), param="top_p"),
    Case("top_p 1.5", 400, r"top_p", _body(top_p=1.5), param="top_p"),
    Case("temperature -0.5", 400, r"temperature", _body(temperature=-0.5), param="temperature"),
    Case("temperature 2.5", 400, r"temperature", _body(temperature=2.5), param="temperature"),
    Case("top_k -2", 400, r"top_k", _body(top_k=-2), param="top_k"),
    Case("min_p 2", 400, r"min_p", _body(min_p=2), param="min_p"),
    Case("presence_penalty 3", 400, r"presence_penalty", _body(presence_penalty=3),
         param="presence_penalty"),
    Case("repetition_penalty 0", 400, r"repetition_penalty", _body(repetition_penalty=0),
         param="repetition_penalty"),
    Case("seed past int64", 400, r"seed", _body(seed=2**64), param="seed"),
    # options
    Case("stream_options without stream", 400, r"only .* when `stream=True`",
         _body(stream_options={"include_usage": True}), param="stream_options"),
    Case("stream_options a string", 400, r"stream_options", _body(stream=True,
         stream_options="yes"), param="stream_options"),
    Case("logit_bias", 400, r"logit_bias is not supported", _body(logit_bias={"1": 5}),
         param="logit_bias"),
    Case("suffix", 400, r"suffix is not supported", _body(suffix="x"), param="suffix"),
    # routes
    Case("GET a POST route", 405, r"[Mm]ethod [Nn]ot [Aa]llowed", method="GET"),
    Case("unknown route", 404, r"no endpoint POST /v1/embeddings; this server has .*"
         r"POST /v1/completions, POST /v1/chat/completions", {}, "/v1/embeddings"),
    Case("the Responses API", 404, r"no endpoint POST /v1/responses; .*POST /v1/chat/completions",
         {"model": "x", "input": "hi"}, "/v1/responses"),
]  # fmt: skip


def send(url: str, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    chunked = headers.pop("chunked", None) is not None
    if case.raw is not None:
        content = _chunks(case.raw) if chunked else case.raw
        return httpx.request(
            case.method, url + case.path, content=content, headers=headers, timeout=60
        )
    if case.method == "GET":
        return httpx.get(url + case.path, timeout=60)
    return httpx.request(case.method, url + case.path, json=case.body, timeout=60)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(small, case):
    response = send(small.url, case)
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == case.status and error["type"] == p.APIError.TYPES[case.status]
    assert re.search(case.message, error["message"]), error["message"]
    assert len(error["message"]) >= 5 and "Traceback" not in error["message"]
    if case.param is not ANY:
        assert error["param"] == case.param


def test_bad_input_leaves_the_server_idle_and_serving(small):
    for case in CASES[:10]:
        send(small.url, case)
    assert _idle(small.url)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "ignore_eos": True}
    reply = httpx.post(f"{small.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


# -- overload ---------------------------------------------------------------------------------


def _idle(url: str) -> bool:
    return all(
        metric(url, f"engram_serve_{name}") == 0
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    )


def test_overload_answers_503_with_retry_after_and_running_requests_finish(small):
    url, long_tokens = small.url, 40  # seconds per pair of requests: the burst takes ~0.1 s
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": long_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    streams: dict[int, tuple[int, list]] = {}

    def long_stream(i: int) -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            streams[i] = (r.status_code, sse_data(list(r.iter_lines())))

    admitted = [threading.Thread(target=long_stream, args=(i,)) for i in range(4)]
    for thread in admitted[:2]:  # the queue holds requests not yet scheduled: fill it in turn
        thread.start()
    wait_for(lambda: metric(url, "engram_serve_num_requests_running") == 2)
    for thread in admitted[2:]:
        thread.start()
    wait_for(lambda: metric(url, "engram_serve_num_requests_waiting") == 2)

    def short(_: int) -> httpx.Response:
        short_body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
        return httpx.post(f"{url}/v1/completions", json=short_body, timeout=60)

    def overloaded() -> tuple[float, float]:
        return (metric(url, "engram_serve_num_requests_running"),
                metric(url, "engram_serve_num_requests_waiting"))  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        burst = pool.map(short, range(8))
        health = httpx.get(f"{url}/health", timeout=60)
        # Still 2 running and 2 waiting once health has answered (nothing new was admitted:
        # every burst request is refused below), so health answered during the overload.
        during = overloaded()
        burst = list(burst)
    assert health.status_code == 200
    assert during == (2, 2), "health answered while 2 requests ran and 2 waited"
    for response in burst:
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert error["type"] == "ServiceUnavailableError" and error["code"] == 503
        assert "waiting queue is full" in error["message"]
    for thread in admitted:
        thread.join(timeout=120)
    for status, events in streams.values():
        assert status == 200 and events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == long_tokens
        assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert len(streams) == 4
    wait_for(lambda: _idle(url))


# -- disconnects ------------------------------------------------------------------------------

LONG = {"max_tokens": 400, "ignore_eos": True}  # never finishes before its client leaves


def _stream_then_leave(url: str, path: str, body: dict, num_chunks: int) -> None:
    """Read `num_chunks` SSE frames (0: only the headers), then close the connection."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for _ in zip(range(num_chunks), r.iter_lines(), strict=False):
            pass


def _plain_then_leave(url: str, engine, body: dict) -> None:
    """Leave a non-streaming request once the engine holds it (found by its prompt, which is
    this client's own). `list(dict.values())` copies in one step under the GIL, so reading the
    engine thread's dict from here is safe."""

    def in_engine() -> bool:
        return any(t.request.prompt == body["prompt"] for t in list(engine.trackers.values()))

    post_then_leave(url, "/v1/completions", body, in_engine)


def _reset_after_headers(url: str, body: dict) -> None:
    """Raw socket: send a streaming request, wait for the response headers (the request is in
    the engine by then), then reset the connection (RST, no FIN handshake)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps({**body, "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + payload)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_random_disconnects_leave_nothing_running(roomy):
    server, engine = roomy
    url, rng = server.url, random.Random(7)
    aborted = metric(url, "engram_serve_request_success_total", finished_reason="abort")
    finished = metric(url, "engram_serve_request_success_total")
    completion = {"model": MODEL, "prompt": PROMPT, **LONG}
    chat = {"model": MODEL, "messages": MESSAGES, **LONG}
    clients = []
    kinds = ["completion", "chat", "plain", "reset"] * 5  # 20 clients, 5 of each kind
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "completion":
            clients.append((_stream_then_leave, url, "/v1/completions", completion,
                            rng.randint(0, 8)))  # fmt: skip
        elif kind == "chat":
            clients.append((_stream_then_leave, url, CHAT, chat, rng.randint(0, 8)))
        elif kind == "plain":  # a prompt of its own, to find its request in the engine
            own = {**completion, "prompt": f"{PROMPT} (client {len(clients)})"}
            clients.append((_plain_then_leave, url, engine, own))
        else:
            clients.append((_reset_after_headers, url, completion))
    with ThreadPoolExecutor(len(clients)) as pool:
        for future in [pool.submit(*client) for client in clients]:
            future.result()

    wait_for(lambda: _idle(url), timeout_s=20)
    assert engine.num_running == engine.num_waiting == 0 and engine.trackers == {}
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # none leaked, none twice
    # Every client's request reached the engine and was aborted: none finished on its own.
    wait_for(lambda: metric(url, "engram_serve_request_success_total", finished_reason="abort")
             == aborted + len(clients))  # fmt: skip
    assert metric(url, "engram_serve_request_success_total") == finished + len(clients)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "ignore_eos": True}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5


def test_soak_tool_reckons_a_short_run(roomy, tmp_path):
    """`engram-serve bench soak` against a running server, for seconds instead of minutes."""
    server, _ = roomy
    output = tmp_path / "soak.json"
    report = soak.main(["--url", server.url, "--pid", str(os.getpid()), "--duration", "4",
                        "--concurrency", "4", "--max-tokens", "8", "--disconnect-fraction",
                        "0.5", "--sample-interval", "1", "--output", str(output)])  # fmt: skip
    client = report["client"]
    assert client["sent"] == client["completed"] + client["aborted"] + client["failed"] > 0
    assert client["completed"] > 0 and client["aborted"] > 0 and client["failed"] == 0
    assert all(report["checks"].values()), report["checks"]
    assert report["memory"]["rss_end_mib"] > 0 and report["samples"]
    assert json.loads(output.read_text())["client"] == client
