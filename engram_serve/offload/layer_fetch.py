"""One Engram layer's fetch: row ids `[T, C]` -> float32 rows `[T, C, W]` on the device, from the
layer's store (offload/tiers.py) and optional cache (offload/cache.py). Which thread and stream
run it, and when, is the prefetcher's business (offload/prefetch.py).

LayerFetcher.fetch:
    1. unique row ids of the step (dedupe) -> cache lookup, pinning the hits;
    2. misses read from the backing tier: by device index (device, UVA), or by CPU threads into
       reused host staging (offload/staging.py), then one non-blocking copy to the device;
    3. misses offered to the cache; unique rows assembled from cache slots and fetched rows;
    4. decoded to float32 once per unique row, expanded back to [T, C, W]; pins released.
LayerFetcher.begin splits it for the split mode (offload/prefetch.py says when): steps 1-2
start in the engine thread at step start, the reads run on the I/O threads, and the rest runs
inside wait(). On CUDA a table the device reads (HBM, UVA) has its whole fetch enqueued on the
layer's stream at once; for a staged store the rest (the non-blocking copy out of pinned
staging, cache admission, assembly, decoding) is enqueued inside wait(), and an event is
recorded after the layer's work. Index arrays reach the device from pinned memory
(offload/uploads.py): a fetch never synchronises the host.

Warm-up: `warm` reads rows the cache lacks into it, for a later step; `begin_warm` is its form
for the split mode (the ordering of warm-ups and fetches: offload/prefetch.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from engram_serve.device import DeviceRuntime
from engram_serve.kernels.cpu_gather import gather_rows_cpu
from engram_serve.kernels.reference import FP8_E4M3_TABLE, UE8M0_TABLE, DecodeTables
from engram_serve.offload.cache import RowCache
from engram_serve.offload.staging import Staging, StagingPool
from engram_serve.offload.tiers import (
    DeviceStore,
    EngramTable,
    StagedStore,
    as_numpy,
    cancel_unstarted,
    decode_rows,
    gather_stored,
    stored_np_dtype,
    wait_reads,
)
from engram_serve.offload.uploads import Uploader

# Row copies on CPU go through NumPy (here and in RowCache._write), not torch indexing: ATen forks
# an OpenMP team for an op over 32,768 elements (at::internal::GRAIN_SIZE), and a second team
# contending with the forward pass's for the cores stalls both (measured on 2 cores: 1.5 cores
# busy instead of 2, output tokens/s down by a fifth).

log = logging.getLogger(__name__)

# warmed: rows read ahead into the cache by warm() (also counted in rows_read)
COUNTERS = ("lookups", "unique_rows", "cache_hits", "cache_misses", "fetches", "warmed")


class LayerFetcher:
    """One Engram layer: its store, optional cache and staging, and its counters."""

    def __init__(
        self,
        table: EngramTable,
        store: DeviceStore | StagedStore,
        cache: RowCache | None,
        runtime: DeviceRuntime,
        indices: Uploader,
        stream: Any = None,
    ) -> None:
        """`indices`: this layer's uploader of index arrays; `stream`: its side stream (CUDA
        with prefetch; None: the caller's stream)."""
        self.table, self.store, self.cache = table, store, cache
        self.runtime, self.device = runtime, runtime.device
        self.indices, self.stream = indices, stream
        self.decode_tables = (
            DecodeTables(runtime.upload(FP8_E4M3_TABLE), runtime.upload(UE8M0_TABLE))
            if runtime.is_cuda
            else DecodeTables()
        )
        self.width, self.dtype = table.width, table.table_dtype
        self.stored_row_bytes = table.row_bytes + table.scale_row_bytes
        self.staging = (
            None
            if store.reads_on_device
            else StagingPool(
                table.width,
                table.scale_row_bytes,
                stored_np_dtype(table.table_dtype),
                runtime,
            )
        )
        # The device tier gathers every row as is: the baseline. Other paths dedupe first,
        # so each distinct row crosses the link (or the disk) once per step.
        self.dedupe = cache is not None or not (store.reads_on_device and store.mode == "direct")
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.rows_read: dict[str, int] = {}
        self.fetch_s = 0.0
        self._lock = threading.Lock()
        self._warm_reads: tuple[np.ndarray, Staging, list[Future]] | None = None  # see begin_warm
        self._reading = np.empty(0, np.int64)  # misses of the fetch begun and not finished

    def fetch(self, ids: np.ndarray) -> torch.Tensor:
        """Row ids `[T, C]` -> float32 rows `[T, C, W]` on the device (enqueued, on CUDA)."""
        start = time.perf_counter()
        num_tokens, num_cols = ids.shape
        flat = ids.reshape(-1)
        if not flat.size:
            return torch.empty(
                (num_tokens, num_cols, self.width), dtype=torch.float32, device=self.device
            )
        if not self.dedupe:
            out = self._gather_decode(self.store.weight, self.store.scale, ids)
            self._count(len(flat), len(flat), 0, start)
            return out.view(num_tokens, num_cols, self.width)
        unique, inverse = np.unique(flat, return_inverse=True)
        slots = self._lookup(unique)
        try:
            out = self._fetch_unique(unique, inverse, slots)
        finally:
            if self.cache is not None:
                self.cache.release(slots)
        self._count(len(flat), len(unique), int((slots >= 0).sum()), start)
        return out.view(num_tokens, num_cols, self.width)

    def _lookup(self, unique: np.ndarray) -> np.ndarray:
        """Cache slots of `unique` ids, pinned until released (-1: a miss; all, with no cache)."""
        if self.cache is None:
            return np.full(len(unique), -1, np.int64)
        return self.cache.lookup(unique)

    def _fetch_unique(
        self, unique: np.ndarray, inverse: np.ndarray, slots: np.ndarray
    ) -> torch.Tensor:
        miss = np.flatnonzero(slots < 0)
        miss_ids = unique[miss]
        staging = None if self.store.reads_on_device else self.staging.acquire(len(miss_ids))
        try:
            return self._complete(unique, inverse, slots, miss, *self._read(miss_ids, staging))
        finally:
            self._release_staging(staging)

    def _complete(
        self,
        unique: np.ndarray,
        inverse: np.ndarray,
        slots: np.ndarray,
        miss: np.ndarray,
        miss_w: torch.Tensor,
        miss_s: torch.Tensor | None,
    ) -> torch.Tensor:
        """With the misses `unique[miss]` read: offer them to the cache, assemble every unique
        row and decode `[n, W]` (a fresh tensor, not staging)."""
        if self.cache is not None and len(miss):
            self.cache.admit(unique[miss], miss_w, miss_s)
        w, s = self._assemble(slots, miss, miss_w, miss_s)  # [m, W] stored rows
        return self._gather_decode(w, s, inverse)

    def warm(self, ids: np.ndarray) -> None:
        """Read the rows of `ids` that the cache lacks into it, for a later step. Pins nothing
        beyond its own lookup; the rows may be evicted (or refused by LFU) like any miss."""
        miss_ids = self._uncached(ids)
        if not len(miss_ids):
            return
        staging = None if self.store.reads_on_device else self.staging.acquire(len(miss_ids))
        try:
            self.cache.admit(miss_ids, *self._read(miss_ids, staging))
        finally:
            self._release_staging(staging)
        self._count_warmed(len(miss_ids))

    def _uncached(self, ids: np.ndarray) -> np.ndarray:
        """The distinct ids the cache lacks now (a look-up that pins nothing)."""
        unique = np.unique(ids)
        slots = self.cache.lookup(unique)
        self.cache.release(slots)
        return unique[slots < 0]

    def _count_warmed(self, rows: int) -> None:
        with self._lock:
            self.counts["warmed"] += rows
            self.rows_read[self.store.tier] = self.rows_read.get(self.store.tier, 0) + rows

    def begin(self, ids: np.ndarray) -> Callable[[], tuple[torch.Tensor, Any]]:
        """`fetch` in two halves, for the split mode (see the module docstring): now, in the
        caller's thread, what must start early; then the returned function, called from `wait`,
        does the rest in its caller's thread and returns the rows with the event after them
        (None on CPU). Only the reads overlap the forward pass on CPU: fetch work in threads of
        its own competed with it for 2 cores and the GIL (0.88 of the device tier's output
        tokens/s on text, against 0.98 with no overlap at all)."""
        self._finish_warm()  # rows read ahead during the last step become hits now
        if self.store.reads_on_device:  # CUDA: the whole fetch enqueued on the layer's stream
            with self.runtime.stream(self.stream):
                done = self.fetch(ids), self._record()
            return lambda: done
        start = time.perf_counter()
        num_tokens, num_cols = ids.shape
        unique, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        slots = self._lookup(unique)
        miss = np.flatnonzero(slots < 0)
        staging = self.staging.acquire(len(miss))
        self._reading = unique[miss]
        reads = self.store.submit_reads(self._reading, *self._staging_views(staging, len(miss)))
        begun_s = time.perf_counter() - start

        def finish() -> tuple[torch.Tensor, Any]:
            start = time.perf_counter()
            try:
                wait_reads(reads)
                with self.runtime.stream(self.stream):
                    staged = self._on_device(*self._staging_views(staging, len(miss)))
                    out = self._complete(unique, inverse, slots, miss, *staged)
                    event = self._record()
            finally:
                self._release_staging(staging)
                self._reading = np.empty(0, np.int64)
                if self.cache is not None:
                    self.cache.release(slots)
            self._count(ids.size, len(unique), len(unique) - len(miss), start - begun_s)
            return out.view(num_tokens, num_cols, self.width), event

        return finish

    def begin_warm(self, ids: np.ndarray) -> None:
        """`warm` for `begin`'s mode: a staged store's reads start now and the rows enter the
        cache at the next `begin` (or `begin_warm`), in the caller's thread; a table the device
        reads is warmed on the layer's stream at once, behind this step's fetch."""
        self._finish_warm()
        if self.store.reads_on_device:
            with self.runtime.stream(self.stream):
                self.warm(ids)
            return
        miss_ids = self._uncached(ids)
        miss_ids = miss_ids[~np.isin(miss_ids, self._reading, assume_unique=True)]  # read already
        if len(miss_ids):
            staging = self.staging.acquire(len(miss_ids))
            reads = self.store.submit_reads(miss_ids, *self._staging_views(staging, len(miss_ids)))
            self._warm_reads = (miss_ids, staging, reads)

    def _finish_warm(self) -> None:
        """Admit the rows read ahead. Reads not started by now are cancelled, not waited for:
        the step about to begin reads what it needs itself, ahead of any later look-ahead."""
        if self._warm_reads is None:
            return
        miss_ids, staging, reads = self._warm_reads
        self._warm_reads = None
        try:
            started = cancel_unstarted(reads)
            wait_reads(started)
            ids, (w, s) = miss_ids, self._staging_views(staging, len(miss_ids))
            if len(started) < len(reads):  # some were cancelled: admit the rows read
                read = np.zeros(len(miss_ids), bool)
                for rows, _ in started:
                    read[rows] = True
                ids, w, s = miss_ids[read], w[read], None if s is None else s[read]
            with self.runtime.stream(self.stream):
                self.cache.admit(ids, *self._on_device(w, s))
        except Exception:  # only a loss of speed: the step's own fetch reads these rows
            log.exception("warming Engram layer %d's cache failed", self.table.layer_id)
            return
        finally:
            with self.runtime.stream(self.stream):
                self._release_staging(staging)
        self._count_warmed(len(ids))

    def _staging_views(self, staging: Staging, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
        return staging.weight[:rows], None if staging.scale is None else staging.scale[:rows]

    def _on_device(
        self, weight: np.ndarray, scale: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored host rows on the device: views on CPU; on CUDA non-blocking copies out of
        pinned staging, enqueued on the current stream."""
        bf16 = self.dtype == "bfloat16"  # NumPy has no bfloat16: its 16-bit words go
        w = self.runtime.upload(weight.view(np.int16) if bf16 else weight, non_blocking=True)
        w = w.view(torch.bfloat16) if bf16 else w
        return w, None if scale is None else self.runtime.upload(scale, non_blocking=True)

    def _record(self) -> Any:
        """An event after the work enqueued so far on the layer's stream (None on CPU)."""
        if self.stream is None:
            return None
        event = self.runtime.new_event()
        event.record(self.stream)
        return event

    def _release_staging(self, staging: Staging | None) -> None:
        """Back to the pool; on CUDA with the event after the copies out of it (enqueued on the
        current stream), so it is refilled only after them."""
        if staging is None:
            return
        ready = None
        if self.runtime.is_cuda:
            ready = self.runtime.new_event()
            ready.record()
        self.staging.release(staging, ready)

    def _gather_decode(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor | None,
        index: np.ndarray,
    ) -> torch.Tensor:
        """float32 `[n, W]` = decode(weight[index]); one fused pass on CPU (its exactness is
        tested against the reference in tests/test_kernels.py and here)."""
        if self.device.type == "cpu":
            idx = torch.from_numpy(np.ascontiguousarray(index).reshape(-1))
            return gather_rows_cpu(weight, idx, scale, block=self.table.quant_block)
        (idx,) = self.indices.upload([index.reshape(-1)])
        w, s = gather_stored(weight, scale, idx)
        return decode_rows(w, s, self.dtype, self.table.quant_block, self.decode_tables)

    def _read(
        self, ids: np.ndarray, staging: Staging | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored rows of `ids` on the device: by device index, or read into `staging` by the
        CPU threads and sent on."""
        if staging is None:
            return self.store.gather(self._to_device(ids))
        self.store.read(ids, *self._staging_views(staging, len(ids)))
        return self._on_device(*self._staging_views(staging, len(ids)))

    def _assemble(
        self,
        slots: np.ndarray,
        miss: np.ndarray,
        miss_w: torch.Tensor,
        miss_s: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored rows of every unique id `[m, W]`: cache hits, then fetched misses."""
        if len(miss) == len(slots):
            return miss_w, miss_s
        hit = np.flatnonzero(slots >= 0)
        if self.device.type == "cpu":
            index = hit, slots[hit], miss
        else:
            index = tuple(self.indices.upload([hit, slots[hit], miss]))
        w = self._merge(self.cache.weight, miss_w, *index)
        s = None if miss_s is None else self._merge(self.cache.scale, miss_s, *index)
        return w, s

    def _merge(self, cached: torch.Tensor, fetched: torch.Tensor, hit, cache_slots, miss):
        """`[len(hit) + len(miss), W]`: cached[cache_slots] at rows `hit`, fetched at `miss`
        (NumPy index arrays on CPU, device tensors elsewhere)."""
        out = torch.empty((len(hit) + len(miss), cached.shape[1]), dtype=cached.dtype,
                          device=self.device)  # fmt: skip
        if self.device.type == "cpu":  # NumPy copies (see the note on CPU row copies)
            as_numpy(out)[hit] = as_numpy(cached)[cache_slots]
            as_numpy(out)[miss] = as_numpy(fetched)
        else:
            out.index_copy_(0, hit, cached.index_select(0, cache_slots))
            out.index_copy_(0, miss, fetched)
        return out

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.from_numpy(np.ascontiguousarray(a))
        return self.indices.upload([a])[0]

    def _count(self, lookups: int, unique: int, hits: int, start: float) -> None:
        """One fetch: `unique` distinct rows looked up, `hits` of them served by the cache and
        the rest by the store."""
        tiers = {self.store.tier: unique - hits}
        if self.cache is not None:
            tiers["cache"] = hits
        with self._lock:
            self.counts["lookups"] += lookups
            self.counts["unique_rows"] += unique
            self.counts["cache_hits"] += hits
            self.counts["cache_misses"] += unique - hits if self.cache is not None else 0
            self.counts["fetches"] += 1
            for tier, rows in tiers.items():
                self.rows_read[tier] = self.rows_read.get(tier, 0) + rows
            self.fetch_s += time.perf_counter() - start

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self.counts)
            out["rows_read"] = dict(self.rows_read)
            out["bytes_read"] = {t: r * self.stored_row_bytes for t, r in self.rows_read.items()}
            out["fetch_s"] = self.fetch_s
        out["table_bytes"] = dict(self.store.table_bytes)
        out["store"] = self.store.mode
        if self.cache is not None:
            out["cache"] = self.cache.stats()
            out["table_bytes"]["cache"] = self.cache.nbytes
        if self.staging is not None:
            out["staging_allocations"] = self.staging.allocations
        return out

    def close(self) -> None:
        self._finish_warm()
        self.store.close()
        self.indices.close()
        if self.staging is not None:
            self.staging.close()
