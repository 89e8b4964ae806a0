"""Sampling on tensors: one row of logits per request that samples this step.

Order: penalties -> min_tokens mask -> (logprobs of the raw logits) -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> a draw from the request's own generator. Each request
draws its noise from its own seeded generator, so a seeded request samples the same tokens
whether it runs alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engram_serve.engine.request import Logprob, Request

# Logprobs of impossible tokens are reported as this finite floor (JSON has no -inf), as vLLM does.
MIN_LOGPROB = -9999.0
_FLOAT_MAX = torch.finfo(torch.float32).max / 4  # headroom: softmax sums stay finite


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]  # per request; None where not asked for


def sample(logits: torch.Tensor, requests: list[Request]) -> SampleOutput:
    """logits [S, V] float32, one row per request in `requests`."""
    logits = logits.float()
    if any(r.sampling.has_penalties for r in requests):
        # Extreme penalties can overflow a logit; keep every value a number.
        logits = apply_penalties(logits, requests).nan_to_num(posinf=_FLOAT_MAX, neginf=-_FLOAT_MAX)
    logits = mask_stop_tokens_before_min(logits, requests)
    raw_logprobs = (
        torch.log_softmax(logits, dim=-1).nan_to_num(nan=MIN_LOGPROB).clamp(min=MIN_LOGPROB)
        if any(r.sampling.logprobs is not None for r in requests)
        else None
    )
    token_ids = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(requests) if not r.sampling.is_greedy]
    if random_rows:
        rows = torch.tensor(random_rows)
        token_ids[rows] = sample_random(logits[rows], [requests[i] for i in random_rows])
    tokens = token_ids.tolist()
    logprobs = [
        None if r.sampling.logprobs is None else top_logprobs(raw_logprobs[i], tokens[i], r)
        for i, r in enumerate(requests)
    ]
    return SampleOutput(tokens, logprobs)


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Repetition penalty on every token seen (prompt and output), as vLLM does; presence and
    frequency penalties on output tokens only."""
    num_seqs, vocab = logits.shape
    counts = torch.zeros(num_seqs, vocab)
    seen = torch.zeros(num_seqs, vocab, dtype=torch.bool)
    for i, r in enumerate(requests):
        out = torch.tensor(r.output_token_ids, dtype=torch.long)
        counts[i].index_add_(0, out, torch.ones(len(out)))
        seen[i, torch.tensor(r.prompt_token_ids, dtype=torch.long)] = True
    seen |= counts > 0
    rep = torch.tensor([r.sampling.repetition_penalty for r in requests])[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    freq = torch.tensor([r.sampling.frequency_penalty for r in requests])[:, None]
    pres = torch.tensor([r.sampling.presence_penalty for r in requests])[:, None]
    return logits - freq * counts - pres * (counts > 0).float()


def mask_stop_tokens_before_min(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Below min_tokens, neither EOS nor a stop token may be sampled."""
    for i, r in enumerate(requests):
        if r.num_output_tokens < r.sampling.min_tokens:
            banned = list(r.sampling.stop_token_ids)
            if not r.sampling.ignore_eos:
                banned += list(r.eos_token_ids)
            if banned:
                logits[i, banned] = float("-inf")
    return logits


def sample_random(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """logits [S, V] -> token ids [S]: temperature, top-k, top-p, min-p, then an exponential race
    (argmax of p / Exp(1) noise is a draw from p) with each request's own generator."""
    temperature = torch.tensor([r.sampling.temperature for r in requests])[:, None]
    logits = logits / temperature
    logits = apply_top_k_top_p(logits, requests)
    probs = torch.softmax(logits, dim=-1)
    min_p = torch.tensor([r.sampling.min_p for r in requests])[:, None]
    if (min_p > 0).any():
        probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
    noise = torch.stack(
        [torch.empty(probs.shape[1]).exponential_(generator=r.generator) for r in requests]
    )
    return (probs / noise).argmax(dim=-1)


def apply_top_k_top_p(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    top_k = torch.tensor([r.sampling.top_k or logits.shape[1] for r in requests])
    top_p = torch.tensor([r.sampling.top_p for r in requests])
    if (top_k >= logits.shape[1]).all() and (top_p >= 1.0).all():
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1])[None, :]
    drop = ranks >= top_k[:, None]
    # top-p keeps the smallest prefix whose mass reaches p (the token crossing p stays).
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def top_logprobs(logprobs: torch.Tensor, token_id: int, request: Request) -> dict[int, Logprob]:
    """The sampled token's logprob and rank, plus the top-k alternatives."""
    chosen = logprobs[token_id].item()
    rank = int((logprobs > chosen).sum().item()) + 1
    out = {token_id: Logprob(chosen, rank)}
    k = request.sampling.logprobs
    if k:
        values, ids = logprobs.topk(k)
        for position, (tid, value) in enumerate(zip(ids.tolist(), values.tolist())):
            out.setdefault(tid, Logprob(value, position + 1))
    return out
