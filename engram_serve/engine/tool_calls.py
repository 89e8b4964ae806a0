"""Tool calling (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`): the tools offered
through the chat template, a call forced by a grammar, and the calls found in the reply.

Both entry points use it (the server and LLM.chat), so it lives in the engine layer, beside the
tokenizer that renders chat templates; it knows nothing of HTTP.

Rendering. A template that reads a `tools` variable (Qwen, Hermes, Llama 3.1, ...: "native")
gets the offered tools as `tools=`, in OpenAI's shape; earlier calls as the assistant message's
`tool_calls`, arguments as objects (what Hugging Face templates expect); results as `tool`
messages. Any other template (the default SmolLM2's plain ChatML) gets the GENERIC FORMAT,
which the system prompt describes (a system message is added, or the first one extended):

    the tools, one JSON object a line: {"name": ..., "description": ..., "parameters": {...}}
    a call: the reply holds {"tool_calls": [{"name": "get_weather", "arguments": {...}}]}
    earlier calls: that same object, at the end of their assistant turn
    their results: a user turn {"tool_results": [{"tool_call_id", "name", "content"}, ...]}

Parsing. Every reply is searched for both formats: the generic object, and Hermes/Qwen blocks
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the closing tag may be missing at
the very end). A call must name an offered function and give its arguments as a JSON object;
anything else (malformed JSON, an unknown name) stays in the content, verbatim. Without
parallel calls, only the first call of a reply is kept.

Forcing. tool_choice "required" or a named function is enforced with the structured-output
grammar (engine/structured.py): a JSON schema of the generic object whose calls name the allowed
functions (a const each) with their `parameters` as the arguments' schema, at least one call,
exactly one for a named function (as vLLM forces it) or without parallel calls, written compactly
(no free whitespace: a sampled call stays short). The generic object is forced whatever the
template, since the parser reads it from any reply.

Streaming. ToolCallStream passes the reply on as content while it comes, holding back only what
may be the start of a call (a prefix of `<tool_call>`, or `{`, whitespace and a prefix of
`"tool_calls"`) and the whitespace before it. From the first opening on, the reply is held, and
the end of the stream brings the calls, with whatever of the held text is content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import jinja2

from engram_serve.engine.request import SamplingParams, StructuredOutputs

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}}  # OpenAI's default: no arguments
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
GENERIC_KEY = '"tool_calls"'
_OPENING = re.compile(r'<tool_call>|\{\s*"tool_calls"')
_JSON = json.JSONDecoder()


class ToolsError(ValueError):
    """A bad tool definition or tool_choice; `param` names the request field at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    """A function the model may call. `parameters`: the JSON schema of its arguments, an
    object."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TOOL_NAME.fullmatch(self.name):
            raise ToolsError(
                "tools", f"function name {self.name!r} must be 1-64 letters, digits, _ or -"
            )
        parameters = self.parameters
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ToolsError("tools", f"{self.name}: parameters must be a JSON schema of an object")

    @classmethod
    def from_openai(cls, spec: Any) -> Tool:
        """From OpenAI's {"type": "function", "function": {"name", "description",
        "parameters"}}. Raises ToolsError."""
        function = spec.get("function") if isinstance(spec, dict) else None
        if not isinstance(function, dict) or spec.get("type", "function") != "function":
            raise ToolsError("tools", 'each tool must be {"type": "function", "function": {...}}')
        return cls(
            name=function.get("name"),
            description=function.get("description") or "",
            parameters=function.get("parameters") or dict(NO_PARAMETERS),
        )

    def function_dict(self) -> dict[str, Any]:
        """The function as OpenAI describes it (a line of the generic format's tool list)."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def openai_dict(self) -> dict[str, Any]:
        """The tool as OpenAI describes it: what native templates read."""
        return {"type": "function", "function": self.function_dict()}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ParsedReply:
    """A reply split into its calls and the text around them (`content`; "" where that is
    only whitespace)."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ToolUse:
    """The tools a chat offers and how its reply may use them.

    choice: "none" (the tools are not offered: plain text), "auto" (the model decides),
    "required" (at least one call), or the name of the one function to call.
    parallel: several calls in one reply, or at most one."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True

    def __post_init__(self) -> None:
        names = [tool.name for tool in self.tools]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ToolsError("tools", f"function names must be unique; repeated: {repeated}")
        if self.is_forced and not self.tools:
            raise ToolsError("tool_choice", f"tool_choice {self.choice!r} needs tools")
        if self.choice not in ("none", "auto", "required") and self.choice not in names:
            raise ToolsError(
                "tool_choice", f"tool_choice names {self.choice!r}, which is not among the tools"
            )

    @classmethod
    def from_openai(
        cls,
        tools: list[Any] | None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool = True,
    ) -> ToolUse | None:
        """From the request's fields; tool_choice is "none", "auto", "required" or
        {"type": "function", "function": {"name": ...}} (default: "auto"). None when no tool is
        offered (none given, or tool_choice "none"): a plain chat. Raises ToolsError."""
        if isinstance(tool_choice, dict):
            function = tool_choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if tool_choice.get("type") != "function" or not isinstance(name, str):
                raise ToolsError(
                    "tool_choice", 'a named tool_choice is {"type": "function", "function": '
                    '{"name": ...}}',
                )  # fmt: skip
            tool_choice = name
        elif tool_choice not in (None, "none", "auto", "required"):
            raise ToolsError(
                "tool_choice", f'tool_choice must be "none", "auto", "required" or a named '
                f"function, got {tool_choice!r}",
            )  # fmt: skip
        tool_use = cls(
            tools=tuple(Tool.from_openai(spec) for spec in tools or ()),
            choice=tool_choice or "auto",
            parallel=parallel_tool_calls,
        )
        return tool_use if tool_use.offered else None

    @property
    def offered(self) -> tuple[Tool, ...]:
        """The tools the prompt shows."""
        return () if self.choice == "none" else self.tools

    @property
    def is_forced(self) -> bool:
        return self.choice not in ("none", "auto")

    def structured_outputs(self) -> StructuredOutputs | None:
        """The grammar that forces a call ("required" or a named function), else None."""
        if not self.is_forced:
            return None
        allowed = [tool for tool in self.tools if self.choice in ("required", tool.name)]
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in allowed
        ]
        items = calls[0] if len(calls) == 1 else {"anyOf": calls}
        array = {"type": "array", "items": items, "minItems": 1}
        if not self.parallel or self.choice != "required":  # a named function: one call of it
            array["maxItems"] = 1
        schema = {
            "type": "object",
            "properties": {"tool_calls": array},
            "required": ["tool_calls"],
            "additionalProperties": False,
        }
        return StructuredOutputs(json=schema, any_whitespace=False)

    def constrain(self, sampling: SamplingParams) -> SamplingParams:
        """`sampling` with the grammar that forces a call, if any. Raises ToolsError when
        `sampling` holds a structured output already: the two would contradict."""
        spec = self.structured_outputs()
        if spec is None:
            return sampling
        if sampling.structured_outputs is not None:
            raise ToolsError(
                "tool_choice", f"tool_choice {self.choice!r} forces a call with a grammar of its "
                "own; it cannot be combined with structured_outputs",
            )  # fmt: skip
        return replace(sampling, structured_outputs=spec)

    # -- rendering ------------------------------------------------------------------------------

    def system_prompt(self) -> str:
        """The generic format's description of the offered tools and how to call them."""
        if self.choice == "auto":
            rule = "Call functions only when they help; otherwise answer in plain text."
        elif self.choice == "required":
            rule = "You must call at least one function."
        else:
            rule = f"You must call the function {self.choice}."
        rule += " Make one call at a time." if not self.parallel else ""
        return "\n".join(
            [
                "You can call functions. Each line below is one: its name, what it does, and "
                "the JSON schema of its arguments.",
                *(json.dumps(tool.function_dict(), ensure_ascii=False) for tool in self.offered),
                "",
                "To call functions, reply with this JSON object and nothing else:",
                '{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}',
                rule,
                "Results come back as "
                '{"tool_results": [{"tool_call_id": ..., "name": ..., "content": ...}]}.',
            ]
        )

    # -- parsing --------------------------------------------------------------------------------

    def parse(self, text: str) -> ParsedReply:
        """The calls in a whole reply (both formats; module docstring) and the text around them."""
        names = {tool.name for tool in self.offered}
        content, calls, pos = [], [], 0
        while (opening := _OPENING.search(text, pos)) is not None:
            found = _read_calls(text, opening, names)
            if found is None:  # not a call: the opening stays in the content
                content.append(text[pos : opening.end()])
                pos = opening.end()
                continue
            found_calls, end = found
            content.append(text[pos : opening.start()])
            calls += found_calls
            pos = end
        content.append(text[pos:])
        around = "".join(content)
        if calls and not around.strip():  # only whitespace between and around the calls
            around = ""
        return ParsedReply(around, tuple(calls if self.parallel else calls[:1]))

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


def _read_calls(
    text: str, opening: re.Match[str], names: set[str]
) -> tuple[list[ToolCall], int] | None:
    """The calls at `opening` and where they end, or None if they are no valid calls."""
    if opening.group() == HERMES_OPEN:
        start = _skip_space(text, opening.end())
        found = _json_at(text, start)
        if found is None:
            return None
        call, end = found
        end = _skip_space(text, end)
        if text.startswith(HERMES_CLOSE, end):
            end += len(HERMES_CLOSE)
        elif end != len(text):
            return None
        items = [call]
    else:
        found = _json_at(text, opening.start())
        if found is None or set(found[0]) != {"tool_calls"}:
            return None
        items, end = found[0]["tool_calls"], found[1]
        if not isinstance(items, list) or not items:
            return None
    calls = [_call_of(item, names) for item in items]
    return None if None in calls else (calls, end)


def _call_of(item: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(item, dict) or set(item) != {"name", "arguments"}:
        return None
    name, arguments = item["name"], item["arguments"]
    if not isinstance(name, str) or name not in names or not isinstance(arguments, dict):
        return None
    return ToolCall(name, arguments)


def _json_at(text: str, start: int) -> tuple[Any, int] | None:
    """The JSON value at `start` and where it ends, or None."""
    try:
        return _JSON.raw_decode(text, start)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python recurses
        return None


def _skip_space(text: str, pos: int) -> int:
    return len(text) - len(text[pos:].lstrip())


class ToolCallStream:
    """One streamed reply: content as it comes (`feed`), calls at the end (`finish`).

    Holds: what has been sent is a prefix of `parse(whole reply).content`, because it stops
    before the first text that is, or may become, a call's opening."""

    def __init__(self, tool_use: ToolUse):
        self.tool_use = tool_use
        self.text = ""
        self.num_sent_chars = 0

    def feed(self, delta: str) -> str:
        """Add the reply's next text; return the content that is safe to send now."""
        self.text += delta
        held = _held_from(self.text, self.num_sent_chars)
        sendable = self.text[self.num_sent_chars : held]
        self.num_sent_chars = held
        return sendable

    def finish(self) -> ParsedReply:
        """The reply is complete: the content not sent yet, and the calls."""
        reply = self.tool_use.parse(self.text)
        return ParsedReply(reply.content[self.num_sent_chars :], reply.tool_calls)


def _held_from(text: str, start: int) -> int:
    """Where the text that may still become a call begins (from `start`): the first opening or
    prefix of one, and the whitespace before it."""
    end = len(text)
    for candidate in re.finditer(r"[<{]", text[start:]):
        if _may_open(text[start + candidate.start() :]):
            end = start + candidate.start()
            break
    return start + len(text[start:end].rstrip())


def _may_open(tail: str) -> bool:
    """`tail` starts with a call's opening, or could become one as more text comes."""
    if tail[0] == "<":
        return tail.startswith(HERMES_OPEN) or HERMES_OPEN.startswith(tail)
    rest = tail[1:].lstrip()
    return rest.startswith(GENERIC_KEY) or GENERIC_KEY.startswith(rest)


# -- templates ------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def template_reads_tools(template: str) -> bool:
    """Whether a chat template reads a variable `tools` (native tool support). Lexed, not
    parsed: the names inside its tags and expressions count; text and strings do not."""
    tokens = [(kind, value) for _, kind, value in jinja2.Environment().lex(template)]
    after_dot = [False] + [token == ("operator", ".") for token in tokens[:-1]]  # x.tools
    return any(token == ("name", "tools") and not dot for token, dot in zip(tokens, after_dot))


def chat_inputs(
    messages: list[dict[str, Any]], tool_use: ToolUse | None, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the `tools` argument to render a chat with: OpenAI-shaped messages
    (assistant `tool_calls`, `tool` results) as a native template or the generic format takes
    them (module docstring). Raises ValueError for call arguments that are not a JSON object."""
    offered = tool_use.offered if tool_use is not None else ()
    if native:
        tools = [tool.openai_dict() for tool in offered] or None
        return [_native_message(message) for message in messages], tools
    messages = _generic_history(messages)
    if offered:
        messages = _with_system_prompt(messages, tool_use.system_prompt())
    return messages, None


def _calls_in(message: dict[str, Any]) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(id, name, arguments) of an assistant message's OpenAI-shaped `tool_calls`."""
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as e:
                raise ValueError(f"tool call arguments are not valid JSON: {e}") from e
        if not isinstance(arguments, dict):
            raise ValueError("tool call arguments must be a JSON object")
        calls.append((call.get("id"), function.get("name"), arguments))
    return calls


def _native_message(message: dict[str, Any]) -> dict[str, Any]:
    if not message.get("tool_calls"):
        return message
    calls = [
        {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}
        for id_, name, arguments in _calls_in(message)
    ]
    return {**message, "tool_calls": calls}


def _generic_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls written into their assistant turns, and each run of tool results merged into one
    user turn (templates that know no `tool` role often insist that roles alternate)."""
    out: list[dict[str, Any]] = []
    names: dict[str | None, str] = {}  # call id -> function name
    results: list[dict[str, Any]] = []
    for message in messages:
        if message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            result = {"tool_call_id": call_id, "name": message.get("name") or names.get(call_id)}
            results.append({**result, "content": message.get("content") or ""})
            continue
        if results:
            out.append(_results_turn(results))
            results = []
        calls = _calls_in(message)
        if calls:
            names |= {id_: name for id_, name, _ in calls}
            written = {"tool_calls": [{"name": n, "arguments": a} for _, n, a in calls]}
            text = message.get("content") or ""
            joined = "\n".join(filter(None, [text, json.dumps(written, ensure_ascii=False)]))
            message = {"role": message["role"], "content": joined}
        out.append(message)
    if results:
        out.append(_results_turn(results))
    return out


def _results_turn(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "user", "content": json.dumps({"tool_results": results}, ensure_ascii=False)}


def _with_system_prompt(messages: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    """The tools' description as the system prompt, after the caller's own if there is one."""
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        joined = "\n\n".join(filter(None, [first.get("content") or "", prompt]))
        return [{**first, "content": joined}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
