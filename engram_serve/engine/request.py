"""The nouns every layer shares: SamplingParams, Request, and what comes back (RequestOutput)."""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import xgrammar

    from engram_serve.engine.tool_calls import ToolCall


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the output, shaped like vLLM's StructuredOutputsParams: exactly one of

        json         a JSON schema (a dict, or its JSON text): the output is an instance of it
        json_object  True: the output is a JSON object, any
        regex        the output matches this regular expression in full
        choice       the output is one of these strings
        grammar      the output is a sentence of this EBNF (GBNF) grammar, from rule `root`

    any_whitespace: False holds JSON (json, json_object) to the compact form json.dumps writes,
    `{"a": [1, 2]}`, with no other whitespace between tokens: a sampled model may otherwise pad
    it with whitespace for many tokens (forced tool calls use it: engine/tool_calls.py).

    Only what can be checked without the tokenizer is checked here; a schema, regex or grammar
    that does not compile is a ValueError when the request is added (engine/structured.py)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    any_whitespace: bool = True

    KINDS = ("json", "json_object", "regex", "choice", "grammar")

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, str):
            object.__setattr__(self, "choice", tuple(self.choice))
        for problem in self._problems():
            raise ValueError(problem)

    def _problems(self):
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            got = " and ".join(given) or "none"
            yield f"structured_outputs needs exactly one of {', '.join(self.KINDS)}; got {got}"
            return
        kind, value = given[0], getattr(self, given[0])
        if kind == "json" and isinstance(value, str):
            try:
                json.loads(value)
            except ValueError as e:
                yield f"structured_outputs.json is not valid JSON: {e}"
        elif kind == "json" and not isinstance(value, dict):
            yield "structured_outputs.json must be a JSON schema: an object or its JSON text"
        elif kind == "json_object" and value is not True:
            yield "structured_outputs.json_object must be true or false"
        elif kind == "choice" and (
            isinstance(value, str) or not value or not all(isinstance(c, str) for c in value)
        ):
            yield "structured_outputs.choice must be a non-empty list of strings"
        elif kind in ("regex", "grammar") and not isinstance(value, str):
            yield f"structured_outputs.{kind} must be a string"

    @property
    def kind(self) -> str:
        """Which of KINDS is set (a metric label, and how the grammar is compiled)."""
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, shaped like vLLM's. `temperature == 0` means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's plus the top k
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None  # None: unconstrained

    MAX_LOGPROBS = 20
    MAX_STOP_STRINGS = 64

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        for problem in self._problems():
            raise ValueError(problem)

    def _problems(self):
        if self.n < 1:
            yield f"n must be at least 1, got {self.n}"
        if not 0.0 <= self.temperature <= 2.0:
            yield f"temperature must be in [0, 2], got {self.temperature}"
        if not 0.0 < self.top_p <= 1.0:
            yield f"top_p must be in (0, 1], got {self.top_p}"
        if self.top_k < 0:
            yield f"top_k must be -1 (disable) or at least 1, got {self.top_k}"
        if not 0.0 <= self.min_p <= 1.0:
            yield f"min_p must be in [0, 1], got {self.min_p}"
        if not -2.0 <= self.presence_penalty <= 2.0:
            yield f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"
        if not -2.0 <= self.frequency_penalty <= 2.0:
            yield f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
        if not 0.0 < self.repetition_penalty <= 2.0:
            yield f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}"
        if self.max_tokens is not None and self.max_tokens < 1:
            yield f"max_tokens must be at least 1, got {self.max_tokens}"
        if self.min_tokens < 0 or (
            self.max_tokens is not None and self.min_tokens > self.max_tokens
        ):
            yield f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            yield f"logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}"
        if len(self.stop) > self.MAX_STOP_STRINGS:
            yield f"at most {self.MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}"
        if any(not s for s in self.stop):
            yield "stop strings must not be empty"
        if self.structured_outputs is not None and self.min_tokens > 0:
            # Below min_tokens EOS is banned, while a complete output allows nothing but EOS.
            yield "min_tokens must be 0 with structured_outputs: the grammar says where it ends"

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token that matched
    logprobs: list[dict[int, Logprob]] | None = None
    # LLM.chat with tools: the calls found in `text` (which holds the whole reply, calls
    # included); None when no tools were offered.
    tool_calls: list[ToolCall] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Text and tokens added since the previous output of this request (for streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, Logprob]] | None = None
    metrics: RequestMetrics | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass(eq=False)
class Request:
    """One sequence inside the engine: its tokens, its place in the KV cache, its progress."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prompt: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    max_total_len: int = 0  # prompt + output may not exceed this (the context length)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV entries are in the cache
    block_ids: list[int] = field(default_factory=list)
    state_slot: int | None = None  # row in per-sequence state (Engram short-conv history)
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    generator: torch.Generator | None = None
    # Where the output is in its grammar (structured outputs): advanced by each sampled token,
    # never by a recomputed one, so a preempted request resumes where it stopped.
    grammar: xgrammar.GrammarMatcher | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def max_output_tokens(self) -> int:
        room = self.max_total_len - len(self.prompt_token_ids)
        requested = self.sampling.max_tokens
        return room if requested is None else min(requested, room)
