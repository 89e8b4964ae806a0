"""Tool calling (engine/tool_calls.py) on real components: the parser and the stream against
hand-written expectations, chat templates rendered by the real tokenizer (the default model's
plain ChatML, and a tiny tools-aware template written here), and the default model served over
HTTP to the `openai` client.

The oracles do not use the code under test: `jsonschema` checks the arguments of every call
against its tool's `parameters`, `json.loads` reads them, and the rendered prompts and parsed
replies are compared with strings written out here. Forced calls are sampled at temperature 1
with several seeds: SmolLM2-135M does not call tools of its own accord, so a call that validates
is the grammar's doing.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from test_server_support import in_process_server

from engram_serve import LLM, SamplingParams, StructuredOutputs
from engram_serve.config import EngineConfig
from engram_serve.engine.tokenizer import Tokenizer
from engram_serve.engine.tool_calls import ToolsError, ToolUse, template_reads_tools

MODEL = "smol-tools"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string"}},
    "required": ["timezone"],
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                      "description": "The weather in a city now"}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME,
                                      "description": "The time in a timezone now"}},
]  # fmt: skip
WEATHER_CHOICE = {"type": "function", "function": {"name": "get_weather"}}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris?"}]
MAX_TOKENS = 128  # a compact call of either tool takes ~30 tokens
# Allowed parallel calls, the model may go on calling (the same function, again and again).
PARALLEL_MAX_TOKENS = 384
TOOL_USE = ToolUse.from_openai(TOOLS)


def calls_of(reply) -> list[tuple[str, dict]]:
    return [(call.name, call.arguments) for call in reply.tool_calls]


# -- parsing ----------------------------------------------------------------------------------

PARIS = {"city": "Paris", "unit": "celsius"}
UTC = {"timezone": "UTC"}
TWO_CALLS = (
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
    '{"name": "get_time", "arguments": {"timezone": "UTC"}}]}'
)
REPLIES = [  # (reply, its content, its calls)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
     "</tool_call>", "", [("get_weather", PARIS)]),
    ('Let me look.\n<tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}</tool_call>'
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
     "</tool_call>", "Let me look.\n", [("get_time", UTC), ("get_weather", PARIS)]),
    # only whitespace beside the calls: no content
    ('\n<tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}</tool_call>\n \n',
     "", [("get_time", UTC)]),
    # the closing tag cut off at the very end
    ('<tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}', "",
     [("get_time", UTC)]),
    (TWO_CALLS, "", [("get_weather", PARIS), ("get_time", UTC)]),
    ('Sure: { "tool_calls" : [{"arguments": {"timezone": "UTC"}, "name": "get_time"}]} Done.',
     "Sure:  Done.", [("get_time", UTC)]),
    # not calls: each stays content, verbatim
    ("It is sunny in Paris today.", "It is sunny in Paris today.", []),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Par', None, []),
    ('<tool_call>{"name": "get_weather", "arguments": {}} trailing</tool_call>', None, []),
    ('<tool_call>{"name": "get_rain", "arguments": {}}</tool_call>', None, []),
    ('<tool_call>{"name": "get_time", "arguments": "UTC"}</tool_call>', None, []),
    ('<tool_call>{"name": "get_time", "arguments": {}, "id": 3}</tool_call>', None, []),
    ('{"tool_calls": []}', None, []),
    ('{"tool_calls": [{"name": "get_time", "arguments": {}}], "more": 1}', None, []),
    ('{"tool_calls": [{"name": "get_time", "arguments": {}}, {"name": "nope", "arguments": {}}]}',
     None, []),
    ("a <b>tag</b> and {braces} and <tool_call> alone", None, []),
]  # fmt: skip
REPLIES = [(text, text if content is None else content, calls) for text, content, calls in REPLIES]


@pytest.mark.parametrize(("text", "content", "calls"), REPLIES)
def test_a_reply_parses_into_its_content_and_calls(text, content, calls):
    reply = TOOL_USE.parse(text)
    assert (reply.content, calls_of(reply)) == (content, calls)


@pytest.mark.parametrize("piece", [1, 3, 1000])
@pytest.mark.parametrize(("text", "content", "calls"), REPLIES)
def test_a_streamed_reply_gives_the_same_content_and_calls(text, content, calls, piece):
    stream = TOOL_USE.stream()
    sent = "".join(stream.feed(text[i : i + piece]) for i in range(0, len(text), piece))
    rest = stream.finish()
    assert (sent + rest.content, calls_of(rest)) == (content, calls)


@pytest.mark.parametrize(
    ("pieces", "sent"),
    [
        (["It is ", "sunny ", "today."], ["It is", " sunny", " today."]),
        (["Let me look. <tool", "_call>{"], ["Let me look.", ""]),
        (["Let me look. <to", "day>"], ["Let me look.", " <today>"]),
        (["x = {", "  ", '"tool_c'], ["x =", "", ""]),
        (["x = {", '"a": 1}'], ["x =", ' {"a": 1}']),
    ],
)
def test_a_stream_holds_back_only_what_may_start_a_call(pieces, sent):
    """Whitespace before the held text waits with it: a reply that is all calls sends none."""
    stream = TOOL_USE.stream()
    assert [stream.feed(piece) for piece in pieces] == sent


def test_without_parallel_calls_only_the_first_call_is_kept():
    single = ToolUse.from_openai(TOOLS, parallel_tool_calls=False)
    assert calls_of(single.parse(TWO_CALLS)) == [("get_weather", PARIS)]


def test_calls_get_ids_of_their_own():
    reply = TOOL_USE.parse(TWO_CALLS)
    ids = [call.id for call in reply.tool_calls]
    assert all(i.startswith("call_") and len(i) > len("call_") for i in ids)
    assert len(set(ids)) == len(ids)


# -- forcing ----------------------------------------------------------------------------------


def _schema(tool_choice, parallel=True) -> dict:
    spec = ToolUse.from_openai(TOOLS, tool_choice, parallel).structured_outputs()
    assert spec.any_whitespace is False  # compact: sampled calls stay short
    return spec.json


def _call(name, arguments) -> dict:
    return {"name": name, "arguments": arguments}


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "good", "bad"),
    [
        (WEATHER_CHOICE, True,  # a named function: one call of it, parallel calls or not
         [[_call("get_weather", PARIS)]],
         [[], [_call("get_time", UTC)], [_call("get_weather", {"city": "Paris"})],
          [_call("get_weather", PARIS)] * 2]),
        ("required", True,
         [[_call("get_time", UTC)], [_call("get_weather", PARIS), _call("get_time", UTC)]],
         [[], [_call("get_rain", {})], [_call("get_time", {"timezone": 5})]]),
        ("required", False,
         [[_call("get_time", UTC)], [_call("get_weather", PARIS)]],
         [[], [_call("get_weather", PARIS), _call("get_time", UTC)]]),
    ],
)  # fmt: skip
def test_the_forcing_schema_admits_exactly_the_allowed_calls(tool_choice, parallel, good, bad):
    schema = _schema(tool_choice, parallel)
    for calls in good:
        jsonschema.validate({"tool_calls": calls}, schema)
    for calls in bad + [[{**_call("get_time", UTC), "id": "x"}]]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"tool_calls": calls}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": good[0], "text": "hi"}, schema)


def test_auto_and_none_force_nothing():
    assert ToolUse.from_openai(TOOLS, "auto").structured_outputs() is None
    assert ToolUse.from_openai(TOOLS, "none") is None  # nothing offered: a plain chat
    assert ToolUse.from_openai(None, "auto") is None


def test_a_forced_call_cannot_join_another_structured_output():
    forced = ToolUse.from_openai(TOOLS, "required")
    choice = SamplingParams(structured_outputs=StructuredOutputs(choice=["a"]))
    with pytest.raises(ToolsError, match="cannot be combined with structured_outputs"):
        forced.constrain(choice)
    assert forced.constrain(SamplingParams()).structured_outputs == forced.structured_outputs()


@pytest.mark.parametrize(
    ("tools", "tool_choice", "param", "problem"),
    [
        (TOOLS, {"type": "function", "function": {"name": "get_rain"}}, "tool_choice",
         "'get_rain', which is not among the tools"),
        (None, "required", "tool_choice", "needs tools"),
        (TOOLS, "sometimes", "tool_choice", "must be"),
        (TOOLS, {"type": "function", "function": {}}, "tool_choice", "a named tool_choice"),
        (TOOLS + TOOLS[:1], None, "tools", "repeated: ['get_weather']"),
        ([{"type": "function", "function": {"name": "get weather"}}], None, "tools",
         "must be 1-64 letters"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
         None, "tools", "JSON schema of an object"),
        ([{"type": "retrieval"}], None, "tools", '{"type": "function"'),
    ],
)  # fmt: skip
def test_bad_tools_are_refused_naming_the_field(tools, tool_choice, param, problem):
    with pytest.raises(ToolsError) as error:
        ToolUse.from_openai(tools, tool_choice)
    assert error.value.param == param and problem in str(error.value)


# -- rendering --------------------------------------------------------------------------------

# A tools-aware template, as small as one can be: tools, calls and results, each its own way.
NATIVE_TEMPLATE = (
    "{% if tools %}<tools>{% for tool in tools %}{{ tool.function.name }}"
    "{{ tool.function.parameters | tojson }};{% endfor %}</tools>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.tool_calls %}<calls>{% for call in message.tool_calls %}"
    "{{ call.id }}={{ call.function.name }}{{ call.function.arguments | tojson }};"
    "{% endfor %}</calls>\n"
    "{% elif message.role == 'tool' %}<result {{ message.tool_call_id }}>{{ message.content }}"
    "</result>\n"
    "{% else %}<{{ message.role }}>{{ message.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_time", "arguments": '{"timezone": "CET"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer(default_model_dir)


@pytest.fixture(scope="module")
def native_tokenizer(default_model_dir) -> Tokenizer:
    """The default model's tokenizer with the tools-aware template instead of its own."""
    tokenizer = Tokenizer(default_model_dir)
    tokenizer.hf_tokenizer.chat_template = NATIVE_TEMPLATE
    return tokenizer


def test_which_templates_read_tools(tokenizer, native_tokenizer):
    assert not tokenizer.chat_template_reads_tools and native_tokenizer.chat_template_reads_tools
    assert template_reads_tools("{% for t in tools %}{{ t }}{% endfor %}")
    assert not template_reads_tools("Use tools wisely. {{ 'tools' }}{{ message.tools }}")


def test_a_tools_aware_template_gets_the_tools_calls_and_results(native_tokenizer):
    expected = (
        '<tools>get_weather{"type": "object", "properties": {"city": {"type": "string", '
        '"minLength": 1}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", '
        '"unit"]};get_time{"type": "object", "properties": {"timezone": {"type": "string"}}, '
        '"required": ["timezone"]};</tools>\n'
        "<user>Weather in Paris?\n"
        '<calls>call_1=get_weather{"city": "Paris", "unit": "celsius"};'
        'call_2=get_time{"timezone": "CET"};</calls>\n'
        "<result call_1>18 C, sunny</result>\n"
        "<result call_2>14:05</result>\n"
        "<assistant>"
    )
    assert native_tokenizer.render_chat(CONVERSATION, True, TOOL_USE) == expected
    without_tools = expected[expected.index("<user>") :]
    assert native_tokenizer.render_chat(CONVERSATION, True, None) == without_tools
    none = ToolUse.from_openai(TOOLS, "none")
    assert native_tokenizer.render_chat(CONVERSATION, True, none) == without_tools


def test_a_plain_template_gets_the_generic_format(tokenizer):
    """SmolLM2's ChatML: the tools in the system prompt, after the caller's own; the calls and
    results as JSON text, the results in one user turn."""
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    tool_use = ToolUse.from_openai(TOOLS, WEATHER_CHOICE, parallel_tool_calls=False)
    rendered = tokenizer.render_chat(messages, True, tool_use)
    weather, time = (json.dumps({k: t["function"][k] for k in ("name", "description",
                                 "parameters")}) for t in TOOLS)  # fmt: skip
    expected = f"""<|im_start|>system
Be brief.

You can call functions. Each line below is one: its name, what it does, and the JSON schema of \
its arguments.
{weather}
{time}

To call functions, reply with this JSON object and nothing else:
{{"tool_calls": [{{"name": "<function name>", "arguments": {{<arguments>}}}}]}}
You must call the function get_weather. Make one call at a time.
Results come back as {{"tool_results": [{{"tool_call_id": ..., "name": ..., "content": ...}}]}}.\
<|im_end|>
<|im_start|>user
Weather in Paris?<|im_end|>
<|im_start|>assistant
{{"tool_calls": [{{"name": "get_weather", "arguments": {{"city": "Paris", "unit": "celsius"}}}}, \
{{"name": "get_time", "arguments": {{"timezone": "CET"}}}}]}}<|im_end|>
<|im_start|>user
{{"tool_results": [{{"tool_call_id": "call_1", "name": "get_weather", "content": "18 C, sunny"}}, \
{{"tool_call_id": "call_2", "name": "get_time", "content": "14:05"}}]}}<|im_end|>
<|im_start|>assistant
"""
    assert rendered == expected


def test_tool_choice_none_renders_a_plain_chat(tokenizer):
    none = ToolUse.from_openai(TOOLS, "none")
    assert tokenizer.render_chat(QUESTION, True, none) == tokenizer.render_chat(QUESTION)
    assert "get_weather" not in tokenizer.render_chat(QUESTION)


def test_call_arguments_that_are_no_json_object_are_refused(tokenizer):
    call = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{x"}}
    with pytest.raises(ValueError, match="not valid JSON"):
        tokenizer.render_chat([{"role": "assistant", "content": None, "tool_calls": [call]}])


# -- over HTTP, with the openai client --------------------------------------------------------


@pytest.fixture(scope="module")
def server(default_model_dir):
    # float32 throughout: the seeded samples below end within their token budgets as drawn
    # under float32 arithmetic (bfloat16 prefill products draw other, equally valid, texts).
    config = EngineConfig(
        max_num_seqs=8, kv_cache_bytes=64 << 20, max_model_len=1024, dtype="float32"
    )
    with in_process_server(default_model_dir, config, served_model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _chat(client, **kwargs):
    kwargs = {"temperature": 1.0, "max_tokens": MAX_TOKENS, "tools": TOOLS, **kwargs}
    return client.chat.completions.create(model=MODEL, messages=QUESTION, **kwargs)


def _validated(calls, names=tuple(SCHEMAS)) -> list[tuple[str, dict]]:
    """Each call's id, type and name, and its arguments against its tool's schema."""
    out = []
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def test_a_named_function_is_called_with_valid_arguments(client):
    reply = _chat(client, tool_choice=WEATHER_CHOICE, parallel_tool_calls=False, n=4, seed=11)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(_validated(choice.message.tool_calls, ["get_weather"])) == 1
    arguments = [c.message.tool_calls[0].function.arguments for c in reply.choices]
    assert len(set(arguments)) > 1, "sampled at temperature 1, the calls should differ"


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_a_named_function_is_called_in_a_stream(client, seed):
    """The calls come whole in the last delta (each with its index); no content comes."""
    stream = _chat(client, tool_choice=WEATHER_CHOICE, parallel_tool_calls=False, seed=seed,
                   stream=True)  # fmt: skip
    chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
    assert not "".join(c.delta.content or "" for c in chunks)
    calls = [call for c in chunks for call in c.delta.tool_calls or ()]
    assert [call.index for call in calls] == list(range(len(calls)))
    assert len(_validated(calls, ["get_weather"])) == 1
    assert chunks[-1].finish_reason == "tool_calls" and chunks[-1].delta.tool_calls


def test_required_calls_one_of_the_tools_or_more(client):
    reply = _chat(client, tool_choice="required", n=4, seed=31, max_tokens=PARALLEL_MAX_TOKENS)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and _validated(choice.message.tool_calls)


def test_without_parallel_calls_there_is_exactly_one(client):
    reply = _chat(client, tool_choice="required", parallel_tool_calls=False, n=4, seed=41)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        assert len(_validated(choice.message.tool_calls)) == 1


def test_tool_choice_none_answers_in_text(client):
    reply = _chat(client, tool_choice="none", n=2, seed=51, max_tokens=24)
    for choice in reply.choices:
        assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
        assert choice.message.content


def test_with_tools_offered_text_streams_as_it_does_whole(client):
    """tool_choice auto: the model answers in prose; streamed, the same seed gives the same
    content, in several pieces."""
    whole = _chat(client, seed=61, max_tokens=32).choices[0]
    assert whole.message.tool_calls is None and whole.message.content
    chunks = [c.choices[0] for c in _chat(client, seed=61, max_tokens=32, stream=True)
              if c.choices]  # fmt: skip
    pieces = [c.delta.content for c in chunks if c.delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.message.content
    assert chunks[-1].finish_reason == whole.finish_reason


def test_a_tool_result_goes_back_and_the_chat_completes(client):
    """An assistant turn of calls (content null) and their results, in the generic format."""
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *CONVERSATION],
        tools=TOOLS, temperature=1.0, seed=71, max_tokens=24,
    )  # fmt: skip
    (choice,) = reply.choices
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    assert reply.usage.prompt_tokens > 100  # the system prompt, calls and results were rendered


@pytest.mark.parametrize(
    ("fields", "param", "problem"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "get_rain"}}}, "tool_choice",
         "'get_rain', which is not among the tools"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
         "got response_format, tool_choice"),
        ({"tool_choice": WEATHER_CHOICE, "extra_body": {"guided_regex": "a+"}}, "guided_regex",
         "got guided_regex, tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools",
         "must be 1-64 letters"),
        ({"tools": TOOLS + TOOLS}, "tools", "must be unique"),
        ({"tools": [{"type": "function", "function": {"name": "f",
                                                      "parameters": {"type": "array"}}}]},
         "tools", "JSON schema of an object"),
        ({"tools": [{"type": "function"}]}, "tools.0.function", "Field required"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tool_choice": "required", "min_tokens": 3}, "min_tokens", "min_tokens must be 0"),
        ({"tool_choice": "required", "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"properties": {"x": {"type": "frob"}}}}}]},
         "tool_choice", "invalid JSON schema"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400s_naming_the_field(client, fields, param, problem):
    fields = {"tools": TOOLS, **fields}
    extra_body = {**fields.pop("extra_body", {}), "min_tokens": fields.pop("min_tokens", 0)}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=extra_body,
                                       **fields)  # fmt: skip
    body = error.value.body
    assert (error.value.status_code, body["param"]) == (400, param)
    assert problem in body["message"], body


# -- offline ----------------------------------------------------------------------------------


def test_llm_chat_returns_the_calls(default_model_dir):
    llm = LLM(default_model_dir, max_num_seqs=4, kv_cache_bytes=64 << 20, max_model_len=1024)
    params = SamplingParams(temperature=1.0, seed=81, max_tokens=MAX_TOKENS)
    outputs = llm.chat([QUESTION] * 2, params, tools=TOOLS, tool_choice="required",
                       parallel_tool_calls=False)  # fmt: skip
    for output in outputs:
        (call,) = output.outputs[0].tool_calls
        jsonschema.validate(call.arguments, SCHEMAS[call.name])
        assert output.outputs[0].finish_reason == "stop"  # the grammar ended the reply
    (plain,) = llm.chat(QUESTION, SamplingParams(max_tokens=4), tools=TOOLS, tool_choice="none")
    assert plain.outputs[0].tool_calls is None
    with pytest.raises(ToolsError, match="cannot be combined"):
        llm.chat(QUESTION, SamplingParams(structured_outputs=StructuredOutputs(json_object=True)),
                 tools=TOOLS, tool_choice="required")  # fmt: skip
