"""Prefetch: every Engram layer's rows requested at step start; the model waits only inside an
Engram layer.

    rows = prefetcher.prefetch(row_ids)   # [L, T, C] row ids, right after hashing; returns at once
    ...                                   # earlier layers run while rows are read
    h = engram(h, rows.wait(layer_id))    # float32 [T, C, W]; the only blocking point

This file is the step level: the step handle (StepRows), the Prefetcher (its worker pool, a
stream per layer, stall accounting) and build_prefetcher. One layer's fetch (dedupe, cache
lookup, read from the backing tier, assemble, decode) is LayerFetcher (offload/layer_fetch.py);
the host staging its reads fill is offload/staging.py.

One layer's fetch (LayerFetcher.fetch), in a worker thread per layer (prefetch on) or inside
wait() (prefetch off); on a CPU device reading a staged store (disk, host-staged), split by
LayerFetcher.begin: its steps 1-2 (dedupe and cache lookup; reading the misses) start in the
engine thread at step start, the reads run on the I/O threads, and the rest runs inside wait()
(threads doing Python work beside the forward pass cost more than they hid on 2 cores; on CUDA
the same split keeps CUDA work in one thread).
On CUDA every layer has a stream of its own and every device operation is enqueued from the
engine thread (no Python thread issues CUDA work): at step start a table the device reads (HBM,
UVA) has its whole fetch enqueued on the layer's stream; a staged store's reads start on the I/O
threads and the rest is enqueued inside wait(). An event is recorded after the layer's work and
wait() makes the compute stream wait on it, so the first Engram layer's fetch never queues
behind a later layer's. Time blocked in wait() is the stall.

Warm-up (the look-ahead: `OffloadConfig.lookahead`, on for the disk and remote tiers, with prefetch
and a cache):
`prefetcher.warm(row_ids)` reads rows a later step will likely want (the engine's next prompt
chunks) into each layer's cache and returns at once. Each layer's jobs run in submission order,
so a warm-up starts after this step's fetch of that layer (it never delays it) and ends before
the next step's fetch starts (no row is read twice). In the split mode a warm-up's reads start
once the step's first Engram layer has its rows (the model waits for that layer after one
layer of compute; look-ahead reads queued beside its reads slowed them), skip the rows this
step's fetch is still reading, and enter the cache at the next step's start.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from engram_serve.config import OffloadConfig
from engram_serve.device import DeviceRuntime, get_runtime
from engram_serve.engram.config import EngramConfig
from engram_serve.offload.cache import RowCache, RowProfile
from engram_serve.offload.layer_fetch import COUNTERS, LayerFetcher
from engram_serve.offload.tiers import (
    DeviceStore,
    DiskStore,
    EngramTable,
    StagedStore,
    device_store,
    host_store,
    stored_torch_dtype,
)
from engram_serve.offload.uploads import Uploader

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the step handle and the prefetcher


class StepRows:
    """One step's Engram rows (a RowHandle): wait(layer_id) -> float32 `[T, C, W]`."""

    def __init__(self, prefetcher: Prefetcher, row_ids: dict[int, np.ndarray]) -> None:
        self._prefetcher, self._row_ids = prefetcher, row_ids
        self._futures: dict[int, Future] = {}
        self._finishers: dict[int, Callable[[], tuple[torch.Tensor, Any]] | Exception] = {}
        self._finished: dict[int, tuple[torch.Tensor, Any]] = {}  # by finish(), not yet waited
        self._done: dict[int, torch.Tensor] = {}
        self._first_layer = min(row_ids, default=None)  # the layer the model reaches first
        self._after_first_layer: list[Callable[[], None]] = []
        for layer_id, ids in row_ids.items():
            if prefetcher.splits:
                self._finishers[layer_id] = prefetcher.fetchers[layer_id].begin(ids)
            elif prefetcher.pool is not None:
                self._futures[layer_id] = prefetcher.submit(layer_id, prefetcher.run, layer_id, ids)

    def wait(self, layer_id: int) -> torch.Tensor:
        if layer_id in self._done:
            return self._done[layer_id]
        if layer_id not in self._row_ids:
            raise KeyError(
                f"layer {layer_id} is not an Engram layer (Engram layers: {list(self._row_ids)})"
            )
        start = time.perf_counter()
        future = self._futures.get(layer_id)
        if layer_id in self._finished:
            out, event = self._finished.pop(layer_id)
        elif layer_id in self._finishers:
            out, event = self._finish(layer_id)
        elif future is not None:
            out, event = future.result()
        else:
            out, event = self._prefetcher.run(layer_id, self._row_ids[layer_id])
        if event is not None:  # rows were made on the layer's stream
            self._prefetcher.wait_on_compute_stream(out, event)
        self._prefetcher.add_stall(time.perf_counter() - start)
        self._done[layer_id] = out
        if layer_id == self._first_layer:
            for fn in self._after_first_layer:
                fn()
            self._after_first_layer.clear()
        return out

    def after_first_layer(self, fn: Callable[[], None]) -> None:
        """fn() once the first Engram layer's rows are ready (now, if they are); dropped if the
        step never waits for them."""
        if self._first_layer is None or self._first_layer in self._done:
            fn()
        else:
            self._after_first_layer.append(fn)

    def finish(self) -> None:
        """Complete the layers begun and not yet waited for (`LayerFetcher.begin` mode), so that
        their staging and cache pins are free for the next step; `wait` returns their rows, or
        raises their error, later. Look-ahead reads still deferred are dropped: they were for
        the step now starting, which reads its rows itself."""
        self._after_first_layer.clear()
        for layer_id in list(self._finishers):
            with contextlib.suppress(Exception):  # kept for wait() to raise
                self._finished[layer_id] = self._finish(layer_id)

    def _finish(self, layer_id: int) -> tuple[torch.Tensor, Any]:
        finisher = self._finishers[layer_id]
        if isinstance(finisher, BaseException):
            raise finisher
        try:
            out = finisher()
        except Exception as e:
            self._finishers[layer_id] = e
            raise
        del self._finishers[layer_id]
        return out


class Prefetcher:
    """Fetches every Engram layer's rows of a step; see the module docstring."""

    def __init__(
        self,
        engram: EngramConfig,
        fetchers: dict[int, LayerFetcher],
        offload: OffloadConfig,
        runtime: DeviceRuntime,
        io_pool: ThreadPoolExecutor,
    ) -> None:
        self.engram, self.fetchers, self.offload = engram, fetchers, offload
        self.runtime, self.device, self.io_pool = runtime, runtime.device, io_pool
        # In-RAM rows on a CPU device take microseconds to gather: a worker thread would only
        # add a hand-off and compete with the forward pass's threads for the cores.
        in_ram = offload.tier == "device" and not runtime.is_cuda
        # The split mode (LayerFetcher.begin): on CUDA always, so that CUDA work stays in the
        # engine thread; on CPU for staged stores, so that only the reads overlap.
        self.splits = (
            offload.prefetch
            and bool(fetchers)
            and (runtime.is_cuda or all(not f.store.reads_on_device for f in fetchers.values()))
        )
        self.pool = (  # two threads a layer: a step's fetch and the next step's warm-up
            ThreadPoolExecutor(2 * len(fetchers), thread_name_prefix="engram-prefetch")
            if offload.prefetch and fetchers and not in_ram and not self.splits
            else None
        )
        # warm() does something: look-ahead asked for, prefetch on and a cache to warm. The
        # engine skips its look-ahead (hashing included) otherwise.
        self.warms = (
            offload.looks_ahead
            and (self.pool is not None or self.splits)
            and any(f.cache is not None for f in fetchers.values())
        )
        self._last_step: StepRows | None = None
        self._last_job: dict[int, Future] = {}  # each layer's latest job (see submit)
        self.steps, self.stall_s = 0, 0.0
        self._gpu_stall_events: list[tuple[Any, Any]] = []
        self._gpu_stall_s = 0.0
        self._lock = threading.Lock()

    def prefetch(self, row_ids: np.ndarray) -> StepRows:
        """Start fetching `row_ids [L, T, C]` (layer order = engram.layer_ids); returns at once."""
        per_layer = self._per_layer(row_ids)
        with self._lock:
            self.steps += 1
        if self._last_step is not None:  # one step's fetches in flight at a time (begin mode)
            self._last_step.finish()
        for fetcher in self.fetchers.values():  # a fresh half of each index arena (uploads.py)
            fetcher.indices.next_step()
        self._last_step = StepRows(self, per_layer)
        return self._last_step

    def warm(self, row_ids: np.ndarray) -> None:
        """Start reading rows `[L, T, C]` a later step will likely want into each layer's cache;
        returns at once. A no-op unless `warms`. See the module docstring for the ordering."""
        if not self.warms:
            return
        for layer_id, ids in self._per_layer(row_ids).items():
            fetcher = self.fetchers[layer_id]
            if fetcher.cache is None:
                continue
            if self.splits and self._last_step is not None:
                self._last_step.after_first_layer(partial(fetcher.begin_warm, ids))
            elif self.splits:
                fetcher.begin_warm(ids)
            else:
                self.submit(layer_id, self._warm_layer, layer_id, ids)

    def submit(self, layer_id: int, fn: Callable[..., Any], *args: Any) -> Future:
        """fn(*args) on the pool once the layer's previous job has finished. The pool runs jobs
        in submission order and a job waits only on an earlier one, so this never deadlocks."""
        with self._lock:
            previous = self._last_job.get(layer_id)
            future = self.pool.submit(_after, previous, fn, *args)
            self._last_job[layer_id] = future
        return future

    def _warm_layer(self, layer_id: int, ids: np.ndarray) -> None:
        try:
            self.fetchers[layer_id].warm(ids)
        except Exception:  # only a loss of speed: the step's own fetch reads these rows
            log.exception("warming Engram layer %d's cache failed", layer_id)

    def _per_layer(self, row_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Checked `row_ids [L, T, C]`, split by layer id."""
        row_ids = np.asarray(row_ids)
        num_layers, num_cols = len(self.engram.layer_ids), self.engram.num_heads
        if row_ids.ndim != 3 or row_ids.shape[0] != num_layers or row_ids.shape[2] != num_cols:
            raise ValueError(
                f"row ids must be [layers={num_layers}, tokens, columns={num_cols}], "
                f"got shape {row_ids.shape}"
            )
        if row_ids.dtype != np.int64:
            raise TypeError(f"row ids must be int64, got {row_ids.dtype}")
        per_layer = {}
        for layer_id, ids in zip(self.engram.layer_ids, row_ids, strict=True):
            rows = self.fetchers[layer_id].table.rows
            if ids.size and (ids.min() < 0 or ids.max() >= rows):
                raise IndexError(
                    f"layer {layer_id}: row ids span [{ids.min()}, {ids.max()}], "
                    f"outside its table of {rows} rows"
                )
            per_layer[layer_id] = np.array(ids, dtype=np.int64, order="C")  # ours to keep
        return per_layer

    def run(self, layer_id: int, ids: np.ndarray) -> tuple[torch.Tensor, None]:
        """One layer's fetch in the caller's thread and on its stream (prefetch off, or a CPU
        worker thread)."""
        return self.fetchers[layer_id].fetch(ids), None

    def wait_on_compute_stream(self, rows: torch.Tensor, event: Any) -> None:
        """Make the current (compute) stream wait for `event`, after which `rows`, made on a
        layer's stream, may be read; timing events around the wait measure the GPU's stall."""
        runtime = self.runtime
        compute = runtime.current_stream()
        before, after = runtime.new_event(timing=True), runtime.new_event(timing=True)
        before.record(compute)
        runtime.wait_event(compute, event)
        after.record(compute)  # after - before: how long the GPU itself stalled
        runtime.record_stream(rows, compute)  # allocated on the layer's stream, used here
        self.add_gpu_stall(before, after)

    def add_stall(self, seconds: float) -> None:
        with self._lock:
            self.stall_s += seconds

    def add_gpu_stall(self, before: Any, after: Any) -> None:
        with self._lock:
            self._gpu_stall_events.append((before, after))
        self.gpu_stall_s()  # the list holds only the events still in flight

    def gpu_stall_s(self) -> float:
        """Time the compute stream waited on prefetch events, over the waits the GPU has
        finished: events are queried, never synchronised, so reading it never stalls the
        host (the last step's waits may still be missing)."""
        with self._lock:
            pending = []
            for before, after in self._gpu_stall_events:
                if after.query():
                    self._gpu_stall_s += before.elapsed_time(after) / 1e3
                else:
                    pending.append((before, after))
            self._gpu_stall_events = pending
            return self._gpu_stall_s

    @property
    def stats(self) -> dict[str, Any]:
        """Cumulative counters, summed over layers, plus each layer's own."""
        layers = {lid: f.stats() for lid, f in self.fetchers.items()}
        out: dict[str, Any] = {
            "tier": self.offload.tier,
            "prefetch": self.offload.prefetch,
            "device": str(self.device),
            "steps": self.steps,
            "stall_s": self.stall_s,  # host time blocked in wait()
        }
        if self.runtime.is_cuda:
            out["gpu_stall_s"] = self.gpu_stall_s()
        for key in (*COUNTERS, "fetch_s"):
            out[key] = sum(s[key] for s in layers.values())
        looked_up = out["cache_hits"] + out["cache_misses"]
        out["hit_rate"] = out["cache_hits"] / looked_up if looked_up else 0.0
        for key in ("rows_read", "bytes_read", "table_bytes"):
            total: dict[str, int] = {}
            for s in layers.values():
                for tier, v in s[key].items():
                    total[tier] = total.get(tier, 0) + v
            out[key] = total
        out["store"] = sorted({s["store"] for s in layers.values()})
        out["tier_state"] = self.tier_state
        out["layers"] = layers
        return out

    @property
    def tier_state(self) -> str:
        """What the backing tier can serve now: "ready", or why not (the remote tier's
        "unreachable" or "unpublished": offload/remote.py)."""
        return min({f.store.state for f in self.fetchers.values()} - {"ready"}, default="ready")

    def close(self) -> None:
        if self._last_step is not None:
            self._last_step.finish()
        self.runtime.synchronize()  # no copy may be in flight when pinned memory is unregistered
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.io_pool.shutdown(wait=True)
        for fetcher in self.fetchers.values():
            fetcher.close()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _after(previous: Future | None, fn: Callable[..., Any], *args: Any) -> Any:
    if previous is not None:
        wait([previous])  # its outcome is its own caller's business
    return fn(*args)


# ---------------------------------------------------------------------------------------------
# building


def cache_rows_per_layer(
    offload: OffloadConfig, tables: dict[int, EngramTable], num_layers: int
) -> int:
    """The cache budget (rows, or bytes of stored rows) split evenly over the Engram layers."""
    if offload.cache_bytes:
        row_bytes = max(t.row_bytes + t.scale_row_bytes for t in tables.values())
        return offload.cache_bytes // row_bytes // max(1, num_layers)
    return offload.cache_rows // max(1, num_layers)


def _check_tables(engram: EngramConfig, tables: dict[int, EngramTable]) -> None:
    for layer_id in engram.layer_ids:
        if layer_id not in tables:
            raise ValueError(f"no table for Engram layer {layer_id} (have {sorted(tables)})")
        t = tables[layer_id]
        if t.width != engram.head_dim or t.table_dtype != engram.table_dtype:
            raise ValueError(
                f"layer {layer_id}'s table is {t.table_dtype} of width {t.width}; the Engram "
                f"config says {engram.table_dtype} of width {engram.head_dim}"
            )


def _store(
    table: EngramTable,
    offload: OffloadConfig,
    runtime: DeviceRuntime,
    io_pool: ThreadPoolExecutor,
    progress: Callable[[int], None] | None,
) -> DeviceStore | StagedStore:
    if offload.tier == "device":
        return device_store(table, runtime, progress)
    if offload.tier == "host":
        return host_store(table, runtime, io_pool, offload.shm_name, offload.host_gather, progress)
    if offload.tier == "remote":
        from engram_serve.offload.remote import RemoteStore  # Mooncake, where it is used

        return RemoteStore(table, io_pool)
    return DiskStore(table, io_pool, direct=offload.direct_io)


def _warm(fetcher: LayerFetcher, profile: RowProfile, fraction: float) -> int:
    """Fill the cache's static hot set with the profile's hottest rows of this layer (at
    start-up, on the current stream)."""
    cache = fetcher.cache
    if fetcher.table.layer_id not in profile.rows:
        return 0
    hot = profile.hot_rows(fetcher.table.layer_id, int(cache.capacity * fraction))
    hot = hot[(hot >= 0) & (hot < fetcher.table.rows)]
    if not len(hot):
        return 0
    staging = None if fetcher.store.reads_on_device else fetcher.staging.acquire(len(hot))
    try:
        w, s = fetcher._read(hot, staging)
        if staging is not None:  # copies: the staging goes back to the pool
            w, s = w.clone(), None if s is None else s.clone()
            fetcher.runtime.synchronize()
    finally:
        if staging is not None:
            fetcher.staging.release(staging)
    return cache.warm(hot, w, s, fraction)


def build_prefetcher(
    engram: EngramConfig,
    tables: dict[int, EngramTable],
    offload: OffloadConfig,
    device: DeviceRuntime | torch.device | str = "cpu",
    progress: bool = False,
) -> Prefetcher:
    """Place each Engram layer's table in `offload.tier`, build its cache, and return the
    prefetcher the engine calls once per step. `device`: a device runtime (device.py), or a
    device to make one for. `progress`: a progress bar while tables are copied into place
    (loading and pinning 100+ GB runs at a few GB/s)."""
    runtime = get_runtime(device) if isinstance(device, (str, torch.device)) else device
    _check_tables(engram, tables)
    io_pool = ThreadPoolExecutor(offload.num_io_threads, thread_name_prefix="engram-io")
    capacity = cache_rows_per_layer(offload, tables, len(engram.layer_ids))
    profile = RowProfile.load(offload.hot_profile) if offload.hot_profile else None
    copies = offload.tier not in ("disk", "remote")
    table_bytes = sum(t.rows * (t.row_bytes + t.scale_row_bytes) for t in tables.values())
    bar = tqdm(total=table_bytes, desc=f"Engram tables -> {offload.tier}", unit="B",
               unit_scale=True, disable=not (progress and copies))  # fmt: skip
    fetchers = {}
    for layer_id in engram.layer_ids:
        table = tables[layer_id]
        store = _store(table, offload, runtime, io_pool, bar.update)
        indices = Uploader(runtime, np.int64)
        cache = None
        if capacity > 0 and offload.tier != "device":
            cache = RowCache(
                capacity,
                table.width,
                table.scale_row_bytes,
                stored_torch_dtype(table.table_dtype),
                runtime,
                offload.cache_policy,
                uploader=indices,
            )
        stream = runtime.new_stream() if offload.prefetch else None
        fetchers[layer_id] = LayerFetcher(table, store, cache, runtime, indices, stream)
        if cache is not None and profile is not None and offload.hot_fraction > 0:
            _warm(fetchers[layer_id], profile, offload.hot_fraction)
    bar.close()
    for fetcher in fetchers.values():  # caches were zeroed and warmed on the current stream
        if fetcher.stream is not None:
            runtime.wait_stream(fetcher.stream, runtime.current_stream())
    return Prefetcher(engram, fetchers, offload, runtime, io_pool)
