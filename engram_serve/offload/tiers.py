"""Where one layer's Engram table lives and how its stored rows are read, behind one interface.

A *store* returns stored rows by id: FP8 bytes plus UE8M0 scales, or float32/bf16/fp16 values.
Decoding to float32 happens once, after a step's rows are assembled, with the functions
kernels/reference.gather_rows uses, so every tier and cache setting yields the same bits.

    tier     store            where the table is                  how rows reach the device
    device   DeviceStore      HBM (RAM on CPU)                    index_select on the device
    host     DeviceStore      pinned DRAM, mapped (CUDA)          index_select over UVA, in place
             HostGatherStore  pinned DRAM (CUDA)                  CPU threads gather into pinned
                                                                  staging, then one async copy
             DeviceStore      RAM (CPU: the same memory as device)
    disk     DiskStore        the table file                      worker threads pread rows
                                                                  into staging (FP8 scales, 1/32
                                                                  of the table, stay in RAM)
    remote   RemoteStore      a Mooncake Store cluster: one       worker threads read ranges of
                              published copy, many servers        rows into staging (remote.py)

Stores that read on the device (`reads_on_device`) take a device index tensor; staged stores
fill host staging arrays in worker threads.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from engram_serve.device import DeviceRuntime
from engram_serve.kernels.reference import DecodeTables, as_bytes, dequantize_rows
from engram_serve.offload import aio, pinned, pread

Tier = Literal["device", "host", "disk", "remote"]
TIERS: tuple[str, ...] = ("device", "host", "disk", "remote")
_STORED_NP: dict[str, Any] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,  # numpy has no bfloat16: the bits, viewed back by torch
    "fp8_e4m3": np.uint8,
}
_STORED_TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp8_e4m3": torch.uint8,
}
BLOCK = 4096  # O_DIRECT alignment of offsets, lengths and buffers


class TableReadError(OSError):
    """A table file's rows could not be read while serving: an I/O error, or a short read (the
    file shrank under the server). It fails the step that needed the rows, not the engine."""


class EngramTable(Protocol):
    """One layer's table as the offload reads it. engram_serve.engram.tables.EngramTable (a
    memory-mapped file) and MemoryTable (arrays in RAM) both fit."""

    layer_id: int
    rows: int
    width: int
    table_dtype: str
    quant_block: int
    row_bytes: int
    scale_row_bytes: int
    weight: np.ndarray  # [rows, W] stored values (bf16 as uint16 bits, fp8 as uint8 bytes)
    scale: np.ndarray | None  # [rows, W / quant_block] UE8M0 bytes (fp8 only)
    path: Path | None  # the file, for the disk tier
    data_offset: int | None  # file offset of row 0's weight
    scale_offset: int | None  # file offset of row 0's scales


@dataclass(frozen=True)
class MemoryTable:
    """A table held in RAM (tests, tables built on the fly). Has no file: not for the disk tier."""

    layer_id: int
    weight: np.ndarray  # [rows, W]
    scale: np.ndarray | None
    table_dtype: str
    quant_block: int = 32
    path: Path | None = None
    data_offset: int | None = None
    scale_offset: int | None = None

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def width(self) -> int:
        return self.weight.shape[1]

    @property
    def row_bytes(self) -> int:
        return self.weight.shape[1] * self.weight.itemsize

    @property
    def scale_row_bytes(self) -> int:
        return 0 if self.scale is None else self.scale.shape[1]


def table_from_tensors(
    layer_id: int,
    weight: torch.Tensor | np.ndarray,
    scale: torch.Tensor | np.ndarray | None = None,
    quant_block: int = 32,
) -> MemoryTable:
    """A MemoryTable from `weight [rows, W]` (float32/bf16/fp16, or FP8 bytes as uint8 or
    torch.float8_e4m3fn with UE8M0 `scale [rows, W / quant_block]`). Arrays are not copied."""
    if isinstance(weight, np.ndarray):
        weight = torch.from_numpy(weight)
    if isinstance(scale, np.ndarray):
        scale = torch.from_numpy(scale)
    weight = weight.detach().cpu().contiguous()
    if weight.dim() != 2:
        raise ValueError(f"a table weight must be [rows, width], got {tuple(weight.shape)}")
    if weight.dtype in (torch.float32, torch.float16):
        dtype = "float32" if weight.dtype == torch.float32 else "float16"
        w = weight.numpy()
    elif weight.dtype == torch.bfloat16:
        dtype, w = "bfloat16", weight.view(torch.int16).numpy().view(np.uint16)
    else:
        dtype, w = "fp8_e4m3", as_bytes(weight).numpy()
    s = None
    if dtype == "fp8_e4m3":
        if scale is None:
            raise ValueError("an FP8 table needs its UE8M0 `scale` tensor")
        s = as_bytes(scale.detach().cpu().contiguous()).numpy()
        if s.shape != (w.shape[0], w.shape[1] // quant_block) or w.shape[1] % quant_block:
            raise ValueError(
                f"FP8 rows {w.shape} need scales of shape {(w.shape[0], w.shape[1] // quant_block)}"
                f" (one per {quant_block} values), got {s.shape}"
            )
    elif scale is not None:
        raise ValueError(f"`scale` is only for FP8 tables, got a {dtype} table")
    return MemoryTable(layer_id, w, s, dtype, quant_block)


def open_tables(model_dir: str | Path, layer_ids: tuple[int, ...] | list[int]) -> dict[int, Any]:
    """Memory-map every Engram layer's table file of a model directory (nothing is read yet)."""
    from engram_serve.engram.tables import open_table  # the file format lives with the model

    return {layer_id: open_table(model_dir, layer_id) for layer_id in layer_ids}


# ---------------------------------------------------------------------------------------------
# stored rows <-> float32


def stored_torch_dtype(table_dtype: str) -> torch.dtype:
    return _STORED_TORCH[table_dtype]


def as_torch(array: np.ndarray, table_dtype: str) -> torch.Tensor:
    """A torch view of stored values (bf16 bits become torch.bfloat16). Read-only arrays (a
    shared or file-mapped table) are viewed too: the offload never writes to a table."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        if table_dtype == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as an array, as_torch's inverse (bfloat16, which NumPy lacks, as
    its 16-bit words)."""
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def decode_rows(
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    table_dtype: str,
    quant_block: int,
    tables: DecodeTables = DecodeTables(),
) -> torch.Tensor:
    """Stored rows `[n, W]` -> float32 `[n, W]`, exactly as reference.gather_rows decodes;
    `tables` on the rows' device."""
    if table_dtype == "fp8_e4m3":
        return dequantize_rows(weight, scale, quant_block, tables)
    return weight.float()


# ---------------------------------------------------------------------------------------------
# stores


Reads = list[tuple[slice, Future]]  # started reads: each fills the output rows of its slice


def wait_reads(reads: Reads) -> None:
    """Wait for every read, then raise the first failure: the caller may reuse the buffers."""
    wait([future for _, future in reads])
    for _, future in reads:
        future.result()


def cancel_unstarted(reads: Reads) -> Reads:
    """Cancel the reads no thread has started yet; returns the others (running or done)."""
    return [(rows, future) for rows, future in reads if not future.cancel()]


class DeviceStore:
    """A whole table in memory the output device reads directly: HBM (device tier), RAM (CPU),
    or mapped pinned host memory read in place over UVA (host tier on CUDA)."""

    reads_on_device = True
    state = "ready"  # what the tier can serve now (the remote tier's may change)

    def __init__(
        self,
        tier: str,
        weight: torch.Tensor,  # [rows, W] stored values, on (or mapped into) the device
        scale: torch.Tensor | None,
        table_bytes: dict[str, int],
        keepalive: tuple[Any, ...] = (),
    ) -> None:
        self.tier, self.weight, self.scale = tier, weight, scale
        self.table_bytes, self._keepalive = table_bytes, keepalive
        self.mode = "uva" if tier == "host" and weight.is_cuda else "direct"

    def gather(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return gather_stored(self.weight, self.scale, ids)

    def close(self) -> None:
        for item in self._keepalive:
            if hasattr(item, "close"):
                item.close()


def gather_stored(
    weight: torch.Tensor, scale: torch.Tensor | None, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored rows `ids` of `weight [R, W]` (and `scale`), on their device. On a GPU each thread
    copies one element: rows viewed as 64-bit words move 8 bytes a load (over UVA: full PCIe
    requests), not 1 or 2."""
    scale = None if scale is None else scale.index_select(0, ids)
    return _wide_view(weight).index_select(0, ids).view(weight.dtype), scale


def _wide_view(weight: torch.Tensor) -> torch.Tensor:
    """`weight [R, W]` viewed as int64 words `[R, W * itemsize / 8]` where rows are whole words
    (every table format here: 256-byte FP8 rows, float rows of even width), else itself."""
    row_bytes = weight.shape[1] * weight.element_size()
    if weight.is_cuda and row_bytes % 8 == 0 and weight.is_contiguous():
        return weight.view(torch.int64)
    return weight


class StagedStore:
    """Rows copied by CPU worker threads into host staging arrays (then sent to the device)."""

    reads_on_device = False
    tier = "host"
    mode = "staged"
    state = "ready"
    min_chunk_rows = 2048  # memory copies: a task must outweigh the executor's overhead
    max_chunk_rows: int | None = None  # None: one task per thread
    inline_rows = 0  # submit_reads of at most this many rows reads in the caller's thread

    def __init__(self, io_pool: ThreadPoolExecutor, table_bytes: dict[str, int]) -> None:
        self.io_pool, self.table_bytes = io_pool, table_bytes

    def read(self, ids: np.ndarray, weight_out: np.ndarray, scale_out: np.ndarray | None) -> None:
        """weight_out[i] = row ids[i]'s stored values (scale_out likewise), split over the pool."""
        if len(ids) <= self._chunk_rows(len(ids)):
            self._read_chunk(ids, weight_out, scale_out)
        else:
            wait_reads(self.submit_reads(ids, weight_out, scale_out))

    def submit_reads(
        self, ids: np.ndarray, weight_out: np.ndarray, scale_out: np.ndarray | None
    ) -> Reads:
        """`read`, started on the pool and returned at once: wait on it with `wait_reads`. A read
        of at most `inline_rows` rows is done before it returns, its outcome in the future."""
        if 0 < len(ids) <= self.inline_rows:
            done: Future = Future()
            try:
                self._read_chunk(ids, weight_out, scale_out)
                done.set_result(None)
            except Exception as e:  # raised by wait_reads, as a pool's read would be
                done.set_exception(e)
            return [(slice(0, len(ids)), done)]
        chunk = self._chunk_rows(len(ids))
        spans = [slice(s, s + chunk) for s in range(0, len(ids), chunk)]
        return [
            (
                rows,
                self.io_pool.submit(
                    self._read_chunk,
                    ids[rows],
                    weight_out[rows],
                    None if scale_out is None else scale_out[rows],
                ),
            )
            for rows in spans
        ]

    def _chunk_rows(self, num_rows: int) -> int:
        rows = max(self.min_chunk_rows, -(-num_rows // self.io_pool._max_workers))
        return rows if self.max_chunk_rows is None else min(rows, self.max_chunk_rows)

    def _read_chunk(
        self, ids: np.ndarray, weight_out: np.ndarray, scale_out: np.ndarray | None
    ) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class HostGatherStore(StagedStore):
    """Host tier, staged path: np.take from (pinned) host memory into pinned staging."""

    def __init__(
        self,
        weight: np.ndarray,
        scale: np.ndarray | None,
        io_pool: ThreadPoolExecutor,
        table_bytes: dict[str, int],
        keepalive: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(io_pool, table_bytes)
        self.weight, self.scale, self._keepalive = weight, scale, keepalive

    def _read_chunk(
        self, ids: np.ndarray, weight_out: np.ndarray, scale_out: np.ndarray | None
    ) -> None:
        np.take(self.weight, ids, axis=0, out=weight_out)
        if scale_out is not None:
            np.take(self.scale, ids, axis=0, out=scale_out)

    def close(self) -> None:
        for item in self._keepalive:
            if hasattr(item, "close"):
                item.close()


class DiskStore(StagedStore):
    """Disk tier: the table file, read by worker threads in compiled code without the GIL.

    `direct`: O_DIRECT, each row read as the 4 KiB blocks that hold it into a per-thread
    aligned bounce buffer, so no read is served by (or fills) the OS page cache; a chunk's reads
    are submitted together through Linux AIO (offload/aio.py), or, where the kernel refuses AIO,
    made one pread per row (offload/pread.py). Otherwise buffered preads with
    POSIX_FADV_RANDOM, so the kernel reads no more than the rows' pages.
    FP8 scales are loaded into RAM at start: one extra random read per row would double IOPS.
    """

    tier = "disk"
    # pread: random reads spread over every thread, many requests in flight; a thread reads its
    # chunk one row after another, so long chunks of a look-ahead read would keep every thread
    # busy for a whole step while the next step's own reads waited behind them.
    min_chunk_rows, max_chunk_rows = 4, 32

    def __init__(self, table: EngramTable, io_pool: ThreadPoolExecutor, direct: bool = False):
        if table.path is None or table.data_offset is None:
            raise ValueError(
                f"the disk tier reads table files; layer {table.layer_id}'s table is in memory "
                "only (open it from a model directory with open_tables)"
            )
        self.path, self.direct = Path(table.path), direct
        self.offset, self.row_bytes = int(table.data_offset), int(table.row_bytes)
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        self.fd = os.open(self.path, flags)
        if not direct:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        # A copy, not a view of the file's map: scale reads must never touch the disk.
        self.scale = None if table.scale is None else np.array(table.scale).view(np.ndarray)
        scale_bytes = 0 if self.scale is None else self.scale.nbytes
        super().__init__(io_pool, {"disk": table.rows * self.row_bytes, "host": scale_bytes})
        self.aio = direct and aio.available()
        if self.aio:  # one thread keeps a chunk's reads in flight: few chunks, few hand-offs
            self.min_chunk_rows = self.max_chunk_rows = aio.DEPTH
        self.mode = "aio-direct" if self.aio else "pread-direct" if direct else "pread"
        self.block = BLOCK if direct else 1
        self._local = threading.local()

    def _bounce(self) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = pread.bounce_buffer(self.row_bytes, self.block)[0]
        return buf

    def _read_chunk(
        self, ids: np.ndarray, weight_out: np.ndarray, scale_out: np.ndarray | None
    ) -> None:
        rows = weight_out.view(np.uint8).reshape(len(ids), self.row_bytes)
        offsets = self.offset + ids.astype(np.int64) * self.row_bytes
        reader = aio.thread_reader() if self.aio else None
        bounce, done = self._bounce(), 0
        while done < len(ids):
            if reader is not None:
                try:
                    failed = reader.read(
                        self.fd, offsets[done:], self.row_bytes, self.block, rows[done:]
                    )
                except OSError as e:  # the AIO context broke: a storage fault like any other
                    raise TableReadError(errno.EIO, f"{self.path}: read failed: {e}") from e
            else:
                failed = pread.pread_rows(
                    self.fd, offsets[done:], self.row_bytes, self.block, bounce, rows[done:]
                )
            if failed < 0:
                break
            done += failed
            self._read_row(int(offsets[done]), rows[done], bounce)  # raises the real error
            done += 1
        if scale_out is not None:
            np.take(self.scale, ids, axis=0, out=scale_out)

    def _read_row(self, offset: int, row: np.ndarray, bounce: np.ndarray) -> None:
        """One row through Python, after the compiled reader reported it: the read again,
        which either succeeds (a transient failure) or raises a TableReadError naming why."""
        start, skip, length = pread.row_span(offset, self.row_bytes, self.block)
        try:
            got = os.preadv(self.fd, [memoryview(bounce)[:length]], start)
        except OSError as e:  # EIO and the like, named after the file
            raise TableReadError(e.errno, f"{self.path}: read failed: {e.strerror or e}") from e
        if got < skip + self.row_bytes:
            raise self._short_read(offset)
        row[:] = bounce[skip : skip + self.row_bytes]

    def _short_read(self, offset: int) -> TableReadError:
        return TableReadError(
            errno.EIO, f"{self.path}: short read at offset {offset} (truncated file?)"
        )

    def drop_page_cache(self) -> None:
        """Evict the file's pages from the OS cache (benchmarks of the buffered mode)."""
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------------------------
# building a layer's store


def _describe(table: EngramTable) -> dict[str, Any]:
    source = None if table.path is None else Path(table.path).resolve()
    stat = None if source is None else source.stat()
    return {
        "layer_id": int(table.layer_id),
        "rows": int(table.rows),
        "width": int(table.width),
        "table_dtype": table.table_dtype,
        "source": None if source is None else str(source),
        "source_size": None if stat is None else stat.st_size,
        "source_mtime_ns": None if stat is None else stat.st_mtime_ns,
    }


def _host_arrays(
    table: EngramTable, shm_name: str | None, progress: Callable[[int], None] | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[Any, ...]]:
    """The table in host RAM: a node-wide /dev/shm copy, the caller's arrays when already in
    RAM, or a fresh anonymous mapping filled from the file."""
    if shm_name is not None:
        shared = pinned.shared_table(
            shm_name, table.layer_id, table.weight, table.scale, _describe(table), progress
        )
        return shared.weight, shared.scale, shared.memories
    if not isinstance(table.weight, np.memmap):
        return table.weight, table.scale, ()
    memories, arrays = [], []
    for src in (table.weight, table.scale):
        if src is None:
            arrays.append(None)
            continue
        mem = pinned.HostMemory(src.nbytes)
        dst = mem.array(src.dtype, src.shape)
        pinned.copy_rows(src, dst, progress)
        memories.append(mem)
        arrays.append(dst)
    return arrays[0], arrays[1], tuple(memories)


def _to_device(
    array: np.ndarray,
    table_dtype: str,
    runtime: DeviceRuntime,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Copy a (possibly file-mapped, larger-than-one-buffer) array to the device in chunks."""
    out = runtime.empty(array.shape, _STORED_TORCH.get(table_dtype, torch.uint8))
    step = max(1, pinned.COPY_CHUNK_BYTES // max(1, array.nbytes // max(1, array.shape[0])))
    for start in range(0, array.shape[0], step):
        chunk = np.ascontiguousarray(array[start : start + step])
        dst = out.narrow(0, start, len(chunk))
        if table_dtype == "bfloat16":  # NumPy has no bfloat16: its 16-bit words go
            dst, chunk = dst.view(torch.int16), chunk.view(np.int16)
        runtime.upload_into(dst, chunk)
        if progress is not None:
            progress(chunk.nbytes)
    return out


def device_store(
    table: EngramTable, runtime: DeviceRuntime, progress: Callable[[int], None] | None = None
) -> DeviceStore:
    """The baseline: the whole table in the device's own memory."""
    if not runtime.is_cuda:
        weight, scale, keep = _host_arrays(table, None, progress)
        w = as_torch(weight, table.table_dtype)
        s = None if scale is None else as_torch(scale, "fp8_e4m3")
    else:
        keep = ()
        w = _to_device(table.weight, table.table_dtype, runtime, progress)
        s = None if table.scale is None else _to_device(table.scale, "fp8_e4m3", runtime, progress)
    nbytes = w.numel() * w.element_size() + (0 if s is None else s.numel())
    return DeviceStore("device", w, s, {"device": nbytes}, keep)


def host_store(
    table: EngramTable,
    runtime: DeviceRuntime,
    io_pool: ThreadPoolExecutor,
    shm_name: str | None = None,
    gather: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> DeviceStore | HostGatherStore:
    """Host tier. On CPU the same memory as the device tier (optionally node-shared). On CUDA
    the table is page-locked in place and read either over UVA or by CPU gather + copy: `gather`
    "uva" | "staged" | "auto" (time both on this machine and keep the faster)."""
    weight, scale, keep = _host_arrays(table, shm_name, progress)
    nbytes = weight.nbytes + (0 if scale is None else scale.nbytes)
    if not runtime.is_cuda:
        w = as_torch(weight, table.table_dtype)
        s = None if scale is None else as_torch(scale, "fp8_e4m3")
        return DeviceStore("host", w, s, {"host": nbytes}, keep)
    if gather not in ("auto", "uva", "staged"):
        raise ValueError(f"host gather must be 'auto', 'uva' or 'staged', got {gather!r}")
    if shm_name is None and not keep:  # the caller's arrays: pin a private copy, not them
        weight, scale, keep = _pinned_copy(weight, scale, progress)
    for mem in keep:
        mem.pin(runtime)
    uva = DeviceStore(
        "host",
        pinned.cuda_view(weight, runtime).view(_STORED_TORCH[table.table_dtype]),
        None if scale is None else pinned.cuda_view(scale, runtime),
        {"host": nbytes},
        keep,
    )
    staged = HostGatherStore(weight, scale, io_pool, {"host": nbytes}, keep)
    if gather == "uva" or (gather == "auto" and _uva_is_faster(uva, staged, table, runtime)):
        return uva
    return staged


def _pinned_copy(
    weight: np.ndarray, scale: np.ndarray | None, progress: Callable[[int], None] | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[Any, ...]]:
    out, keep = [], []
    for src in (weight, scale):
        if src is None:
            out.append(None)
            continue
        mem = pinned.HostMemory(src.nbytes)
        dst = mem.array(src.dtype, src.shape)
        pinned.copy_rows(src, dst, progress)
        out.append(dst)
        keep.append(mem)
    return out[0], out[1], tuple(keep)


def _uva_is_faster(
    uva: DeviceStore, staged: HostGatherStore, table: EngramTable, runtime: DeviceRuntime,
    num_rows: int = 65536, repeats: int = 3,
) -> bool:  # fmt: skip
    """Time a step-sized random gather both ways (the choice is made once, at start-up)."""
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, table.rows, num_rows))
    w_out, w_mem = pinned.host_empty((len(ids), table.width), _STORED_NP[table.table_dtype],
                                     runtime)  # fmt: skip
    s_out, s_mem = None, None
    if table.scale is not None:
        s_out, s_mem = pinned.host_empty((len(ids), table.scale.shape[1]), np.uint8, runtime)
    ids_dev = runtime.upload(ids)

    def run_uva() -> None:
        uva.gather(ids_dev)

    def run_staged() -> None:
        staged.read(ids, w_out, s_out)
        runtime.upload(w_out, non_blocking=True)

    times = {}
    for name, fn in (("uva", run_uva), ("staged", run_staged)):
        fn()
        runtime.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
            runtime.synchronize()  # the staged copy's source is refilled next time round
        times[name] = time.perf_counter() - start
    for mem in (w_mem, s_mem):
        if mem is not None:
            mem.close()
    return times["uva"] <= times["staged"]


def stored_np_dtype(table_dtype: str) -> Any:
    return _STORED_NP[table_dtype]
