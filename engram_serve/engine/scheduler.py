"""Which requests run this step, and how many of their tokens.

Policy (continuous batching with chunked prefill): running requests first, oldest first, each
taking what it still lacks (a decode token, or the next prefill chunk) under the token budget;
then waiting requests in arrival order while the budget, `max_num_seqs` and the KV pool allow,
the last one possibly with a partial chunk. When the pool cannot hold a running request's next
tokens, the newest running request is preempted by recompute: its blocks are freed and it
returns to the front of the waiting queue with every token so far to prefill again.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engram_serve.config import EngineConfig
from engram_serve.engine.kv_cache import BlockManager
from engram_serve.engine.request import Request, RequestStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the caller should retry later."""


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_tokens)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0  # cumulative

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"the waiting queue is full ({self.config.max_waiting} requests); retry later"
            )
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self.finish(request, "abort")
                    return request
        return None

    def finish(self, request: Request, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark finished and give back its blocks and state slot. The caller has already taken
        it out of `running`/`waiting`."""
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        request.metrics.finished_time = time.monotonic()
        self._release(request)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(batch, budget)
        if batch.num_preempted == 0:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.blocks.grow(request.block_ids, request.num_computed_tokens + num_new):
                self._preempt(self.running.pop())
                batch.num_preempted += 1
                if index >= len(self.running):  # the request itself was the newest
                    return budget
            batch.add(request, num_new)
            budget -= num_new
            index += 1
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.blocks.grow(request.block_ids, request.num_computed_tokens + num_new):
                return
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.state_slot = self._free_slots.pop()
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.monotonic()
            self.running.append(request)
            batch.add(request, num_new)
            budget -= num_new

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.blocks.free(request.block_ids)
        if request.state_slot is not None:
            self._free_slots.append(request.state_slot)
            request.state_slot = None
