"""The OpenAI-compatible HTTP API (FastAPI): the app and its routes.

    POST /v1/completions, /v1/chat/completions     GET /v1/models
    GET /health, /version, /metrics                POST /tokenize, /detokenize

A route validates its body (protocol.py), turns it into engine requests and hands them to the
AsyncEngine, whose thread runs the engine; the event loop never blocks on it. A client that goes
away aborts its engine requests at once (streaming: the SSE response watches for the disconnect,
sse.py; non-streaming: the handler races the disconnect). Every error is OpenAI's body
{"error": {"message", "type", "param", "code"}}, never FastAPI's 422 (errors.py); the API key and
the body-size limit are checked before any route runs (middleware.py).

Shutdown (SIGTERM/SIGINT): uvicorn stops accepting; the engine drains, refusing new requests
and aborting those still running after --shutdown-timeout seconds. process.py runs the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

import engram_serve
from engram_serve.config import ServerConfig
from engram_serve.engine.engine import Engine
from engram_serve.engine.request import RequestOutput, StructuredOutputs
from engram_serve.engine.scheduler import QueueFullError
from engram_serve.kernels.cpu_threads import WorkerThread
from engram_serve.server import protocol as p
from engram_serve.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineRequest,
    Generation,
    PromptInput,
    ShuttingDownError,
)
from engram_serve.server.errors import (
    api_error,
    http_error,
    internal_error,
    openapi_without_422,
    raise_if_failed,
    validation_error,
)
from engram_serve.server.metrics import ServerMetrics, mark_process_dead, render_metrics
from engram_serve.server.middleware import RequestGuard
from engram_serve.server.sse import SSEResponse, chat_events, completion_events

logger = logging.getLogger("engram_serve.server")

RETRY_AFTER_S = 1  # Retry-After when the waiting queue is full
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


def build_app(
    engine: Engine, config: ServerConfig | None = None, engine_thread: WorkerThread | None = None
) -> FastAPI:
    """The FastAPI app serving `engine`; the engine thread runs while the app's lifespan does:
    `engine_thread` where given (the one that built the engine), else a new one."""
    config = config or ServerConfig()
    model_name = config.served_model_name or engine.tokenizer.model_dir.name
    metrics = ServerMetrics(
        model_name, engine.max_model_len, stats_interval_s=config.stats_interval_s
    )
    state = ServerState(
        engine=AsyncEngine(engine, metrics.observe, thread=engine_thread),
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
    app.add_exception_handler(p.APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.openapi = lambda: openapi_without_422(app)
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
    generation = await _generate(state, body, requests)
    reply = dict(id=base_id, model=state.model_name, created=int(time.time()))
    if body.stream:
        return SSEResponse(completion_events(body, generation, reply), generation)

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
    tool_use = body.tool_use()
    prompt = PromptInput(
        messages=[m.template_dict() for m in body.messages],
        add_generation_prompt=body.add_generation_prompt,
        tool_use=tool_use,
    )
    sampling = body.sampling_params(body.max_output_tokens, body.num_logprobs, state.vocab_size)
    base_id = p.random_id("chatcmpl")
    requests = [EngineRequest(f"{base_id}-{j}", prompt, s) for j, s in enumerate(sampling)]
    generation = await _generate(state, body, requests)
    reply = dict(id=base_id, model=state.model_name, created=int(time.time()))
    if body.stream:
        return SSEResponse(chat_events(body, tool_use, generation, reply), generation)

    async def complete() -> Response:
        outputs = await _final_outputs(generation)
        choices = [
            p.chat_choice(i, out, body.num_logprobs, tool_use) for i, out in enumerate(outputs)
        ]
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


async def _generate(
    state: ServerState, body: p.SamplingRequest, requests: list[EngineRequest]
) -> Generation:
    spec = requests[0].sampling.structured_outputs  # every choice of a body shares it
    compile_s = await _compile_grammar(state, body, spec) if spec is not None else 0.0
    try:
        generation = await state.engine.generate(requests)
    except QueueFullError as e:
        raise p.APIError(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from e
    except (ShuttingDownError, EngineDeadError) as e:
        raise p.APIError(503, str(e)) from e
    except ValueError as e:  # bad token ids, empty prompt, context too long, template errors
        raise p.APIError(400, str(e)) from e
    if spec is not None:
        state.metrics.observe_structured(spec.kind, len(requests), compile_s)
    return generation


async def _compile_grammar(
    state: ServerState, body: p.SamplingRequest, spec: StructuredOutputs
) -> float:
    """Compile in a worker thread before the engine sees the request (engine/structured.py).
    -> seconds. A schema, regex or grammar that does not compile is a 400 naming its field."""
    try:
        return await state.engine.compile_grammar(spec)
    except ValueError as e:
        raise p.APIError(400, str(e), next(iter(body.constraints()))) from e


async def _final_outputs(generation: Generation) -> list[RequestOutput]:
    async with generation:
        try:
            outputs = await generation.final_outputs()
        except EngineDeadError as e:
            raise p.APIError(503, str(e)) from e
    for output in outputs:
        raise_if_failed(output)
    return outputs


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
    """503 while the engine cannot serve at all (stopped, draining). Engram tables that cannot be
    read now (a remote store that is down or unpublished) answer 200 with their state in the
    body: the process is sound, a restart would not bring the store back, and every replica
    shares the store (a 503 would restart or unroute them all at once)."""
    engine = _state(request).engine
    if engine.error is not None:
        raise p.APIError(503, f"the engine has stopped: {engine.error!r}")
    if engine.is_draining:
        raise p.APIError(503, "the server is shutting down")
    tables = engine.engram_tables
    if tables is None:
        return Response(status_code=200)
    return JSONResponse({"engram_tables": tables})


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


__all__ = ["build_app"]
