"""Threads for the compiled CPU kernels.

`run_split`: the numba kernels release the GIL, so plain Python threads run them in parallel.
Their work is cut into contiguous runs, one per thread, the caller taking the first. This stays
out of torch's OpenMP fork/join, which matters when a kernel runs while the model computes on the
same cores.

`launch_parallel`: a `parallel=True` kernel (its `prange` loops on numba's threads), on as many
threads as torch uses.

`WorkerThread`: the one thread a server's engine is built and stepped on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numba
import numpy as np
import torch

# numba runs parallel kernels on OpenMP (torch's libgomp) when it can load it, else on its
# workqueue layer, which aborts the process if two threads launch at once: one launch at a time.
_launch_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
T = TypeVar("T")


def thread_count(num_items: int, min_per_thread: int, num_threads: int | None) -> int:
    """Threads for `num_items` of work: `num_threads` (None: torch's count), but at least
    `min_per_thread` items each, below which a thread hand-off costs more than it saves."""
    wanted = torch.get_num_threads() if num_threads is None else num_threads
    return max(1, min(wanted, num_items // min_per_thread))


def run_split(
    n: int, threads: int, fn: Callable[[int, int], None], costs: np.ndarray | None = None
) -> None:
    """fn(lo, hi) over `threads` contiguous runs of [0, n), the caller taking the first. The runs
    hold equal numbers of items, or equal sums of `costs` (`[n]`, one per item) when given."""
    if threads <= 1:
        return fn(0, n)
    if costs is None:
        bounds = [n * i // threads for i in range(threads + 1)]
    else:
        total = np.cumsum(costs)
        cuts = np.searchsorted(total, total[-1] * np.arange(1, threads) / threads)
        bounds = [0, *cuts.tolist(), n]
    pool = _workers(threads - 1)
    # The kernels write through NumPy views: no torch op runs in a worker (so none is affected
    # by the caller's inference mode, which is per thread).
    futures = [pool.submit(fn, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:], strict=True)]
    fn(bounds[0], bounds[1])
    for future in futures:
        future.result()


def _workers(count: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            _pool = ThreadPoolExecutor(count, thread_name_prefix="engram-kernel")
            _pool_size = count
        return _pool


def launch_parallel(kernel: Callable[..., Any], *args: Any, num_threads: int | None = None) -> Any:
    """kernel(*args) on `num_threads` of numba's threads (None: torch's thread count)."""
    threads = torch.get_num_threads() if num_threads is None else num_threads
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    with _launch_lock:
        return kernel(*args)


class WorkerThread:
    """A daemon thread that runs the callables given to `submit`, one after another.

    A server builds its engine and steps it on one such thread, so that one thread starts all of
    the process's OpenMP work (torch's ops and the numba kernels both run on libgomp). libgomp
    keeps a team of worker threads for every thread that starts parallel work; once a process
    holds more of them than it has cores, it stops letting idle workers spin between parallel
    regions, and each region then wakes its workers from sleep. A decode step runs ~200 regions:
    loaded on the main thread and stepped on another, the default model's single-sequence
    decode step took 45-54 ms against 30-32 ms stepped on the thread that loaded it (2-core Xeon
    family 6 model 167, float32 weights, 64-token runs alternating).
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((fn, future))
        return future

    def _serve(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # the submitter's to handle
                    future.set_exception(e)
