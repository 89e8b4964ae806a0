"""The disk tier's row reader: one pread per row, compiled, without the GIL.

A Python loop of `os.preadv` holds the GIL between reads, so I/O threads and the engine thread
(which runs the model's Python) queue for it, and each thread's turn can wait out the 5 ms
switch interval. Here a whole chunk of rows is read by numba-compiled code calling libc's
`pread` directly, the GIL released throughout. A failed or short read stops the chunk and
reports its row, which the caller reads again through Python to raise the real error.
"""

from __future__ import annotations

import ctypes

import numba
import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)
_pread = _libc.pread
# ssize_t pread(int fd, void *buf, size_t count, off_t offset); the buffer passed as its address.
_pread.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_ssize_t)
_pread.restype = ctypes.c_ssize_t


@numba.njit
def row_span(offset, row_bytes, block):
    """(start, skip, length): the `block`-aligned read holding the row at `offset`, and where
    in it the row starts."""
    start = offset - offset % block
    skip = offset - start
    return start, skip, (skip + row_bytes + block - 1) // block * block


@numba.njit(nogil=True)  # not cached: numba cannot cache a ctypes function's address
def pread_rows(fd, offsets, row_bytes, block, bounce, rows):
    """rows[i] = the `row_bytes` bytes at file offset offsets[i], each read as the `block`-aligned
    span holding it into `bounce` (block 1: exact reads; 4096 with O_DIRECT, whose buffer and
    offsets must be aligned). Returns the first row whose read failed or came short, or -1."""
    address = bounce.ctypes.data
    for i in range(offsets.shape[0]):
        start, skip, length = row_span(offsets[i], row_bytes, block)
        if _pread(fd, address, length, start) < skip + row_bytes:
            return i
        rows[i, :] = bounce[skip : skip + row_bytes]
    return -1


def bounce_buffer(row_bytes: int, block: int, slots: int = 1) -> np.ndarray:
    """`slots` buffers `[slots, span]` for row reads (`pread_rows` takes one, offload/aio.py
    one per read in flight), each the largest span a row can need, aligned to `block`."""
    span = (-(-(row_bytes + block - 1) // block) + 1) * block
    raw = np.empty(slots * span + block, dtype=np.uint8)
    skip = -raw.ctypes.data % block
    return raw[skip : skip + slots * span].reshape(slots, span)
