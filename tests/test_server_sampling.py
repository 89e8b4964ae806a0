"""Sampling through the HTTP server, on the real default model and the real HTTP stack.

1. Every request field of /v1/completions and /v1/chat/completions that reaches the engine, sent
   with a non-default value, arrives in the engine's `SamplingParams` with that value. What
   arrives is read where the engine receives it: `Engine.add_request` is wrapped by a recorder
   that keeps its arguments and calls the real method (nothing is replaced).
2. Each penalty (presence, frequency, repetition) changes the greedy text exactly as its
   definition says: the server's text is compared with a greedy decode by transformers' model of
   the same weights, the penalty applied by a plain loop over the tokens seen. Each test also
   checks, on that oracle, that its penalty ignored or swapped with another would give another
   text, so the test fails on such a mutant.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter

import httpx
import pytest
import torch

from engram_serve.config import EngineConfig, ServerConfig
from engram_serve.engine.request import SamplingParams
from engram_serve.llm import build_engine
from engram_serve.server import protocol as p
from engram_serve.server.api import build_app
from engram_serve.server.process import BackgroundServer

MODEL = "smol-sampling"
MAX_MODEL_LEN = 512


@dataclasses.dataclass
class Served:
    url: str
    arrived: dict[str, SamplingParams]  # engine request id -> what Engine.add_request received

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=120)

    def arrived_for(self, response_id: str) -> list[SamplingParams]:
        """The SamplingParams of the engine requests of one HTTP response, in choice order."""
        ids = sorted(i for i in self.arrived if i.startswith(f"{response_id}-"))
        return [self.arrived[i] for i in ids]


@pytest.fixture(scope="module")
def served(default_model_dir):
    engine = build_engine(
        default_model_dir,
        EngineConfig(max_num_seqs=4, kv_cache_bytes=128 << 20, max_model_len=MAX_MODEL_LEN),
    )
    arrived: dict[str, SamplingParams] = {}
    real_add_request = engine.add_request

    def add_request(prompt_token_ids, sampling, request_id=None, prompt=None):
        arrived[request_id] = sampling
        return real_add_request(prompt_token_ids, sampling, request_id, prompt)

    engine.add_request = add_request
    app = build_app(engine, ServerConfig(served_model_name=MODEL))
    with BackgroundServer(app) as server:
        yield Served(server.url, arrived)


# -- every field arrives ----------------------------------------------------------------------

# A value for every SamplingParams field the mapping sets, none of them its default (checked in
# test_the_expected_values_are_not_defaults). Each choice j gets seed + j; `n` itself arrives as
# the number of engine requests (each SamplingParams keeps n = 1). `structured_outputs` cannot
# join them (it refuses min_tokens): test_structured_outputs.py maps each of its fields. The other
# request fields do not reach SamplingParams: model, prompt / messages, echo,
# add_generation_prompt, stream and stream_options (tested in test_server_openai.py), user
# (accepted, unused), and the fields refused unless they ask for nothing (test_server_fields.py).
NON_DEFAULT = dict(
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    presence_penalty=0.25,
    frequency_penalty=0.75,
    repetition_penalty=1.25,
    max_tokens=5,
    min_tokens=2,
    stop=("zzzz", "qqqq"),
    stop_token_ids=(5, 6),
    ignore_eos=True,
    logprobs=3,
    skip_special_tokens=False,
)
SEED, N = 11, 2
SHARED_FIELDS = {  # the request fields both endpoints share, as JSON
    **{k: v for k, v in NON_DEFAULT.items() if k not in ("max_tokens", "logprobs")},
    "stop": list(NON_DEFAULT["stop"]),
    "stop_token_ids": list(NON_DEFAULT["stop_token_ids"]),
    "seed": SEED,
    "n": N,
    "user": "someone",  # accepted and unused (OpenAI's end-user id)
}
EXPECTED = [SamplingParams(seed=SEED + j, **NON_DEFAULT) for j in range(N)]
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def test_the_expected_values_are_not_defaults():
    """Every SamplingParams field but n and structured_outputs is set to a non-default value
    above (so a field the mapping dropped or swapped could not pass unseen), and the values
    differ from each other where a swap could hide (presence, frequency)."""
    defaults = SamplingParams()
    for f in dataclasses.fields(SamplingParams):
        if f.name not in ("n", "structured_outputs"):
            assert getattr(EXPECTED[0], f.name) != getattr(defaults, f.name), f.name
    assert NON_DEFAULT["presence_penalty"] != NON_DEFAULT["frequency_penalty"]


def test_every_completions_field_arrives_in_sampling_params(served):
    """n = 2 choices, each with every field as sent (and seed + its index)."""
    body = {**SHARED_FIELDS, "model": MODEL, "prompt": "The sky is", "max_tokens": 5, "logprobs": 3}
    response = served.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert served.arrived_for(reply["id"]) == EXPECTED
    assert [c["index"] for c in reply["choices"]] == list(range(N))


def test_every_chat_field_arrives_in_sampling_params(served):
    """Chat, streamed: max_completion_tokens wins over its alias max_tokens, and `logprobs: true`
    with `top_logprobs: k` asks for k."""
    body = {
        **SHARED_FIELDS, "model": MODEL, "messages": MESSAGES, "max_completion_tokens": 5,
        "max_tokens": 9, "logprobs": True, "top_logprobs": 3, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = list(r.iter_lines())  # the whole stream, to its end
    first = next(line for line in lines if line.startswith("data: {"))
    response_id = json.loads(first.removeprefix("data: "))["id"]
    assert served.arrived_for(response_id) == EXPECTED


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_tokens": 7}, dict(max_tokens=7)),  # the alias alone
        ({"logprobs": True}, dict(logprobs=0)),  # the sampled token's logprob only
        ({"temperature": 0}, dict(temperature=0.0)),  # greedy
        ({"temperature": p.GREEDY_TEMPERATURE / 2}, dict(temperature=0.0)),  # greedy too
        ({"top_k": 49152}, {}),  # the whole vocabulary: no top-k
        ({"top_k": -1, "max_tokens": 3}, dict(max_tokens=3)),  # -1: no top-k
    ],
)
def test_chat_variants_arrive(served, fields, expected):
    """The mapping's own rules, each through the HTTP stack."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, **fields}
    response = served.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert served.arrived_for(response.json()["id"]) == [
        SamplingParams(**{"max_tokens": 3, **expected})
    ]


def test_completions_defaults_arrive_as_the_engine_defaults(served):
    """An empty request gets OpenAI's defaults: temperature 1, max_tokens 16, nothing else."""
    response = served.post("/v1/completions", {"prompt": "The sky is"})
    assert response.status_code == 200, response.text
    assert served.arrived_for(response.json()["id"]) == [SamplingParams(max_tokens=16)]


def test_chat_defaults_map_to_the_engine_defaults():
    """Chat without max_tokens runs up to the context length (max_tokens None), no logprobs."""
    body = p.ChatCompletionRequest(messages=MESSAGES)
    params = body.sampling_params(body.max_output_tokens, body.num_logprobs, vocab_size=1000)
    assert params == [SamplingParams(max_tokens=None)]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_fields_are_accepted_logged_and_change_nothing(served, path, caplog):
    """Fields no API defines are accepted (200), named in a warning, and leave the SamplingParams
    at their defaults, as vLLM does; the fields OpenAI or vLLM define are each honoured or refused
    (test_server_fields.py)."""
    unknown = {"my_extension": 3, "trace_tag": "a"}
    prompt = {"prompt": "The sky is"} if "chat" not in path else {"messages": MESSAGES}
    with caplog.at_level(logging.WARNING, logger="engram_serve.server.protocol"):
        response = served.post(path, {**prompt, "max_tokens": 2, **unknown})
    assert response.status_code == 200, response.text
    assert served.arrived_for(response.json()["id"]) == [SamplingParams(max_tokens=2)]
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert any(all(name in w for name in unknown) for w in warnings), warnings


# -- each penalty changes the greedy text as it should ----------------------------------------
#
# The oracle: transformers' LlamaForCausalLM on the default model's weights (its Engram is an
# identity, so the served model is exactly this backbone), decoded greedily, with the penalty
# applied to each step's logits by a plain loop from its definition (repetition on every token
# seen, prompt or output: logit / r if positive, else logit * r; then - frequency * count -
# presence * [count > 0] over output tokens).
#
# Unpenalised, the model continues "Once upon a time" with ", the city of Nova Haven was a
# thriving metropolis, ... But as the years went by, the city began to lose its original". At
# 1.4, presence replaces the second " city" (" the economy began"); frequency, already the third
# " the" (its count is 2: " it began"); repetition 1.1 replaces " a", seen in the prompt, at the
# fifth token (" was ruled by").

PENALTY_STEPS = 32
MIN_MARGIN = 0.02  # logits; the engine and transformers agree far more closely than this
REPEATING_PROMPT = "Once upon a time"


def _penalised(
    logits: torch.Tensor,
    prompt: list[int],
    output: list[int],
    presence: float = 0.0,
    frequency: float = 0.0,
    repetition: float = 1.0,
) -> torch.Tensor:
    """The penalties by their definitions, one token at a time, in float64."""
    logits = logits.double().clone()
    counts = Counter(output)
    for token in set(prompt) | set(output):
        value = logits[token].item()
        value = value / repetition if value > 0 else value * repetition
        value -= frequency * counts[token] + presence * (counts[token] > 0)
        logits[token] = value
    return logits


@dataclasses.dataclass
class Run:
    tokens: list[int]
    logits: list[torch.Tensor]  # each step's raw (unpenalised) next-token logits
    margin: float  # the smallest lead of the chosen token's penalised logit over the runner-up's


class Oracle:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.prompt: list[int] = tokenizer(REPEATING_PROMPT)["input_ids"]
        self._runs: dict[tuple, Run] = {}

    def greedy(self, **penalties: float) -> Run:
        """PENALTY_STEPS greedy tokens after the prompt under `penalties` (presence, frequency,
        repetition), with transformers' own KV cache. Memoised: the tests share runs."""
        key = tuple(sorted(penalties.items()))
        if key in self._runs:
            return self._runs[key]
        run = Run([], [], float("inf"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one-token steps: threads only cost, a lot on a busy machine
        try:
            with torch.no_grad():
                step = self.model(input_ids=torch.tensor([self.prompt]), use_cache=True)
                for _ in range(PENALTY_STEPS):
                    raw = step.logits[0, -1].double()
                    logits = _penalised(raw, self.prompt, run.tokens, **penalties)
                    top = logits.topk(2).values
                    run.margin = min(run.margin, (top[0] - top[1]).item())
                    run.tokens.append(int(logits.argmax()))
                    run.logits.append(raw)
                    step = self.model(
                        input_ids=torch.tensor([run.tokens[-1:]]), cache=step.cache, use_cache=True
                    )
        finally:
            torch.set_num_threads(threads)
        self._runs[key] = run
        return run

    def departs(self, run: Run, **penalties: float) -> bool:
        """Whether greedy decoding under `penalties` clearly leaves `run`'s tokens: up to where it
        leaves, it sees the same logits, so it leaves at the first step where another token beats
        run's by more than MIN_MARGIN under these penalties (no forward pass needed)."""
        for step, raw in enumerate(run.logits):
            logits = _penalised(raw, self.prompt, run.tokens[:step], **penalties)
            if logits.max() - logits[run.tokens[step]] > MIN_MARGIN:
                return True
        return False

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def oracle(default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    return Oracle(model.eval(), AutoTokenizer.from_pretrained(default_model_dir))


# Each case: the request field, the oracle's arguments for it, and the mutants (what a mapping or
# sampler bug would apply instead; a swap gives each field the other's value or default). A swap
# of repetition with presence or frequency would give repetition their default 0: refused (400).
PENALTY_CASES = {
    "presence": (
        {"presence_penalty": 1.4}, dict(presence=1.4),
        {"ignored": {}, "swapped with frequency": dict(frequency=1.4),
         "swapped with repetition": dict(presence=1.0, repetition=1.4)},
    ),
    "frequency": (
        {"frequency_penalty": 1.4}, dict(frequency=1.4),
        {"ignored": {}, "swapped with presence": dict(presence=1.4),
         "swapped with repetition": dict(frequency=1.0, repetition=1.4)},
    ),
    "repetition": (
        {"repetition_penalty": 1.1}, dict(repetition=1.1),
        {"ignored": {}, "applied as presence": dict(presence=1.1),
         "applied as frequency": dict(frequency=1.1)},
    ),
}  # fmt: skip


def _greedy_text(served: Served, prompt: list[int], **fields) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": PENALTY_STEPS, "temperature": 0,
            "ignore_eos": True, **fields}  # fmt: skip
    response = served.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_the_unpenalised_greedy_text_matches_the_oracle(served, oracle):
    """The baseline the penalty tests depart from: the prompt makes the model repeat itself."""
    base = oracle.greedy()
    assert base.margin > MIN_MARGIN, "the oracle's choice is near a tie"
    assert " the city" in oracle.text(base.tokens).split("years went by,")[1], "a repeat"
    assert _greedy_text(served, oracle.prompt) == oracle.text(base.tokens)


@pytest.mark.parametrize("name", list(PENALTY_CASES))
def test_each_penalty_changes_the_greedy_text_as_defined(served, oracle, name):
    """Greedy, through /v1/completions: the text under one penalty equals the oracle's. On the
    oracle: it differs from the unpenalised text, first where the unpenalised token is a repeat
    (one the penalty applies to), and the penalty ignored or swapped would give another text (so
    those mutants fail here)."""
    fields, penalty, mutants = PENALTY_CASES[name]
    base, expected = oracle.greedy(), oracle.greedy(**penalty)
    assert expected.margin > MIN_MARGIN, "the oracle's choice is near a tie"
    departs = next(i for i, (a, b) in enumerate(zip(base.tokens, expected.tokens)) if a != b)
    seen = base.tokens[:departs] + (oracle.prompt if name == "repetition" else [])
    assert base.tokens[departs] in seen, "only a token the penalty applies to is displaced"
    for mutant, args in mutants.items():
        assert oracle.departs(expected, **args), f"cannot tell '{mutant}' apart"
    assert _greedy_text(served, oracle.prompt, **fields) == oracle.text(expected.tokens)
