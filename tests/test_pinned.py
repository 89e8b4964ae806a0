"""offload/pinned.py's CUDA calls, through the recording fake runtime (tests/fake_cuda.py): what
is registered and with which flags, the read-only fallback of shared tables, and what
`cuda_view` refuses. The calls against a real driver are tests/gpu/test_offload_gpu.py."""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_cuda import ERROR_HOST_MEMORY_ALREADY_REGISTERED, FakeCudaRuntime

from engram_serve import device as dev
from engram_serve.offload import pinned

pytestmark = pytest.mark.fake_cuda

MAPPED_PORTABLE = dev.HOST_REGISTER_MAPPED | dev.HOST_REGISTER_PORTABLE
PAGE = mmap.PAGESIZE


class RecordingRuntime(FakeCudaRuntime):
    """The fake, also keeping every cudaHostRegister call: (ptr, nbytes, flags)."""

    def __init__(self, read_only: int = 1, host_pointer: int = 1) -> None:
        attributes = {
            dev.ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED: read_only,
            dev.ATTR_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM: host_pointer,
        }
        super().__init__(attributes)
        self.registered: list[tuple[int, int, int]] = []

    def register_host(self, ptr: int, nbytes: int, flags: int) -> None:
        super().register_host(ptr, nbytes, flags)
        self.registered.append((ptr, nbytes, flags))


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A node-shared table (mapped read-only, as every process maps it) and its source."""
    monkeypatch.setattr(pinned, "SHM_DIR", tmp_path)
    weight = np.random.default_rng(0).integers(0, 256, (1000, 40), dtype=np.uint8)
    scale = np.full((1000, 2), 127, np.uint8)
    table = pinned.shared_table("t", 1, weight, scale, {"rows": 1000})
    assert not any(mem.writable for mem in table.memories)
    return table, weight


def _mapping_permissions(address: int) -> str:
    """rwxp/rwxs of this process's mapping holding `address` (/proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end:
            return perms
    raise LookupError(f"{address:#x} is not mapped")


def test_shared_table_registers_read_only_where_the_device_supports_it(shared, caplog):
    table, weight = shared
    rt = RecordingRuntime(read_only=1)
    with caplog.at_level(logging.WARNING):
        for mem in table.memories:
            mem.pin(rt)
    flags = MAPPED_PORTABLE | dev.HOST_REGISTER_READ_ONLY
    assert rt.registered == [(mem.ptr, mem.nbytes, flags) for mem in table.memories]
    assert not caplog.records
    assert _mapping_permissions(table.memories[0].ptr) == "r--s"  # still read-only
    for mem in table.memories:
        mem.close()


def test_shared_table_falls_back_to_a_writable_mapping_where_read_only_is_unsupported(
    shared, caplog
):
    """The fake refuses READ_ONLY here (CUDA error 801), as such a driver does; the table is
    re-mapped writable in place, so the arrays handed out before stay valid and registered."""
    table, weight = shared
    address = table.weight.ctypes.data
    rt = RecordingRuntime(read_only=0)
    pinned._log_read_write_fallback.cache_clear()  # once per device and process: this test's
    with caplog.at_level(logging.WARNING, logger=pinned.__name__):
        for mem in table.memories:
            mem.pin(rt)
    assert rt.registered == [(mem.ptr, mem.nbytes, MAPPED_PORTABLE) for mem in table.memories]
    assert [r.getMessage() for r in caplog.records] == [
        "cuda:0 cannot register host memory read-only (device attribute 113 is 0): shared "
        "tables are mapped writable and registered read-write"
    ]
    assert _mapping_permissions(address) == "rw-s"
    assert table.weight.ctypes.data == address and np.array_equal(table.weight, weight)
    assert not table.weight.flags.writeable  # NumPy still guards the shared table
    assert pinned.cuda_view(table.weight, rt).shape == weight.shape
    rt.synchronize()  # the fake counts a view as work, and nothing is unregistered under work
    for mem in table.memories:
        mem.close()


def test_a_read_only_registration_is_refused_before_the_driver_where_unsupported():
    mem = pinned.HostMemory(PAGE)
    with pytest.raises(RuntimeError, match="cannot register host memory read-only"):
        pinned.Registration(mem.ptr, mem.nbytes, RecordingRuntime(read_only=0), read_only=True)


def test_registration_in_chunks_and_release_unregisters_them_all():
    rt = RecordingRuntime()
    mem = pinned.HostMemory(5 * PAGE)
    reg = pinned.Registration(mem.ptr, mem.nbytes, rt, chunk=2 * PAGE)
    want = [(mem.ptr + off, size) for off, size in pinned.register_chunks(5 * PAGE, 2 * PAGE)]
    assert [(p, n) for p, n, _ in rt.registered] == reg.chunks == want
    assert [n for _, n, _ in rt.registered] == [2 * PAGE, 2 * PAGE, PAGE]
    assert all(flags == MAPPED_PORTABLE for _, _, flags in rt.registered)
    reg.release()
    assert reg.chunks == []
    again = pinned.Registration(mem.ptr, mem.nbytes, rt)  # the fake would refuse an overlap
    again.release()


def test_a_failed_registration_leaves_the_one_before_it_in_place():
    rt = RecordingRuntime()
    mem = pinned.HostMemory(2 * PAGE).pin(rt)
    with pytest.raises(dev.CudaError) as error:
        pinned.Registration(mem.ptr, PAGE, rt)
    assert error.value.code == ERROR_HOST_MEMORY_ALREADY_REGISTERED
    assert pinned.cuda_view(mem.array(np.uint8, (2 * PAGE,)), rt).numel() == 2 * PAGE
    rt.synchronize()
    mem.close()


def test_close_unregisters_through_the_runtime():
    rt = RecordingRuntime()
    mem = pinned.HostMemory(3 * PAGE).pin(rt)
    array = mem.array(np.float32, (3 * PAGE // 4,))
    mem.close()
    assert mem.registration is None
    with pytest.raises(RuntimeError, match="not inside host memory this process registered"):
        pinned.cuda_view(array, rt)
    mem.pin(rt).close()  # registrable again: nothing was left registered


def test_host_empty_pins_for_a_cuda_runtime_only():
    rt = RecordingRuntime()
    for runtime in (None, dev.CpuRuntime()):
        array, mem = pinned.host_empty((16, 8), np.float32, runtime)
        assert array.shape == (16, 8) and mem.registration is None
    array, mem = pinned.host_empty((16, 8), np.float32, rt)
    assert rt.registered == [(array.ctypes.data, array.nbytes, MAPPED_PORTABLE)]
    mem.close()
    with pytest.raises(ValueError, match="needs a CUDA runtime"):
        pinned.HostMemory(PAGE).pin(dev.CpuRuntime())


def test_cuda_view_reads_registered_memory_in_place():
    rt = RecordingRuntime()
    mem = pinned.HostMemory(4 * PAGE).pin(rt)
    array = mem.array(np.uint16, (2, PAGE // 2), offset=2 * PAGE)  # bfloat16 bits, inside
    view = pinned.cuda_view(array, rt)
    assert view.device.type == "cuda" and tuple(view.shape) == array.shape
    assert rt.view_points_at_host(view, array)
    rt.synchronize()
    mem.close()


def test_cuda_view_is_refused_where_the_device_cannot_use_host_pointers():
    rt = RecordingRuntime(host_pointer=0)
    mem = pinned.HostMemory(PAGE).pin(rt)
    with pytest.raises(RuntimeError, match="attribute 91 is 0"):
        pinned.cuda_view(mem.array(np.uint8, (PAGE,)), rt)
    mem.close()


def test_cuda_view_is_refused_outside_registered_memory():
    rt = RecordingRuntime()
    mem = pinned.HostMemory(2 * PAGE).pin(rt)
    with pytest.raises(RuntimeError, match="not inside host memory this process registered"):
        pinned.cuda_view(np.zeros(PAGE, np.uint8), rt)  # pageable: never registered
    inside = mem.array(np.uint8, (2 * PAGE,))
    with pytest.raises(RuntimeError, match="not inside host memory"):
        pinned.cuda_view(np.concatenate([inside, inside]), rt)
    mem.close()


def test_cuda_view_refuses_a_view_that_is_not_the_host_memory():
    """On a GPU, a view at another address would be torch's copy of the table in HBM."""

    class CopyingRuntime(RecordingRuntime):
        def host_view(self, array: np.ndarray):
            super().host_view(array)
            return self._new_tensor(array.shape, torch.uint8)  # somewhere else

    rt = CopyingRuntime()
    mem = pinned.HostMemory(PAGE).pin(rt)
    with pytest.raises(RuntimeError, match="copied it to the device"):
        pinned.cuda_view(mem.array(np.uint8, (PAGE,)), rt)
    rt.synchronize()
    mem.close()


def test_cupy_error_names_the_extra_to_install():
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"pip install 'engram-serve\[cuda\]'"):
            pinned.CupyHostMemory(PAGE)
    else:
        pytest.skip("cupy is installed")
