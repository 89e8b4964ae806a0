"""Sampling on tensors: penalties, min_tokens masking and truncation, checked element by element
against their definitions; the distributions `sample` draws from (temperature, top-k, top-p, min-p,
penalties), checked by their frequencies against targets computed here from the definitions; and
seeded generators (the same seed, alone or in any batch, gives the same tokens)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from engram_serve.device import CpuRuntime
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


def test_ignore_eos_leaves_eos_free_below_min_tokens_but_not_the_stop_tokens():
    logits = torch.zeros(1, 6)
    logits[0, 5], logits[0, 0] = 10.0, 9.0  # the stop token, then EOS (id 0), would win
    r = _request([1], [4], min_tokens=3, stop_token_ids=[5], ignore_eos=True, temperature=0.0)
    assert sample(logits, [r]).token_ids == [0]


def test_top_k_keeps_exactly_the_k_largest_in_every_row():
    """Against a per-row sort, for every k from 1 to past the vocabulary, top-p left at 1 (in
    float32 the kept tokens' mass can sum to just under 1, so top-p cannot stand in for top-k)."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 50, generator=generator) * 3
    requests = [_request([1], [], top_k=k) for k in range(1, 65)]
    kept = torch.isfinite(apply_top_k_top_p(logits, SamplingBatch.build(requests, 50)))
    for row, k in enumerate(range(1, 65)):
        want = sorted(range(50), key=lambda t: -logits[row, t].item())[: min(k, 50)]
        assert kept[row].nonzero().flatten().tolist() == sorted(want), k


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
    # Mass that reaches p exactly (four equal tokens, 0.25 each, exact in float32) is enough.
    uniform = torch.zeros(1, 4)
    for top_p, count in ((0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)):
        batch = SamplingBatch.build([_request([1], [], top_p=top_p)], 4)
        assert torch.isfinite(apply_top_k_top_p(uniform, batch)).sum().item() == count, top_p


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
        assert lp.rank == 1 + int((expected > expected[token]).sum())


def test_logprobs_come_back_per_row_in_a_batch_where_some_rows_ask_for_none():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 1.5, 0.0], [2.0, 0.0, 0.1, 0.2]])
    requests = [
        _request([1], [], temperature=0.0),
        _request([1], [], temperature=0.0, logprobs=1),
        _request([1], [], temperature=0.0),
    ]
    out = sample(logits, requests)
    assert out.token_ids == [1, 2, 0]
    assert out.logprobs[0] is None and out.logprobs[2] is None
    expected = torch.log_softmax(logits[1], -1)[2].item()
    assert set(out.logprobs[1]) == {2} and math.isclose(out.logprobs[1][2].logprob, expected)


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


def test_a_penalised_logit_that_overflows_is_still_drawn_at_a_low_temperature():
    """Repetition 5e-324 is 0 in float32: token 2's logit 3.0 / 0 overflows, and at temperature
    0.01 it must still be (all but surely) the token drawn, whatever the seed."""
    logits = torch.tensor([[0.5, 1.0, 3.0, -1.0]])
    for seed in range(8):
        r = _request([2], [], repetition_penalty=5e-324, temperature=0.01, seed=seed)
        r.generator = CpuRuntime().generator(seed)
        assert sample(logits.clone(), [r]).token_ids == [2], seed


# -- distributions ----------------------------------------------------------------------------
#
# Each case is sampled DRAWS times in one `sample` call on a batch of DRAWS identical requests,
# each with its own generator seeded as the engine seeds one (CpuRuntime.generator), all seeds
# distinct, so the draws are independent. All cases share that one batch, their rows interleaved
# with each other and with greedy rows, so each row must get its own parameters.
#
# The bound: token i's frequency f_i is compared with its target probability p_i (computed by
# `_target` below from the definitions, element by element). By Hoeffding's inequality,
# P(|f_i - p_i| >= t) <= 2 exp(-2 DRAWS t^2) = CELL_ALPHA for t = TOLERANCE (~0.023 at 20,000
# draws). The module checks 11 cases x 8 tokens = 88 cells, so by Bonferroni a correct sampler
# fails by chance with probability < 88 * CELL_ALPHA < 1e-7 (over the choice of seeds; with the
# seeds fixed here the test is deterministic: it cannot flake).
#
# The power: each case lists the mutants it is meant to kill (a sampler that ignores the
# temperature, min_p, top_k, top_p or a penalty, or swaps presence and frequency) as the parameters
# that sampler would in effect use, and asserts that the mutant's distribution q differs from p by
# d >= 3 t in some token i. Such a mutant passes only if |f_i - q_i| >= d - t >= 2 t, which happens
# with probability <= 2 exp(-2 DRAWS (2 t)^2) = 2 (CELL_ALPHA / 2)^4 < 1e-36.

DRAWS = 20_000
CELL_ALPHA = 1e-9
TOLERANCE = math.sqrt(math.log(2 / CELL_ALPHA) / (2 * DRAWS))
LOGITS = (2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -2.5)
GREEDY_EVERY = 97  # a greedy row after every 97th draw of each case


@dataclass(frozen=True)
class Case:
    """Sampling parameters, the mutants they must tell apart (the parameters a broken sampler would
    in effect use), and the request's prompt and output tokens (for penalties)."""

    params: dict
    mutants: dict
    prompt: tuple[int, ...] = ()
    output: tuple[int, ...] = ()
    logits: tuple[float, ...] = field(default=LOGITS)


IGNORES_TEMPERATURE = {"temperature ignored (always 1.0)": dict(temperature=1.0)}
CASES = {
    "temperature 0.5": Case(dict(temperature=0.5), IGNORES_TEMPERATURE),
    "temperature 1.5": Case(dict(temperature=1.5), IGNORES_TEMPERATURE),
    "min_p 0.3 at temperature 0.8": Case(
        dict(temperature=0.8, min_p=0.3), {"min_p ignored": dict(min_p=0.0)}
    ),
    "top_k 3 at temperature 1.5": Case(
        dict(temperature=1.5, top_k=3), {"top_k ignored": dict(top_k=0)}
    ),
    # The token that crosses p stays: 0.43 + 0.29 >= 0.6 keeps tokens 0 and 1.
    "top_p 0.6": Case(dict(top_p=0.6), {"top_p ignored": dict(top_p=1.0)}),
    # Both bind: top-p runs on the top-k renormalised distribution.
    "top_k 4 then top_p 0.75 at temperature 1.5": Case(
        dict(temperature=1.5, top_k=4, top_p=0.75),
        {"top_k ignored": dict(top_k=0), "top_p ignored": dict(top_p=1.0)},
    ),
    "top_k 6, top_p 0.9, min_p 0.5 at temperature 1.5": Case(
        dict(temperature=1.5, top_k=6, top_p=0.9, min_p=0.5), {"min_p ignored": dict(min_p=0.0)}
    ),
    # Token 0 (positive logit) and token 6 (negative) are in the prompt, 1 and 2 in the output.
    "repetition 1.5 at temperature 0.7": Case(
        dict(temperature=0.7, repetition_penalty=1.5),
        {"repetition ignored": dict(repetition_penalty=1.0)},
        prompt=(0, 6), output=(1, 1, 1, 2),
    ),
    "presence 0.8": Case(
        dict(presence_penalty=0.8),
        {"presence ignored": dict(presence_penalty=0.0),
         "presence applied as frequency": dict(presence_penalty=0.0, frequency_penalty=0.8)},
        prompt=(0, 6), output=(1, 1, 1, 2),
    ),
    "frequency 0.5": Case(
        dict(frequency_penalty=0.5),
        {"frequency ignored": dict(frequency_penalty=0.0),
         "frequency applied as presence": dict(presence_penalty=0.5, frequency_penalty=0.0)},
        prompt=(0, 6), output=(1, 1, 1, 2),
    ),
    "all penalties at temperature 0.7": Case(
        dict(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5,
             frequency_penalty=0.2),
        {"repetition ignored": dict(repetition_penalty=1.0),
         "presence ignored": dict(presence_penalty=0.0),
         "frequency ignored": dict(frequency_penalty=0.0)},
        prompt=(5, 6), output=(0, 0, 0, 2),
    ),
}  # fmt: skip


def _target(case: Case, **overrides) -> list[float]:
    """The distribution to sample from, by the definitions, one element at a time: penalties
    (repetition on every token seen, prompt or output: logit / r if positive, else logit * r;
    then - frequency * count - presence * [count > 0] over output tokens), softmax(logits / T),
    keep the k most likely, then the smallest most-likely-first prefix whose mass reaches top_p
    (the token that crosses it stays), then the tokens whose probability is at least
    min_p * the largest; renormalised after each step."""
    p = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
         "frequency_penalty": 0.0, "presence_penalty": 0.0, **case.params, **overrides}  # fmt: skip
    counts = Counter(case.output)
    values = []
    for token, value in enumerate(case.logits):
        if token in case.prompt or counts[token]:
            rep = p["repetition_penalty"]
            value = value / rep if value > 0 else value * rep
        value -= p["frequency_penalty"] * counts[token] + p["presence_penalty"] * (
            counts[token] > 0
        )
        values.append(value / p["temperature"])

    def normalised(weights: dict[int, float]) -> dict[int, float]:
        total = sum(weights.values())
        return {token: w / total for token, w in weights.items()}

    probs = normalised({t: math.exp(v - max(values)) for t, v in enumerate(values)})
    order = sorted(probs, key=lambda t: -probs[t])
    if p["top_k"]:
        probs = normalised({t: probs[t] for t in order[: p["top_k"]]})
    kept, mass_before = {}, 0.0
    for token in order:
        if token in probs and mass_before < p["top_p"]:
            kept[token] = probs[token]
            mass_before += probs[token]
    probs = normalised(kept)
    largest = max(probs.values())
    probs = normalised({t: q for t, q in probs.items() if q >= p["min_p"] * largest})
    return [probs.get(token, 0.0) for token in range(len(case.logits))]


def _seeded_request(request_id: str, params, seed: int, prompt=(), output=()) -> Request:
    """A request as the engine makes one: its generator from CpuRuntime.generator(seed).
    `params`: SamplingParams, or a dict of its fields."""
    sampling = params if isinstance(params, SamplingParams) else SamplingParams(**params)
    request = Request(request_id, list(prompt) or [7], sampling, max_total_len=1000)
    request.output_token_ids = list(output)
    request.generator = CpuRuntime().generator(seed)
    return request


@pytest.fixture(scope="module")
def draws() -> dict[str, list[int]]:
    """Every case's DRAWS tokens, and the greedy rows' tokens under "greedy", all from one
    `sample` call on one batch whose rows interleave the cases (and greedy rows)."""
    names = list(CASES)
    requests, rows, labels = [], [], []
    greedy_logits = tuple(reversed(LOGITS))  # argmax: token 7
    params = {name: SamplingParams(**CASES[name].params) for name in names}  # frozen: shared
    for i in range(DRAWS):
        for c, name in enumerate(names):
            case = CASES[name]
            seed = 1 + i * len(names) + c  # distinct for every request, below 2**32
            requests.append(
                _seeded_request(f"{name}-{i}", params[name], seed, case.prompt, case.output)
            )
            rows.append(case.logits)
            labels.append(name)
        if i % GREEDY_EVERY == 0:
            requests.append(_seeded_request(f"greedy-{i}", dict(temperature=0.0), seed=0))
            rows.append(greedy_logits)
            labels.append("greedy")
    tokens = sample(torch.tensor(rows), requests).token_ids
    out: dict[str, list[int]] = {}
    for label, token in zip(labels, tokens):
        out.setdefault(label, []).append(token)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_sampling_draws_from_the_target_distribution(name, draws):
    """The frequencies of DRAWS draws are within TOLERANCE of the target distribution in every
    token (false failure < 1e-7 for the module), and the case tells its mutants apart (each is at
    least 3 x TOLERANCE away in some token: it passes with probability < 1e-36)."""
    assert len(CASES) * len(LOGITS) * CELL_ALPHA < 1e-7, "the stated false-failure bound"
    case = CASES[name]
    target = _target(case)
    for mutant, overrides in case.mutants.items():
        other = _target(case, **overrides)
        distance = max(abs(a - b) for a, b in zip(target, other))
        assert distance >= 3 * TOLERANCE, f"{name} cannot tell '{mutant}' apart ({distance:.3f})"
    counts = Counter(draws[name])
    assert sum(counts.values()) == DRAWS
    frequencies = [counts[token] / DRAWS for token in range(len(case.logits))]
    for token, (f, p) in enumerate(zip(frequencies, target)):
        assert abs(f - p) < TOLERANCE, (
            f"{name}: token {token} drawn with frequency {f:.4f}, target {p:.4f} "
            f"(tolerance {TOLERANCE:.4f}); frequencies {[round(x, 4) for x in frequencies]}, "
            f"target {[round(x, 4) for x in target]}"
        )
        if p == 0.0:
            assert counts[token] == 0, f"{name}: token {token} is filtered out but was drawn"


def test_greedy_rows_in_a_sampled_batch_take_the_argmax(draws):
    assert draws["greedy"] and set(draws["greedy"]) == {len(LOGITS) - 1}


# -- seeds ------------------------------------------------------------------------------------

SEED_STEPS = 40
SEED_VOCAB = 16


def _seed_logits(step: int) -> torch.Tensor:
    """A fixed, nearly flat row per step (so that different generators rarely agree)."""
    return torch.randn(SEED_VOCAB, generator=torch.Generator().manual_seed(10_000 + step)) * 0.3


def _seeded_run(seed: int, companions) -> list[int]:
    """SEED_STEPS tokens of a request seeded `seed`; at each step `companions(step)` gives the
    other requests of the batch, as (position of ours, [(params, seed), ...])."""
    ours = _seeded_request("ours", dict(temperature=1.0), seed)
    tokens = []
    for step in range(SEED_STEPS):
        position, mates = companions(step)
        batch = [_seeded_request(f"o{j}", params, s) for j, (params, s) in enumerate(mates)]
        batch.insert(position, ours)
        logits = torch.randn(len(batch), SEED_VOCAB, generator=torch.Generator().manual_seed(step))
        logits[position] = _seed_logits(step)
        tokens.append(sample(logits, batch).token_ids[position])
    return tokens


def _alone(step: int):
    return 0, []


def _in_changing_batches(step: int):
    """Batches of changing size and order, with greedy rows, other seeds, top-k / top-p / min-p
    rows (which switch the batch-wide truncation and min-p steps on for our row too) and
    penalties."""
    mates = [
        (dict(temperature=0.0), 0),
        (dict(temperature=0.7, top_k=3), 5 + step),
        (dict(temperature=1.2, top_p=0.5, min_p=0.2), 99),
        (dict(temperature=1.0, presence_penalty=1.0), 7),
    ][: 1 + step % 4]
    return step % (len(mates) + 1), mates


def test_a_seed_gives_the_same_tokens_alone_or_in_any_batch():
    alone = _seeded_run(1234, _alone)
    assert _seeded_run(1234, _alone) == alone, "the same seed, run again"
    assert _seeded_run(1234, _in_changing_batches) == alone, "the same seed, in batches"
    assert len(set(alone)) > 4, "the draws vary (a flat distribution over 16 tokens)"


def test_different_seeds_give_different_tokens():
    runs = [tuple(_seeded_run(seed, _alone)) for seed in (1234, 1235, 0, 2**31 + 7)]
    assert len(set(runs)) == len(runs)


def test_seeds_that_differ_only_above_bit_31_give_different_tokens():
    """torch's CPU generator keeps a seed's low 32 bits; the engine's mixes the high ones in."""
    assert _seeded_run(5, _alone) != _seeded_run(5 + 2**32, _alone)
