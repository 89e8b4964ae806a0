"""Reused host staging for rows read by CPU threads: a staged store (disk, host-staged) reads a
fetch's misses into a layer's staging arrays, from which one non-blocking copy sends them to the
device. Pinned on CUDA; allocated once per layer and grown, never per step.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engram_serve.device import DeviceRuntime
from engram_serve.offload import pinned

# Staging buffers of one layer: this step's fetch, its look-ahead, and the last step's look-ahead,
# whose copy into the cache is enqueued as this step starts (CUDA: its buffer is free once that
# copy is done, a step later; a third buffer keeps that wait off the host).
STAGING_DEPTH = 3
STAGING_MIN_ROWS = 4096


@dataclass
class Staging:
    """Host arrays one fetch fills and copies from; pinned on CUDA. `ready`: the copy out of
    them has finished (CUDA), so they may be refilled."""

    weight: np.ndarray  # [capacity, W] stored values
    scale: np.ndarray | None  # [capacity, W / quant_block]
    memories: list[Any] = field(default_factory=list)
    ready: Any = None

    @property
    def capacity(self) -> int:
        return self.weight.shape[0]


class StagingPool:
    """One layer's staging buffers, allocated once and grown (never per step)."""

    def __init__(self, width: int, scale_width: int, np_dtype: Any, runtime: DeviceRuntime) -> None:
        self.width, self.scale_width, self.np_dtype = width, scale_width, np_dtype
        self.runtime = runtime  # pinned memory on CUDA
        self.free: queue.Queue[Staging] = queue.Queue()
        self.allocations = 0
        for _ in range(STAGING_DEPTH):
            self.free.put(self._allocate(STAGING_MIN_ROWS))

    def _allocate(self, rows: int) -> Staging:
        self.allocations += 1
        w, w_mem = pinned.host_empty((rows, self.width), self.np_dtype, self.runtime)
        s, mems = None, [w_mem]
        if self.scale_width:
            s, s_mem = pinned.host_empty((rows, self.scale_width), np.uint8, self.runtime)
            mems.append(s_mem)
        return Staging(w, s, mems)

    def acquire(self, rows: int) -> Staging:
        staging = self.free.get()
        if staging.ready is not None and not staging.ready.query():
            staging.ready.synchronize()  # its copy is still in flight: never refill under it
        staging.ready = None
        if staging.capacity < rows:  # grow geometrically: steady state allocates nothing
            for mem in staging.memories:
                mem.close()
            staging = self._allocate(max(rows, 2 * staging.capacity))
        return staging

    def release(self, staging: Staging, ready: Any = None) -> None:
        staging.ready = ready
        self.free.put(staging)

    def close(self) -> None:
        while not self.free.empty():
            for mem in self.free.get().memories:
                mem.close()
