"""The engine: one `step()` moves every unfinished request forward.

    schedule -> hash -> prefetch -> forward -> sample -> postprocess

Engram row ids depend only on token ids, so they are computed before the forward pass and every
Engram layer's rows are requested at once; the model waits for a layer's rows only inside that
layer.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from engram_serve.config import EngineConfig, ModelConfig
from engram_serve.device import DeviceRuntime, get_runtime
from engram_serve.engine.kv_cache import BlockManager, allocate_cache, kv_bytes_per_block
from engram_serve.engine.output import OutputTracker
from engram_serve.engine.request import Request, RequestOutput, SamplingParams
from engram_serve.engine.sampler import SampleOutput, Sampler
from engram_serve.engine.scheduler import QueueFullError, ScheduledBatch, Scheduler
from engram_serve.engine.structured import GrammarCompiler, advance
from engram_serve.engine.tokenizer import Tokenizer
from engram_serve.engram.ngram_hash import NgramHasher
from engram_serve.model.batch import AttentionMetadata, ForwardBatch, RowHandle
from engram_serve.offload.tiers import TableReadError
from engram_serve.offload.uploads import Uploader

logger = logging.getLogger(__name__)
# Sequences in the warm-up's batch: enough for the batched kernels (the CPU's bfloat16 decode
# products run from kernels/cpu_quant.BFLOAT16_BAND_MIN_ROWS = 32 sequences).
WARM_UP_BATCH = 32

__all__ = ["Engine", "EngramRuntime", "QueueFullError", "RequestTooLongError"]


class RequestTooLongError(ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


@dataclass
class EngramRuntime:
    """What the engine needs to feed Engram layers: the hasher and a prefetcher
    (offload/prefetch.py: `prefetch(row_ids [L, T, C]) -> RowHandle`)."""

    hasher: NgramHasher
    prefetcher: object


@dataclass
class StepStats:
    num_prompt_tokens: int = 0  # cumulative, prefill tokens computed (recomputes included)
    num_generation_tokens: int = 0
    num_steps: int = 0
    num_failed_steps: int = 0  # steps whose Engram rows could not be read


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
        config: EngineConfig = EngineConfig(),
        engram: EngramRuntime | None = None,
        runtime: DeviceRuntime | None = None,
    ):
        """`runtime`: the device runtime the model, the prefetcher and this engine share
        (device.py); None: that of `config.device`."""
        self.model, self.model_config, self.tokenizer = model, model_config, tokenizer
        self.config, self.engram = config, engram
        self.runtime = runtime or get_runtime(config.device)
        self.cache_dtype = getattr(torch, config.cache_dtype)
        self.max_model_len = min(
            config.max_model_len or model_config.max_position_embeddings,
            model_config.max_position_embeddings,
        )
        self.blocks = BlockManager(self._num_kv_blocks(), config.kv_block_size)
        self.cache = allocate_cache(
            model_config,
            self.blocks.num_blocks,
            config.kv_block_size,
            self.cache_dtype,
            self._engram_conv_shapes(),
            model.model.norm.weight.dtype,  # the activations' (float32 for quantized weights)
            self.runtime,
        )
        self.inputs = Uploader(self.runtime, np.int64)
        self.sampler = Sampler(self.runtime)
        self.grammars = GrammarCompiler(tokenizer, model_config.vocab_size)
        self.scheduler = Scheduler(config, self.blocks)
        self.trackers: dict[str, OutputTracker] = {}
        self.stats = StepStats()
        self._rng = np.random.default_rng(config.seed)  # seeds of requests that bring none
        self._request_ids = itertools.count()

    # -- the spine --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        inputs = self._prepare_inputs(batch)
        inputs.engram_rows = self._prefetch_rows(batch)  # hash -> prefetch
        self._lookahead(batch)  # the next step's prompt rows, read while this step computes
        try:
            logits = self.model(inputs)  # [S', V] for requests that sample this step
        except TableReadError as error:  # a storage fault fails this step, not the engine
            return self._fail_step(batch, error)
        sampling = [r for r, n in zip(batch.requests, batch.num_new_tokens) if _samples(r, n)]
        sampled = self.sampler.sample(logits, sampling)  # the step's one download
        return self._postprocess(batch, sampling, sampled)

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        request_id: str | None = None,
        prompt: str | None = None,
    ) -> Request:
        """Queue a request. Raises RequestTooLongError, ValueError (bad token ids, a structured
        output that does not compile) or QueueFullError; nothing is queued then. A structured
        output's grammar is compiled here unless it is in the compiler's cache already (the
        server compiles it beforehand, in a worker thread: engine/structured.py)."""
        self._check_prompt(prompt_token_ids, sampling)
        request = Request(
            request_id=request_id if request_id is not None else f"req-{next(self._request_ids)}",
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            prompt=prompt,
            eos_token_ids=self.tokenizer.eos_token_ids,
            max_total_len=self.max_model_len,
        )
        if request.request_id in self.trackers:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if sampling.structured_outputs is not None:
            request.grammar = self.grammars.matcher(sampling.structured_outputs)
        seed = sampling.seed if sampling.seed is not None else int(self._rng.integers(2**62))
        request.generator = self.runtime.generator(seed)
        self.scheduler.add(request)
        self.trackers[request.request_id] = OutputTracker(request, self.tokenizer)
        return request

    def warm_up(self) -> None:
        """Run requests of two tokens, a prefill step and a decode step each: one alone, then
        WARM_UP_BATCH together (at most max_num_seqs), so that the compiled kernels of both a
        single sequence and a batch are built (or loaded from their caches) before a client
        waits on them: on a fresh machine the CPU decode layer takes ~35 s to compile, the
        batched bfloat16 one ~5 s more. Their tokens are not counted in `stats` (the server's
        token metrics start at zero); their Engram rows are (they were read)."""
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up runs before any request is added")
        start = time.perf_counter()
        logger.info("warming up: one sequence, then a batch (compiles kernels on first use)")
        greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        for batch in (1, min(WARM_UP_BATCH, self.config.max_num_seqs)):
            for _ in range(batch):
                self.add_request([0] * 4, greedy, request_id=f"warm-up-{next(self._request_ids)}")
            while self.has_unfinished_requests():
                self.step()
        self.stats = StepStats()
        _release_freed_heap()
        logger.info("warmed up in %.1f s", time.perf_counter() - start)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.abort(request_id)
        if request is None:
            return None
        return self.trackers.pop(request_id).output()

    def close(self) -> None:
        """Free the device's host buffers and the Engram prefetcher once nothing is in flight."""
        self.runtime.synchronize()
        if self.engram is not None:
            self.engram.prefetcher.close()
        self.sampler.close()
        self.inputs.close()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.blocks.usage

    def _check_prompt(self, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of vocabulary (vocab size {vocab})")
        requested = sampling.max_tokens or 1
        if num_prompt + requested > self.max_model_len:
            raise RequestTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {num_prompt + requested} tokens ({num_prompt} in the messages, "
                f"{requested} in the completion). Please reduce the length of the messages or "
                "completion."
            )

    # -- step phases ------------------------------------------------------------------------

    def _prepare_inputs(self, batch: ScheduledBatch) -> ForwardBatch:
        """Flat token ids and positions of the step, and where each token's KV goes: built on
        the host, sent to the device in one copy."""
        self.inputs.next_step()
        requests, num_new = batch.requests, batch.num_new_tokens
        starts = np.array([r.num_computed_tokens for r in requests], np.int64)
        query_lens = np.array(num_new, np.int64)
        seq_lens = starts + query_lens
        query_start_loc = np.concatenate(([0], np.cumsum(query_lens)))
        positions = np.concatenate([np.arange(s, e) for s, e in zip(starts, seq_lens)])
        token_ids = np.concatenate([
            r.all_token_ids[s:e] for r, s, e in zip(requests, starts, seq_lens)
        ]).astype(np.int64)  # fmt: skip
        max_blocks = max(len(r.block_ids) for r in requests)
        block_tables = np.zeros((len(requests), max_blocks), dtype=np.int64)
        for i, request in enumerate(requests):
            block_tables[i, : len(request.block_ids)] = request.block_ids
        block_size = self.blocks.block_size
        seq_of_token = np.repeat(np.arange(len(requests)), query_lens)
        slots = block_tables[seq_of_token, positions // block_size] * block_size
        slots += positions % block_size
        samples = [_samples(r, n) for r, n in zip(requests, num_new)]
        state_slots = np.array([r.state_slot for r in requests], np.int64)
        on_device = self.inputs.upload([
            token_ids, positions, query_start_loc, seq_lens, block_tables, slots, state_slots,
            state_slots[starts == 0],  # sequences that start this step: no Engram history
            query_start_loc[1:][samples] - 1,  # the tokens whose logits are sampled
            np.flatnonzero(query_lens == 1),  # the decoding sequences of a mixed batch
        ])  # fmt: skip
        (token_ids_d, positions_d, query_start_loc_d, seq_lens_d, block_tables_d, slots_d,
         state_slots_d, fresh_slots_d, logits_indices_d, decode_seqs_d) = on_device  # fmt: skip
        attn = AttentionMetadata(
            query_start_loc=query_start_loc_d,
            seq_lens=seq_lens_d,
            block_tables=block_tables_d,
            slot_mapping=slots_d,
            max_seq_len=int(seq_lens.max()),
            is_decode_only=bool((query_lens == 1).all()),
            query_start_host=query_start_loc.tolist(),
            seq_lens_host=seq_lens.tolist(),
            decode_seqs=decode_seqs_d,
        )
        return ForwardBatch(
            token_ids=token_ids_d,
            positions=positions_d,
            attn=attn,
            cache=self.cache,
            state_slots=state_slots_d,
            logits_indices=logits_indices_d,
            fresh_state_slots=fresh_slots_d,
        )

    def _prefetch_rows(self, batch: ScheduledBatch) -> RowHandle | None:
        """Hash the step's tokens with each request's lookback, then start fetching every
        Engram layer's rows."""
        if self.engram is None:
            return None
        chunks = [
            (r, r.num_computed_tokens, n) for r, n in zip(batch.requests, batch.num_new_tokens)
        ]
        return self.engram.prefetcher.prefetch(self._row_ids(chunks))

    def _lookahead(self, batch: ScheduledBatch) -> None:
        """Start reading into the row cache the rows of the known tokens (prompt, or recompute
        after a preemption) the next step will most likely compute, while this step runs. The
        guess replays the scheduler: running requests past this step's tokens, then waiting
        ones while sequence slots last, under the token budget; a decode token (unknown until
        sampled) takes one token of it. Decode rows rely on the cache alone."""
        if self.engram is None or not self.engram.prefetcher.warms:
            return
        scheduled = {r.request_id: n for r, n in zip(batch.requests, batch.num_new_tokens)}
        free_seqs = max(0, self.config.max_num_seqs - len(self.scheduler.running))
        waiting = itertools.islice(self.scheduler.waiting, free_seqs)
        budget, chunks = self.config.max_num_batched_tokens, []
        for request in itertools.chain(self.scheduler.running, waiting):
            start = request.num_computed_tokens + scheduled.get(request.request_id, 0)
            num_known = min(request.num_tokens - start, budget)
            if num_known > 0:
                chunks.append((request, start, num_known))
            budget -= max(num_known, 1)
            if budget <= 0:
                break
        if chunks:
            self.engram.prefetcher.warm(self._row_ids(chunks))

    def _row_ids(self, chunks: list[tuple[Request, int, int]]) -> np.ndarray:
        """Row ids `[L, T, C]` of chunks `(request, start, num_tokens)` of known tokens, each
        hashed with the N-1 tokens before it (its lookback, the pad token's before the start).
        Every id is compressed in one call (two a chunk took 64 decode chunks 306 us, one 75 us;
        a step runs it once, twice with the look-ahead)."""
        hasher = self.engram.hasher
        token_ids, query_start_loc, lookbacks = [], [0], []
        for request, start, num_tokens in chunks:
            tokens = request.all_token_ids
            token_ids.extend(tokens[start : start + num_tokens])
            query_start_loc.append(query_start_loc[-1] + num_tokens)
            lookbacks.extend(hasher.raw_lookback(tokens, start))
        compressed = hasher.compress(np.array(token_ids + lookbacks, dtype=np.int64))
        num_tokens = query_start_loc[-1]
        return hasher.row_ids(
            compressed[:num_tokens],
            np.array(query_start_loc),
            compressed[num_tokens:].reshape(len(chunks), hasher.lookback_len),
        )

    def _postprocess(
        self, batch: ScheduledBatch, sampling: list[Request], sampled: SampleOutput
    ) -> list[RequestOutput]:
        now = time.monotonic()
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            start, num_prompt = request.num_computed_tokens, len(request.prompt_token_ids)
            self.stats.num_prompt_tokens += max(0, min(start + num_new, num_prompt) - start)
            request.num_computed_tokens = start + num_new
        self.stats.num_generation_tokens += len(sampling)
        self.stats.num_steps += 1
        outputs = []
        for request, token_id, logprobs in zip(sampling, sampled.token_ids, sampled.logprobs):
            request.metrics.first_token_time = request.metrics.first_token_time or now
            request.metrics.last_token_time = now
            finish = self.trackers[request.request_id].append(token_id, logprobs)
            if request.grammar is not None and advance(request, token_id):
                # The grammar has ended (it took EOS): the output is whole, even at max_tokens.
                finish = finish if finish is not None and finish[0] == "stop" else ("stop", None)
            if finish is not None:
                self.scheduler.running.remove(request)
                self.scheduler.finish(request, *finish)
            tracker = self.trackers[request.request_id]
            outputs.append(tracker.output())
            if request.is_finished:
                del self.trackers[request.request_id]
        return outputs

    def _fail_step(self, batch: ScheduledBatch, error: TableReadError) -> list[RequestOutput]:
        """Finish the step's requests with reason "error" and free their blocks. Their state of
        this step may be half written, so they cannot go on; requests not in the step can."""
        logger.error("Engram rows unreadable, %d requests fail: %s", len(batch.requests), error)
        self.stats.num_failed_steps += 1
        outputs = []
        for request in batch.requests:
            self.scheduler.running.remove(request)
            self.scheduler.finish(request, "error")
            outputs.append(self.trackers.pop(request.request_id).output())
        return outputs

    # -- sizing -----------------------------------------------------------------------------

    def _num_kv_blocks(self) -> int:
        config = self.config
        num_blocks = config.num_kv_blocks or config.kv_cache_bytes // kv_bytes_per_block(
            self.model_config, config.kv_block_size, self.cache_dtype
        )
        needed = -(-self.max_model_len // config.kv_block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {config.kv_block_size} tokens, fewer "
                f"than one sequence of max_model_len={self.max_model_len} needs ({needed}); "
                "raise the KV budget or lower max_model_len"
            )
        return num_blocks

    def _engram_conv_shapes(self) -> dict[int, tuple[int, ...]]:
        shapes = {}
        for layer in self.model.model.layers:
            engram = getattr(layer, "engram", None)
            if engram is not None and engram.history_len > 0:
                width = engram.config.hc_mult * self.model_config.hidden_size
                shapes[layer.layer_id] = (self.config.max_num_seqs, engram.history_len, width)
        return shapes


def _samples(request: Request, num_new: int) -> bool:
    """A request samples when this step computes its last known token."""
    return request.num_computed_tokens + num_new == request.num_tokens


def _release_freed_heap() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim; elsewhere nothing):
    loading and the first steps leave buffers freed but resident, 21 MiB of the server's idle
    RSS on the default model (738 -> 717 MiB measured)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
