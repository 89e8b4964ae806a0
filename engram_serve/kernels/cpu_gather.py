"""The CPU path's row gather: `reference.gather_rows` for tables far larger than the caches.

A random row gather is bound by memory latency, not arithmetic. What this does about it:
- Rows are copied whole, as wide words (a 256-byte row is 16 complex128 "words"), by
  `torch.index_select`, whose contiguous path is one memcpy per row and releases the GIL.
- The ids are split into contiguous runs, one per thread (the caller is one of them; large
  batches only), and each run is gathered in chunks below index_select's parallel grain, so
  every call runs inline on its thread. Torch's OpenMP fork/join is avoided on purpose: when
  the cores are busy (the engine gathers while the model computes) one descheduled OpenMP
  thread stalls the whole call; we measured plain index_select 3-250x slower then. On an idle
  machine plain index_select is as fast or faster (bench/kernels.py has both).
- FP8 rows are gathered as raw bytes, then decoded through exact 256-entry float32 tables
  (NumPy `take`) in cache-sized pieces, instead of torch's FP8 cast or a per-value int64 index:
  6-12x faster than the reference twin.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from engram_serve.kernels import reference

# ATen runs an op inline (no OpenMP) below this many work items (at::internal::GRAIN_SIZE);
# index_select counts rows x words of a row.
_TORCH_GRAIN = 32768
_MIN_ROWS_PER_THREAD = 8192  # below this a thread hand-off costs more than it saves
_DECODE_ROWS = 256  # FP8 rows decoded per piece, so the raw bytes stay in cache
_WORD_DTYPES = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)
_FP8_LUT = reference.FP8_E4M3_TABLE.numpy()
_UE8M0_LUT = reference.UE8M0_TABLE.numpy()

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


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
    ids = row_ids.reshape(-1).to(torch.int64).contiguous()  # [n]
    _check_ids(ids, table.shape[0])
    width = table.shape[1]
    out = _output(out, (*row_ids.shape, width))
    if not table.is_contiguous() or (is_fp8 and not scale.is_contiguous()):
        return out.copy_(reference.gather_rows(table, row_ids, scale, block))
    threads = _thread_count(ids.shape[0], num_threads)
    out_rows = out.view(-1, width)  # [n, W]
    if table.dtype == torch.float32:
        _gather_raw([(table, out_rows)], ids, threads)
    elif not is_fp8:  # bf16/fp16: gather the 16-bit values, widen them in one pass
        staged = torch.empty(ids.shape[0], width, dtype=table.dtype)
        _gather_raw([(table, staged)], ids, threads)
        out_rows.copy_(staged)
    else:
        rows, scales = reference.as_bytes(table), reference.as_bytes(scale)
        staged_rows = torch.empty(ids.shape[0], width, dtype=torch.uint8)
        staged_scales = torch.empty(ids.shape[0], width // block, dtype=torch.uint8)
        _gather_raw([(rows, staged_rows), (scales, staged_scales)], ids, threads)
        _decode_fp8(staged_rows.numpy(), staged_scales.numpy(), block, out_rows.numpy())
    return out


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


def _check_ids(ids: torch.Tensor, num_rows: int) -> None:
    flat = ids.numpy()  # NumPy's reductions run inline, torch's would fork OpenMP threads
    if flat.size and (flat.min() < 0 or flat.max() >= num_rows):
        raise IndexError(
            f"row ids span [{int(flat.min())}, {int(flat.max())}], "
            f"outside a table of {num_rows} rows"
        )


def _thread_count(num_rows: int, num_threads: int | None) -> int:
    wanted = torch.get_num_threads() if num_threads is None else num_threads
    return max(1, min(wanted, num_rows // _MIN_ROWS_PER_THREAD))


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous `[R, B]`-byte-row tensor viewed as `[R, B / s]` of the widest s-byte type
    dividing the row and the address: fewer, wider elements per row for index_select."""
    raw = t.view(torch.uint8) if t.dtype != torch.uint8 else t
    row_bytes = raw.shape[1]
    for dtype in _WORD_DTYPES:
        size = dtype.itemsize
        if row_bytes % size == 0 and raw.data_ptr() % size == 0:
            return raw.view(dtype)
    raise AssertionError("uint8 always fits")


def _gather_raw(pairs: list[tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor, threads: int):
    """dst[i] = src[ids[i]] for every (src [R, B bytes], dst [n, B bytes]) pair, as raw bytes,
    over `threads` contiguous runs of ids."""
    words = [(_as_words(src), _as_words(dst)) for src, dst in pairs]

    def gather(lo: int, hi: int) -> None:
        for src, dst in words:
            chunk = max(1, (_TORCH_GRAIN - 1) // max(1, src.shape[1]))
            for start in range(lo, hi, chunk):
                stop = min(hi, start + chunk)
                torch.index_select(src, 0, ids[start:stop], out=dst[start:stop])

    _run_split(len(ids), threads, gather)


def _run_split(n: int, threads: int, fn: Callable[[int, int], None]) -> None:
    """fn(lo, hi) over `threads` contiguous runs of [0, n), the caller taking the first."""
    if threads == 1:
        return fn(0, n)
    bounds = [n * i // threads for i in range(threads + 1)]
    pool = _workers(threads - 1)
    # Inference mode is per thread: workers writing into buffers the caller made under it (the
    # engine's step) must enter it too.
    inference = torch.is_inference_mode_enabled()

    def run(lo: int, hi: int) -> None:
        with torch.inference_mode(inference):
            fn(lo, hi)

    futures = [pool.submit(run, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:], strict=True)]
    fn(bounds[0], bounds[1])
    for future in futures:
        future.result()


def _workers(count: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            _pool = ThreadPoolExecutor(count, thread_name_prefix="engram-gather")
            _pool_size = count
        return _pool


def _decode_fp8(rows: np.ndarray, scales: np.ndarray, block: int, out: np.ndarray) -> None:
    """out = fp8(rows) * ue8m0(scales) per block: exact table lookups, then the same float32
    product the reference computes (inf/NaN included)."""
    n, width = rows.shape
    with np.errstate(over="ignore", invalid="ignore"):
        for lo in range(0, n, _DECODE_ROWS):
            hi = min(n, lo + _DECODE_ROWS)
            dst = out[lo:hi]  # [p, W]
            np.take(_FP8_LUT, rows[lo:hi], out=dst, mode="wrap")  # bytes are < 256
            blocks = dst.reshape(hi - lo, width // block, block)
            np.multiply(blocks, _UE8M0_LUT[scales[lo:hi]][..., None], out=blocks)
