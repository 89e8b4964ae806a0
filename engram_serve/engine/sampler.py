"""Sampling on tensors: one row of logits per request that samples this step.

Order: grammar bitmask (structured outputs) -> penalties -> min_tokens mask -> (logprobs of the
raw logits) -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> a draw from the
request's own generator. Each request draws its noise from its own seeded generator, so a seeded
request samples the same tokens whether it runs alone or in any batch.

Device discipline (CUDA): the requests' parameters are gathered on the host and reach the device
in one upload per dtype (engine/uploads.py); the grammar bitmask too is filled on the host
(engine/structured.py) and goes up in one upload, only in a step with a constrained request;
which steps run is decided on the host from the parameters, never by reading a device value; the
sampled ids, with every logprob asked for, come back in one download: the step's only
synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engram_serve.device import CpuRuntime, DeviceRuntime
from engram_serve.engine.request import Logprob, Request
from engram_serve.engine.structured import apply_token_bitmask, grammar_bitmask
from engram_serve.offload.uploads import Uploader

# Logprobs of impossible tokens are reported as this finite floor (JSON has no -inf), as vLLM does.
MIN_LOGPROB = -9999.0
_FLOAT_MAX = torch.finfo(torch.float32).max  # what a penalised logit that overflowed becomes


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]  # per request; None where not asked for


@dataclass
class SamplingBatch:
    """One step's sampling parameters on the device, with the host's knowledge of which steps
    apply. Rows follow `requests`; `random_*` rows follow `random_rows` (the non-greedy ones)."""

    requests: list[Request]
    generators: list  # [R] the random rows' own generators
    random_rows: torch.Tensor  # [R] int64
    temperature: torch.Tensor  # [R]
    top_k: torch.Tensor  # [R] int64, vocab size where off
    top_p: torch.Tensor  # [R]
    min_p: torch.Tensor  # [R]
    penalties: torch.Tensor  # [S, 3]: repetition, frequency, presence
    output_tokens: torch.Tensor  # [2, n] (row, token) of every output token (penalties on)
    prompt_tokens: torch.Tensor  # [2, m] (row, token) of every prompt token (penalties on)
    banned: torch.Tensor  # [2, b] (row, token) not to sample yet (min_tokens)
    has_penalties: bool
    truncates: bool  # some random row has top-k or top-p
    has_min_p: bool
    max_logprobs: int | None  # the largest k asked for; None: no logprobs
    bitmask: torch.Tensor | None  # [S, ceil(V/32)] int32 the grammars allow; None: no grammar
    constrained_rows: list[int]  # rows with a grammar

    @classmethod
    def build(
        cls,
        requests: list[Request],
        vocab_size: int,
        uploads: tuple[Uploader, Uploader, Uploader] | None = None,
    ) -> SamplingBatch:
        """`uploads`: (float32, int64, int32) uploaders of the device; None: CPU tensors."""
        floats, ints, words = uploads or tuple(
            Uploader(CpuRuntime(), dtype) for dtype in (np.float32, np.int64, np.int32)
        )
        params = [r.sampling for r in requests]
        random = [i for i, p in enumerate(params) if not p.is_greedy]
        rand = [params[i] for i in random]
        has_penalties = any(p.has_penalties for p in params)
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        temperature, top_p, min_p, penalties = floats.upload([
            np.array([p.temperature for p in rand], np.float32),
            np.array([p.top_p for p in rand], np.float32),
            np.array([p.min_p for p in rand], np.float32),
            np.array([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty]
                      for p in params], np.float32).reshape(len(params), 3),
        ])  # fmt: skip
        random_rows, top_k, output_tokens, prompt_tokens, banned = ints.upload([
            np.array(random, np.int64),
            np.array([p.top_k or vocab_size for p in rand], np.int64),
            _pairs([r.output_token_ids if r.sampling.has_penalties else () for r in requests]),
            _pairs([r.prompt_token_ids if r.sampling.has_penalties else () for r in requests]),
            _pairs([_banned(r) for r in requests]),
        ])  # fmt: skip
        constrained = [i for i, r in enumerate(requests) if r.grammar is not None]
        bitmask = None
        if constrained:  # a batch without a grammar makes no bitmask
            (bitmask,) = words.upload([grammar_bitmask(requests, constrained, vocab_size)])
        return cls(
            requests, [requests[i].generator for i in random], random_rows, temperature,
            top_k, top_p, min_p, penalties, output_tokens, prompt_tokens, banned, has_penalties,
            truncates=any(p.top_p < 1.0 or 0 < p.top_k < vocab_size for p in rand),
            has_min_p=any(p.min_p > 0 for p in rand),
            max_logprobs=max(logprobs) if logprobs else None,
            bitmask=bitmask,
            constrained_rows=constrained,
        )  # fmt: skip


def _banned(request: Request) -> tuple[int, ...]:
    """Below min_tokens, neither EOS nor a stop token may be sampled."""
    if request.num_output_tokens >= request.sampling.min_tokens:
        return ()
    banned = request.sampling.stop_token_ids
    return banned if request.sampling.ignore_eos else banned + tuple(request.eos_token_ids)


def _pairs(tokens_per_row: list) -> np.ndarray:
    """[2, n] int64: (row, token) of every token of every row."""
    rows = [np.full(len(t), i, np.int64) for i, t in enumerate(tokens_per_row)]
    cols = [np.asarray(t, np.int64) for t in tokens_per_row]
    if not rows:
        return np.zeros((2, 0), np.int64)
    return np.stack([np.concatenate(rows), np.concatenate(cols)])


class Sampler:
    """Samples on one device; `sample(logits, requests)` -> token ids (and logprobs) on the
    host."""

    def __init__(self, runtime: DeviceRuntime) -> None:
        self.runtime = runtime
        self.uploads = tuple(Uploader(runtime, t) for t in (np.float32, np.int64, np.int32))

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleOutput:
        """logits [S, V], one row per request in `requests`."""
        for uploader in self.uploads:
            uploader.next_step()
        batch = SamplingBatch.build(requests, logits.shape[1], self.uploads)
        token_ids, logprobs = sample_on_device(logits, batch, self.runtime)
        return self._to_host(token_ids, logprobs, batch)

    def _to_host(
        self, token_ids: torch.Tensor, logprobs: torch.Tensor | None, batch: SamplingBatch
    ) -> SampleOutput:
        """One download: ids, and where asked for each row's [chosen, rank, top-k values, top-k
        ids] as float64 (token ids below 2**53 are exact)."""
        if logprobs is None:
            return SampleOutput(self.runtime.download(token_ids).tolist(),
                                [None] * len(batch.requests))  # fmt: skip
        host = self.runtime.download(torch.cat((token_ids.double()[:, None], logprobs), 1))
        tokens = host[:, 0].astype(np.int64).tolist()
        k = batch.max_logprobs
        out = []
        for row, (request, token) in zip(host, zip(batch.requests, tokens)):
            asked = request.sampling.logprobs
            if asked is None:
                out.append(None)
                continue
            entry = {token: Logprob(float(row[1]), int(row[2]))}
            values, ids = row[3 : 3 + k], row[3 + k : 3 + 2 * k].astype(np.int64)
            for position in range(asked):
                entry.setdefault(int(ids[position]), Logprob(float(values[position]), position + 1))
            out.append(entry)
        return SampleOutput(tokens, out)

    def close(self) -> None:
        for uploader in self.uploads:
            uploader.close()


def sample(logits: torch.Tensor, requests: list[Request]) -> SampleOutput:
    """Sample on the CPU (tests and offline use)."""
    return Sampler(CpuRuntime()).sample(logits, requests)


def sample_on_device(
    logits: torch.Tensor, batch: SamplingBatch, runtime: DeviceRuntime
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> token ids [S] int64 and, if any request asked, logprob rows [S, 2 + 2k] float64
    (chosen, rank, top-k values, top-k ids), all on the device."""
    logits = logits.float()
    if batch.bitmask is not None:  # first: nothing after it can make a forbidden token likely
        logits = apply_token_bitmask(logits, batch.bitmask, batch.constrained_rows)
    if batch.has_penalties:
        # Extreme penalties can overflow a logit; keep every value a number.
        logits = apply_penalties(logits, batch).nan_to_num(posinf=_FLOAT_MAX, neginf=-_FLOAT_MAX)
    if batch.banned.shape[1]:
        rows, tokens = batch.banned
        logits = logits.index_put((rows, tokens), logits.new_full((), float("-inf")))
    token_ids = logits.argmax(dim=-1)
    if batch.random_rows.shape[0]:
        rows = batch.random_rows
        drawn = sample_random(logits.index_select(0, rows), batch, runtime)
        token_ids = token_ids.index_copy(0, rows, drawn)
    if batch.max_logprobs is None:
        return token_ids, None
    return token_ids, logprob_rows(logits, token_ids, batch.max_logprobs)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty on every token seen (prompt and output), as vLLM does; presence and
    frequency penalties on output tokens only."""
    out_rows, out_tokens = batch.output_tokens
    counts = torch.zeros_like(logits).index_put_(
        (out_rows, out_tokens), logits.new_ones(()), accumulate=True
    )
    prompt_rows, prompt_tokens = batch.prompt_tokens
    seen = (counts > 0).index_put_(
        (prompt_rows, prompt_tokens), counts.new_ones((), dtype=torch.bool)
    )
    rep, freq, pres = batch.penalties.unbind(1)  # [S] each
    penalised = torch.where(logits > 0, logits / rep[:, None], logits * rep[:, None])
    logits = torch.where(seen, penalised, logits)
    return logits - freq[:, None] * counts - pres[:, None] * (counts > 0).float()


def sample_random(
    logits: torch.Tensor, batch: SamplingBatch, runtime: DeviceRuntime
) -> torch.Tensor:
    """logits [R, V] -> token ids [R]: temperature, top-k, top-p, min-p, then an exponential race
    (argmax of p / Exp(1) noise is a draw from p) with each request's own generator."""
    # Less the row's largest first: a penalised logit may be as large as float32 allows, and
    # dividing that by a temperature below 1 would overflow to inf (and the row's softmax to NaN).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / batch.temperature[:, None]
    if batch.truncates:
        logits = apply_top_k_top_p(logits, batch)
    probs = torch.softmax(logits, dim=-1)
    if batch.has_min_p:
        floor = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs < floor, 0.0, probs)
    noise = runtime.exponential(probs.shape[1], batch.generators)  # [R, V]
    return (probs / noise).argmax(dim=-1)


def apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [R, V] of the random rows; top-p keeps the smallest prefix whose mass reaches p
    (the token crossing p stays). A row with top-p 1 keeps every token top-k keeps: its float32
    cumulative mass can reach 1 before the last tokens, which must not drop them."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
    drop = ranks >= batch.top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = batch.top_p[:, None]
    drop |= (mass_before >= top_p) & (top_p < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def logprob_rows(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> torch.Tensor:
    """[S, 2 + 2k] float64: the sampled token's logprob of the raw (penalised) logits, its rank,
    then the top k logprobs and their ids."""
    logprobs = torch.log_softmax(logits, dim=-1).nan_to_num(nan=MIN_LOGPROB).clamp(min=MIN_LOGPROB)
    chosen = logprobs.gather(1, token_ids[:, None])  # [S, 1]
    rank = (logprobs > chosen).sum(dim=1, keepdim=True) + 1
    values, ids = logprobs.topk(k, dim=-1)
    return torch.cat((chosen.double(), rank.double(), values.double(), ids.double()), 1)
