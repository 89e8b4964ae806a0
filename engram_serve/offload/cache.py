"""The fast-tier row cache: hot Engram rows kept in HBM (GPU) or RAM (in front of disk).

Layout: `ways`-way set-associative, like FBGEMM's and HugeCTR's embedding caches. Row r lives,
if anywhere, in set `hash(r) % num_sets`, in one of its `ways` slots; slot = set * ways + way.
A whole step's lookup (and admission) is one call of a compiled loop over its rows, and the host
metadata costs 8 + 8 + 4 + 1 bytes per slot, nothing per table row (tables have 10^8-10^9 rows).
(Done with NumPy array operations, dozens of small ones and `np.add.at`, lookup and admission
cost 3.8 ms a layer and step, 3.5% of the benchmark's step time on 2 cores; compiled, 0.9 ms.)

Per slot: `tags` (row id, -1 empty), `score` (LRU: last step used), `pins` (in-flight steps
reading the slot) and `static` (the profiled hot set, never evicted).

Invariants:
- A pinned slot is never evicted: rows a step in flight will read out of the cache stay put
  while a concurrent prefetch admits its own misses.
- A row's tag is set and its data written under the same lock, so no lookup ever returns a slot
  whose data is not (or, on GPU, not yet enqueued to be) there. On CUDA every cache read and write
  is enqueued on the prefetcher's one side stream, whose order then keeps them apart.

Policies (dynamic admission, for the slots outside the hot set):
- "lru": evict the way least recently used; every miss is admitted.
- "lfu": a count-min sketch estimates each row's recent frequency (counters halved every
  10 x capacity lookups, so the past fades); the victim is the way with the lowest estimate and a
  miss is admitted only if it is more frequent than its victim (TinyLFU).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numba
import numpy as np
import torch

from engram_serve.device import CpuRuntime, DeviceRuntime
from engram_serve.offload.tiers import as_numpy
from engram_serve.offload.uploads import Uploader

CachePolicy = Literal["lru", "lfu"]
DEFAULT_WAYS = 32
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SKETCH_SEEDS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F,
                          0x165667B19E3779F9, 0xD6E8FEB86659FD93], np.uint64)  # fmt: skip
_LOCKED = np.iinfo(np.int64).max
_NO_SKETCH = (np.zeros((0, 1), np.uint32), np.uint64(0))  # LRU's: no counters


@numba.njit(inline="always")
def _mix(row, seed):
    """A 32-bit multiplicative hash of an int64 row id (wrapping uint64 arithmetic)."""
    return (np.uint64(row) * seed) >> np.uint64(32)


@numba.njit(inline="always")
def _set_of(row, num_sets):
    return np.int64(_mix(row, _GOLDEN) % np.uint64(num_sets))


@numba.njit(nogil=True, cache=True)
def _sets(ids, num_sets):
    out = np.empty(ids.shape[0], np.int64)
    for i in range(ids.shape[0]):
        out[i] = _set_of(ids[i], num_sets)
    return out


@numba.njit(nogil=True, cache=True)
def _sketch_add(table, mask, ids):
    for i in range(ids.shape[0]):
        for r in range(table.shape[0]):
            table[r, _mix(ids[i], _SKETCH_SEEDS[r]) & mask] += 1


@numba.njit(inline="always")
def _sketch_estimate(table, mask, row):
    est = table[0, _mix(row, _SKETCH_SEEDS[0]) & mask]
    for r in range(1, table.shape[0]):
        est = min(est, table[r, _mix(row, _SKETCH_SEEDS[r]) & mask])
    return np.int64(est)


@numba.njit(nogil=True, cache=True)
def _lookup(tags, pins, score, ids, tick, lru, slots):
    """slots[i] = the slot holding ids[i], pinned (and, LRU, marked used now), or -1; returns
    the number of hits."""
    num_sets, ways = tags.shape
    hits = 0
    for i in range(ids.shape[0]):
        s, slots[i] = _set_of(ids[i], num_sets), -1
        for w in range(ways):
            if tags[s, w] == ids[i]:
                pins[s, w] += 1
                if lru:
                    score[s, w] = tick
                slots[i] = s * ways + w
                hits += 1
                break
    return hits


@numba.njit(nogil=True, cache=True)
def _choose_slots(tags, score, pins, static, sketch, mask, ids, tick, out):
    """Admission of distinct missed rows `ids`: out[i] = the slot row ids[i] takes (its tag and
    score written), or -1. Within a set, candidates in their order take its unlocked ways in
    the policy's order (empty ways first; then LRU: least recent; LFU, `sketch` not empty:
    lowest estimate, and only if the candidate's estimate is higher). Returns (admitted,
    evicted)."""
    num_sets, ways = tags.shape
    lfu = sketch.shape[0] > 0
    sets = np.empty(ids.shape[0], np.int64)
    fresh = np.zeros(ids.shape[0], np.bool_)
    for i in range(ids.shape[0]):
        out[i], s = -1, _set_of(ids[i], num_sets)
        sets[i], fresh[i] = s, True
        for w in range(ways):
            if tags[s, w] == ids[i]:  # admitted meanwhile
                fresh[i] = False
                break
    candidates = np.flatnonzero(fresh)
    order = candidates[np.argsort(sets[candidates], kind="mergesort")]  # by set, stable
    keys = np.empty(ways, np.int64)
    admitted = evicted = 0
    start = 0
    while start < order.shape[0]:
        s = sets[order[start]]
        end = start
        while end < order.shape[0] and sets[order[end]] == s:
            end += 1
        unlocked = 0
        for w in range(ways):
            if pins[s, w] > 0 or static[s, w]:
                keys[w] = _LOCKED
            elif tags[s, w] < 0:
                keys[w], unlocked = -1, unlocked + 1
            else:
                keys[w] = _sketch_estimate(sketch, mask, tags[s, w]) if lfu else score[s, w]
                unlocked += 1
        for rank in range(min(end - start, unlocked)):
            i, way = order[start + rank], np.argmin(keys)  # ties: the lowest way first
            victim, keys[way] = keys[way], _LOCKED
            if lfu and victim >= 0 and _sketch_estimate(sketch, mask, ids[i]) <= victim:
                continue  # TinyLFU: only a more frequent row replaces another
            evicted += victim >= 0
            admitted += 1
            tags[s, way], score[s, way] = ids[i], tick
            out[i] = s * ways + way
        start = end
    return admitted, evicted


class FrequencySketch:
    """Count-min sketch of row frequencies: 4 x width uint32 counters, aged by halving."""

    def __init__(self, capacity: int) -> None:
        width = 1 << max(10, int(2 * capacity - 1).bit_length())
        self.mask = np.uint64(width - 1)
        self.table = np.zeros((len(_SKETCH_SEEDS), width), np.uint32)
        self.sample_size, self.added = 10 * max(1, capacity), 0

    def add(self, ids: np.ndarray) -> None:
        _sketch_add(self.table, self.mask, ids)
        self.added += len(ids)
        if self.added >= self.sample_size:
            self.table >>= 1
            self.added //= 2


class RowCache:
    """One Engram layer's row cache: `capacity` slots of stored rows on `device`."""

    def __init__(
        self,
        capacity: int,
        width: int,
        scale_width: int,
        dtype: torch.dtype,
        runtime: DeviceRuntime | None = None,
        policy: CachePolicy = "lru",
        ways: int = DEFAULT_WAYS,
        uploader: Uploader | None = None,
    ) -> None:
        """`runtime`: the device the rows live on (None: the CPU); `uploader`: how slot indices
        reach it, when not the CPU (pinned, non-blocking)."""
        runtime = runtime or CpuRuntime()
        if capacity < 1:
            raise ValueError(f"a row cache needs capacity >= 1, got {capacity}")
        if policy not in ("lru", "lfu"):
            raise ValueError(f"cache policy must be 'lru' or 'lfu', got {policy!r}")
        self.ways = min(ways, capacity)
        self.num_sets = capacity // self.ways  # rounds down: never more memory than asked for
        self.policy = policy
        # Every array written in full now (np.full, torch.zeros), not left to calloc's or the
        # allocator's untouched pages: their first touch would fault pages in while serving.
        shape = (self.num_sets, self.ways)
        self.tags = np.full(shape, -1, np.int64)
        self.score = np.full(shape, 0, np.int64)
        self.pins = np.full(shape, 0, np.int32)
        self.static = np.full(shape, False)
        self.weight = runtime.empty((self.capacity, width), dtype).zero_()
        self.scale = (
            runtime.empty((self.capacity, scale_width), torch.uint8).zero_()
            if scale_width
            else None
        )
        self.uploader = uploader
        self.sketch = FrequencySketch(self.capacity) if policy == "lfu" else None
        self.lock = threading.Lock()
        self.tick = 0
        self.counts = dict.fromkeys(("hits", "misses", "admitted", "evicted", "rejected"), 0)

    @property
    def capacity(self) -> int:
        return self.num_sets * self.ways

    @property
    def nbytes(self) -> int:
        scale = 0 if self.scale is None else self.scale.numel()
        return self.weight.numel() * self.weight.element_size() + scale

    def sets_of(self, ids: np.ndarray) -> np.ndarray:
        return _sets(ids, self.num_sets)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots of distinct row `ids` `[m]` (-1: miss). Hits are pinned: call release(slots)
        once their rows have been read out (on GPU: enqueued)."""
        ids = np.ascontiguousarray(ids, np.int64)
        slots = np.empty(len(ids), np.int64)
        with self.lock:
            self.tick += 1
            hits = _lookup(
                self.tags, self.pins, self.score, ids, self.tick, self.sketch is None, slots
            )
            if self.sketch is not None:
                self.sketch.add(ids)
            self.counts["hits"] += hits
            self.counts["misses"] += len(ids) - hits
        return slots

    def release(self, slots: np.ndarray) -> None:
        slots = slots[slots >= 0]
        with self.lock:
            self.pins[slots // self.ways, slots % self.ways] -= 1

    def admit(
        self, ids: np.ndarray, weight: torch.Tensor, scale: torch.Tensor | None
    ) -> np.ndarray:
        """Offer missed rows `ids [k]` with their stored rows `weight [k, W]` (on the cache's
        device). Returns the slot each was written to, -1 where not admitted (its set had no
        unpinned, non-static way left, the policy refused it, or it was admitted meanwhile)."""
        with self.lock:
            slots = self._choose_slots(ids)
            take = np.flatnonzero(slots >= 0)
            if len(take):
                self._write(slots[take], take, weight, scale)
        return slots

    def _write(
        self, slots: np.ndarray, rows: np.ndarray, weight: torch.Tensor, scale: torch.Tensor | None
    ) -> None:
        """Cache slots `slots` = weight[rows] (and scale[rows]). On CPU by NumPy: one thread,
        no ATen team beside the forward pass's, and faster than index_put (a prefill step's
        4,000 rows of 256 bytes: 0.86 against 2.16 ms)."""
        if self.weight.device.type == "cpu":
            as_numpy(self.weight)[slots] = as_numpy(weight)[rows]
            if self.scale is not None:
                self.scale.numpy()[slots] = scale.numpy()[rows]
            return
        dst, src = self.uploader.upload([slots, rows])
        self.weight.index_copy_(0, dst, weight.index_select(0, src))
        if self.scale is not None:
            self.scale.index_copy_(0, dst, scale.index_select(0, src))

    def _choose_slots(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, np.int64)
        out = np.empty(len(ids), np.int64)
        sketch = _NO_SKETCH if self.sketch is None else (self.sketch.table, self.sketch.mask)
        admitted, evicted = _choose_slots(
            self.tags, self.score, self.pins, self.static, *sketch, ids, self.tick, out
        )
        self.counts["evicted"] += evicted
        self.counts["admitted"] += admitted
        self.counts["rejected"] += len(ids) - admitted
        return out

    def warm(
        self,
        ids: np.ndarray,
        weight: torch.Tensor,
        scale: torch.Tensor | None,
        max_fraction: float = 1.0,
    ) -> int:
        """Place rows `ids` (hottest first) as the static hot set, at most `max_fraction` of
        each set's ways. Returns how many were placed."""
        hot_ways = int(self.ways * max_fraction)
        with self.lock:
            _, first = np.unique(ids, return_index=True)
            first = np.sort(first)
            ids_u = ids[first]
            if self.weight.device.type == "cpu":
                index = torch.from_numpy(first)
            else:
                (index,) = self.uploader.upload([first])
            weight = weight.index_select(0, index)
            if scale is not None:
                scale = scale.index_select(0, index)
            sets = self.sets_of(ids_u)
            order = np.argsort(sets, kind="stable")  # keeps hottest-first within each set
            touched, first, group = np.unique(sets[order], return_index=True, return_inverse=True)
            rank = np.arange(len(order)) - first[group]
            taken = self.static[touched] | (self.tags[touched] >= 0)  # [k_sets, ways]
            room = np.minimum(hot_ways - self.static[touched].sum(1), (~taken).sum(1))
            ok = rank < room[group]
            order, group, rank = order[ok], group[ok], rank[ok]
            way = np.argsort(taken, axis=1, kind="stable")[group, rank]  # free ways first
            chosen = sets[order]
            self.tags[chosen, way], self.static[chosen, way] = ids_u[order], True
            self._write(chosen * self.ways + way, order, weight, scale)
        return len(order)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                **self.counts,
                "policy": self.policy,
                "capacity": self.capacity,
                "resident": int((self.tags >= 0).sum()),
                "static": int(self.static.sum()),
                "bytes": self.nbytes,
            }


# ---------------------------------------------------------------------------------------------
# n-gram row profiles: which rows a text corpus touches, for the static hot set


@dataclass(frozen=True)
class RowProfile:
    """Per Engram layer: row ids by descending hit count, and the counts."""

    rows: dict[int, np.ndarray]
    counts: dict[int, np.ndarray]
    num_tokens: int

    def hot_rows(self, layer_id: int, k: int) -> np.ndarray:
        return self.rows[layer_id][:k]

    def save(self, path: str | Path) -> None:
        arrays = {f"rows_{lid}": r for lid, r in self.rows.items()}
        arrays |= {f"counts_{lid}": c for lid, c in self.counts.items()}
        meta = {"layer_ids": list(self.rows), "num_tokens": self.num_tokens}
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> RowProfile:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            ids = [int(i) for i in meta["layer_ids"]]
            return cls(
                {i: data[f"rows_{i}"] for i in ids},
                {i: data[f"counts_{i}"] for i in ids},
                int(meta["num_tokens"]),
            )


def _merge_counts(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, inverse = np.unique(ids, return_inverse=True)
    return unique, np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int64)


def profile_rows(
    hasher: Any,
    documents: Iterable[Sequence[int] | np.ndarray],
    top_k: int | None = None,
    flush_ids: int = 1 << 22,
) -> RowProfile:
    """Count how often each table row is read over `documents` (raw token id sequences, each
    hashed as one whole sequence from its start), per Engram layer; keep the `top_k` hottest.

    `hasher` is an engine NgramHasher (its `compress`, `lookback` and `row_ids` are used).
    """
    layer_ids = list(hasher.config.layer_ids)
    merged = {lid: (np.empty(0, np.int64), np.empty(0, np.int64)) for lid in layer_ids}
    pending: dict[int, list[np.ndarray]] = {lid: [] for lid in layer_ids}
    num_pending = num_tokens = 0

    def flush() -> None:
        for lid in layer_ids:
            if pending[lid]:
                ids = np.concatenate([merged[lid][0], *pending[lid]])
                counts = np.concatenate(
                    [merged[lid][1], *(np.ones(len(p), np.int64) for p in pending[lid])]
                )
                merged[lid] = _merge_counts(ids, counts)
                pending[lid] = []

    empty_history = np.empty(0, np.int64)
    for doc in documents:
        compressed = hasher.compress(np.asarray(doc, dtype=np.int64))
        if not len(compressed):
            continue
        rows = hasher.row_ids(
            compressed, np.array([0, len(compressed)]), hasher.lookback(empty_history)[None]
        )  # [L, T, C]
        for lid, layer_rows in zip(layer_ids, rows, strict=True):
            pending[lid].append(layer_rows.reshape(-1))
        num_tokens += len(compressed)
        num_pending += rows[0].size
        if num_pending >= flush_ids:
            flush()
            num_pending = 0
    flush()
    out_rows, out_counts = {}, {}
    for lid, (ids, counts) in merged.items():
        order = np.argsort(-counts, kind="stable")[:top_k]
        out_rows[lid], out_counts[lid] = ids[order], counts[order]
    return RowProfile(out_rows, out_counts, num_tokens)
