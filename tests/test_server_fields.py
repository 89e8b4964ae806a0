"""Every request field of both endpoints is honoured or refused, never silently ignored.

Which fields exist is read from an oracle outside this project: the `openai` package's own request
types (the parameters of `client.completions.create` and `client.chat.completions.create`), and
vLLM's extensions as its OpenAI-compatible server documents them (VLLM_* below). Each field must
be one of:
- a field of our request model: honoured (what each does is tested where it is built:
  test_server_sampling.py, test_structured_outputs.py, test_tool_calls.py, test_server_openai.py);
- in the endpoint's `unsupported_fields`: refused with a 400 naming it, unless sent with a value
  that asks for nothing (OpenAI's and vLLM's own default);
- in `protocol.NO_EFFECT_FIELDS`: accepted; they concern billing, storage or caching, not what is
  generated.
A field that is none of these fails the first test: a new field of the `openai` package needs a
decision. Then every refused field goes over HTTP, once with a value that asks for something (a
400 naming it) and once with its no-op value (accepted).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai.types import completion_create_params as completions_params
from openai.types.chat import completion_create_params as chat_params
from test_server_support import in_process_server

from engram_serve.config import EngineConfig
from engram_serve.server import protocol as p

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MODELS = {COMPLETIONS: p.CompletionRequest, CHAT: p.ChatCompletionRequest}

# vLLM's extra request fields (its OpenAI-compatible server's "extra parameters"), both endpoints.
VLLM_SHARED = {
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty",
    "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "allowed_token_ids", "prompt_logprobs", "bad_words", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "structural_tag", "guided_decoding_backend",
    "guided_whitespace_pattern", "structured_outputs", "priority", "request_id",
    "logits_processors", "return_tokens_as_token_ids", "return_token_ids", "cache_salt",
    "kv_transfer_params", "vllm_xargs", "response_format", "add_special_tokens",
}  # fmt: skip
VLLM_ONLY = {
    COMPLETIONS: {"prompt_embeds"},
    CHAT: {"echo", "add_generation_prompt", "continue_final_message", "documents",
           "chat_template", "chat_template_kwargs", "mm_processor_kwargs"},
}  # fmt: skip


def defined_fields(endpoint: str) -> set[str]:
    params = completions_params if endpoint == COMPLETIONS else chat_params
    return (
        {*params.CompletionCreateParamsBase.__annotations__, "stream"}
        | VLLM_SHARED
        | VLLM_ONLY[endpoint]
    )


# A value that asks for something, for every field some endpoint refuses.
ASKING: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "The sky is blue."},
    "reasoning_effort": "high",
    "verbosity": "low",
    "web_search_options": {},
    "moderation": {"policy": {"input": {"mode": "block"}}},
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "store": True,
    "logit_bias": {"5": 1.0},
    "suffix": " and then",
    "best_of": 3,
    "use_beam_search": True,
    "length_penalty": 0.5,
    "include_stop_str_in_output": True,
    "spaces_between_special_tokens": False,
    "truncate_prompt_tokens": 4,
    "allowed_token_ids": [5, 6],
    "prompt_logprobs": 1,
    "bad_words": ["sky"],
    "structural_tag": '{"type": "structural_tag"}',
    "guided_decoding_backend": "outlines",
    "guided_whitespace_pattern": " ",
    "priority": 1,
    "request_id": "my-id",
    "logits_processors": ["my.Processor"],
    "return_tokens_as_token_ids": True,
    "return_token_ids": True,
    "kv_transfer_params": {"do_remote_decode": True},
    "vllm_xargs": {"key": 1},
    "add_special_tokens": "flip",  # the endpoint's own default, negated below
    "prompt_embeds": "AAAA",
    "echo": True,
    "continue_final_message": True,
    "documents": [{"title": "a", "text": "b"}],
    "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": True},
    "mm_processor_kwargs": {"num_crops": 4},
}


def _asking(model: type[p.SamplingRequest], field: str) -> Any:
    if ASKING[field] == "flip":
        return not model.unsupported_fields[field][0]
    return ASKING[field]


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
def test_every_field_of_the_apis_is_honoured_refused_or_without_effect(endpoint):
    model = MODELS[endpoint]
    undecided = {
        name
        for name in defined_fields(endpoint)
        if name not in model.model_fields
        and name not in model.unsupported_fields
        and name not in p.NO_EFFECT_FIELDS
    }
    assert not undecided, f"{endpoint}: decide about {sorted(undecided)}"
    # A field is in one place only.
    assert not set(model.model_fields) & set(model.unsupported_fields)
    assert not set(model.model_fields) & p.NO_EFFECT_FIELDS
    assert not set(model.unsupported_fields) & p.NO_EFFECT_FIELDS


@pytest.fixture(scope="module")
def url(default_model_dir):
    config = EngineConfig(max_num_seqs=2, kv_cache_bytes=64 << 20, max_model_len=256)
    with in_process_server(default_model_dir, config) as server:
        yield server.url


def _post(url: str, endpoint: str, **fields) -> httpx.Response:
    base = (
        {"prompt": "The sky is"}
        if endpoint == COMPLETIONS
        else {"messages": [{"role": "user", "content": "Hi"}]}
    )
    return httpx.post(f"{url}{endpoint}", json={**base, "max_tokens": 1, **fields}, timeout=60)


REFUSED = [(e, f) for e in (COMPLETIONS, CHAT) for f in MODELS[e].unsupported_fields]


@pytest.mark.parametrize(("endpoint", "field"), REFUSED)
def test_a_refused_field_is_a_400_naming_it_unless_it_asks_for_nothing(url, endpoint, field):
    model = MODELS[endpoint]
    refused = _post(url, endpoint, **{field: _asking(model, field)})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == field and error["message"] == f"{field} is not supported"
    for value in model.unsupported_fields[field]:
        accepted = _post(url, endpoint, **{field: value})
        assert accepted.status_code == 200, (value, accepted.text)


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
def test_fields_without_effect_are_accepted(url, endpoint):
    fields = {
        "metadata": {"team": "a"}, "service_tier": "auto", "prompt_cache_key": "k",
        "prompt_cache_retention": "24h", "safety_identifier": "s", "cache_salt": "salt",
    }  # fmt: skip
    assert _post(url, endpoint, **fields).status_code == 200
