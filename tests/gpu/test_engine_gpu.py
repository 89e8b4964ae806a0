"""The engine end to end on CUDA: the default model through `LLM(device="cuda")`, its Engram
tables in each tier, gives Hugging Face transformers' greedy tokens on the same GPU; and
`engram-serve serve --device cuda` answers a request.

The default model's Engram is an identity retrofit (its value path starts at zero), so every
tier must give the backbone's own tokens, and transformers reading the packaged GGUF is that
backbone (tests/test_default_model.py proves the weights equal on CPU).
"""

from __future__ import annotations

import httpx
import pytest
import torch
from test_server_support import MODEL, ServeProcess

from engram_serve import LLM, SamplingParams
from engram_serve.model.default_model import packaged_gguf_path

pytestmark = pytest.mark.gpu

NEW_TOKENS = 24
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Give me three tips for staying healthy.",
    "Translate to French: I love programming",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
)
TIERS = {
    "device": {},
    "host + hbm cache": {"engram_tier": "host", "engram_cache_rows": 4096},
    "disk + hbm cache": {"engram_tier": "disk", "engram_cache_rows": 4096},
}


@pytest.fixture(scope="module")
def hf_model():
    """transformers' own loading of the packaged GGUF, on the GPU in float32 (the engine's
    default dtype)."""
    from transformers import AutoModelForCausalLM

    path = packaged_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.to("cuda").eval()


def hf_greedy_agrees(model, prompt: list[int], tokens: list[int]) -> bool:
    """Whether `tokens` are transformers' greedy continuation of `prompt`: each the argmax of
    its logits at the position before, in one forward over the whole sequence."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + tokens], device="cuda")).logits[0]
    return logits[len(prompt) - 1 : -1].argmax(-1).tolist() == tokens


@pytest.mark.parametrize("tier", list(TIERS))
def test_greedy_tokens_equal_transformers_on_the_same_gpu(default_model_dir, hf_model, tier):
    llm = LLM(device="cuda", **TIERS[tier])
    try:
        tokenizer = llm.get_tokenizer()
        prompts = [tokenizer.encode(p) for p in PROMPTS]
        greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outputs = llm.generate(prompts, greedy)
    finally:
        llm.engine.close()
    tokens = [out.outputs[0].token_ids for out in outputs]
    assert all(len(t) == NEW_TOKENS for t in tokens)
    agree = [hf_greedy_agrees(hf_model, p, t) for p, t in zip(prompts, tokens, strict=True)]
    # Two float32 implementations on one GPU sum in different orders: allow one near-tie.
    assert sum(agree) >= len(PROMPTS) - 1, agree


def test_serve_answers_a_completion_on_cuda(default_model_dir, tmp_path):
    server = ServeProcess(tmp_path, ["--device", "cuda"])
    try:
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, (response.text, server.log())
        answer = response.json()
        assert answer["usage"]["completion_tokens"] == 8
        assert answer["choices"][0]["text"].strip()
    finally:
        server.stop()
