"""The CPU path's row gather: `reference.gather_rows` for tables far larger than the caches.

A random row gather is bound by memory latency, not arithmetic: each row is a DRAM miss, and on
4 KiB pages a TLB miss too (offload/pinned.py maps tables with transparent huge pages, which
removes most of the latter). What this does about the rest:
- numba kernels copy each row as wide words and prefetch the row `_PREFETCH_ROWS` ids ahead, so
  many misses are in flight at once instead of the one or two a per-row memcpy loop overlaps.
- FP8 rows are decoded in the same pass through exact 256-entry float32 tables (FP8-E4M3
  values and UE8M0 scales), times their block's scale, as the reference computes them.
- Large batches are split into contiguous runs of ids, one per thread (kernels/cpu_threads.py).
`python -m engram_serve.bench.kernels` measures it against `torch.index_select`.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from engram_serve.kernels import reference
from engram_serve.kernels.cpu_prefetch import prefetch_bytes
from engram_serve.kernels.cpu_threads import run_split, thread_count

_MIN_ROWS_PER_THREAD = 8192  # below this a thread hand-off costs more than it saves
_PREFETCH_ROWS = 32  # how far ahead rows are prefetched: enough misses to cover DRAM latency
_WORDS = {8: np.uint64, 4: np.uint32, 2: np.uint16, 1: np.uint8}  # by size in bytes
_FP8_LUT = reference.FP8_E4M3_TABLE.numpy()
_UE8M0_LUT = reference.UE8M0_TABLE.numpy()


@numba.njit(inline="always")
def _prefetch_row(table, row):
    row_bytes = table.shape[1] * table.itemsize
    prefetch_bytes(table.ctypes.data + row * row_bytes, row_bytes)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _gather_kernel(table, ids, out):
    """out[i] = table[ids[i]] (rows of words)."""
    for i in range(ids.shape[0]):
        if i + _PREFETCH_ROWS < ids.shape[0]:
            _prefetch_row(table, ids[i + _PREFETCH_ROWS])
        row = ids[i]
        for w in range(table.shape[1]):
            out[i, w] = table[row, w]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _gather_fp8_kernel(rows, scales, ids, fp8_lut, ue8m0_lut, out):
    """out[i, w] = fp8(rows[ids[i], w]) * ue8m0(scales[ids[i], w // block]) in float32."""
    block = rows.shape[1] // scales.shape[1]
    for i in range(ids.shape[0]):
        if i + _PREFETCH_ROWS < ids.shape[0]:
            _prefetch_row(rows, ids[i + _PREFETCH_ROWS])
            _prefetch_row(scales, ids[i + _PREFETCH_ROWS])
        row = ids[i]
        for b in range(scales.shape[1]):
            scale = ue8m0_lut[scales[row, b]]
            for j in range(block):
                out[i, b * block + j] = fp8_lut[rows[row, b * block + j]] * scale


@numba.njit(nogil=True, cache=True)
def _id_span(ids):
    """(min, max) of the ids in one pass; (0, -1) when there are none."""
    low, high = (ids[0], ids[0]) if ids.shape[0] else (0, -1)
    for i in range(ids.shape[0]):
        low, high = min(low, ids[i]), max(high, ids[i])
    return low, high


def gather_rows_cpu(
    table: torch.Tensor,
    row_ids: torch.Tensor,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block: int = 32,
    num_threads: int | None = None,
) -> torch.Tensor:
    """`reference.gather_rows` on CPU tensors, with an optional output:
    out[..., :] = table[row_ids[...], :] as float32, FP8 rows dequantized with `scale`
    (out[i, w] = fp8(rows[i, w]) * 2**(scale[i, w // block] - 127)).

    table `[R, W]` float32/bf16/fp16 or FP8 bytes with scale `[R, W / block]`; row_ids int64
    `[...]`; out float32 `[..., W]` contiguous, or None. num_threads: None uses torch's count.
    """
    is_fp8 = _check_inputs(table, row_ids, scale, block)
    ids = _ids_array(row_ids, table.shape[0])
    width = table.shape[1]
    out = _output(out, (*row_ids.shape, width))
    if not table.is_contiguous() or (is_fp8 and not scale.is_contiguous()):
        return out.copy_(reference.gather_rows(table, row_ids, scale, block))
    if not len(ids):
        return out
    threads = thread_count(len(ids), _MIN_ROWS_PER_THREAD, num_threads)
    dst = out.numpy().reshape(len(ids), width)  # [n, W]
    if is_fp8:
        rows, scales = _bits(table), _bits(scale)

        def gather(lo: int, hi: int) -> None:
            _gather_fp8_kernel(rows, scales, ids[lo:hi], _FP8_LUT, _UE8M0_LUT, dst[lo:hi])

        run_split(len(ids), threads, gather)
    elif table.dtype == torch.float32:
        _gather_words(_bits(table), ids, dst, threads)
    else:  # bf16/fp16: gather the 16-bit values, widen them in one pass
        staged = np.empty((len(ids), width), dtype=np.int16)
        _gather_words(_bits(table), ids, staged, threads)
        out.view(-1, width).copy_(torch.from_numpy(staged).view(table.dtype))
    return out


def _gather_words(src: np.ndarray, ids: np.ndarray, dst: np.ndarray, threads: int) -> None:
    """dst[i] = src[ids[i]] for C-contiguous arrays `[R, ...]` and `[n, ...]`, as raw words."""
    src, dst = _as_words(src), _as_words(dst)
    run_split(len(ids), threads, lambda lo, hi: _gather_kernel(src, ids[lo:hi], dst[lo:hi]))


def _check_inputs(
    table: torch.Tensor, row_ids: torch.Tensor, scale: torch.Tensor | None, block: int
) -> bool:
    """The reference's argument checks; returns whether the table holds FP8 bytes."""
    if table.device.type != "cpu" or row_ids.device.type != "cpu":
        raise ValueError(f"gather_rows_cpu needs CPU tensors, got {table.device}/{row_ids.device}")
    if table.dim() != 2:
        raise ValueError(f"table must be [rows, width], got shape {tuple(table.shape)}")
    is_fp8 = table.dtype == torch.uint8 or table.dtype in reference._FP8_VIEW_DTYPES
    if is_fp8 and scale is None:
        raise ValueError("an FP8 table needs its UE8M0 `scale` tensor")
    if not is_fp8 and scale is not None:
        raise ValueError(f"`scale` is only for FP8 tables, got a {table.dtype} table")
    rows, width = table.shape
    if is_fp8 and (width % block or tuple(scale.shape) != (rows, width // block)):
        raise ValueError(
            f"table {tuple(table.shape)} needs a scale of shape {(rows, width // block)}"
            f" (one per {block} values), got {tuple(scale.shape)}"
        )
    return is_fp8


def _output(out: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if out.dtype != torch.float32 or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float32 tensor of shape {shape}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    return out


def _ids_array(row_ids: torch.Tensor, num_rows: int) -> np.ndarray:
    """Flat int64 ids, checked to lie in [0, num_rows)."""
    ids = np.ascontiguousarray(row_ids.numpy().reshape(-1), dtype=np.int64)
    low, high = _id_span(ids)
    if low < 0 or high >= num_rows:
        raise IndexError(f"row ids span [{low}, {high}], outside a table of {num_rows} rows")
    return ids


def _bits(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as NumPy, through a same-size integer type for the dtypes NumPy
    lacks (bf16, FP8)."""
    if t.dtype in (torch.float32, torch.uint8):
        return t.numpy()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


def _as_words(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array `[R, ...]` as `[R, B / s]` of the widest unsigned type (s = 8, 4, 2
    or 1 bytes) dividing the row's B bytes."""
    raw = a.reshape(a.shape[0], -1).view(np.uint8)
    return raw.view(_WORDS[math.gcd(raw.shape[1], 8)])
