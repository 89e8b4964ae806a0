"""The bridge between the event loop and the engine, which runs in its own thread.

The Engine is not thread-safe, so everything that touches it (tokenizing, adding, aborting,
stepping) runs on the engine thread. The event loop only puts commands on a queue and reads
outputs from per-HTTP-request asyncio queues; it never waits on the engine.

    async with await engine.generate(requests) as generation:   # raises on bad input, full queue
        async for index, output in generation:                   # outputs in step order
            ...
    # leaving the block (done, error, cancelled by a client disconnect) aborts what is unfinished
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from jinja2 import TemplateError

from engram_serve.engine.engine import Engine
from engram_serve.engine.request import RequestOutput, SamplingParams, StructuredOutputs
from engram_serve.engine.tool_calls import ToolUse
from engram_serve.kernels.cpu_threads import WorkerThread

logger = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (an error in a step, or shutdown)."""


class ShuttingDownError(RuntimeError):
    """The server is draining for shutdown and takes no new requests."""


@dataclass(frozen=True)
class PromptInput:
    """A prompt as token ids, text, or chat messages; text and messages are tokenized on the
    engine thread."""

    token_ids: list[int] | None = None
    text: str | None = None
    messages: list[dict[str, Any]] | None = None  # rendered through the chat template
    add_special_tokens: bool = True  # for text (a chat template writes its own)
    add_generation_prompt: bool = True  # for messages
    tool_use: ToolUse | None = None  # the tools the messages offer
    want_text: bool = False  # decode token ids into RequestOutput.prompt (for echo)


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: PromptInput
    sampling: SamplingParams


class Generation:
    """The engine requests of one HTTP request, and their outputs as (index, output) pairs."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str]):
        self._engine, self.request_ids = engine, request_ids
        self._queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
        self._unfinished = set(range(len(request_ids)))

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        index, output = item
        if output.finished:
            self._unfinished.discard(index)
        return index, output

    async def final_outputs(self) -> list[RequestOutput]:
        """Wait for every request to finish; their last outputs, by index."""
        final: list[Any] = [None] * len(self.request_ids)
        async for index, output in self:
            if output.finished:
                final[index] = output
        return final

    def abort(self) -> None:
        """Abort the unfinished requests (frees their KV blocks). Never blocks."""
        if self._unfinished:
            self._engine.abort([self.request_ids[i] for i in self._unfinished])

    def _deliver(self, item: tuple[int, RequestOutput] | BaseException) -> None:
        self._queue.put_nowait(item)

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


class AsyncEngine:
    """Runs `engine.step()` in a thread while requests are unfinished. `observe` (the metrics)
    is called on the engine thread after every step and command batch."""

    def __init__(
        self,
        engine: Engine,
        observe: Callable[[Engine, list[RequestOutput]], None] | None = None,
        idle_wake_s: float = 1.0,
        thread: WorkerThread | None = None,
    ):
        """`thread`: the thread to step on, best the one that built the engine (WorkerThread's
        docstring says why); None: a new one."""
        self.engine, self._observe, self._idle_wake_s = engine, observe, idle_wake_s
        self._worker = thread
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._routes: dict[str, tuple[Generation, int]] = {}  # engine thread only
        self._lock = threading.Lock()  # orders "is it dead?" against "fail what is queued"
        self._error: BaseException | None = None
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: Future[None] | None = None  # the engine loop's end

    # -- lifecycle (event loop) -----------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = (self._worker or WorkerThread("engine")).submit(self._run)

    async def stop(self) -> None:
        """Abort what is left and end the engine thread."""
        with self._lock:
            if self._error is None:
                self._commands.put(_STOP)
        if self._done is not None:
            await asyncio.wrap_future(self._done)

    def drain(self, timeout_s: float) -> None:
        """Shutdown: take no new requests; abort those still running after `timeout_s`."""
        if self._draining:
            return
        logger.info("Draining: new requests are refused; in-flight ones get %.1f s", timeout_s)
        self._draining = True
        asyncio.get_running_loop().call_later(timeout_s, self._abort_all)

    @property
    def error(self) -> BaseException | None:
        """Why the engine thread stopped, or None while it runs."""
        return self._error

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def engram_tables(self) -> dict[str, str] | None:
        """{"tier", "state"} of the Engram tables ("ready", or why rows cannot be read now; the
        remote tier's probe thread keeps it), None without Engram. Safe off the engine thread."""
        prefetcher = getattr(self.engine.engram, "prefetcher", None)
        if prefetcher is None:
            return None
        return {"tier": prefetcher.offload.tier, "state": prefetcher.tier_state}

    # -- requests (event loop) ------------------------------------------------------------------

    async def generate(self, requests: list[EngineRequest]) -> Generation:
        """Add all requests or none. Raises what Engine.add_request raises (ValueError,
        RequestTooLongError, QueueFullError), ShuttingDownError or EngineDeadError."""
        if self._draining:
            raise ShuttingDownError("the server is shutting down")
        generation = Generation(self, [r.request_id for r in requests])
        try:
            await self.call(lambda engine: self._add_all(requests, generation))
        except asyncio.CancelledError:  # the add may still run; the abort queued after it
            generation.abort()
            raise
        return generation

    async def compile_grammar(self, spec: StructuredOutputs) -> float:
        """Compile a structured output's grammar in a worker thread, into the engine's grammar
        cache, where `Engine.add_request` then finds it: the engine thread never compiles. The
        compiler is thread-safe and shares nothing else with the engine. -> the seconds it took.
        Raises ValueError for a schema, regex or grammar that does not compile."""

        def compile_timed() -> float:
            start = time.perf_counter()
            self.engine.grammars.compile(spec)
            return time.perf_counter() - start

        return await asyncio.to_thread(compile_timed)

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) on the engine thread between steps (tokenizing, for instance)."""
        future: Future[T] = Future()
        with self._lock:
            if self._error is not None:
                raise EngineDeadError(f"the engine has stopped: {self._error}")
            self._commands.put((fn, future))
        return await asyncio.wrap_future(future)

    def abort(self, request_ids: list[str]) -> None:
        """Thread-safe and non-blocking; unknown or finished ids are ignored."""
        with self._lock:
            if self._error is None:
                self._commands.put((lambda engine: self._abort(request_ids), None))

    def _abort_all(self) -> None:
        with self._lock:
            if self._error is None:
                self._commands.put((lambda engine: self._abort(list(self._routes)), None))

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._run_commands(block=not self.engine.has_unfinished_requests()):
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                self._observe_safely(outputs)  # first, so a client that got its last token
                self._publish(outputs)  # finds it counted in /metrics
            self._abort(list(self._routes))
            self._fail(EngineDeadError("the engine was stopped"))
        except BaseException as e:  # a bug or a fault in a step: everyone waiting must hear it
            logger.exception("The engine thread failed; the server can no longer generate")
            self._fail(e)

    def _run_commands(self, block: bool) -> bool:
        """Run the queued commands (waiting for one if idle); False once told to stop."""
        try:
            command = self._commands.get(timeout=self._idle_wake_s) if block else None
        except queue.Empty:
            command = None
        while True:
            if command is _STOP:
                return False
            if command is not None:
                self._run_command(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _run_command(self, fn: Callable[[Engine], Any], future: Future | None) -> None:
        try:
            result = fn(self.engine)
        except Exception as e:  # the caller's problem (bad input), not the engine's
            if future is None:
                raise
            future.set_exception(e)
        else:
            if future is not None:
                future.set_result(result)

    def _add_all(self, requests: list[EngineRequest], generation: Generation) -> None:
        added = []
        try:
            for index, request in enumerate(requests):
                token_ids = self.tokenize(request.prompt)
                text = self._prompt_text(request.prompt, token_ids)
                self.engine.add_request(token_ids, request.sampling, request.request_id, text)
                added.append(request.request_id)
                self._routes[request.request_id] = (generation, index)
        except BaseException:
            for request_id in added:
                self.engine.abort_request(request_id)
                del self._routes[request_id]
            raise

    def tokenize(self, prompt: PromptInput) -> list[int]:
        """The prompt's token ids. Engine thread only (inside `call`)."""
        tokenizer = self.engine.tokenizer
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        if prompt.messages is not None:
            try:
                return tokenizer.apply_chat_template(
                    prompt.messages, prompt.add_generation_prompt, prompt.tool_use
                )
            except TemplateError as e:  # e.g. roles that do not alternate
                raise ValueError(f"the chat template failed: {e}") from e
        return tokenizer.encode(prompt.text or "", prompt.add_special_tokens)

    def _prompt_text(self, prompt: PromptInput, token_ids: list[int]) -> str | None:
        if prompt.text is not None:
            return prompt.text
        return self.engine.tokenizer.decode(token_ids) if prompt.want_text else None

    def _abort(self, request_ids: list[str]) -> None:
        outputs = [self.engine.abort_request(i) for i in request_ids if i in self._routes]
        outputs = [o for o in outputs if o is not None]
        for output in outputs:
            logger.info("Aborted request %s", output.request_id)
        if outputs:
            self._observe_safely(outputs)
        self._publish(outputs)

    def _observe_safely(self, outputs: list[RequestOutput]) -> None:
        """Metrics must never take the engine down."""
        if self._observe is None:
            return
        try:
            self._observe(self.engine, outputs)
        except Exception:
            logger.exception("Updating metrics failed")

    def _publish(self, outputs: list[RequestOutput]) -> None:
        deliveries = []
        for output in outputs:
            route = self._routes.get(output.request_id)
            if route is None:
                continue
            generation, index = route
            if output.delta_logprobs:
                self._decode_logprob_tokens(output)
            if output.finished:
                del self._routes[output.request_id]
            deliveries.append((generation, (index, output)))
        if deliveries:
            self._loop.call_soon_threadsafe(_deliver_all, deliveries)

    def _decode_logprob_tokens(self, output: RequestOutput) -> None:
        """Fill Logprob.decoded_token here: the tokenizer belongs to this thread."""
        tokenizer = self.engine.tokenizer
        for alternatives in output.delta_logprobs:
            for token_id, logprob in alternatives.items():
                if logprob.decoded_token is None:
                    logprob.decoded_token = tokenizer.decode([token_id], skip_special_tokens=False)

    def _fail(self, error: BaseException) -> None:
        """Stop taking commands; fail those queued and every open generation."""
        with self._lock:
            self._error = error
        dead = (
            error
            if isinstance(error, EngineDeadError)
            else EngineDeadError(f"the engine has stopped: {error!r}")
        )
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command is not _STOP and command[1] is not None:
                command[1].set_exception(dead)
        deliveries = [(generation, dead) for generation, _ in self._routes.values()]
        self._routes.clear()
        if deliveries and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver_all, deliveries)


def _deliver_all(deliveries: list[tuple[Generation, Any]]) -> None:
    for generation, item in deliveries:
        generation._deliver(item)
