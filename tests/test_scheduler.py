"""The scheduler's policy (engine/scheduler.py), step by step on a real BlockManager, without a
model: a step's tokens are "computed" by `advance`, which does what Engine._postprocess does to
a request (its computed count moves on; a request that computed its last known token gets one
new token).

Policy, as the module documents it: running requests first, oldest first, each taking what it
still lacks under the token budget; then waiting requests in arrival order while the budget,
`max_num_seqs` and the KV pool allow, the last one possibly with a partial chunk. When the pool
cannot hold a running request's next tokens, the newest running request is preempted by
recompute: its blocks are freed and it goes back to the front of the waiting queue with every
token so far to prefill again. The last test replays random workloads against a transcription of
that text (`PolicyModel`), which knows block counts only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_serve.config import EngineConfig
from engram_serve.engine.kv_cache import BlockManager
from engram_serve.engine.request import Request, RequestStatus, SamplingParams
from engram_serve.engine.scheduler import QueueFullError, ScheduledBatch, Scheduler

BLOCK = 4


def make(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 8, max_waiting: int = 64):
    config = EngineConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, kv_block_size=BLOCK,
        max_waiting=max_waiting,
    )  # fmt: skip
    return Scheduler(config, BlockManager(num_blocks, BLOCK))


def add(scheduler: Scheduler, name: str, prompt_len: int) -> Request:
    request = Request(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=None))
    scheduler.add(request)
    return request


def advance(batch: ScheduledBatch) -> None:
    """What the engine does to a scheduled request after the forward pass."""
    for request, num_new in zip(batch.requests, batch.num_new_tokens, strict=True):
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens:
            request.output_token_ids.append(7)


def plan(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens, strict=True)]


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


def blocks_for(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK)


def check_blocks(scheduler: Scheduler) -> None:
    """Every block is free or held by exactly one request, which holds what its computed tokens
    need; waiting requests hold none."""
    held = [b for r in scheduler.running for b in r.block_ids]
    free = list(scheduler.blocks._free)
    assert sorted(held + free) == list(range(scheduler.blocks.num_blocks))
    for request in scheduler.waiting:
        assert request.block_ids == [] and request.state_slot is None
    slots = [r.state_slot for r in scheduler.running]
    assert len(set(slots)) == len(slots) and all(0 <= s < scheduler.config.max_num_seqs
                                                   for s in slots)  # fmt: skip


# -- order and budget -------------------------------------------------------------------------


def test_running_requests_come_first_then_waiting_ones_in_arrival_order():
    scheduler = make()
    add(scheduler, "a", 5)
    add(scheduler, "b", 3)
    first = scheduler.schedule()
    assert plan(first) == [("a", 5), ("b", 3)]
    advance(first)
    add(scheduler, "c", 2)
    add(scheduler, "d", 6)
    second = scheduler.schedule()  # a and b decode, then c and d start
    assert plan(second) == [("a", 1), ("b", 1), ("c", 2), ("d", 6)]
    assert ids(scheduler.running) == ["a", "b", "c", "d"] and not scheduler.waiting
    assert all(r.status is RequestStatus.RUNNING for r in scheduler.running)
    check_blocks(scheduler)


def test_the_token_budget_cuts_the_last_prefill_into_chunks():
    scheduler = make(budget=10)
    for name, length in (("a", 4), ("b", 4), ("c", 9)):
        add(scheduler, name, length)
    step = scheduler.schedule()
    assert plan(step) == [("a", 4), ("b", 4), ("c", 2)]  # c: a partial chunk, budget spent
    assert step.num_tokens == 10
    assert len(scheduler.running[2].block_ids) == blocks_for(2)  # blocks for what it computes
    advance(step)
    assert scheduler.running[2].num_output_tokens == 0, "a partial prefill samples nothing"
    step = scheduler.schedule()  # a and b decode; c's next chunk takes the rest of the budget
    assert plan(step) == [("a", 1), ("b", 1), ("c", 7)]
    advance(step)
    assert scheduler.running[2].num_output_tokens == 1
    assert plan(scheduler.schedule()) == [("a", 1), ("b", 1), ("c", 1)]
    check_blocks(scheduler)


def test_running_requests_may_spend_the_whole_budget_and_waiting_ones_then_wait():
    scheduler = make(budget=6)
    add(scheduler, "a", 5)
    add(scheduler, "b", 9)
    step = scheduler.schedule()
    assert plan(step) == [("a", 5), ("b", 1)]
    advance(step)
    add(scheduler, "c", 1)
    step = scheduler.schedule()  # a decodes (1), b's prefill takes the other 5: none for c
    assert plan(step) == [("a", 1), ("b", 5)]
    assert ids(scheduler.waiting) == ["c"]
    advance(step)
    step = scheduler.schedule()  # b's last 3 prompt tokens, then c
    assert plan(step) == [("a", 1), ("b", 3), ("c", 1)]


def test_max_num_seqs_caps_the_running_requests():
    scheduler = make(max_num_seqs=2)
    for name in "abc":
        add(scheduler, name, 2)
    step = scheduler.schedule()
    assert plan(step) == [("a", 2), ("b", 2)]
    assert ids(scheduler.waiting) == ["c"]
    advance(step)
    step = scheduler.schedule()
    assert plan(step) == [("a", 1), ("b", 1)]  # budget and blocks to spare, but no seat for c
    advance(step)
    scheduler.running.remove(a := scheduler.running[0])  # the engine finishes a request
    scheduler.finish(a, "stop")
    assert plan(scheduler.schedule()) == [("b", 1), ("c", 2)]
    check_blocks(scheduler)


def test_a_waiting_request_that_does_not_fit_the_pool_holds_back_those_behind_it():
    scheduler = make(num_blocks=4)
    add(scheduler, "a", 8)  # 2 blocks
    step = scheduler.schedule()
    assert plan(step) == [("a", 8)]
    add(scheduler, "big", 8)  # needs 2 blocks
    add(scheduler, "small", 1)  # needs 1: it would fit, but arrived later
    advance(step)
    step = scheduler.schedule()  # a's 9th token takes a third block: 1 is left
    assert plan(step) == [("a", 1)]
    assert ids(scheduler.waiting) == ["big", "small"]
    assert scheduler.blocks.num_free_blocks == 1
    check_blocks(scheduler)


def test_the_waiting_queue_refuses_past_max_waiting():
    scheduler = make(max_waiting=2)
    add(scheduler, "a", 1)
    add(scheduler, "b", 1)
    with pytest.raises(QueueFullError):
        add(scheduler, "c", 1)
    assert ids(scheduler.waiting) == ["a", "b"]
    advance(scheduler.schedule())  # once they run, the queue has room again
    add(scheduler, "c", 1)


# -- preemption -------------------------------------------------------------------------------


def test_the_newest_running_request_is_preempted_and_goes_back_to_the_front():
    scheduler = make(num_blocks=4)
    add(scheduler, "old", 4)  # 1 block
    add(scheduler, "mid", 3)  # 1 block
    add(scheduler, "new", 8)  # 2 blocks: the pool is full
    step = scheduler.schedule()
    assert plan(step) == [("old", 4), ("mid", 3), ("new", 8)]
    advance(step)
    add(scheduler, "late", 1)
    new = scheduler.running[2]
    slot = new.state_slot
    step = scheduler.schedule()  # old's 5th token needs a block: the newest (new) is preempted
    assert step.num_preempted == 1 and scheduler.num_preemptions == 1
    assert plan(step) == [("old", 1), ("mid", 1)]
    assert ids(scheduler.running) == ["old", "mid"]
    assert ids(scheduler.waiting) == ["new", "late"]  # at the front, ahead of a later arrival
    assert new.status is RequestStatus.WAITING and new.num_preemptions == 1
    assert new.num_computed_tokens == 0 and new.block_ids == [] and new.state_slot is None
    assert new.num_tokens == 9, "it keeps its tokens, to prefill again"
    assert slot in scheduler._free_slots
    assert scheduler.blocks.num_free_blocks == 1  # new's 2 blocks, less old's new one
    check_blocks(scheduler)
    advance(step)
    for request in list(scheduler.running):  # the engine finishes old and mid: 4 blocks free
        scheduler.running.remove(request)
        scheduler.finish(request, "stop")
    step = scheduler.schedule()  # new recomputes all its 9 tokens, still ahead of late
    assert plan(step) == [("new", 9), ("late", 1)]


def test_preemption_goes_on_from_the_newest_until_the_request_fits():
    scheduler = make(num_blocks=4)
    for name in ("a", "b", "c"):
        add(scheduler, name, 3)  # 1 block each
    step = scheduler.schedule()
    advance(step)
    scheduler.running[0].output_token_ids += [7] * 12  # a: 16 tokens, 4 blocks, 1 free
    step = scheduler.schedule()  # c goes back first, then b, in front of it
    assert step.num_preempted == 2 and ids(scheduler.waiting) == ["b", "c"]
    assert plan(step) == [("a", 13)]
    check_blocks(scheduler)


def test_a_request_that_is_itself_the_newest_preempts_itself_and_the_step_stops_there():
    scheduler = make(num_blocks=3)
    add(scheduler, "a", 3)  # 1 block
    b = add(scheduler, "b", 8)  # 2 blocks: the pool is full
    advance(scheduler.schedule())
    add(scheduler, "c", 1)
    step = scheduler.schedule()  # a fits its block; b's 9th token does not, and b is the newest
    assert plan(step) == [("a", 1)] and step.num_preempted == 1
    assert ids(scheduler.running) == ["a"] and ids(scheduler.waiting) == ["b", "c"]
    assert b.block_ids == [] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert scheduler.blocks.num_free_blocks == 2
    check_blocks(scheduler)


def test_a_step_that_preempts_starts_no_waiting_request():
    scheduler = make(num_blocks=3, budget=2)
    add(scheduler, "a", 2)  # 1 block
    add(scheduler, "b", 7)  # prefilled a token a step (what the budget leaves after a)
    for _ in range(20):
        step = scheduler.schedule()
        advance(step)
        if step.num_preempted:
            break
    # b's 5th token needed a second block while a held the other two: b preempted itself.
    assert step.num_preempted == 1 and plan(step) == [("a", 1)]
    assert scheduler.blocks.num_free_blocks == 1 and ids(scheduler.waiting) == ["b"]
    # b's first chunk (1 token of budget, 1 block) would have fit, but not in that step:
    assert plan(scheduler.schedule()) == [("a", 1), ("b", 1)]


def test_once_the_budget_is_spent_no_request_gets_an_empty_chunk():
    scheduler = make(budget=6)
    a, _ = add(scheduler, "a", 3), add(scheduler, "b", 2)
    advance(scheduler.schedule())
    a.output_token_ids += [7] * 10  # a lacks 11 tokens: the whole budget
    step = scheduler.schedule()
    assert plan(step) == [("a", 6)], "b waits for the next step; it is not scheduled with 0"


def test_a_preempted_request_counts_each_preemption_and_keeps_its_first_schedule_time():
    scheduler = make(num_blocks=3)
    a = add(scheduler, "a", 3)  # 1 block
    b = add(scheduler, "b", 8)  # 2 blocks: the pool is full
    assert b.metrics.first_scheduled_time is None
    advance(scheduler.schedule())
    first = b.metrics.first_scheduled_time
    assert first is not None and first >= b.metrics.arrival_time
    step = scheduler.schedule()  # b's 9th token needs a third block: b preempts itself
    assert step.num_preempted == 1 and b.num_preemptions == 1
    advance(step)
    scheduler.running.remove(a)
    scheduler.finish(a, "stop")
    preemptions = 0
    for _ in range(8):  # b runs alone in the 3 blocks, until its 13th token needs a fourth
        step = scheduler.schedule()
        preemptions += step.num_preempted
        advance(step)
    assert preemptions == 1 and b.num_preemptions == 2 and scheduler.num_preemptions == 2
    assert b.metrics.first_scheduled_time == first, "the first schedule is the first one"


# -- abort ------------------------------------------------------------------------------------


def test_abort_of_a_waiting_request():
    scheduler = make(max_num_seqs=1)
    add(scheduler, "a", 3)
    b = add(scheduler, "b", 3)
    advance(scheduler.schedule())
    assert scheduler.abort("b") is b
    assert b.status is RequestStatus.FINISHED and b.finish_reason == "abort"
    assert b.metrics.finished_time is not None
    assert ids(scheduler.waiting) == [] and scheduler.num_unfinished == 1
    assert scheduler.abort("b") is None and scheduler.abort("nope") is None
    scheduler.running.remove(a := scheduler.running[0])
    scheduler.finish(a, "stop")
    assert scheduler.schedule().is_empty, "b is not scheduled again"


def test_abort_of_a_running_request_frees_its_blocks_and_state_slot():
    scheduler = make(num_blocks=4)
    a = add(scheduler, "a", 9)
    add(scheduler, "b", 1)
    advance(scheduler.schedule())
    slot = a.state_slot
    assert scheduler.blocks.num_free_blocks == 0
    assert scheduler.abort("a") is a
    assert a.block_ids == [] and a.state_slot is None and a.finish_reason == "abort"
    assert scheduler.blocks.num_free_blocks == 3 and slot in scheduler._free_slots
    assert ids(scheduler.running) == ["b"]
    assert plan(scheduler.schedule()) == [("b", 1)]
    check_blocks(scheduler)


def test_abort_of_a_preempted_request():
    scheduler = make(num_blocks=2)
    add(scheduler, "a", 4)
    b = add(scheduler, "b", 4)
    advance(scheduler.schedule())
    step = scheduler.schedule()  # a's 5th token takes b's block
    assert step.num_preempted == 1 and ids(scheduler.waiting) == ["b"]
    advance(step)
    assert scheduler.abort("b") is b
    assert b.status is RequestStatus.FINISHED and b.finish_reason == "abort"
    assert b.block_ids == [] and scheduler.blocks.num_free_blocks == 0
    scheduler.running.remove(a := scheduler.running[0])
    scheduler.finish(a, "length")
    assert scheduler.blocks.num_free_blocks == 2
    assert scheduler.schedule().is_empty and scheduler.num_unfinished == 0


# -- the policy on random workloads -----------------------------------------------------------


@dataclass
class Model:
    name: str
    num_tokens: int
    computed: int = 0
    blocks: int = 0


@dataclass
class PolicyModel:
    """The module docstring's policy, over block counts (no block ids, no slots)."""

    num_blocks: int
    budget: int
    max_num_seqs: int
    waiting: deque[Model] = field(default_factory=deque)
    running: list[Model] = field(default_factory=list)
    preemptions: int = 0

    @property
    def free(self) -> int:
        return self.num_blocks - sum(r.blocks for r in self.running)

    def fits(self, request: Model, num_new: int) -> bool:
        return blocks_for(request.computed + num_new) - request.blocks <= self.free

    def step(self) -> list[tuple[str, int]]:
        out, budget, preempted = [], self.budget, False
        for request in list(self.running):  # oldest first
            if budget == 0 or request not in self.running:
                break
            num_new = min(request.num_tokens - request.computed, budget)
            while not self.fits(request, num_new):  # the newest goes back, to the front
                newest = self.running.pop()
                newest.computed, newest.blocks, preempted = 0, 0, True
                self.waiting.appendleft(newest)
                self.preemptions += 1
                if newest is request:
                    break
            else:
                request.blocks = max(request.blocks, blocks_for(request.computed + num_new))
                out.append((request, num_new))
                budget -= num_new
        while not preempted and self.waiting and budget and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.computed, budget)
            if not self.fits(request, num_new):
                break
            self.running.append(self.waiting.popleft())
            request.blocks = blocks_for(request.computed + num_new)
            out.append((request, num_new))
            budget -= num_new
        for request, num_new in out:
            request.computed += num_new
            if request.computed == request.num_tokens:
                request.num_tokens += 1
        return [(r.name, n) for r, n in out]

    def finish(self, name: str) -> None:
        for queue in (self.running, self.waiting):
            for request in list(queue):
                if request.name == name:
                    queue.remove(request)


ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 23)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("finish"), st.integers(0, 30)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    num_blocks=st.integers(6, 16),
    budget=st.integers(1, 24),
    max_num_seqs=st.integers(1, 5),
    actions=ACTIONS,
)
def test_random_workloads_follow_the_policy(num_blocks, budget, max_num_seqs, actions):
    scheduler = make(num_blocks=num_blocks, budget=budget, max_num_seqs=max_num_seqs)
    model = PolicyModel(num_blocks, budget, max_num_seqs)
    names: list[str] = []
    for action, value in actions:
        if action == "add":
            if value > num_blocks * BLOCK - 8:  # a request must fit the pool alone
                continue
            names.append(f"r{len(names)}")
            add(scheduler, names[-1], value)
            model.waiting.append(Model(names[-1], value))
        elif action == "step":
            for _ in range(value):
                step = scheduler.schedule()
                assert plan(step) == model.step()
                advance(step)
        elif names:
            name = names[value % len(names)]
            if action == "abort":
                scheduler.abort(name)
            else:  # the engine finishes a running request (stop or length)
                request = next((r for r in scheduler.running if r.request_id == name), None)
                if request is None:
                    continue
                scheduler.running.remove(request)
                scheduler.finish(request, "stop")
            model.finish(name)
        assert ids(scheduler.running) == [r.name for r in model.running]
        assert ids(scheduler.waiting) == [r.name for r in model.waiting]
        assert scheduler.num_preemptions == model.preemptions
        assert scheduler.blocks.num_free_blocks == model.free
        for request, expected in zip(scheduler.running, model.running, strict=True):
            assert len(request.block_ids) == expected.blocks
            assert request.num_computed_tokens == expected.computed
        check_blocks(scheduler)
