"""Server-sent events: the streamed chunks of a completion or a chat completion, framed.

Each chunk is one `data: {json}` frame and `data: [DONE]` ends the stream; an error after the 200
went out is sent as an error frame. The response listens for the client to leave: cancelling the
stream aborts its unfinished engine requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from engram_serve.engine.request import RequestOutput
from engram_serve.engine.tool_calls import ToolUse
from engram_serve.server import protocol as p
from engram_serve.server.async_engine import EngineDeadError, Generation
from engram_serve.server.errors import raise_if_failed


def completion_events(
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


def chat_events(
    body: p.ChatCompletionRequest,
    tool_use: ToolUse | None,
    generation: Generation,
    reply: dict[str, Any],
) -> AsyncIterator[str]:
    """With tools, each choice's text goes through a ToolCallStream (engine/tool_calls.py):
    content streams except what may start a call; the calls come in the last delta."""

    def choice_chunk(choice: p.ChatStreamChoice) -> BaseModel:
        return p.ChatCompletionChunk(**reply, choices=[choice])

    # The first chunk of every choice carries the role, before any token is ready.
    role = p.DeltaMessage(role="assistant", content="")
    opening = [choice_chunk(p.ChatStreamChoice(index=i, delta=role)) for i in range(body.n)]
    streams = [tool_use.stream() for _ in range(body.n)] if tool_use is not None else None

    def chunk(index: int, output: RequestOutput) -> BaseModel | None:
        logprobs = None
        if body.num_logprobs is not None and output.delta_token_ids:
            logprobs = p.chat_logprobs(
                output.delta_token_ids, output.delta_logprobs or [], body.num_logprobs
            )
        text, calls = output.delta_text, []
        if streams is not None:
            text = streams[index].feed(text)
            if output.finished:
                rest = streams[index].finish()
                calls = [
                    p.DeltaToolCall(index=i, **p.tool_call_info(call).model_dump())
                    for i, call in enumerate(rest.tool_calls)
                ]
                text += rest.content
        if not (text or logprobs or output.finished):
            return None
        done = output.outputs[0] if output.finished else None
        delta = p.DeltaMessage(content=text or None, tool_calls=calls or None)
        return choice_chunk(
            p.ChatStreamChoice(
                index=index,
                delta=delta,
                logprobs=logprobs,
                finish_reason=done and p.finish_reason_of(done, calls),
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
                raise_if_failed(output)
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


class SSEResponse(StreamingResponse):
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


__all__ = ["SSEResponse", "chat_events", "completion_events"]
