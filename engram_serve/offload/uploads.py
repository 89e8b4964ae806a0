"""Small host arrays (a step's token ids, positions, block tables and sampling parameters; a
fetch's row indices and cache slots) moved to the device by non-blocking copies out of pinned
memory.

On CUDA a copy from pageable memory is a hidden synchronisation. So the arrays of one upload are
packed into a page-locked arena and sent with one copy. The arena has two halves, used in turn
step by step (`next_step`): a half is refilled only after every copy out of it has finished,
which the step's download of its sampled tokens has ensured long before the half comes round
again, so the wait (an event query) is normally free. On CPU the packed array is the tensor:
no copy, no arena.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from engram_serve.device import DeviceRuntime
from engram_serve.offload import pinned

MIN_CAPACITY = 1 << 16  # elements per half: a step of 2,048 tokens and 64 sequences fits


class _Arena:
    def __init__(self, capacity: int, dtype: Any, runtime: DeviceRuntime) -> None:
        self.array, self.memory = pinned.host_empty((2, capacity), dtype, runtime)
        self.copied: list[Any] = [None, None]  # per half: the event after its last copy

    @property
    def capacity(self) -> int:
        return self.array.shape[1]


class Uploader:
    """`upload(arrays)` -> device tensors shaped like `arrays`, all of one dtype."""

    def __init__(self, runtime: DeviceRuntime, dtype: Any) -> None:
        self.runtime, self.dtype = runtime, np.dtype(dtype)
        self._arena: _Arena | None = None
        self._retired: list[_Arena] = []  # outgrown; freed at close, when no copy is in flight
        self._half, self._used = 0, 0

    def next_step(self) -> None:
        """Move to the other half, once the copies out of it have finished."""
        if self._arena is None:
            return
        self._half, self._used = 1 - self._half, 0
        copied = self._arena.copied[self._half]
        if copied is not None and not copied.query():
            copied.synchronize()

    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        sizes = [a.size for a in arrays]
        if not self.runtime.is_cuda:
            packed = np.concatenate([a.reshape(-1) for a in arrays]).astype(self.dtype, copy=False)
            return _split(torch.from_numpy(packed), arrays, sizes)
        total = sum(sizes)
        self._make_room(total)
        arena, start = self._arena, self._used
        offset = start
        for a, size in zip(arrays, sizes):
            arena.array[self._half, offset : offset + size] = a.reshape(-1)
            offset += size
        self._used = offset
        packed = self.runtime.upload(arena.array[self._half, start:offset], non_blocking=True)
        arena.copied[self._half] = event = self.runtime.new_event()
        event.record()
        return _split(packed, arrays, sizes)

    def _make_room(self, num_elements: int) -> None:
        if self._arena is not None and self._used + num_elements <= self._arena.capacity:
            return
        # Grow: a fresh arena; the old one may still be copied from, so it lives until close.
        capacity = max(MIN_CAPACITY, 2 * num_elements)
        if self._arena is not None:
            self._retired.append(self._arena)
            capacity = max(capacity, 2 * self._arena.capacity)
        self._arena, self._used = _Arena(capacity, self.dtype, self.runtime), 0

    def close(self) -> None:
        """Free the arenas; the caller has synchronised the device (no copy is in flight)."""
        for arena in [*self._retired, *([self._arena] if self._arena else [])]:
            arena.memory.close()
        self._arena, self._retired = None, []


def _split(
    packed: torch.Tensor, arrays: Sequence[np.ndarray], sizes: list[int]
) -> list[torch.Tensor]:
    out, offset = [], 0
    for a, size in zip(arrays, sizes):
        out.append(packed.narrow(0, offset, size).view(a.shape))
        offset += size
    return out
