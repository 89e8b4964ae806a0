"""Structured outputs (engine/structured.py) on real components: xgrammar, the default model's
tokenizer and weights, the HTTP server and the `openai` client.

The oracles do not use xgrammar: `jsonschema` for JSON schemas, `re.fullmatch` for regexes, a
recursive-descent parser for the EBNF grammar, membership for choices, and the tokenizer's own
decoding for which first tokens a choice allows. Outputs are sampled at temperature 1 with
different seeds, so a constraint that failed would show: the model is not made to follow it by
its own preferences. Each constrained output must also end with finish_reason "stop": the grammar
completed and ended the request, rather than max_tokens cutting it off.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import textwrap

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch
from fake_cuda import FakeCudaRuntime
from test_server_support import Scrape, in_process_server

from engram_serve import LLM, SamplingParams, StructuredOutputs
from engram_serve.config import EngineConfig
from engram_serve.engine.request import Request
from engram_serve.engine.sampler import Sampler, sample
from engram_serve.engine.structured import (
    GrammarCompiler,
    apply_token_bitmask,
    apply_token_bitmask_torch,
    grammar_bitmask,
)
from engram_serve.llm import build_engine
from engram_serve.server import protocol as p

MODEL = "smol-structured"
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "done": {"type": "boolean"},
    },
    "required": ["color", "count", "done"],
}
JSON_MESSAGES = [{"role": "user", "content": "Give a colour, a count and whether it is done."}]
CHOICES = ["yes", "no", "maybe so"]
# Quotes, a backslash, a newline, a tab and a non-ASCII letter: the choice grammar's escapes.
TRICKY_CHOICE = 'say "hi" \\ then\n\tgo é'
REGEX = r"[A-Z][a-z]{2,6}-[0-9]{3}"
# Sums of up to three products; a factor is a number or a parenthesised sum of two numbers.
# Bounded (at most ~50 characters), so every sentence ends well inside max_tokens.
ARITHMETIC = r"""
root ::= sum
sum ::= product (("+" | "-") product){0,2}
product ::= factor (("*" | "/") factor)?
factor ::= number | "(" number ("+" | "-") number ")"
number ::= [1-9] [0-9]?
"""
MAX_TOKENS = 64  # above every grammar's longest output here (the JSON ~30 tokens, with spaces)


def is_arithmetic(text: str) -> bool:
    """The oracle of ARITHMETIC: a recursive-descent parser of the same rules."""
    pos = 0

    def take(pattern: str) -> bool:
        nonlocal pos
        match = re.compile(pattern).match(text, pos)
        if match is None:
            return False
        pos = match.end()
        return True

    def factor() -> bool:
        if take(r"\("):
            return take(r"[1-9][0-9]?") and take(r"[+-]") and take(r"[1-9][0-9]?") and take(r"\)")
        return take(r"[1-9][0-9]?")

    def product() -> bool:
        return factor() and (not take(r"[*/]") or factor())

    def sum_() -> bool:
        if not product():
            return False
        for _ in range(2):
            if not take(r"[+-]"):
                break
            if not product():
                return False
        return True

    return sum_() and pos == len(text)


def test_the_arithmetic_oracle_accepts_and_refuses():
    for good in ("7", "12+(3-4)*5", "(1+2)/3-4*56", "99"):
        assert is_arithmetic(good), good
    for bad in ("", "0", "1+", "(1*2)", "1+2+3+4", "123", "1 + 2", "((1+2))"):
        assert not is_arithmetic(bad), bad


# -- the engine, offline ----------------------------------------------------------------------
#
# One batch holds every offline case at once (a decode step of 30 sequences costs little more
# than one of a single sequence here), and each test below checks its own rows of it.


@pytest.fixture(scope="module")
def llm(default_model_dir) -> LLM:
    return LLM(default_model_dir, max_num_seqs=32, kv_cache_bytes=64 << 20, max_model_len=256)


FREE_PROMPT = "The capital of France is"
FREE = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _sampled(seed: int, spec: StructuredOutputs, **sampling) -> SamplingParams:
    return SamplingParams(
        temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, structured_outputs=spec, **sampling
    )


@pytest.fixture(scope="module")
def batch(llm) -> dict[str, list]:
    """Case -> its completions, all generated in one batch by LLM.generate."""
    json_prompt = llm.get_tokenizer().apply_chat_template(JSON_MESSAGES)
    cases = {  # case -> [(prompt, params)]
        "json": [(json_prompt, _sampled(s, StructuredOutputs(json=SCHEMA))) for s in range(10)],
        "choice": [("Will it rain?", _sampled(s, StructuredOutputs(choice=CHOICES)))
                   for s in range(6)],
        "regex": [("A product code:", _sampled(s, StructuredOutputs(regex=REGEX)))
                  for s in range(6)],
        "grammar": [("A sum for a child:", _sampled(s, StructuredOutputs(grammar=ARITHMETIC)))
                    for s in range(6)],
        "tricky": [("Say it:", _sampled(0, StructuredOutputs(choice=[TRICKY_CHOICE])))],
        "ignore_eos": [("Yes or no?", _sampled(1, StructuredOutputs(choice=CHOICES),
                                               ignore_eos=True))],
        "greedy json": [(json_prompt, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                         structured_outputs=StructuredOutputs(json=SCHEMA)))],
        "free": [(FREE_PROMPT, FREE)],
    }  # fmt: skip
    rows = [(case, prompt, params) for case, pairs in cases.items() for prompt, params in pairs]
    outputs = llm.generate([r[1] for r in rows], [r[2] for r in rows])
    completions: dict[str, list] = {case: [] for case in cases}
    for (case, _, _), output in zip(rows, outputs):
        completions[case].append(output.outputs[0])
    return completions


def _stopped(completions: list) -> list:
    """Each constrained output (the engine's or the openai client's) ended with its grammar (EOS
    taken), not at max_tokens."""
    assert all(c.finish_reason == "stop" for c in completions), completions
    return completions


def test_json_schema_outputs_validate(batch):
    texts = [c.text for c in _stopped(batch["json"] + batch["greedy json"])]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1, "sampled at temperature 1, the outputs should differ"


def test_choice_outputs_are_choices(batch):
    for completion in _stopped(batch["choice"] + batch["ignore_eos"]):
        assert completion.text in CHOICES


def test_a_choice_with_escapes_comes_out_verbatim(batch):
    (completion,) = _stopped(batch["tricky"])
    assert completion.text == TRICKY_CHOICE


def test_regex_outputs_match_in_full(batch):
    for completion in _stopped(batch["regex"]):
        assert re.fullmatch(REGEX, completion.text), completion.text


def test_grammar_outputs_parse(batch):
    for completion in _stopped(batch["grammar"]):
        assert is_arithmetic(completion.text), completion.text


def test_the_mask_does_not_leak_across_rows(llm, batch):
    """The unconstrained greedy row of the batch decoded what it decodes alone."""
    alone = llm.generate(FREE_PROMPT, FREE)[0].outputs[0]
    assert batch["free"][0].token_ids == alone.token_ids


def test_a_grammar_that_ends_at_max_tokens_stops(llm):
    """With EOS ignored, the EOS that ends the grammar is the last token max_tokens allows: the
    output is whole, so "stop", not "length"."""

    def run(max_tokens: int):
        spec = StructuredOutputs(choice=["yes"])
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                structured_outputs=spec)  # fmt: skip
        return llm.generate("Yes?", params)[0].outputs[0]

    roomy = run(MAX_TOKENS)
    eos = llm.engine.tokenizer.eos_token_ids
    assert roomy.finish_reason == "stop" and roomy.token_ids[-1] in eos
    exact = run(len(roomy.token_ids))
    assert (exact.finish_reason, exact.text) == ("stop", "yes")


def test_llm_chat_takes_a_structured_output(llm):
    """One SamplingParams for four conversations (the engine seeds each its own)."""
    messages = [{"role": "user", "content": "Will it rain tomorrow?"}]
    params = SamplingParams(
        temperature=1.0, max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputs(choice=CHOICES)
    )
    for output in llm.chat([messages] * 4, params):
        assert output.outputs[0].finish_reason == "stop" and output.outputs[0].text in CHOICES


def test_a_spec_that_does_not_compile_is_refused_and_nothing_is_queued(llm):
    for spec, problem in [
        (StructuredOutputs(regex="(unclosed"), "invalid regex"),
        (StructuredOutputs(json={"type": "frobnicate"}), "invalid JSON schema"),
        (StructuredOutputs(grammar='root ::= "a" |'), "invalid grammar"),
    ]:
        with pytest.raises(ValueError, match=problem):
            llm.generate("Hi", SamplingParams(structured_outputs=spec))
        assert not llm.engine.has_unfinished_requests()


def test_preempted_requests_resume_their_grammar(llm, default_model_dir):
    """Nine KV blocks of 16 tokens; three prompts of 46 tokens take three blocks each, so the
    third output token of any request preempts one, which is recomputed later. A matcher advanced
    twice by a recomputed token (or not at all) would change the mask: the greedy outputs would
    differ from those of the same batch on an engine with room for all (`llm`), or break their
    grammar."""
    config = EngineConfig(
        max_num_seqs=3, max_num_batched_tokens=64, kv_block_size=16, num_kv_blocks=9,
        max_model_len=128,
    )  # fmt: skip
    small = LLM.from_engine(build_engine(default_model_dir, config))
    tokenizer = small.get_tokenizer()
    texts = ["A product code: " * 16, "A sum for a child to work out: " * 8, "Code: " * 46]
    prompts = [tokenizer.encode(text)[:46] for text in texts]
    assert all(len(prompt) == 46 for prompt in prompts)
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, structured_outputs=spec)
              for spec in (StructuredOutputs(regex=REGEX), StructuredOutputs(grammar=ARITHMETIC),
                           StructuredOutputs(regex=REGEX))]  # fmt: skip
    preempted = _stopped([o.outputs[0] for o in small.generate(prompts, params)])
    assert small.engine.scheduler.num_preemptions > 0, "the KV budget should force preemption"
    roomy = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert llm.engine.scheduler.num_preemptions == 0
    assert [c.token_ids for c in preempted] == [c.token_ids for c in roomy]
    assert re.fullmatch(REGEX, preempted[0].text) and re.fullmatch(REGEX, preempted[2].text)
    assert is_arithmetic(preempted[1].text)


# -- the sampler ------------------------------------------------------------------------------


def test_the_torch_twin_masks_as_xgrammar_does():
    """A vocabulary that is no multiple of 32, random bits (sign bits included)."""
    generator = torch.Generator().manual_seed(0)
    vocab, rows = 100, 5
    bitmask = torch.randint(-(2**31), 2**31, (rows, 4), generator=generator, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    logits = torch.randn(rows, vocab, generator=generator)
    ours = apply_token_bitmask_torch(logits, bitmask)
    theirs = apply_token_bitmask(logits, bitmask, list(range(rows)))
    assert torch.equal(ours, theirs)
    bits = [(int(bitmask[r, t // 32]) >> (t % 32)) & 1 for r in range(rows) for t in range(vocab)]
    assert torch.equal(torch.isfinite(ours).flatten(), torch.tensor(bits, dtype=torch.bool))


def _constrained_request(compiler: GrammarCompiler, spec: StructuredOutputs, seed: int, **kw):
    sampling = SamplingParams(structured_outputs=spec, **kw)
    eos = compiler.tokenizer.eos_token_ids
    request = Request(f"r{seed}", [1, 2, 3], sampling, eos_token_ids=eos, max_total_len=100)
    request.grammar = compiler.matcher(spec)
    request.generator = torch.Generator().manual_seed(seed)
    return request


def _tokens_starting_a_choice(tokenizer, vocab_size: int) -> set[int]:
    """The oracle: token ids whose text is a non-empty prefix of a choice."""
    allowed = set()
    for token in range(vocab_size):
        text = tokenizer.decode([token], skip_special_tokens=False)
        if text and any(c.startswith(text) for c in CHOICES):
            allowed.add(token)
    return allowed


def test_the_bitmask_allows_exactly_the_tokens_that_start_a_choice_and_nothing_else_wins(llm):
    """The first step of a choice grammar, in a batch with an unconstrained row: the mask leaves
    finite exactly the tokens the tokenizer spells as a prefix of a choice. Then 32 draws at
    temperature 1 with penalties, top-k, top-p and min-p from logits that favour every other
    token: each draw is one of those tokens."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    spec = StructuredOutputs(choice=CHOICES)
    allowed = _tokens_starting_a_choice(engine.tokenizer, vocab)
    assert allowed and not allowed & set(engine.tokenizer.eos_token_ids)
    free = Request("free", [1], SamplingParams(), max_total_len=100)
    constrained = _constrained_request(engine.grammars, spec, 0)
    requests = [free, constrained]
    bitmask = torch.from_numpy(grammar_bitmask(requests, [1], vocab))
    masked = apply_token_bitmask(torch.zeros(2, vocab), bitmask, [1])
    assert torch.isfinite(masked[0]).all()
    assert set(torch.isfinite(masked[1]).nonzero().flatten().tolist()) == allowed

    logits = torch.full((1, vocab), 10.0)
    logits[0, sorted(allowed)] = -5.0
    draws = [
        _constrained_request(engine.grammars, spec, seed, temperature=1.0, top_k=50, top_p=0.9,
                             min_p=0.01, repetition_penalty=2.0, presence_penalty=-2.0)
        for seed in range(32)
    ]  # fmt: skip
    tokens = sample(logits.expand(len(draws), vocab).clone(), draws).token_ids
    assert set(tokens) <= allowed


@pytest.mark.fake_cuda
def test_on_cuda_the_bitmask_goes_up_in_one_upload_and_nothing_comes_back(llm):
    """The sampler under FakeTensorMode with the recording fake of the CUDA runtime: a batch with
    a constrained row uploads one more array (the bitmask) than one without, and syncs once (the
    download of its tokens); a host read of a device value would raise."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    fake = FakeCudaRuntime(fill=lambda t: np.zeros(t.shape))
    sampler = Sampler(fake)
    spec = StructuredOutputs(choice=CHOICES)
    with fake.active():
        for constrained in (False, True):
            requests = [Request("free", [1], SamplingParams(seed=1), max_total_len=100)]
            requests[0].generator = fake.generator(1)
            if constrained:
                requests.append(_constrained_request(engine.grammars, spec, 2, temperature=0.5))
                requests[1].generator = fake.generator(2)
            fake.reset_counts()
            sampler.sample(fake.empty((len(requests), vocab), torch.float32), requests)
            assert fake.sync_kinds == {"download": 1}
            assert fake.uploads == 2 + constrained  # floats, ints (+ the bitmask)
        sampler.close()
    fake.assert_idle()


# -- the protocol ---------------------------------------------------------------------------------

FIELDS = {  # a request field -> (its JSON value, the StructuredOutputs it asks for)
    "response_format": (
        {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}},
        StructuredOutputs(json=SCHEMA),
    ),
    "guided_json": (SCHEMA, StructuredOutputs(json=SCHEMA)),
    "guided_regex": (REGEX, StructuredOutputs(regex=REGEX)),
    "guided_choice": (CHOICES, StructuredOutputs(choice=CHOICES)),
    "guided_grammar": (ARITHMETIC, StructuredOutputs(grammar=ARITHMETIC)),
    "structured_outputs": ({"json_object": True}, StructuredOutputs(json_object=True)),
}
REQUESTS = {
    "completions": (p.CompletionRequest, {"prompt": "Hi"}),
    "chat": (p.ChatCompletionRequest, {"messages": JSON_MESSAGES}),
}


def _params(endpoint: str, **fields) -> SamplingParams:
    model, base = REQUESTS[endpoint]
    body = model(**base, **fields)
    (params,) = body.sampling_params(8, None, vocab_size=1000)
    return params


@pytest.mark.parametrize("endpoint", REQUESTS)
@pytest.mark.parametrize("field", FIELDS)
def test_each_field_maps_to_its_constraint(endpoint, field):
    value, expected = FIELDS[field]
    assert _params(endpoint, **{field: value}).structured_outputs == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"type": "json_object"}, StructuredOutputs(json_object=True)),
        ({"type": "text"}, None),
        ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
         StructuredOutputs(json={"type": "object"})),  # strict or not, enforced
    ],
)  # fmt: skip
def test_response_format_types(value, expected):
    assert _params("chat", response_format=value).structured_outputs == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"json": SCHEMA}, StructuredOutputs(json=SCHEMA)),
        ({"json": json.dumps(SCHEMA)}, StructuredOutputs(json=json.dumps(SCHEMA))),
        ({"regex": REGEX}, StructuredOutputs(regex=REGEX)),
        ({"choice": CHOICES}, StructuredOutputs(choice=CHOICES)),
        ({"grammar": ARITHMETIC}, StructuredOutputs(grammar=ARITHMETIC)),
    ],
)
def test_each_structured_outputs_key_maps(value, expected):
    assert _params("completions", structured_outputs=value).structured_outputs == expected


def test_no_field_no_constraint():
    assert _params("chat").structured_outputs is None


@pytest.mark.parametrize("pair", list(itertools.combinations(FIELDS, 2)))
def test_two_constraints_are_refused_naming_both(pair):
    with pytest.raises(p.APIError) as error:
        _params("chat", **{field: FIELDS[field][0] for field in pair})
    assert error.value.status == 400
    assert all(field in error.value.message for field in pair), error.value.message


@pytest.mark.parametrize(
    ("fields", "param", "problem"),
    [
        ({"structured_outputs": {"json": SCHEMA, "regex": REGEX}}, "structured_outputs",
         "got json and regex"),
        ({"structured_outputs": {}}, "structured_outputs", "got none"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}},
         "response_format", "needs json_schema.schema"),
        ({"guided_regex": REGEX, "min_tokens": 2}, "min_tokens", "min_tokens must be 0"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400s_naming_the_field(fields, param, problem):
    with pytest.raises(p.APIError) as error:
        _params("chat", **fields)
    assert (error.value.status, error.value.param) == (400, param)
    assert problem in error.value.message


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({}, "got none"),
        ({"json": SCHEMA, "choice": CHOICES}, "got json and choice"),
        ({"json": 5}, "must be a JSON schema"),
        ({"json_object": "yes"}, "true or false"),
        ({"choice": "yes"}, "non-empty list of strings"),
        ({"choice": ["yes", 1]}, "non-empty list of strings"),
        ({"regex": 5}, "must be a string"),
    ],
)
def test_structured_outputs_validates_itself(arguments, problem):
    with pytest.raises(ValueError, match=problem):
        StructuredOutputs(**arguments)


# -- over HTTP, with the openai client --------------------------------------------------------


@pytest.fixture(scope="module")
def server(default_model_dir):
    config = EngineConfig(max_num_seqs=8, kv_cache_bytes=64 << 20, max_model_len=256)
    with in_process_server(default_model_dir, config, served_model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _chat(client, **kwargs):
    kwargs = {"temperature": 1.0, "max_tokens": MAX_TOKENS, **kwargs}
    return client.chat.completions.create(model=MODEL, messages=JSON_MESSAGES, **kwargs)


def test_chat_response_format_json_schema(client):
    schema = {"name": "thing", "schema": SCHEMA, "strict": True}
    response_format = {"type": "json_schema", "json_schema": schema}
    reply = _chat(client, response_format=response_format, n=2, seed=5)
    for choice in _stopped(reply.choices):
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_chat_response_format_json_object(client):
    """Greedy: any object may nest without end, and sampled ones often run long. Unconstrained,
    the same request answers in prose, so the object is the constraint's doing."""
    reply = _chat(client, response_format={"type": "json_object"}, temperature=0)
    (choice,) = _stopped(reply.choices)
    assert isinstance(json.loads(choice.message.content), dict)
    (free,) = _chat(client, temperature=0).choices
    with pytest.raises(ValueError):
        json.loads(free.message.content)


def test_completions_guided_choice_and_regex(client):
    def complete(prompt: str, **extra_body):
        reply = client.completions.create(model=MODEL, prompt=prompt, n=3, seed=2,
                                          temperature=1.0, max_tokens=MAX_TOKENS,
                                          extra_body=extra_body)  # fmt: skip
        return [c.text for c in _stopped(reply.choices)]

    assert set(complete("Will it rain?", guided_choice=CHOICES)) <= set(CHOICES)
    for text in complete("A product code:", guided_regex=REGEX):
        assert re.fullmatch(REGEX, text), text


def test_chat_structured_outputs_and_guided_grammar(client):
    reply = _chat(client, n=2, seed=3, extra_body={"structured_outputs": {"choice": CHOICES}})
    assert {c.message.content for c in _stopped(reply.choices)} <= set(CHOICES)
    reply = _chat(client, n=2, seed=4, extra_body={"guided_grammar": ARITHMETIC})
    for choice in _stopped(reply.choices):
        assert is_arithmetic(choice.message.content), choice.message.content


@pytest.mark.parametrize(
    ("extra_body", "problem"),
    [
        ({"guided_json": {"type": "frobnicate"}}, 'JSON schema: Unsupported type "frobnicate"'),
        ({"guided_regex": "(unclosed"}, "invalid regex"),
        ({"guided_grammar": 'root ::= "a" |'}, "invalid grammar"),
        ({"guided_regex": REGEX, "guided_choice": CHOICES}, "guided_regex, guided_choice"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ],
)  # fmt: skip
def test_bad_constraints_over_http_are_400s_naming_the_problem(client, extra_body, problem):
    with pytest.raises(openai.BadRequestError) as error:
        _chat(client, extra_body=extra_body)
    assert error.value.status_code == 400
    assert problem in error.value.body["message"], error.value.body


def test_a_stream_with_a_constraint_concatenates_to_valid_json(client):
    stream = _chat(client, stream=True, seed=6, extra_body={"guided_json": SCHEMA})
    chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
    text = "".join(c.delta.content or "" for c in chunks)
    assert len([c for c in chunks if c.delta.content]) > 1, "it should come in pieces"
    assert chunks[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_metrics_count_constrained_requests_by_kind(server, client):
    """Engine requests (n per prompt) with a constraint, by kind; one compile per HTTP request.
    Refused and unconstrained requests count nowhere."""
    before = Scrape(server.url)
    _chat(client, n=2, seed=7, extra_body={"guided_choice": CHOICES})
    client.completions.create(model=MODEL, prompt="A code:", max_tokens=MAX_TOKENS,
                              extra_body={"guided_regex": REGEX})  # fmt: skip
    _chat(client, max_tokens=2)  # unconstrained
    refused = httpx.post(f"{server.url}/v1/completions", timeout=60,
                         json={"prompt": "x", "guided_regex": "(unclosed"})  # fmt: skip
    assert refused.status_code == 400
    after = Scrape(server.url)
    requests = "engram_serve_structured_output_requests_total"
    assert after.delta(before, requests, kind="choice") == 2
    assert after.delta(before, requests, kind="regex") == 1
    assert after.delta(before, requests) == 3
    compiles = "engram_serve_structured_output_compile_seconds_count"
    assert after.delta(before, compiles) == 2


def test_an_unconstrained_engine_loads_neither_xgrammar_nor_torch_dynamo(default_model_dir):
    """Idle memory (issue 25): xgrammar (44 MiB) comes with the first constrained request, and
    nothing on the CPU serving path pulls in torch._dynamo (147 MiB), which torch's meta kernels
    of random and concatenating ops import. In a fresh process: sys.modules is per process."""
    script = textwrap.dedent(f"""
        import sys
        from engram_serve import LLM, SamplingParams, StructuredOutputs
        llm = LLM({str(default_model_dir)!r})
        llm.engine.warm_up()
        llm.generate(["The capital of France is"], SamplingParams(max_tokens=4))
        print("xgrammar" in sys.modules, "torch._dynamo" in sys.modules)
        spec = StructuredOutputs(choice=["yes", "no"])
        [out] = llm.generate(["Yes or no?"], SamplingParams(max_tokens=4, structured_outputs=spec))
        print("xgrammar" in sys.modules, out.outputs[0].text)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    idle, constrained = out.stdout.splitlines()[-2:]
    assert idle == "False False"
    assert constrained in ("True yes", "True no")
