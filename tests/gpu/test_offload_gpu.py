"""CUDA paths of the offload: pinned host tables read over UVA or staged, the HBM cache, the side
stream. Every tier must give the device tier's exact bits; the gather's H2D bandwidth is
measured and printed (run with -s to see it)."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from engram_serve.bench.gpu_check import ENGRAM as CONFIG
from engram_serve.bench.gpu_check import write_tables, zipf_steps
from engram_serve.config import OffloadConfig
from engram_serve.device import ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED, CudaRuntime, get_runtime
from engram_serve.kernels.reference import gather_rows
from engram_serve.offload import pinned
from engram_serve.offload.prefetch import build_prefetcher
from engram_serve.offload.tiers import host_store

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return write_tables(tmp_path_factory.mktemp("gpu_tables"))


@pytest.fixture(scope="module")
def runtime():
    return get_runtime("cuda")


SETTINGS = {
    "host uva": OffloadConfig(tier="host", host_gather="uva"),
    "host staged": OffloadConfig(tier="host", host_gather="staged"),
    "host auto + hbm cache": OffloadConfig(tier="host", cache_rows=4096),
    "host uva + cache, no prefetch": OffloadConfig(tier="host", host_gather="uva",
                                                   cache_rows=4096, prefetch=False),
    "disk + hbm cache": OffloadConfig(tier="disk", cache_rows=4096, cache_policy="lfu"),
    "disk direct": OffloadConfig(tier="disk", direct_io=True),
}  # fmt: skip


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_gpu_tiers_match_the_device_tier_bitwise(tables, runtime, setting):
    steps = list(zipf_steps(tables, 30))
    with (
        build_prefetcher(CONFIG, tables, OffloadConfig(tier="device"), runtime) as baseline,
        build_prefetcher(CONFIG, tables, SETTINGS[setting], runtime) as offloaded,
    ):
        pending = [offloaded.prefetch(steps[0]), offloaded.prefetch(steps[1])]  # 2 in flight
        for i, rows in enumerate(steps):
            handle = pending[i]
            if i + 2 < len(steps):
                pending.append(offloaded.prefetch(steps[i + 2]))
            want_handle = baseline.prefetch(rows)
            for layer_index, layer_id in enumerate(CONFIG.layer_ids):
                got, want = handle.wait(layer_id), want_handle.wait(layer_id)
                assert got.is_cuda and got.shape == want.shape
                assert torch.equal(got.view(torch.int32), want.view(torch.int32))
                if i % 10 == 0:  # and the device tier is the reference gather
                    t = tables[layer_id]
                    ref = gather_rows(t.weight_tensor(), torch.from_numpy(rows[layer_index]),
                                      t.scale_tensor())  # fmt: skip
                    assert torch.equal(want.cpu().view(torch.int32), ref.view(torch.int32))
        stats = offloaded.stats
    assert stats["lookups"] == sum(r[0].size for r in steps) * len(CONFIG.layer_ids)
    if SETTINGS[setting].cache_rows:
        assert stats["cache_hits"] > 0
    print(setting, {k: stats[k] for k in ("hit_rate", "rows_read", "stall_s", "store")},
          "gpu stall", stats.get("gpu_stall_s"))  # fmt: skip


def test_registration_in_chunks_and_uva_view(runtime):
    mem = pinned.HostMemory(256 << 20)
    host = mem.array(np.float32, (64 << 20,))
    host[:] = np.arange(host.size, dtype=np.float32)
    reg = pinned.Registration(mem.ptr, mem.nbytes, runtime, chunk=64 << 20)
    try:
        assert len(reg.chunks) == 4
        view = pinned.cuda_view(host, runtime)
        assert view.is_cuda and view.data_ptr() == host.ctypes.data  # in place: no copy
        idx = torch.randint(0, host.size, (1 << 16,), device="cuda")
        assert torch.equal(view[idx].cpu(), torch.from_numpy(host)[idx.cpu()])
        torch.cuda.synchronize()
    finally:
        reg.release()


def test_cupy_host_alloc_if_available(runtime):
    pytest.importorskip("cupy")
    mem = pinned.CupyHostMemory(1 << 20)
    try:
        host = mem.array(np.uint8, (1 << 20,))
        host[:] = np.arange(host.size) % 251
        assert torch.equal(pinned.cuda_view(host, runtime).cpu(), torch.from_numpy(host))
        torch.cuda.synchronize()
    finally:
        mem.close()


class NoReadOnlyRegistration(CudaRuntime):
    """This GPU as a driver without read-only host registration (device attribute 113 = 0)."""

    def device_attribute(self, attr: int) -> int:
        return (
            0 if attr == ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED else super().device_attribute(attr)
        )


@pytest.mark.parametrize("read_only", ["supported", "unsupported"])
def test_shared_table_pins_read_only_or_falls_back(tables, runtime, read_only):
    """A /dev/shm table, mapped read-only, registered read-only; or, where the driver cannot,
    re-mapped writable in place and registered read-write: the same rows either way."""
    if read_only == "unsupported":
        runtime = NoReadOnlyRegistration(runtime.device)
    name = f"gputest-{uuid.uuid4().hex[:10]}"
    try:
        off = OffloadConfig(tier="host", shm_name=name, host_gather="uva")
        steps = list(zipf_steps(tables, 5, seed=3))
        with (
            build_prefetcher(CONFIG, tables, off, runtime) as shared,
            build_prefetcher(CONFIG, tables, OffloadConfig(), runtime) as baseline,
        ):
            for rows in steps:
                a, b = shared.prefetch(rows), baseline.prefetch(rows)
                for layer_id in CONFIG.layer_ids:
                    assert torch.equal(a.wait(layer_id).view(torch.int32),
                                       b.wait(layer_id).view(torch.int32))  # fmt: skip
    finally:
        pinned.remove_shared(name, list(CONFIG.layer_ids))


@pytest.mark.parametrize("gather", ["uva", "staged"])
def test_h2d_bandwidth_of_the_gather(tables, runtime, gather):
    """Bandwidth of a step-sized random gather from pinned host memory into HBM."""
    table = tables[CONFIG.layer_ids[0]]
    io_pool = ThreadPoolExecutor(16)
    store = host_store(table, runtime, io_pool, gather=gather)
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, table.rows, 200_000))
    row_bytes = table.row_bytes + table.scale_row_bytes
    if store.reads_on_device:
        ids_dev = torch.from_numpy(ids).cuda()

        def run():
            store.gather(ids_dev)
    else:
        w, w_mem = pinned.host_empty((len(ids), table.width), np.uint8, runtime)
        s, s_mem = pinned.host_empty((len(ids), table.scale_row_bytes), np.uint8, runtime)

        def run():
            store.read(ids, w, s)
            runtime.upload(w, non_blocking=True)
            runtime.upload(s, non_blocking=True)

    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    gbps = len(ids) * row_bytes / seconds / 1e9
    print(f"\n{gather}: {len(ids):,} rows of {row_bytes} B in {seconds * 1e3:.2f} ms "
          f"= {gbps:.1f} GB/s, {len(ids) / seconds / 1e6:.1f} M rows/s")  # fmt: skip
    assert gbps > 0.5  # far below any PCIe link: catches a path that is broken, not slow
    store.close()
    io_pool.shutdown()
