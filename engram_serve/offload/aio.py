"""The disk tier's O_DIRECT row reads through Linux native AIO: a chunk of rows submitted in one
system call and reaped in a few, by compiled code without the GIL.

Why: a blocking `pread` of one 4 KiB O_DIRECT block costs its thread ~22 us of CPU here (the
call, the sleep, the wake-up; a VM's virtio disk), and a step's reads are spread over many
threads, each hand-off another wake-up. Submitted together through `io_submit`, the same reads
cost ~4 us of CPU each, and one thread keeps a whole chunk in flight (measured: 512 random
blocks of an 8 GiB table, 5.5-6 ms until all were read, 2 ms of CPU; 128 preads one after
another, 6 ms and 2.9 ms of CPU). On 2 cores that CPU is taken from the forward pass. Through
DiskStore, 450 random rows (a decode step's misses of a layer): 5.6 ms and 8.8 us of CPU a row,
against 8.5 ms and 28 us with preads on 32 threads.

Linux AIO is asynchronous only for O_DIRECT (buffered reads complete inside `io_submit`), so
the disk tier uses it with `direct_io` alone, and keeps `pread` where the kernel refuses AIO
(`available()`: a seccomp filter, `fs.aio-max-nr` exhausted, or not x86-64, whose system call
numbers these are).

Each thread has its own AIO context (`thread_reader`), freed when the thread ends. The system
calls go through libc's `syscall`, as glibc has no AIO wrappers:
    io_setup(nr, &ctx)  io_submit(ctx, n, iocb **)  io_getevents(ctx, min, max, events, NULL)
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import threading

import numba
import numpy as np

from engram_serve.offload.pread import bounce_buffer, row_span

DEPTH = 256  # reads one thread keeps in flight: a step's misses of a layer in one or two chunks
_SYS_IO_SETUP, _SYS_IO_DESTROY, _SYS_IO_GETEVENTS, _SYS_IO_SUBMIT = 206, 207, 208, 209  # x86-64
_IOCB_CMD_PREAD = 0
_IOCB_WORDS = 8  # struct iocb: 64 bytes
_EVENT_WORDS = 4  # struct io_event: data, obj, res, res2
_MAX_REAP_ERRORS = 1000  # io_getevents failing this often in a row (not EINTR): give up

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.argtypes = (ctypes.c_long,) * 6  # the number and up to five arguments
_syscall.restype = ctypes.c_long

log = logging.getLogger(__name__)


@numba.njit(nogil=True)  # not cached: numba cannot cache a ctypes function's address
def _read_rows(context, fd, offsets, row_bytes, block, iocbs, pointers, events, bounce, rows):
    """rows[i] = the `row_bytes` bytes at file offset offsets[i], each read as the
    `block`-aligned span holding it (pread.row_span) into its slot of `bounce`, len(iocbs) reads
    in flight at a time. Returns the first row whose read failed, came short or could not be
    submitted, -1 when all were read, or -2 when reaping failed (reads may still be in flight:
    the context must be destroyed before `bounce` is freed)."""
    depth, n = iocbs.shape[0], offsets.shape[0]
    # Addresses as int64: numba would turn unsigned + signed arithmetic into float64.
    iocbs_at, pointers_at = np.int64(iocbs.ctypes.data), np.int64(pointers.ctypes.data)
    events_at, bounce_at = np.int64(events.ctypes.data), np.int64(bounce.ctypes.data)
    for start in range(0, n, depth):
        count = min(depth, n - start)
        for j in range(count):
            first, _, length = row_span(offsets[start + j], row_bytes, block)
            iocbs[j, :] = 0
            iocbs[j, 0] = j  # aio_data: the slot, returned in the event
            iocbs[j, 2] = (fd << 32) | _IOCB_CMD_PREAD  # aio_fildes, aio_reqprio, aio_lio_opcode
            iocbs[j, 3] = bounce_at + j * bounce.shape[1]  # aio_buf
            iocbs[j, 4] = length  # aio_nbytes
            iocbs[j, 5] = first  # aio_offset
            pointers[j] = iocbs_at + j * _IOCB_WORDS * 8
        submitted = 0
        while submitted < count:
            got = _syscall(
                _SYS_IO_SUBMIT, context, count - submitted, pointers_at + 8 * submitted, 0, 0
            )
            if got <= 0:
                break
            submitted += got
        failed = -1 if submitted == count else start + submitted
        reaped, errors = 0, 0
        while reaped < submitted:
            got = _syscall(_SYS_IO_GETEVENTS, context, 1, depth, events_at, 0)
            if got < 0:  # EINTR: a signal reached this thread
                errors += 1
                if errors > _MAX_REAP_ERRORS:
                    return -2
                continue
            errors = 0
            for e in range(got):
                j, result = events[e, 0], events[e, 2]
                _, skip, _ = row_span(offsets[start + j], row_bytes, block)
                if result < skip + row_bytes:
                    if failed < 0 or start + j < failed:
                        failed = start + j
                else:
                    rows[start + j, :] = bounce[j, skip : skip + row_bytes]
            reaped += got
        if failed >= 0:
            return failed
    return -1


class AioReader:
    """One thread's AIO context, its request and event arrays, and aligned bounce buffers."""

    def __init__(self, depth: int = DEPTH) -> None:
        context = ctypes.c_ulong(0)
        if _syscall(_SYS_IO_SETUP, depth, ctypes.addressof(context), 0, 0, 0) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_setup: {os.strerror(err)}")
        self.context, self.depth = context.value, depth
        self.iocbs = np.zeros((depth, _IOCB_WORDS), np.int64)
        self.pointers = np.zeros(depth, np.int64)
        self.events = np.zeros((depth, _EVENT_WORDS), np.int64)
        self._bounce: dict[tuple[int, int], np.ndarray] = {}  # (row bytes, block) -> buffer

    def read(
        self, fd: int, offsets: np.ndarray, row_bytes: int, block: int, rows: np.ndarray
    ) -> int:
        """`_read_rows` into `rows [n, row_bytes]` (uint8); the first failed row or -1."""
        bounce = self._bounce_buffer(row_bytes, block)
        failed = _read_rows(
            self.context, fd, offsets, row_bytes, block, self.iocbs, self.pointers, self.events,
            bounce, rows,
        )  # fmt: skip
        if failed == -2:
            self.close()  # waits for the reads still in flight, so `bounce` may be freed
            raise OSError("io_getevents kept failing; this thread's AIO context was closed")
        return int(failed)

    def _bounce_buffer(self, row_bytes: int, block: int) -> np.ndarray:
        """`depth` slots for rows of `row_bytes` (pread.bounce_buffer), made once per shape."""
        buf = self._bounce.get((row_bytes, block))
        if buf is None:
            buf = self._bounce[row_bytes, block] = bounce_buffer(row_bytes, block, self.depth)
        return buf

    def close(self) -> None:
        if self.context:
            _syscall(_SYS_IO_DESTROY, self.context, 0, 0, 0, 0)
            self.context = 0

    def __del__(self) -> None:  # a thread's reader goes with its thread (threading.local)
        if not sys.is_finalizing():  # at exit the kernel frees it (and this module is gone)
            self.close()


_local = threading.local()
_available: bool | None = None
_available_lock = threading.Lock()


def available() -> bool:
    """Whether this kernel lets the process use AIO, tried once; the reader is compiled then
    (~5 s), not in the first step that reads."""
    global _available
    with _available_lock:
        if _available is None and platform.machine() != "x86_64":
            _available = False
        if _available is None:
            try:
                reader = AioReader(1)
                reader.read(0, np.empty(0, np.int64), 1, 1, np.empty((0, 1), np.uint8))
                reader.close()
                _available = True
            except OSError as e:
                log.warning("Linux AIO unavailable (%s): disk reads use pread", e.strerror)
                _available = False
        return _available


def thread_reader() -> AioReader | None:
    """The calling thread's reader, made on first use; None if the kernel refused it this thread
    a context (`fs.aio-max-nr` reached: the caller reads with pread)."""
    reader = getattr(_local, "reader", None)
    if reader is None or (reader is not False and not reader.context):
        try:
            reader = AioReader()
        except OSError as e:
            log.warning("no AIO context for this thread (%s): it reads with pread", e.strerror)
            reader = False
        _local.reader = reader
    return reader or None
