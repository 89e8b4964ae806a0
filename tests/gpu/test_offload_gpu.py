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

from engram_serve.config import EngramConfig, OffloadConfig
from engram_serve.kernels.reference import gather_rows
from engram_serve.model.tables import table_layouts, table_path, write_random_table
from engram_serve.offload import pinned
from engram_serve.offload.prefetch import build_prefetcher
from engram_serve.offload.tiers import host_store, open_tables

pytestmark = pytest.mark.gpu

CONFIG = EngramConfig(
    variant="v41",
    layer_ids=(1, 3),
    max_ngram_size=4,
    n_head_per_ngram=8,
    engram_vocab_size=(20_000, 20_000, 20_000),
    head_dim=256,
    table_dtype="fp8_e4m3",
)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("gpu_tables")
    for layout in table_layouts(CONFIG):
        path = table_path(model_dir, layout.layer_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_random_table(path, layout, seed=0)
    return open_tables(model_dir, CONFIG.layer_ids)


def zipf_steps(tables, num_steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for step in range(num_steps):
        num_tokens = 0 if step == 5 else int(rng.integers(1, 300))
        yield np.stack([
            np.minimum(rng.zipf(1.2, (num_tokens, CONFIG.num_heads)) - 1, tables[lid].rows - 1)
            for lid in CONFIG.layer_ids
        ]).astype(np.int64)  # fmt: skip


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
def test_gpu_tiers_match_the_device_tier_bitwise(tables, setting):
    steps = list(zipf_steps(tables, 30))
    device = torch.device("cuda")
    with (
        build_prefetcher(CONFIG, tables, OffloadConfig(tier="device"), device) as baseline,
        build_prefetcher(CONFIG, tables, SETTINGS[setting], device) as offloaded,
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


def test_registration_in_chunks_and_uva_view():
    mem = pinned.HostMemory(256 << 20)
    host = mem.array(np.float32, (64 << 20,))
    host[:] = np.arange(host.size, dtype=np.float32)
    reg = pinned.Registration(mem.ptr, mem.nbytes, chunk=64 << 20)
    try:
        assert len(reg.chunks) == 4
        view = pinned.cuda_view(host)
        assert view.is_cuda
        idx = torch.randint(0, host.size, (1 << 16,), device="cuda")
        assert torch.equal(view[idx].cpu(), torch.from_numpy(host)[idx.cpu()])
        torch.cuda.synchronize()
    finally:
        reg.release()


def test_cupy_host_alloc_if_available():
    pytest.importorskip("cupy")
    mem = pinned.CupyHostMemory(1 << 20)
    try:
        host = mem.array(np.uint8, (1 << 20,))
        host[:] = np.arange(host.size) % 251
        assert torch.equal(pinned.cuda_view(host).cpu(), torch.from_numpy(host))
    finally:
        mem.close()


def test_shared_table_pins_read_only(tables):
    name = f"gputest-{uuid.uuid4().hex[:10]}"
    try:
        off = OffloadConfig(tier="host", shm_name=name, host_gather="uva")
        steps = list(zipf_steps(tables, 5, seed=3))
        with (
            build_prefetcher(CONFIG, tables, off, "cuda") as shared,
            build_prefetcher(CONFIG, tables, OffloadConfig(), "cuda") as baseline,
        ):
            for rows in steps:
                a, b = shared.prefetch(rows), baseline.prefetch(rows)
                for layer_id in CONFIG.layer_ids:
                    assert torch.equal(a.wait(layer_id).view(torch.int32),
                                       b.wait(layer_id).view(torch.int32))  # fmt: skip
    finally:
        pinned.remove_shared(name, list(CONFIG.layer_ids))


@pytest.mark.parametrize("gather", ["uva", "staged"])
def test_h2d_bandwidth_of_the_gather(tables, gather):
    """Bandwidth of a step-sized random gather from pinned host memory into HBM."""
    table = tables[CONFIG.layer_ids[0]]
    io_pool = ThreadPoolExecutor(16)
    store = host_store(table, torch.device("cuda"), io_pool, gather=gather)
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, table.rows, 200_000))
    row_bytes = table.row_bytes + table.scale_row_bytes
    if store.reads_on_device:
        ids_dev = torch.from_numpy(ids).cuda()

        def run():
            store.gather(ids_dev)
    else:
        w, w_mem = pinned.host_empty((len(ids), table.width), np.uint8, True)
        s, s_mem = pinned.host_empty((len(ids), table.scale_row_bytes), np.uint8, True)

        def run():
            store.read(ids, w, s)
            torch.from_numpy(w).cuda(non_blocking=True)
            torch.from_numpy(s).cuda(non_blocking=True)

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
