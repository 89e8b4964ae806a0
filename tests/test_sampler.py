"""Sampling on tensors: penalties, min_tokens masking and truncation, checked element by element
against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from engram_serve.engine.request import Request, SamplingParams
from engram_serve.engine.sampler import (
    SamplingBatch,
    apply_penalties,
    apply_top_k_top_p,
    sample,
)


def _request(prompt, output, **sampling) -> Request:
    r = Request(
        "r", list(prompt), SamplingParams(**sampling), eos_token_ids=(0,), max_total_len=100
    )
    r.output_token_ids = list(output)
    r.generator = torch.Generator().manual_seed(0)
    return r


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    r = _request(
        [1], [2, 2, 3], repetition_penalty=1.5, presence_penalty=0.25, frequency_penalty=0.5
    )
    got = apply_penalties(logits.clone(), SamplingBatch.build([r], 5))[0].tolist()
    counts = {2: 2, 3: 1}
    for token, value in enumerate(logits[0].tolist()):
        if token in (1, 2, 3):  # seen in the prompt or the output: repetition penalty
            value = value / 1.5 if value > 0 else value * 1.5
        value -= 0.5 * counts.get(token, 0) + 0.25 * (token in counts)
        assert got[token] == pytest.approx(value)


def test_min_tokens_masks_eos_and_stop_tokens_only_below_the_minimum():
    logits = torch.zeros(1, 6)
    logits[0, 0], logits[0, 5] = 10.0, 9.0  # EOS (id 0), then the stop token, would win
    early = _request([1], [4], min_tokens=3, stop_token_ids=[5], temperature=0.0)
    late = _request([1], [4, 4, 4], min_tokens=3, stop_token_ids=[5], temperature=0.0)
    assert sample(logits.clone(), [early]).token_ids[0] not in (0, 5)
    assert sample(logits.clone(), [late]).token_ids == [0]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))

    def kept(**kw):
        batch = SamplingBatch.build([_request([1], [], **kw)], 5)
        return torch.isfinite(apply_top_k_top_p(logits, batch))[0]

    assert kept(top_k=2).tolist() == [True, True, False, False, False]
    # top-p keeps the smallest prefix whose mass reaches p: 0.5 + 0.2 = 0.7 >= 0.6
    assert kept(top_p=0.6).tolist() == [True, True, False, False, False]
    assert kept(top_p=0.71).tolist() == [True, True, True, False, False]
    assert kept(top_k=3, top_p=0.5).tolist() == [True, False, False, False, False]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    r = _request([1], [], temperature=1.0, seed=1)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(probs.log()[None], [r]).token_ids[0]] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    r = _request([1], [], temperature=0.0, logprobs=2)
    out = sample(logits, [r])
    entry = out.logprobs[0]
    expected = torch.log_softmax(logits[0], -1)
    assert out.token_ids == [1] and entry[1].rank == 1
    assert set(entry) == {1, 0}  # the sampled token plus the top 2 (which include it)
    for token, lp in entry.items():
        assert math.isclose(lp.logprob, expected[token].item(), rel_tol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=2), "min_p"), (dict(max_tokens=0), "max_tokens"), (dict(logprobs=21), "logprobs"),
    (dict(n=0), "n must"), (dict(stop=[""]), "stop strings"),
    (dict(stop=["x"] * 65), "at most 64 stop strings"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])  # fmt: skip
def test_invalid_sampling_params_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_extreme_penalties_and_banned_tokens_give_finite_logprobs():
    logits = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    r = _request([0, 1], [1], repetition_penalty=5e-324, min_tokens=5, logprobs=4, temperature=0.0)
    out = sample(logits, [r])
    values = [lp.logprob for lp in out.logprobs[0].values()]
    assert all(math.isfinite(v) and v <= 0 for v in values), values
    assert out.token_ids[0] != 0  # EOS (id 0) is banned below min_tokens
