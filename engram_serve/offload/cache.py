"""The fast-tier row cache: hot Engram rows kept in HBM (GPU) or RAM (in front of disk).

Layout: `ways`-way set-associative, like FBGEMM's and HugeCTR's embedding caches. Row r lives,
if anywhere, in set `hash(r) % num_sets`, in one of its `ways` slots; slot = set * ways + way.
Lookup of a whole step is one vectorized compare of `[m, ways]` tags, and the host metadata
costs 8 + 8 + 4 + 1 bytes per slot, nothing per table row (tables have 10^8-10^9 rows).

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

import numpy as np
import torch

CachePolicy = Literal["lru", "lfu"]
DEFAULT_WAYS = 32
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SKETCH_SEEDS = tuple(np.uint64(s) for s in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F,
                                             0x165667B19E3779F9, 0xD6E8FEB86659FD93))  # fmt: skip
_LOCKED = np.iinfo(np.int64).max


def _mix(ids: np.ndarray, seed: np.uint64) -> np.ndarray:
    """A 32-bit multiplicative hash of int64 row ids (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        return (ids.astype(np.uint64) * seed) >> np.uint64(32)


class FrequencySketch:
    """Count-min sketch of row frequencies: 4 x width uint32 counters, aged by halving."""

    def __init__(self, capacity: int) -> None:
        width = 1 << max(10, int(2 * capacity - 1).bit_length())
        self.mask = np.uint64(width - 1)
        self.table = np.zeros((len(_SKETCH_SEEDS), width), np.uint32)
        self.sample_size, self.added = 10 * max(1, capacity), 0

    def _index(self, ids: np.ndarray) -> list[np.ndarray]:
        return [(_mix(ids, s) & self.mask).astype(np.int64) for s in _SKETCH_SEEDS]

    def add(self, ids: np.ndarray) -> None:
        for row, idx in zip(self.table, self._index(ids), strict=True):
            np.add.at(row, idx, 1)
        self.added += len(ids)
        if self.added >= self.sample_size:
            self.table >>= 1
            self.added //= 2

    def estimate(self, ids: np.ndarray) -> np.ndarray:
        """Estimated counts, same shape as `ids` (never below the true count since aging)."""
        flat = ids.reshape(-1)
        est = np.min([row[idx] for row, idx in zip(self.table, self._index(flat), strict=True)], 0)
        return est.astype(np.int64).reshape(ids.shape)


class RowCache:
    """One Engram layer's row cache: `capacity` slots of stored rows on `device`."""

    def __init__(
        self,
        capacity: int,
        width: int,
        scale_width: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        policy: CachePolicy = "lru",
        ways: int = DEFAULT_WAYS,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"a row cache needs capacity >= 1, got {capacity}")
        if policy not in ("lru", "lfu"):
            raise ValueError(f"cache policy must be 'lru' or 'lfu', got {policy!r}")
        self.ways = min(ways, capacity)
        self.num_sets = capacity // self.ways  # rounds down: never more memory than asked for
        self.policy = policy
        shape = (self.num_sets, self.ways)
        self.tags = np.full(shape, -1, np.int64)
        self.score = np.zeros(shape, np.int64)
        self.pins = np.zeros(shape, np.int32)
        self.static = np.zeros(shape, bool)
        self.weight = torch.empty((self.capacity, width), dtype=dtype, device=device)
        self.scale = (
            torch.empty((self.capacity, scale_width), dtype=torch.uint8, device=device)
            if scale_width
            else None
        )
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
        return (_mix(ids, _GOLDEN) % np.uint64(self.num_sets)).astype(np.int64)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots of distinct row `ids` `[m]` (-1: miss). Hits are pinned: call release(slots)
        once their rows have been read out (on GPU: enqueued)."""
        with self.lock:
            self.tick += 1
            sets = self.sets_of(ids)
            match = self.tags[sets] == ids[:, None]  # [m, ways]
            hit = match.any(1)
            hit_sets, hit_ways = sets[hit], match[hit].argmax(1)
            self.pins[hit_sets, hit_ways] += 1  # ids are distinct, so (set, way) pairs are too
            if self.sketch is None:
                self.score[hit_sets, hit_ways] = self.tick
            else:
                self.sketch.add(ids)
            slots = np.full(len(ids), -1, np.int64)
            slots[hit] = hit_sets * self.ways + hit_ways
            self.counts["hits"] += int(hit.sum())
            self.counts["misses"] += int(len(ids) - hit.sum())
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
                dst = torch.from_numpy(slots[take]).to(self.weight.device, non_blocking=True)
                src = torch.from_numpy(take).to(weight.device, non_blocking=True)
                self.weight[dst] = weight[src]
                if self.scale is not None:
                    self.scale[dst] = scale[src]
        return slots

    def _choose_slots(self, ids: np.ndarray) -> np.ndarray:
        out = np.full(len(ids), -1, np.int64)
        sets = self.sets_of(ids)
        fresh = np.flatnonzero(~(self.tags[sets] == ids[:, None]).any(1))
        if not len(fresh):
            return out
        order = fresh[np.argsort(sets[fresh], kind="stable")]  # candidates grouped by set
        touched, first, group = np.unique(sets[order], return_index=True, return_inverse=True)
        rank = np.arange(len(order)) - first[group]  # i-th candidate of its set takes way i
        tags = self.tags[touched]  # [k_sets, ways]
        key = self.score[touched] if self.sketch is None else self.sketch.estimate(tags)
        key = np.where(tags < 0, -1, key)  # empty ways fill first
        locked = (self.pins[touched] > 0) | self.static[touched]
        key = np.where(locked, _LOCKED, key)
        way_order = np.argsort(key, axis=1, kind="stable")
        ok = rank < (~locked).sum(1)[group]
        order, group, rank = order[ok], group[ok], rank[ok]
        way = way_order[group, rank]
        victim_key = key[group, way]
        if self.sketch is not None:  # TinyLFU: replace only a less frequent row
            keep = (victim_key < 0) | (self.sketch.estimate(ids[order]) > victim_key)
            order, way, victim_key = order[keep], way[keep], victim_key[keep]
        chosen_sets = sets[order]
        self.counts["evicted"] += int((victim_key >= 0).sum())
        self.counts["admitted"] += len(order)
        self.counts["rejected"] += len(ids) - len(order)
        self.tags[chosen_sets, way] = ids[order]
        self.score[chosen_sets, way] = self.tick
        out[order] = chosen_sets * self.ways + way
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
            ids_u = ids[np.sort(first)]
            weight = weight[torch.from_numpy(np.sort(first)).to(weight.device)]
            if scale is not None:
                scale = scale[torch.from_numpy(np.sort(first)).to(scale.device)]
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
            slots = torch.from_numpy(chosen * self.ways + way).to(self.weight.device)
            src = torch.from_numpy(order).to(weight.device)
            self.weight[slots] = weight[src]
            if self.scale is not None:
                self.scale[slots] = scale[src]
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
