"""The OpenAI API's bodies (pydantic models) and the conversions between them and the engine's
nouns: request -> SamplingParams, RequestOutput -> choices, logprobs, usage, errors.

Requests accept unknown fields (they are logged and ignored, as vLLM does). Values the engine
validates itself (temperature, top_p, penalties, ...) are checked by SamplingParams, so the
ranges live in one place; the limits below are the server's own.

Structured outputs are never ignored: OpenAI's `response_format` and vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs` all map to
SamplingParams.structured_outputs, and a request that sets more than one of them is refused.
A chat's `tool_choice` "required" or named counts as one (it forces a call with a grammar:
engine/tool_calls.py, which also renders the tools and parses the calls).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_serializer

from engram_serve.engine.request import (
    CompletionOutput,
    Logprob,
    RequestOutput,
    SamplingParams,
    StructuredOutputs,
)
from engram_serve.engine.tool_calls import ParsedReply, ToolCall, ToolsError, ToolUse

logger = logging.getLogger(__name__)

# -- limits ---------------------------------------------------------------------------------------

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_CHOICES = 128  # engine requests one HTTP request may fan out to (prompts x n)
MAX_LOGPROBS = SamplingParams.MAX_LOGPROBS  # completions `logprobs`, chat `top_logprobs`
MAX_STOP = SamplingParams.MAX_STOP_STRINGS
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's seed is an int64
SEED_SPACE = 2**64  # torch generators take seeds in [0, 2**64)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
GREEDY_TEMPERATURE = 1e-5  # below this, sampling is greedy (dividing by ~0 overflows)
# OpenAI's documented value ranges, published in the schema (SamplingParams checks them too).
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # presence/frequency in [-2, 2], repetition in (0, 2]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # JSON true is no token id, though Python calls it an int
        raise ValueError("a token id must be an integer")
    return value


TokenId = Annotated[int, BeforeValidator(_not_bool), Field(ge=0)]  # 5.0 is accepted as 5


class APIError(Exception):
    """An error with its HTTP status, sent as OpenAI's body {"error": {...}}."""

    TYPES = {
        400: "BadRequestError",
        401: "AuthenticationError",
        404: "NotFoundError",
        405: "MethodNotAllowedError",
        413: "RequestTooLargeError",
        499: "ClientClosedRequest",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
    }

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    def body(self) -> dict[str, Any]:
        fallback = "BadRequestError" if self.status < 500 else "InternalServerError"
        kind = self.TYPES.get(self.status, fallback)
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.status)
        ).model_dump()


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int  # the HTTP status, as vLLM sends it


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- requests -------------------------------------------------------------------------------------


class OpenAIRequest(BaseModel):
    """Unknown fields are accepted and ignored (see `log_ignored_fields`)."""

    model_config = ConfigDict(extra="allow")

    def log_ignored_fields(self) -> None:
        if self.model_extra:
            logger.warning(
                "The following fields were present in the request but ignored: %s",
                sorted(self.model_extra),
            )


class StreamOptions(OpenAIRequest):
    include_usage: bool = True


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema. `strict` or not, the schema is enforced."""

    model_config = ConfigDict(populate_by_name=True)

    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint. Unknown keys are refused: each of
    vLLM's others (structural_tag, whitespace_pattern, ...) would change the output."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


GUIDED_FIELDS = {  # vLLM's guided_* field -> its StructuredOutputs kind
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


# Fields of OpenAI's or vLLM's request that change what is generated or returned and that
# engram-serve does not implement, each with the values that ask for nothing (their defaults
# there): any other value is a 400 naming the field, never silently dropped. Both endpoints
# refuse these; each endpoint adds its own (`unsupported_fields`).
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "moderation": (None,),
    "store": (None, False),  # nothing is stored for later retrieval
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "include_stop_str_in_output": (None, False),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None,),
    "prompt_logprobs": (None,),
    "bad_words": (None, []),
    "structural_tag": (None,),
    "guided_decoding_backend": (None, "xgrammar", "auto"),
    "guided_whitespace_pattern": (None,),
    "priority": (None, 0),
    "request_id": (None,),  # the response's id is the server's own
    "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
}
# Fields accepted that concern billing, storage or caching, not what is generated.
NO_EFFECT_FIELDS = frozenset({
    "metadata", "service_tier", "prompt_cache_key", "prompt_cache_retention",
    "prompt_cache_options", "safety_identifier", "cache_salt",
})  # fmt: skip


class SamplingRequest(OpenAIRequest):
    """Fields both completions and chat share: OpenAI's and vLLM's sampling extras."""

    unsupported_fields: ClassVar[dict[str, tuple[Any, ...]]] = UNSUPPORTED_FIELDS

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: no top-k")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_PENALTY)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Structured outputs: at most one of these.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    def check(self) -> None:
        """Cross-field rules pydantic's types cannot express."""
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400, "Stream options can only be defined when `stream=True`.", "stream_options"
            )
        for name, value in (self.model_extra or {}).items():
            if name in self.unsupported_fields and value not in self.unsupported_fields[name]:
                raise APIError(400, f"{name} is not supported", name)

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def constraints(self) -> dict[str, dict[str, Any]]:
        """Each field that asks for a structured output, by name, with the StructuredOutputs
        arguments it asks for."""
        found: dict[str, dict[str, Any]] = {}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found["response_format"] = {"json_object": True}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise APIError(
                    400, "response_format of type json_schema needs json_schema.schema",
                    "response_format",
                )  # fmt: skip
            found["response_format"] = {"json": fmt.json_schema.json_schema}
        for field, kind in GUIDED_FIELDS.items():
            if getattr(self, field) is not None:
                found[field] = {kind: getattr(self, field)}
        if self.structured_outputs is not None:
            found["structured_outputs"] = self.structured_outputs.model_dump(
                by_alias=True, exclude_none=True
            )
        return found

    def _structured_outputs(self) -> StructuredOutputs | None:
        """The one constraint asked for, or None. Raises APIError (400) for more than one."""
        found = self.constraints()
        if not found:
            return None
        if len(found) > 1:
            raise APIError(
                400, f"give at most one structured output constraint; got {', '.join(found)}",
                next(iter(found)),
            )  # fmt: skip
        ((field, arguments),) = found.items()
        try:
            return StructuredOutputs(**arguments)
        except ValueError as e:  # its messages name structured_outputs' own fields
            message = str(e) if field == "structured_outputs" else f"{field}: {e}"
            raise APIError(400, message, field) from e

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, vocab_size: int
    ) -> list[SamplingParams]:
        """One SamplingParams per choice (n of them). A seed gives choice i the seed + i, so
        choices differ from each other and repeat across calls. Raises APIError (400)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings are allowed", "stop")
        bad = next((t for t in self.stop_token_ids or [] if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"stop token id {bad} is outside the vocabulary", "stop_token_ids")
        temperature = 1.0 if self.temperature is None else self.temperature
        top_k = self.top_k or 0
        common = dict(
            temperature=0.0 if 0 <= temperature < GREEDY_TEMPERATURE else temperature,
            top_p=_or(self.top_p, 1.0),
            top_k=0 if top_k >= vocab_size else top_k,  # keeping everything is no top-k
            min_p=_or(self.min_p, 0.0),
            presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0),
            repetition_penalty=_or(self.repetition_penalty, 1.0),
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=self._structured_outputs(),
        )
        seeds = [None if self.seed is None else (self.seed + i) % SEED_SPACE for i in range(self.n)]
        try:
            return [SamplingParams(seed=seed, **common) for seed in seeds]
        except ValueError as e:  # its messages start with the field's name
            field = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), field if field in type(self).model_fields else None) from e


class CompletionRequest(SamplingRequest):
    unsupported_fields: ClassVar[dict[str, tuple[Any, ...]]] = {
        **UNSUPPORTED_FIELDS,
        "suffix": (None, ""),
        "add_special_tokens": (True,),  # a text prompt always gets the tokenizer's special tokens
        "prompt_embeds": (None,),
    }

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def check(self) -> None:
        super().check()
        if self.echo and self.logprobs is not None:
            raise APIError(
                400, "echo with logprobs needs prompt logprobs, which are not computed", "echo"
            )

    def prompts(self) -> list[str | list[int]]:
        """The prompts as strings or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "the prompt is empty", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts are allowed", "prompt")
        if len(prompts) * self.n > MAX_CHOICES:
            raise APIError(400, f"prompts x n must be at most {MAX_CHOICES}", "n")
        return prompts


class ContentPart(OpenAIRequest):
    type: str
    text: str | None = None


class FunctionDefinition(BaseModel):
    name: str = Field(description="1-64 letters, digits, _ or -")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of an object")
    strict: bool | None = Field(None, description="a forced call follows the schema either way")


class ToolDefinition(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, as text")


class ToolCallInfo(BaseModel):
    """A call: in a response's message, and in an assistant message sent back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(ToolCallInfo):
    index: int


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallInfo] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def template_dict(self) -> dict[str, Any]:
        """What chat templates expect: role and text content; an assistant's calls; a tool
        result's call id and function name."""
        content = self.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise APIError(400, "only text content parts are supported", "messages")
            content = "".join(p.text for p in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.role == "tool":
            message |= {"tool_call_id": self.tool_call_id, "name": self.name}
        return message


class ChatCompletionRequest(SamplingRequest):
    unsupported_fields: ClassVar[dict[str, tuple[Any, ...]]] = {
        **UNSUPPORTED_FIELDS,
        "functions": (None,),  # the deprecated form of tools
        "function_call": (None,),
        "add_special_tokens": (False,),  # the chat template writes the special tokens
        "echo": (None, False),
        "continue_final_message": (None, False),
        "documents": (None,),
        "chat_template": (None,),
        "chat_template_kwargs": (None, {}),
        "mm_processor_kwargs": (None,),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='default: "auto" with tools'
    )
    parallel_tool_calls: bool = True

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise APIError(
                400, "when using `top_logprobs`, `logprobs` must be set to true", "top_logprobs"
            )

    def tool_use(self) -> ToolUse | None:
        """The tools offered and how the reply may use them; None for a plain chat. Raises
        APIError (400) for bad tools or a tool_choice that names no tool."""
        choice = self.tool_choice
        try:
            return ToolUse.from_openai(
                [tool.model_dump(exclude_none=True) for tool in self.tools or ()],
                choice.model_dump() if isinstance(choice, BaseModel) else choice,
                self.parallel_tool_calls,
            )
        except ToolsError as e:
            raise APIError(400, str(e), e.param) from e

    def constraints(self) -> dict[str, dict[str, Any]]:
        """The structured output fields, and a tool_choice that forces a call."""
        found = super().constraints()
        tool_use = self.tool_use()
        spec = tool_use.structured_outputs() if tool_use is not None else None
        if spec is not None:
            found["tool_choice"] = {"json": spec.json, "any_whitespace": spec.any_whitespace}
        return found

    @property
    def max_output_tokens(self) -> int | None:
        """None: up to the context length."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(OpenAIRequest):
    """Either `prompt` (text) or `messages` (through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[TokenId]


# -- responses ------------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format: parallel lists, one entry per token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallInfo] | None = None


class DeltaMessage(BaseModel):
    """A stream's increment; fields not set are left out of the JSON (as OpenAI does)."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "engram-serve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


# -- conversions ----------------------------------------------------------------------------------


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def usage_of(num_prompt_tokens: int, num_completion_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_completion_tokens,
        total_tokens=num_prompt_tokens + num_completion_tokens,
    )


def usage_of_outputs(outputs: list[RequestOutput], n: int) -> UsageInfo:
    """Each prompt counted once (its n choices share it), every choice's tokens counted."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs[::n])
    completion = sum(len(o.outputs[0].token_ids) for o in outputs)
    return usage_of(prompt, completion)


def _token_text(token_id: int, logprob: Logprob) -> str:
    # The engine thread fills decoded_token for requests that ask for logprobs.
    return logprob.decoded_token if logprob.decoded_token is not None else f"<{token_id}>"


def completion_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]], text_offset: int = 0
) -> CompletionLogprobs:
    """Legacy logprobs of generated tokens; text offsets count from `text_offset` (the length of
    the text already sent for this choice)."""
    out = CompletionLogprobs()
    for token_id, alternatives in zip(token_ids, logprobs, strict=True):
        chosen = alternatives[token_id]
        token = _token_text(token_id, chosen)
        out.tokens.append(token)
        out.token_logprobs.append(chosen.logprob)
        out.top_logprobs.append({_token_text(t, lp): lp.logprob for t, lp in alternatives.items()})
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int
) -> ChatLogprobs:
    """Chat logprobs: each token with its bytes and the `num_top` most likely alternatives."""
    content = []
    for token_id, alternatives in zip(token_ids, logprobs, strict=True):
        chosen = alternatives[token_id]
        top = sorted((lp.rank, t, lp) for t, lp in alternatives.items() if lp.rank <= num_top)
        content.append(
            ChatTokenLogprob(
                **_top_logprob(token_id, chosen).model_dump(),
                top_logprobs=[_top_logprob(t, lp) for _, t, lp in top],
            )
        )
    return ChatLogprobs(content=content)


def _top_logprob(token_id: int, logprob: Logprob) -> TopLogprob:
    token = _token_text(token_id, logprob)
    return TopLogprob(
        token=token, logprob=logprob.logprob, bytes=list(token.encode("utf-8", "replace"))
    )


def completion_choice(
    index: int, output: RequestOutput, echo: bool, want_logprobs: bool
) -> CompletionChoice:
    completion: CompletionOutput = output.outputs[0]
    prefix = (output.prompt or "") if echo else ""
    logprobs = None
    if want_logprobs:
        logprobs = completion_logprobs(completion.token_ids, completion.logprobs or [], len(prefix))
    return CompletionChoice(
        index=index,
        text=prefix + completion.text,
        logprobs=logprobs,
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
    )


def chat_choice(
    index: int, output: RequestOutput, num_logprobs: int | None, tool_use: ToolUse | None
) -> ChatChoice:
    completion = output.outputs[0]
    logprobs = None
    if num_logprobs is not None:
        logprobs = chat_logprobs(completion.token_ids, completion.logprobs or [], num_logprobs)
    text = completion.text
    reply = tool_use.parse(text) if tool_use is not None else ParsedReply(text)
    calls = [tool_call_info(call) for call in reply.tool_calls]
    return ChatChoice(
        index=index,
        message=ChatResponseMessage(
            content=content_beside(reply.content, calls), tool_calls=calls or None
        ),
        logprobs=logprobs,
        finish_reason=finish_reason_of(completion, calls),
        stop_reason=completion.stop_reason,
    )


def tool_call_info(call: ToolCall) -> ToolCallInfo:
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return ToolCallInfo(id=call.id, function=FunctionCall(name=call.name, arguments=arguments))


def content_beside(content: str, calls: list[Any]) -> str | None:
    """A message's content: None (not "") where there are calls and no text beside them."""
    return None if calls and not content else content


def finish_reason_of(completion: CompletionOutput, calls: list[Any]) -> str | None:
    """A reply that holds calls ends with "tool_calls", however the engine ended it."""
    return "tool_calls" if calls else completion.finish_reason
