"""Host memory for Engram tables and staging buffers, and node-wide shared tables.

Why not `tensor.pin_memory()`: PyTorch's caching host allocator rounds every request up to a
power of two (a 20.4 GiB table pins 32 GiB). Instead a region is mapped here (anonymous, or a
file in /dev/shm) and then, on CUDA, page-locked in place with `cudaHostRegister`, at most
MAX_REGISTER_BYTES per call (recent drivers fail a single registration near 512 GiB). Every
CUDA call goes through the device runtime (engram_serve/device.py: `register_host`,
`unregister_host`, `device_attribute`, `host_view`), so the tests prove this file on a CPU-only
machine with a recording fake (tests/fake_cuda.py). cupy's `cudaHostAlloc` is the other
allocator; cupy is optional and imported only when asked for.

A registered region is "mapped": under UVA its host address is also a device address, so
`cuda_view` wraps it as a CUDA tensor that kernels read in place over PCIe (zero copy). It
refuses anything else rather than let torch copy a table into HBM.

Node-shared tables: `shared_table` copies a table once into /dev/shm; every server process on the
node maps the same pages (MAP_SHARED), so a replica adds page-table entries, not a copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import logging
import mmap
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_serve import device

logger = logging.getLogger(__name__)

MAX_REGISTER_BYTES = 64 << 30
COPY_CHUNK_BYTES = 64 << 20
_MAX_FOLIO = 2 << 20  # the largest page-cache folio on x86-64 and arm64 with 4 KiB pages
SHM_DIR = Path(os.environ.get("ENGRAM_SHM_DIR", "/dev/shm"))
_MAP_FIXED = 0x10  # Linux (x86-64, arm64); Python's mmap module does not export it


# ---------------------------------------------------------------------------------------------
# page-aligned host regions


class HostMemory:
    """A page-aligned host region: anonymous memory, or a file mapped MAP_SHARED.

    `array(dtype, shape, offset)` views it as NumPy; the views keep the mapping alive.
    `pin(runtime)` page-locks it for a CUDA device, `close()` unregisters it again.
    """

    def __init__(self, nbytes: int, path: Path | None = None, writable: bool = True) -> None:
        self.nbytes, self.path = int(nbytes), path
        self.writable = writable or path is None  # anonymous memory is always mapped writable
        self._size = max(self.nbytes, 1)  # mmap refuses length 0; an empty table maps one byte
        if path is None:  # private: Python's default anonymous map is MAP_SHARED (shmem)
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            self._mmap = mmap.mmap(-1, self._size, flags=flags)
        else:
            with open(path, "r+b" if writable else "rb") as f:
                access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
                self._mmap = mmap.mmap(f.fileno(), self._size, access=access)
        _advise_huge_pages(self._mmap)
        self._bytes = np.frombuffer(self._mmap, dtype=np.uint8, count=self.nbytes)
        self.registration: Registration | None = None

    @property
    def ptr(self) -> int:
        return int(self._bytes.ctypes.data)

    def array(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        return (
            self._bytes[offset : offset + count * np.dtype(dtype).itemsize]
            .view(dtype)
            .reshape(shape)
        )

    def pin(self, runtime: Any) -> HostMemory:
        """Page-lock the region for `runtime`'s GPU (cudaHostRegister, mapped, in chunks).

        A read-only file mapping (a shared table) is registered read-only where the device
        supports that; elsewhere it is re-mapped writable first and registered read-write, since
        CUDA refuses to register a read-only mapping read-write (`_remap_writable`).
        """
        if not _is_cuda(runtime):
            raise ValueError("pinning host memory needs a CUDA runtime")
        if self.registration is None and self.nbytes:
            read_only = not self.writable
            if read_only and not read_only_supported(runtime):
                _log_read_write_fallback(str(runtime.device))
                self._remap_writable()
                read_only = False
            self.registration = Registration(self.ptr, self.nbytes, runtime, read_only=read_only)
        return self

    def _remap_writable(self) -> None:
        """Map the same file writable at the same address, replacing the read-only mapping.

        Why in place: `shared_table` hands out its arrays before anything is pinned (pinning
        needs a runtime, mapping does not), and those arrays must lie inside what is then
        registered. mmap(MAP_SHARED | MAP_FIXED) of the same file at the same address swaps the
        mapping in one step under the kernel's mmap lock: same addresses, same page-cache
        pages, so every array keeps its bytes and stays valid. The arrays stay read-only in
        NumPy, so this process still cannot write the table by accident. Opening the file for
        writing is allowed: its user's server processes made it.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long)  # fmt: skip
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED
        with open(self.path, "r+b") as f:
            got = libc.mmap(self.ptr, self._size, prot, flags, f.fileno(), 0)
        if got != self.ptr:
            raise OSError(ctypes.get_errno(), f"re-mapping {self.path} writable failed")
        _advise_huge_pages(self._mmap)  # the advice belonged to the mapping just replaced
        self.writable = True

    def close(self) -> None:
        """Unregister the region (the mapping itself lives on while arrays view it)."""
        if self.registration is not None:
            self.registration.release()
            self.registration = None


def copy_rows(
    src: np.ndarray, dst: np.ndarray, progress: Callable[[int], None] | None = None
) -> None:
    """dst[:] = src[:], in COPY_CHUNK_BYTES pieces: `src` may be a memmap larger than RAM.

    A memmap's file is read into `dst` directly and each piece's pages are dropped from the OS
    page cache behind it: loading a table into RAM leaves no second copy of it there (an 8 GiB
    table would otherwise hold 8 GiB of cache as well, until memory pressure evicts it). Pages
    some process has mapped (the memmap itself, once read through) stay cached.
    """
    if src.shape != dst.shape:
        raise ValueError(f"copy of {src.shape} into {dst.shape}")
    if not src.size:
        return
    row_bytes = max(1, src.nbytes // max(1, src.shape[0]))
    step = max(1, COPY_CHUNK_BYTES // row_bytes)
    readable = _whole_memmap(src) and dst.flags.c_contiguous and dst.dtype == src.dtype
    dropped = src.offset - src.offset % _MAX_FOLIO if readable else 0  # cache dropped up to
    with open(src.filename, "rb") if readable else contextlib.nullcontext() as file:
        for start in range(0, src.shape[0], step):
            stop = min(src.shape[0], start + step)
            if file is None:
                dst[start:stop] = src[start:stop]
            else:
                offset, end = src.offset + start * row_bytes, src.offset + stop * row_bytes
                _read_exactly(file.fileno(), dst[start:stop], offset, src.filename)
                # Only cached folios (up to 2 MiB, aligned to their size) the range covers
                # whole are dropped: start each drop at the 2 MiB boundary where the last one
                # may have left a folio.
                os.posix_fadvise(file.fileno(), dropped, end - dropped, os.POSIX_FADV_DONTNEED)
                dropped = end - end % _MAX_FOLIO
            if progress is not None:
                progress((stop - start) * row_bytes)


def _whole_memmap(a: np.ndarray) -> bool:
    """Whether `a` is an np.memmap of a whole contiguous run of its file (not a view into one)."""
    return (
        isinstance(a, np.memmap)
        and a.filename is not None
        and a.flags.c_contiguous
        and isinstance(a.base, mmap.mmap)
    )


def _read_exactly(fd: int, dst: np.ndarray, offset: int, name: str) -> None:
    view = memoryview(dst.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(f"{name} ended at byte {offset + done}, {len(view) - done} bytes early")
        done += n


# ---------------------------------------------------------------------------------------------
# CUDA: registration, cupy allocation, UVA views


@functools.cache
def _log_read_write_fallback(device_name: str) -> None:
    """One line per device and process, however many tables fall back."""
    logger.warning(
        "%s cannot register host memory read-only (device attribute %d is 0): shared tables "
        "are mapped writable and registered read-write",
        device_name, device.ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED,
    )  # fmt: skip


def _is_cuda(runtime: Any) -> bool:
    return runtime is not None and runtime.is_cuda


def read_only_supported(runtime: Any) -> bool:
    """Whether `runtime`'s device accepts cudaHostRegisterReadOnly (device attribute 113)."""
    return runtime.device_attribute(device.ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED) == 1


# Host ranges this process has page-locked and mapped (Registration, CupyHostMemory): the only
# memory `cuda_view` wraps.
_pinned: set[Any] = set()
_pinned_lock = threading.Lock()


def _is_pinned(ptr: int, nbytes: int) -> bool:
    with _pinned_lock:
        return any(p.ptr <= ptr and ptr + nbytes <= p.ptr + p.nbytes for p in _pinned)


class Registration:
    """`cudaHostRegister(Mapped | Portable [| ReadOnly])` of [ptr, ptr + nbytes) through
    `runtime`, at most `chunk` bytes a call. Mapped: under UVA the host address is then a device
    address (what `cuda_view` relies on); portable: every CUDA context may use it. `release()`
    unregisters it; nothing may be in flight on it then."""

    def __init__(
        self,
        ptr: int,
        nbytes: int,
        runtime: Any,
        chunk: int = MAX_REGISTER_BYTES,
        read_only: bool = False,
    ) -> None:
        if read_only and not read_only_supported(runtime):
            raise RuntimeError(
                "this GPU cannot register host memory read-only (device attribute "
                f"{device.ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED} is 0): register a writable "
                "mapping (HostMemory.pin re-maps a shared table writable)"
            )
        self.ptr, self.nbytes, self.runtime = int(ptr), int(nbytes), runtime
        self.chunks: list[tuple[int, int]] = []
        flags = device.HOST_REGISTER_MAPPED | device.HOST_REGISTER_PORTABLE
        if read_only:  # a read-only mapping (a shared table) must be registered as such
            flags |= device.HOST_REGISTER_READ_ONLY
        try:
            for offset, size in register_chunks(self.nbytes, chunk):
                self.runtime.register_host(self.ptr + offset, size, flags)
                self.chunks.append((self.ptr + offset, size))
        except BaseException:
            self.release()
            raise
        with _pinned_lock:
            _pinned.add(self)

    def release(self) -> None:
        """Unregister every chunk, last first; cuda_view refuses the range from now on."""
        with _pinned_lock:
            _pinned.discard(self)
        while self.chunks:
            self.runtime.unregister_host(self.chunks[-1][0])
            self.chunks.pop()


def register_chunks(nbytes: int, chunk: int = MAX_REGISTER_BYTES) -> list[tuple[int, int]]:
    """(offset, size) of each registration call for a region of `nbytes` (pure, testable)."""
    if chunk <= 0 or chunk % mmap.PAGESIZE:
        raise ValueError(f"registration chunk {chunk} is not a positive multiple of a page")
    return [(s, min(chunk, nbytes - s)) for s in range(0, nbytes, chunk)]


class CupyHostMemory:
    """`cudaHostAlloc(Mapped | Portable)` through cupy, freed on close. Exact size: no pool."""

    def __init__(self, nbytes: int) -> None:
        try:
            import cupy
        except ImportError:
            raise RuntimeError(
                "pinned allocation with cudaHostAlloc needs cupy (cupy-cuda13x): "
                "pip install 'engram-serve[cuda]' (or use the mmap + cudaHostRegister path, "
                "which needs only torch)"
            ) from None
        self._runtime = cupy.cuda.runtime
        self.nbytes = int(nbytes)
        # cudaHostAllocMapped | cudaHostAllocPortable: the same bits as the registration flags
        flags = device.HOST_REGISTER_MAPPED | device.HOST_REGISTER_PORTABLE
        self.ptr = self._runtime.hostAlloc(max(1, self.nbytes), flags)
        buf = (ctypes.c_uint8 * max(1, self.nbytes)).from_address(self.ptr)
        self._bytes = np.frombuffer(buf, dtype=np.uint8, count=self.nbytes)
        with _pinned_lock:
            _pinned.add(self)

    def array(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        return (
            self._bytes[offset : offset + count * np.dtype(dtype).itemsize]
            .view(dtype)
            .reshape(shape)
        )

    def close(self) -> None:
        with _pinned_lock:
            _pinned.discard(self)
        if self.ptr:
            self._runtime.freeHost(self.ptr)
            self.ptr = 0


def cuda_view(array: np.ndarray, runtime: Any) -> torch.Tensor:
    """A CUDA tensor over `array` where it lies, in registered (mapped) host memory: kernels
    read it in place over UVA. Never a copy: anything else is refused with a RuntimeError.

    What must hold: the device can use a registered host pointer as a device pointer (device
    attribute 91; every 64-bit Linux UVA system), `array` lies inside memory this process has
    registered (Registration, HostMemory.pin, CupyHostMemory) and the caller keeps it registered
    and alive while the view is used, and the view's address is the host address (any other
    would mean torch copied the array into device memory: a table would fill HBM).
    """
    if not array.flags.c_contiguous:
        raise ValueError("cuda_view needs a C-contiguous host array")
    attr = device.ATTR_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM
    if runtime.device_attribute(attr) != 1:
        raise RuntimeError(
            f"this GPU cannot read registered host memory at its host address (device "
            f"attribute {attr} is 0): read host tables staged (host_gather='staged')"
        )
    host_ptr = int(array.ctypes.data)
    if not _is_pinned(host_ptr, array.nbytes):
        raise RuntimeError(
            f"{array.nbytes} bytes at {host_ptr:#x} are not inside host memory this process "
            "registered: pin them (HostMemory.pin) before viewing them from the GPU"
        )
    view = runtime.host_view(array)
    if not runtime.view_points_at_host(view, array):  # view.data_ptr() == host_ptr, on a GPU
        raise RuntimeError(
            f"the device view of host memory at {host_ptr:#x} lies elsewhere: torch copied it "
            "to the device instead of reading it in place; refusing"
        )
    return view


# ---------------------------------------------------------------------------------------------
# staging buffers


def _advise_huge_pages(region: mmap.mmap) -> None:
    """Ask for transparent huge pages (kernel setting `madvise`, the common default): a random
    row read over a table of 4 KiB pages misses the TLB nearly every time, with 2 MiB pages it
    rarely does (bench/kernels.py measures the difference). Kernels without THP refuse; the
    table then simply stays on small pages."""
    with contextlib.suppress(AttributeError, OSError):
        region.madvise(mmap.MADV_HUGEPAGE)


def host_empty(shape: tuple[int, ...], dtype: Any, runtime: Any) -> tuple[np.ndarray, HostMemory]:
    """A host array for staging, exactly its size (unlike pin_memory()). Page-locked for
    `runtime`'s GPU where it is a CUDA runtime; None or a CPU runtime: plain memory."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    mem = HostMemory(nbytes)
    if _is_cuda(runtime):
        mem.pin(runtime)
    return mem.array(dtype, shape), mem


# ---------------------------------------------------------------------------------------------
# node-wide shared tables in /dev/shm


@dataclass(frozen=True)
class SharedArrays:
    weight: np.ndarray
    scale: np.ndarray | None
    memories: tuple[HostMemory, ...]
    created: bool  # True: this process copied the table in; False: it mapped an existing copy


def shm_paths(name: str, layer_id: int) -> dict[str, Path]:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"shared table name {name!r} must be a plain file name")
    stem = SHM_DIR / f"engram-{name}-layer{layer_id}"
    return {k: stem.with_suffix(f".{k}") for k in ("weight", "scale", "json")}


def shared_table(
    name: str,
    layer_id: int,
    weight: np.ndarray,
    scale: np.ndarray | None,
    describe: dict[str, Any],
    progress: Callable[[int], None] | None = None,
) -> SharedArrays:
    """Map layer `layer_id`'s table from /dev/shm, copying it there first if no process has.

    `describe` identifies the table (rows, width, dtype, source file...): a copy made from a
    different table is refused rather than silently used or deleted (other processes may map it).
    The JSON sidecar is written last, under an exclusive lock, so a half-written copy is never
    mapped.
    """
    paths = shm_paths(name, layer_id)
    SHM_DIR.mkdir(parents=True, exist_ok=True)
    with open(SHM_DIR / f"engram-{name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        created = not paths["json"].exists()
        if created:
            _write_shared(paths, weight, scale, describe, progress)
        found = json.loads(paths["json"].read_text())
        if found != describe:
            raise RuntimeError(
                f"{paths['json']} describes a different table ({found}, expected {describe}); "
                f"remove engram-{name}-layer{layer_id}.* from {SHM_DIR} once no server uses it"
            )
    w_mem = HostMemory(weight.nbytes, paths["weight"], writable=False)
    memories = [w_mem]
    shared_scale = None
    if scale is not None:
        s_mem = HostMemory(scale.nbytes, paths["scale"], writable=False)
        shared_scale = s_mem.array(scale.dtype, scale.shape)
        memories.append(s_mem)
    return SharedArrays(
        w_mem.array(weight.dtype, weight.shape), shared_scale, tuple(memories), created
    )


def _write_shared(
    paths: dict[str, Path],
    weight: np.ndarray,
    scale: np.ndarray | None,
    describe: dict[str, Any],
    progress: Callable[[int], None] | None,
) -> None:
    need = weight.nbytes + (0 if scale is None else scale.nbytes)
    free = shutil.disk_usage(SHM_DIR).free
    if need > free:
        raise OSError(
            f"{SHM_DIR} has {free / 2**30:.2f} GiB free, the table needs {need / 2**30:.2f} GiB "
            "(containers: raise --shm-size or use --ipc=host)"
        )
    for key, src in (("weight", weight), ("scale", scale)):
        if src is None:
            continue
        with open(paths[key], "wb") as f:
            f.truncate(max(1, src.nbytes))
        mem = HostMemory(src.nbytes, paths[key])
        copy_rows(src, mem.array(src.dtype, src.shape), progress)
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(describe))
    os.replace(tmp, paths["json"])


def remove_shared(name: str, layer_ids: list[int]) -> None:
    """Delete a shared table's files (mapped pages stay valid until every process unmaps)."""
    for layer_id in layer_ids:
        for path in shm_paths(name, layer_id).values():
            path.unlink(missing_ok=True)
    (SHM_DIR / f"engram-{name}.lock").unlink(missing_ok=True)
