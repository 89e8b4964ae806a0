"""The OpenAI-compatible HTTP API (FastAPI + uvicorn).

    POST /v1/completions, /v1/chat/completions     GET /v1/models
    GET /health, /version, /metrics                POST /tokenize, /detokenize

A route validates its body (protocol.py), turns it into engine requests and hands them to the
AsyncEngine, whose thread runs the engine; the event loop never blocks on it. A client that goes
away aborts its engine requests at once (streaming: the SSE response watches for the disconnect;
non-streaming: the handler races the disconnect). Every error is OpenAI's body
{"error": {"message", "type", "param", "code"}}, never FastAPI's 422.

Shutdown (SIGTERM/SIGINT): uvicorn stops accepting; the engine drains, refusing new requests
and aborting those still running after --shutdown-timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import engram_serve
from engram_serve.config import ServerConfig
from engram_serve.engine.engine import Engine
from engram_serve.engine.request import RequestOutput
from engram_serve.engine.scheduler import QueueFullError
from engram_serve.server import protocol as p
from engram_serve.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineRequest,
    Generation,
    PromptInput,
    ShuttingDownError,
)
from engram_serve.server.metrics import (
    MULTIPROC_ENV,
    ServerMetrics,
    is_multiprocess,
    mark_process_dead,
    render_metrics,
)

logger = logging.getLogger("engram_serve.server")

API_KEY_ENV = "ENGRAM_SERVE_API_KEY"
WORKER_ARGS_ENV = "ENGRAM_SERVE_WORKER_ARGS"  # the CLI arguments, for worker processes
DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
RETRY_AFTER_S = 1  # Retry-After when the waiting queue is full
SHUTDOWN_GRACE_S = 5.0  # after the drain deadline, uvicorn's own cancel of stuck tasks
ERROR_RESPONSES = {s: {"model": p.ErrorResponse} for s in (400, 401, 404, 413, 503)}


@dataclass(frozen=True)
class ServerState:
    engine: AsyncEngine
    metrics: ServerMetrics
    config: ServerConfig
    model_name: str
    max_model_len: int
    vocab_size: int

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise p.APIError(404, f"The model `{model}` does not exist.", "model")


def _state(request: Request) -> ServerState:
    return request.app.state.server


# -- the app --------------------------------------------------------------------------------------


def build_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; the engine thread runs while the app's lifespan does."""
    config = config or ServerConfig()
    model_name = config.served_model_name or engine.tokenizer.model_dir.name
    metrics = ServerMetrics(
        model_name, engine.max_model_len, stats_interval_s=config.stats_interval_s
    )
    state = ServerState(
        engine=AsyncEngine(engine, metrics.observe),
        metrics=metrics,
        config=config,
        model_name=model_name,
        max_model_len=engine.max_model_len,
        vocab_size=engine.model_config.vocab_size,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        if threading.current_thread() is threading.main_thread():
            _drain_on_signals(state.engine, config.shutdown_timeout_s)
        try:
            yield
        finally:
            await state.engine.stop()
            mark_process_dead()

    app = FastAPI(title="engram-serve", version=engram_serve.__version__, lifespan=lifespan)
    app.state.server = state
    app.include_router(v1_router)
    app.include_router(router)
    app.add_middleware(RequestGuard, api_key=config.api_key, max_bytes=config.max_request_bytes)
    app.add_exception_handler(p.APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.openapi = lambda: _openapi_without_422(app)
    return app


def _drain_on_signals(engine: AsyncEngine, timeout_s: float) -> None:
    """Chain a drain in front of uvicorn's SIGTERM/SIGINT handlers (installed just before the
    app starts; uvicorn restores the originals when it exits)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(engine.drain, timeout_s)
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


# -- completions ----------------------------------------------------------------------------------

v1_router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
router = APIRouter()
SSE_EVENT = {  # one server-sent event (OpenAPI before 3.2 describes a stream by its events)
    "type": "object",
    "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE] last"}},
    "required": ["data"],
}
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}}


@v1_router.post("/completions", response_model=p.CompletionResponse, responses=STREAM_RESPONSE)
async def create_completion(body: p.CompletionRequest, request: Request) -> Response:
    state = _state(request)
    _check(body, state)
    prompts = body.prompts()
    sampling = body.sampling_params(body.max_tokens, body.logprobs, state.vocab_size)
    base_id = p.random_id("cmpl")
    requests = [
        EngineRequest(f"{base_id}-{i}-{j}", _prompt_input(prompt, body.echo), params)
        for i, prompt in enumerate(prompts)
        for j, params in enumerate(sampling)
    ]
    generation = await _generate(state, requests)
    reply = dict(id=base_id, model=state.model_name, created=int(time.time()))
    if body.stream:
        return _SSEResponse(_completion_events(body, generation, reply), generation)

    async def complete() -> Response:
        outputs = await _final_outputs(generation)
        choices = [
            p.completion_choice(i, out, body.echo, body.logprobs is not None)
            for i, out in enumerate(outputs)
        ]
        usage = p.usage_of_outputs(outputs, body.n)
        return _json(p.CompletionResponse(**reply, choices=choices, usage=usage))

    return await _unless_disconnected(request, generation, complete())


@v1_router.post(
    "/chat/completions", response_model=p.ChatCompletionResponse, responses=STREAM_RESPONSE
)
async def create_chat_completion(body: p.ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    _check(body, state)
    messages = [m.template_dict() for m in body.messages]
    prompt = PromptInput(messages=messages, add_generation_prompt=body.add_generation_prompt)
    sampling = body.sampling_params(body.max_output_tokens, body.num_logprobs, state.vocab_size)
    base_id = p.random_id("chatcmpl")
    requests = [EngineRequest(f"{base_id}-{j}", prompt, s) for j, s in enumerate(sampling)]
    generation = await _generate(state, requests)
    reply = dict(id=base_id, model=state.model_name, created=int(time.time()))
    if body.stream:
        return _SSEResponse(_chat_events(body, generation, reply), generation)

    async def complete() -> Response:
        outputs = await _final_outputs(generation)
        choices = [p.chat_choice(i, out, body.num_logprobs) for i, out in enumerate(outputs)]
        usage = p.usage_of_outputs(outputs, body.n)
        return _json(p.ChatCompletionResponse(**reply, choices=choices, usage=usage))

    return await _unless_disconnected(request, generation, complete())


def _check(body: p.SamplingRequest, state: ServerState) -> None:
    body.log_ignored_fields()
    body.check()
    state.check_model(body.model)


def _prompt_input(prompt: str | list[int], echo: bool) -> PromptInput:
    if isinstance(prompt, str):
        return PromptInput(text=prompt)
    return PromptInput(token_ids=list(prompt), want_text=echo)


async def _generate(state: ServerState, requests: list[EngineRequest]) -> Generation:
    try:
        return await state.engine.generate(requests)
    except QueueFullError as e:
        raise p.APIError(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from e
    except (ShuttingDownError, EngineDeadError) as e:
        raise p.APIError(503, str(e)) from e
    except ValueError as e:  # bad token ids, empty prompt, context too long, template errors
        raise p.APIError(400, str(e)) from e


async def _final_outputs(generation: Generation) -> list[RequestOutput]:
    async with generation:
        try:
            outputs = await generation.final_outputs()
        except EngineDeadError as e:
            raise p.APIError(503, str(e)) from e
    for output in outputs:
        _raise_if_failed(output)
    return outputs


def _raise_if_failed(output: RequestOutput) -> None:
    if not output.finished:
        return
    reason = output.outputs[0].finish_reason
    if reason == "abort":  # only aborts the client did not cause reach here: shutdown
        raise p.APIError(503, "the request was aborted: the server is shutting down")
    if reason == "error":  # the engine names the file in its log; clients get no paths
        raise p.APIError(500, "the request failed: its Engram rows could not be read from storage")


# -- streaming ------------------------------------------------------------------------------------


def _completion_events(
    body: p.CompletionRequest, generation: Generation, reply: dict[str, Any]
) -> AsyncIterator[str]:
    started = set()
    offsets = [0] * len(generation.request_ids)  # text_offset of each choice's next token

    def chunk(index: int, output: RequestOutput) -> BaseModel | None:
        text = output.delta_text
        if body.echo and index not in started:
            text = (output.prompt or "") + text
        started.add(index)
        logprobs = None
        if body.logprobs is not None and output.delta_token_ids:
            logprobs = p.completion_logprobs(
                output.delta_token_ids, output.delta_logprobs or [], offsets[index]
            )
            offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        if not (text or logprobs or output.finished):
            return None
        done = output.outputs[0] if output.finished else None
        choice = p.CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=done and done.finish_reason,
            stop_reason=done and done.stop_reason,
        )
        return p.CompletionResponse(**reply, choices=[choice])

    def usage(outputs: list[RequestOutput]) -> BaseModel | None:
        if not body.include_usage:
            return None
        return p.CompletionResponse(**reply, choices=[], usage=p.usage_of_outputs(outputs, body.n))

    return _sse_events(generation, [], chunk, usage)


def _chat_events(
    body: p.ChatCompletionRequest, generation: Generation, reply: dict[str, Any]
) -> AsyncIterator[str]:
    def choice_chunk(choice: p.ChatStreamChoice) -> BaseModel:
        return p.ChatCompletionChunk(**reply, choices=[choice])

    # The first chunk of every choice carries the role, before any token is ready.
    role = p.DeltaMessage(role="assistant", content="")
    opening = [choice_chunk(p.ChatStreamChoice(index=i, delta=role)) for i in range(body.n)]

    def chunk(index: int, output: RequestOutput) -> BaseModel | None:
        logprobs = None
        if body.num_logprobs is not None and output.delta_token_ids:
            logprobs = p.chat_logprobs(
                output.delta_token_ids, output.delta_logprobs or [], body.num_logprobs
            )
        if not (output.delta_text or logprobs or output.finished):
            return None
        done = output.outputs[0] if output.finished else None
        delta = p.DeltaMessage(content=output.delta_text or None)
        return choice_chunk(
            p.ChatStreamChoice(
                index=index,
                delta=delta,
                logprobs=logprobs,
                finish_reason=done and done.finish_reason,
                stop_reason=done and done.stop_reason,
            )
        )

    def usage(outputs: list[RequestOutput]) -> BaseModel | None:
        if not body.include_usage:
            return None
        return p.ChatCompletionChunk(**reply, choices=[], usage=p.usage_of_outputs(outputs, body.n))

    return _sse_events(generation, opening, chunk, usage)


async def _sse_events(
    generation: Generation,
    opening: list[BaseModel],
    chunk: Callable[[int, RequestOutput], BaseModel | None],
    usage: Callable[[list[RequestOutput]], BaseModel | None],
) -> AsyncIterator[str]:
    """`data: {json}` frames, then `data: [DONE]`. An error after the 200 went out is sent as
    an error frame. Leaving (done, error, disconnect) aborts unfinished engine requests."""
    final: list[Any] = [None] * len(generation.request_ids)
    async with generation:
        try:
            for frame in opening:
                yield _sse(frame)
            async for index, output in generation:
                _raise_if_failed(output)
                if output.finished:
                    final[index] = output
                frame = chunk(index, output)
                if frame is not None:
                    yield _sse(frame)
            closing = usage(final)
            if closing is not None:
                yield _sse(closing)
        except (p.APIError, EngineDeadError) as e:
            error = e if isinstance(e, p.APIError) else p.APIError(503, str(e))
            yield f"data: {json.dumps(error.body())}\n\n"
    yield "data: [DONE]\n\n"


# JSON may carry these raw, but many SSE readers split lines at them (str.splitlines, httpx's
# iter_lines); escaped, the JSON means the same and every reader sees one line.
_UNICODE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json().translate(_UNICODE_LINE_BREAKS)}\n\n"


class _SSEResponse(StreamingResponse):
    """Streams while listening for the client to leave; on disconnect the body is cancelled at
    once (not at the next write), so its engine requests are aborted even while none of them
    has produced a token (e.g. still queued)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], generation: Generation):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._stream_until_disconnect(receive, send)
        finally:  # also when the body never started: its own cleanup never ran
            self.generation.abort()

    async def _stream_until_disconnect(self, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away mid-write
                    pass
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.body_iterator.aclose()
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


async def _unless_disconnected(
    request: Request, generation: Generation, work: Awaitable[Response]
) -> Response:
    """Run `work` unless the client leaves first; then cancel it and abort its requests."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            generation.abort()
    if task.cancelled():
        logger.info("Client disconnected; its request was aborted")
        raise p.APIError(499, "client disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the rest of the API --------------------------------------------------------------------------


@v1_router.get("/models", response_model=p.ModelList)
async def list_models(request: Request) -> Response:
    state = _state(request)
    card = p.ModelCard(
        id=state.model_name, root=state.model_name, max_model_len=state.max_model_len
    )
    return _json(p.ModelList(data=[card]))


@router.get(
    "/health", response_class=Response, responses={200: {}, 503: {"model": p.ErrorResponse}}
)
async def health(request: Request) -> Response:
    engine = _state(request).engine
    if engine.error is not None:
        raise p.APIError(503, f"the engine has stopped: {engine.error!r}")
    if engine.is_draining:
        raise p.APIError(503, "the server is shutting down")
    return Response(status_code=200)


@router.get("/version", response_model=p.VersionResponse)
async def version() -> Response:
    return _json(p.VersionResponse(version=engram_serve.__version__))


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    body = render_metrics(_state(request).metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize", response_model=p.TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: p.TokenizeRequest, request: Request) -> Response:
    state = _state(request)
    body.log_ignored_fields()
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise p.APIError(400, "give exactly one of `prompt` and `messages`", "prompt")
    if body.messages is not None:
        prompt = PromptInput(
            messages=[m.template_dict() for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
        )
    else:
        prompt = PromptInput(text=body.prompt, add_special_tokens=body.add_special_tokens)

    def run(engine: Engine) -> p.TokenizeResponse:
        ids = state.engine.tokenize(prompt)
        strs = None
        if body.return_token_strs:
            strs = [engine.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        return p.TokenizeResponse(
            count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs
        )

    return _json(await _call(state, run))


@router.post("/detokenize", response_model=p.DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: p.DetokenizeRequest, request: Request) -> Response:
    state = _state(request)
    body.log_ignored_fields()
    state.check_model(body.model)
    bad = next((t for t in body.tokens if not 0 <= t < state.vocab_size), None)
    if bad is not None:
        raise p.APIError(400, f"token id {bad} is outside the vocabulary", "tokens")
    text = await _call(state, lambda engine: engine.tokenizer.decode(body.tokens))
    return _json(p.DetokenizeResponse(prompt=text))


async def _call(state: ServerState, fn: Callable[[Engine], Any]) -> Any:
    try:
        return await state.engine.call(fn)
    except EngineDeadError as e:
        raise p.APIError(503, str(e)) from e
    except ValueError as e:
        raise p.APIError(400, str(e)) from e


def _json(model: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status)


# -- errors ---------------------------------------------------------------------------------------


def error_response(error: p.APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """pydantic's errors as one 400: the first field's problem, and where it is."""
    errors = exc.errors() or [{"msg": "invalid request", "loc": (), "type": ""}]
    if errors[0].get("type") == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error", "cannot parse the body")
        return error_response(p.APIError(400, f"malformed JSON: {reason}"))
    fields = list(dict.fromkeys(_error_path(e)[:1] for e in errors))
    where, text = _field_problem([e for e in errors if _error_path(e)[:1] == fields[0]])
    message = f"{'.'.join(where) or 'body'}: {text}"
    if len(fields) > 1:
        message += f" (and {len(fields) - 1} more field{'s' if len(fields) > 2 else ''} wrong)"
    return error_response(p.APIError(400, message, ".".join(where) or None))


def _error_path(error: dict[str, Any]) -> tuple[str, ...]:
    """Where an error is, without "body" and the union-member tags pydantic puts in the path
    (type names: "str", "list[str]", "function-after[...]")."""
    tags = ("str", "int", "float", "bool", "list", "dict")
    loc = error.get("loc", ())
    return tuple(str(x) for x in loc if x != "body" and not (x in tags or "[" in str(x)))


def _field_problem(errors: list[dict[str, Any]]) -> tuple[tuple[str, ...], str]:
    """One field's problem. A union (prompt: text, token ids, ...) fails once per member: a
    value error (the type fit) says most, then the deepest error; members that all refuse the
    type at one place are named together ("a valid string or a valid list")."""

    def is_type_error(e: dict[str, Any]) -> bool:
        return e.get("type", "").endswith(("_type", "_parsing"))

    best = min(errors, key=lambda e: (is_type_error(e), -len(_error_path(e))))
    where = _error_path(best)
    if not is_type_error(best):
        return where, best["msg"]
    same = [e["msg"] for e in errors if is_type_error(e) and _error_path(e) == where]
    first, *others = dict.fromkeys(same)
    return where, " or ".join([first, *(m.removeprefix("Input should be ") for m in others)])


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    error = p.APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
    return error_response(error)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("Unhandled error in %s %s", request.method, request.url.path)
    return error_response(p.APIError(500, f"internal server error: {type(exc).__name__}"))


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents a 422 for every body; this server answers 400 instead."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


class RequestGuard:
    """Pure ASGI middleware: the API key on /v1 routes, then the body-size limit (the body is
    read here, at most `max_bytes` of it, and replayed to the app)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self._auth_error(scope)
        messages: list[dict[str, Any]] = []
        if error is None:
            error = await self._read_body(scope, receive, messages)
        if error is not None:
            return await error_response(error)(scope, receive, send)

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _auth_error(self, scope: Scope) -> p.APIError | None:
        if self.api_key is None or not scope["path"].startswith("/v1"):
            return None
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            return None
        return p.APIError(401, "invalid or missing API key (Authorization: Bearer <key>)")

    async def _read_body(
        self, scope: Scope, receive: Receive, messages: list[dict[str, Any]]
    ) -> p.APIError | None:
        too_large = p.APIError(413, f"the request body exceeds {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return p.APIError(400, "invalid Content-Length header")
            if int(length) > self.max_bytes:
                return too_large
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return too_large
            if message["type"] != "http.request" or not message.get("more_body", False):
                return None


# -- running --------------------------------------------------------------------------------------


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=ServerConfig.host)
    group.add_argument("--port", type=int, default=ServerConfig.port)
    group.add_argument(
        "--api-key", default=None, help=f"require this bearer key on /v1 routes (env {API_KEY_ENV})"
    )
    group.add_argument("--served-model-name", default=None, help="the model id clients use")
    group.add_argument(
        "--shutdown-timeout", type=float, default=ServerConfig.shutdown_timeout_s,
        help="seconds in-flight requests get to finish after SIGTERM before they are aborted",
    )
    group.add_argument(
        "--max-request-bytes", type=int, default=ServerConfig.max_request_bytes,
        help="larger request bodies are refused (HTTP 413)",
    )
    group.add_argument(
        "--workers", type=int, default=ServerConfig.workers,
        help=f"server processes, each with its own engine (metrics merged via {MULTIPROC_ENV})",
    )
    group.add_argument(
        "--stats-interval", type=float, default=ServerConfig.stats_interval_s,
        help="seconds between stats log lines (0: off)",
    )
    group.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    name = args.served_model_name or args.model or DEFAULT_SERVED_MODEL_NAME
    return ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        served_model_name=name,
        shutdown_timeout_s=args.shutdown_timeout,
        max_request_bytes=args.max_request_bytes,
        workers=args.workers,
        stats_interval_s=args.stats_interval,
    )


def run_server(args: argparse.Namespace) -> None:
    """`engram-serve serve`: build the engine, then serve until SIGTERM/SIGINT."""
    _setup_logging(args.log_level)
    config = server_config_from_args(args)
    options = dict(
        host=config.host,
        port=config.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(config.shutdown_timeout_s + SHUTDOWN_GRACE_S),
    )
    if config.workers == 1:
        from engram_serve.cli import engine_from_args

        engine = engine_from_args(args)
        engine.warm_up()
        uvicorn.run(build_app(engine, config), **options)
        return
    _run_workers(args, config, options)


def _run_workers(args: argparse.Namespace, config: ServerConfig, options: dict) -> None:
    """Several processes on one socket, each building its own engine from the same arguments."""
    own_dir = None
    if not is_multiprocess():
        own_dir = tempfile.mkdtemp(prefix="engram-serve-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir
    os.environ[WORKER_ARGS_ENV] = json.dumps({k: v for k, v in vars(args).items() if k != "run"})
    try:
        uvicorn.run(
            f"{__name__}:create_worker_app", factory=True, workers=config.workers, **options
        )
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def create_worker_app() -> FastAPI:
    """The app of one worker process (an app factory for uvicorn)."""
    from engram_serve.cli import engine_from_args

    args = argparse.Namespace(**json.loads(os.environ[WORKER_ARGS_ENV]))
    _setup_logging(args.log_level)
    engine = engine_from_args(args)
    engine.warm_up()
    return build_app(engine, server_config_from_args(args))


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s"
    )


class BackgroundServer:
    """Serves an app from a daemon thread on loopback (tests, notebooks). `port=0` picks a free
    port; `url` says which."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, **options: Any):
        options.setdefault("log_level", "warning")
        options.setdefault("timeout_graceful_shutdown", 5)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start; see the log")
            time.sleep(0.01)
        self.host, self.port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "BackgroundServer",
    "add_server_args",
    "build_app",
    "create_worker_app",
    "error_response",
    "run_server",
    "server_config_from_args",
]
