"""Offload subsystem: every tier and cache setting returns the device tier's exact bits; the
cache keeps what it must; profiles count what the hasher reads; a /dev/shm table is shared
between processes without a private copy."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_serve.config import OffloadConfig
from engram_serve.device import CpuRuntime
from engram_serve.engram.config import EngramConfig
from engram_serve.engram.ngram_hash import NgramHasher
from engram_serve.engram.tables import open_table, table_layouts, table_path, write_random_table
from engram_serve.kernels.reference import gather_rows
from engram_serve.offload import aio, pinned
from engram_serve.offload.cache import RowCache, RowProfile, profile_rows
from engram_serve.offload.prefetch import build_prefetcher
from engram_serve.offload.staging import STAGING_DEPTH
from engram_serve.offload.tiers import DiskStore, TableReadError, open_tables, table_from_tensors

REPO = Path(__file__).resolve().parents[1]
VOCAB = 400  # compressed vocabulary of the synthetic token stream


def engram_config(table_dtype: str) -> EngramConfig:
    return EngramConfig(
        layer_ids=(1, 4),
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(600, 900),
        head_dim=64,
        table_dtype=table_dtype,
    )


def write_tables(model_dir: Path, config: EngramConfig, seed: int = 0) -> None:
    for layout in table_layouts(config):
        path = table_path(model_dir, layout.layer_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_random_table(path, layout, seed)


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float16", "fp8_e4m3"])
def model(request, tmp_path_factory):
    config = engram_config(request.param)
    model_dir = tmp_path_factory.mktemp(f"tables_{request.param}")
    write_tables(model_dir, config)
    return config, model_dir


def token_steps(config: EngramConfig, num_steps: int, seed: int = 0):
    """Row ids of a Zipf-distributed token stream, hashed step by step as the engine does:
    varying step sizes, empty steps included, lookback carried across steps."""
    hasher = NgramHasher(config, np.arange(VOCAB, dtype=np.int64))
    rng = np.random.default_rng(seed)
    history = np.empty(0, np.int64)
    for step in range(num_steps):
        if step % 7 == 3:  # an empty step (the hasher itself is not asked to hash nothing)
            yield np.empty((len(config.layer_ids), 0, config.num_heads), np.int64)
            continue
        num_tokens = int(rng.integers(1, 40))
        ids = np.minimum(rng.zipf(1.3, num_tokens) - 1, VOCAB - 1).astype(np.int64)
        rows = hasher.row_ids(ids, np.array([0, num_tokens]), hasher.lookback(history)[None])
        history = np.concatenate([history, ids])
        yield rows


def reference_rows(table, ids: np.ndarray) -> torch.Tensor:
    return gather_rows(table.weight_tensor(), torch.from_numpy(ids), table.scale_tensor())


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


SETTINGS = {
    "device": OffloadConfig(tier="device"),
    "host": OffloadConfig(tier="host"),
    "host+cache": OffloadConfig(tier="host", cache_rows=96),
    "disk": OffloadConfig(tier="disk", num_io_threads=4),
    "disk+lru": OffloadConfig(tier="disk", cache_rows=96, num_io_threads=4),
    "disk+lfu": OffloadConfig(tier="disk", cache_rows=96, cache_policy="lfu", num_io_threads=3),
    "disk+lru,no prefetch": OffloadConfig(tier="disk", cache_rows=96, prefetch=False),
    "disk+direct io": OffloadConfig(tier="disk", cache_rows=4000, direct_io=True),
    "disk+cache bytes": OffloadConfig(tier="disk", cache_bytes=64 * 280, num_io_threads=2),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_tier_and_cache_setting_gives_the_device_tier_bits(model, setting):
    config, model_dir = model
    tables = open_tables(model_dir, config.layer_ids)
    steps = list(token_steps(config, 40))
    with build_prefetcher(config, tables, SETTINGS[setting]) as prefetcher:
        # Three steps in flight before the first wait: concurrent fetches share the cache, and
        # each step's rows must survive the admissions of the steps after it.
        handles = [prefetcher.prefetch(rows) for rows in steps[:3]]
        for i, rows in enumerate(steps):
            handle = handles[i]
            if i + 3 < len(steps):
                handles.append(prefetcher.prefetch(steps[i + 3]))
            for layer_id, layer_rows in zip(config.layer_ids, rows, strict=True):
                assert_same_bits(
                    handle.wait(layer_id), reference_rows(tables[layer_id], layer_rows)
                )
        stats = prefetcher.stats
    total = sum(r[0].size for r in steps) * len(config.layer_ids)
    assert stats["lookups"] == total
    assert sum(stats["rows_read"].values()) == (
        total if setting in ("device", "host") else stats["unique_rows"]
    )
    if "cache" in stats["rows_read"]:
        assert stats["rows_read"]["cache"] == stats["cache_hits"] > 0
        assert stats["cache_hits"] + stats["cache_misses"] == stats["unique_rows"]


def test_memory_tables_from_tensors_match_the_reference():
    config = engram_config("fp8_e4m3")
    gen = torch.Generator().manual_seed(0)
    tables, layouts = {}, table_layouts(config)
    for layout in layouts:
        weight = torch.randint(0, 256, (layout.rows, 64), dtype=torch.uint8, generator=gen)
        weight[weight == 0x7F] = 0  # keep NaN bytes out: NaN != NaN would fail the comparison
        weight[weight == 0xFF] = 0
        scale = torch.randint(100, 140, (layout.rows, 2), dtype=torch.uint8, generator=gen)
        tables[layout.layer_id] = table_from_tensors(layout.layer_id, weight, scale)
    rows = next(r for r in token_steps(config, 3) if r.shape[1])
    prefetcher = build_prefetcher(config, tables, OffloadConfig(tier="host", cache_rows=64))
    handle = prefetcher.prefetch(rows)
    for i, layer_id in enumerate(config.layer_ids):
        t = tables[layer_id]
        want = gather_rows(torch.from_numpy(t.weight), torch.from_numpy(rows[i]),
                           torch.from_numpy(t.scale))  # fmt: skip
        assert_same_bits(handle.wait(layer_id), want)
    prefetcher.close()


def test_empty_step_and_bad_input():
    config = engram_config("float32")
    tables = {
        lay.layer_id: table_from_tensors(lay.layer_id, torch.randn(lay.rows, 64))
        for lay in table_layouts(config)
    }
    prefetcher = build_prefetcher(config, tables, OffloadConfig(tier="host"))
    rows = prefetcher.prefetch(np.empty((2, 0, config.num_heads), np.int64)).wait(4)
    assert rows.shape == (0, config.num_heads, 64)
    with pytest.raises(ValueError, match="row ids must be"):
        prefetcher.prefetch(np.zeros((1, 3, config.num_heads), np.int64))
    with pytest.raises(IndexError, match="outside its table"):
        prefetcher.prefetch(np.full((2, 1, config.num_heads), 10**6, np.int64))
    with pytest.raises(KeyError, match="not an Engram layer"):
        prefetcher.prefetch(np.zeros((2, 1, config.num_heads), np.int64)).wait(2)
    prefetcher.close()
    with pytest.raises(ValueError, match="disk tier reads table files"):
        build_prefetcher(config, tables, OffloadConfig(tier="disk"))
    with pytest.raises(ValueError, match="config says"):
        build_prefetcher(engram_config("float16"), tables, OffloadConfig())
    with pytest.raises(ValueError, match="rows or in bytes"):
        OffloadConfig(cache_rows=1, cache_bytes=1)


def test_stall_is_measured_and_staging_is_reused(model, tmp_path):
    config, model_dir = model
    tables = open_tables(model_dir, config.layer_ids)
    steps = [r for r in token_steps(config, 30) if r.shape[1]]
    off = OffloadConfig(tier="disk", cache_rows=64, prefetch=False, num_io_threads=2)
    with build_prefetcher(config, tables, off) as prefetcher:
        for rows in steps:
            handle = prefetcher.prefetch(rows)
            for layer_id in config.layer_ids:
                handle.wait(layer_id)
        stats = prefetcher.stats
    # Without prefetch every fetch runs inside wait(): the model stalls for all of it.
    assert stats["stall_s"] >= stats["fetch_s"] > 0
    assert stats["steps"] == len(steps)
    for layer in stats["layers"].values():
        assert layer["staging_allocations"] == STAGING_DEPTH  # allocated once, not per step


def test_lookahead_reads_not_started_by_the_next_step_are_cancelled_not_waited_for(model):
    """One I/O thread, held busy: layer 1's look-ahead reads finish before it is held, layer
    4's queue behind it. The next step admits layer 1's rows (all hits), cancels layer 4's
    instead of blocking on them (before, `begin` waited for every look-ahead read, so this
    step would wait for the held thread), and reads layer 4's rows itself, each once."""
    import threading

    config, model_dir = model
    tables = open_tables(model_dir, config.layer_ids)
    rows = next(r for r in token_steps(config, 10) if r.shape[1] >= 8)
    offload = OffloadConfig(tier="disk", cache_rows=4000, num_io_threads=1)
    with build_prefetcher(config, tables, offload) as prefetcher:
        assert prefetcher.splits
        held = threading.Event()
        fetchers = prefetcher.fetchers
        fetchers[1].begin_warm(rows[0])
        prefetcher.io_pool.submit(lambda: None).result()  # layer 1's reads are done
        prefetcher.io_pool.submit(held.wait, 5)  # a held thread (let go after 5 s at most)
        fetchers[4].begin_warm(rows[1])
        handle = prefetcher.prefetch(rows)  # must not wait for the held thread
        held.set()
        for layer_id, layer_rows in zip(config.layer_ids, rows, strict=True):
            assert_same_bits(handle.wait(layer_id), reference_rows(tables[layer_id], layer_rows))
        layers = prefetcher.stats["layers"]
    unique = [len(np.unique(r)) for r in rows]
    assert layers[1]["warmed"] == unique[0] and layers[1]["cache_hits"] == unique[0]
    assert layers[4]["warmed"] == 0 and layers[4]["cache_misses"] == unique[1]
    assert layers[4]["rows_read"]["disk"] == unique[1]  # cancelled reads were never made


def test_lookahead_reads_start_once_the_first_engram_layer_has_its_rows(model):
    """A step's own reads come first: the look-ahead asked for at step start submits nothing
    until the model has waited for the first Engram layer (layer 1); then its reads start, and
    the next step finds every row in the cache. A look-ahead still deferred when the next step
    starts is dropped (that step reads its rows itself)."""
    config, model_dir = model
    tables = open_tables(model_dir, config.layer_ids)
    steps = [r for r in token_steps(config, 12) if r.shape[1] >= 8][:3]
    offload = OffloadConfig(tier="disk", cache_rows=4000, cache_policy="lru", lookahead=True)
    with build_prefetcher(config, tables, offload) as prefetcher:
        assert prefetcher.splits and prefetcher.warms
        submitted = []  # the layer of every read submission, in order
        for layer_id, fetcher in prefetcher.fetchers.items():

            def spy(*args, layer_id=layer_id, submit=fetcher.store.submit_reads):
                submitted.append(layer_id)
                return submit(*args)

            fetcher.store.submit_reads = spy

        def counts(key):
            return {lid: layer[key] for lid, layer in prefetcher.stats["layers"].items()}

        def check(handle, rows):
            for layer_id, layer_rows in zip(config.layer_ids, rows, strict=True):
                want = reference_rows(tables[layer_id], layer_rows)
                assert_same_bits(handle.wait(layer_id), want)

        handle = prefetcher.prefetch(steps[0])
        prefetcher.warm(steps[1])
        assert sorted(submitted) == sorted(config.layer_ids)  # the step's own reads alone
        handle.wait(4)  # not the first layer: nothing more starts
        assert len(submitted) == len(config.layer_ids)
        handle.wait(1)
        assert len(submitted) > len(config.layer_ids), "the look-ahead's reads start now"
        check(handle, steps[0])
        prefetcher.io_pool.submit(lambda: None).result()  # every read has started

        misses = counts("cache_misses")
        first = prefetcher.prefetch(steps[1])
        warmed = counts("warmed")
        prefetcher.warm(steps[2])  # deferred until layer 1's wait, which never comes
        num_submitted = len(submitted)
        second = prefetcher.prefetch(steps[2])  # finishes step 1, drops its look-ahead
        assert counts("cache_misses") == misses, "step 1's rows were all read ahead or cached"
        assert len(submitted) == num_submitted + len(config.layer_ids)  # step 2's own reads
        check(first, steps[1])
        check(second, steps[2])
        assert counts("warmed") == warmed


# ---------------------------------------------------------------------------------------------
# the disk tier's reads

AIO_ROW = 264  # not a divisor of 4096: rows start anywhere in a block, some span two


@pytest.fixture
def direct_file(tmp_path):
    """(path, bytes) of a file of random bytes: a 100-byte header, then 40 rows of AIO_ROW."""
    data = np.random.default_rng(0).integers(0, 256, 100 + 40 * AIO_ROW, dtype=np.uint8)
    path = tmp_path / "rows.bin"
    path.write_bytes(data.tobytes())
    return path, data


needs_aio = pytest.mark.skipif(not aio.available(), reason="this kernel refuses Linux AIO")


def _offsets(ids) -> np.ndarray:
    return 100 + np.asarray(ids, np.int64) * AIO_ROW


@needs_aio
def test_aio_reads_rows_anywhere_in_the_file_in_several_batches(direct_file):
    path, data = direct_file
    ids = [39, 0, 7, 7, 15, 31, 2, 38, 20, 14, 1]  # 11 rows, 4 in flight at a time
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    reader = aio.AioReader(depth=4)
    try:
        rows = np.zeros((len(ids), AIO_ROW), np.uint8)
        assert reader.read(fd, _offsets(ids), AIO_ROW, 4096, rows) == -1
    finally:
        reader.close()
        os.close(fd)
    for row, i in zip(rows, ids, strict=True):
        np.testing.assert_array_equal(row, data[100 + i * AIO_ROW : 100 + (i + 1) * AIO_ROW])


@needs_aio
def test_aio_reports_the_first_row_it_could_not_read(direct_file):
    """A row past the end of the file comes back short: its index is returned, and every row
    before it is read."""
    path, data = direct_file
    ids = [3, 9, 12, 25, 40, 5, 41]  # row 40 starts at the end of the file, index 4 here
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    reader = aio.AioReader(depth=3)
    try:
        rows = np.zeros((len(ids), AIO_ROW), np.uint8)
        assert reader.read(fd, _offsets(ids), AIO_ROW, 4096, rows) == 4
    finally:
        reader.close()
        os.close(fd)
    for row, i in zip(rows[:4], ids[:4], strict=True):
        np.testing.assert_array_equal(row, data[100 + i * AIO_ROW : 100 + (i + 1) * AIO_ROW])


@pytest.mark.parametrize("use_aio", [True, False], ids=["aio", "pread fallback"])
def test_direct_disk_reads_equal_the_table_and_name_a_truncated_file(
    model, use_aio, monkeypatch, tmp_path
):
    """O_DIRECT through AIO, and through pread where the kernel refuses AIO (`available()`
    false: a seccomp filter, or fs.aio-max-nr reached)."""
    if use_aio and not aio.available():
        pytest.skip("this kernel refuses Linux AIO")
    monkeypatch.setattr(aio, "_available", use_aio)
    config, model_dir = model
    table = open_table(model_dir, config.layer_ids[0])
    ids = np.random.default_rng(1).integers(0, table.rows, 600)  # 3 chunks of AIO
    with ThreadPoolExecutor(4) as pool:
        store = DiskStore(table, pool, direct=True)
        assert store.mode == ("aio-direct" if use_aio else "pread-direct")
        weight = np.empty((len(ids), *table.weight.shape[1:]), table.weight.dtype)
        store.read(ids, weight, None)
        np.testing.assert_array_equal(weight.view(np.uint8), table.weight[ids].view(np.uint8))
        store.close()

        shutil.copytree(model_dir, tmp_path / "copy")  # its table cut in half while in use
        table = open_table(tmp_path / "copy", config.layer_ids[0])
        store = DiskStore(table, pool, direct=True)
        os.truncate(table.path, table.data_offset + table.rows // 2 * table.row_bytes)
        with pytest.raises(TableReadError, match=r"layer_1\.safetensors: short read"):
            store.read(ids, weight, None)
        store.close()


# ---------------------------------------------------------------------------------------------
# the cache


def make_cache(capacity: int, policy: str = "lru", ways: int = 32) -> RowCache:
    return RowCache(capacity, 4, 0, torch.float32, None, policy, ways)


def rows_of(ids) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.float32)[:, None].repeat(1, 4)  # row r holds r


def admit(cache: RowCache, ids) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    slots = cache.lookup(ids)
    cache.release(slots)
    miss = slots < 0
    return cache.admit(ids[miss], rows_of(ids[miss]), None)


def cached(cache: RowCache, ids) -> np.ndarray:
    slots = cache.lookup(np.asarray(ids, np.int64))
    cache.release(slots)
    return slots >= 0


def test_cache_lookup_returns_the_rows_it_admitted():
    cache = make_cache(256, ways=8)
    ids = np.random.default_rng(0).choice(10**9, 200, replace=False)
    admit(cache, ids)
    slots = cache.lookup(ids)
    assert (cache.tags >= 0).sum() <= cache.capacity == 256
    hit = slots >= 0
    assert hit.mean() > 0.5  # some sets overflow (8 ways), most rows fit
    assert torch.equal(cache.weight[torch.from_numpy(slots[hit])][:, 0],
                       torch.from_numpy(ids[hit]).float())  # fmt: skip


def test_lru_evicts_the_least_recently_used():
    cache = make_cache(4, "lru", ways=4)  # one set: plain LRU
    admit(cache, [10, 11, 12, 13])
    cached(cache, [10])  # 11 is now the oldest
    admit(cache, [14])
    assert cached(cache, [10, 11, 12, 13, 14]).tolist() == [True, False, True, True, True]


def test_lfu_keeps_a_frequent_row_through_a_scan():
    results = {}
    for policy in ("lru", "lfu"):
        cache = make_cache(4, policy, ways=4)
        for _ in range(5):
            admit(cache, [7])
        for cold in range(100, 120):  # a scan of rows seen once each
            admit(cache, [cold])
        results[policy] = bool(cached(cache, [7])[0])
    assert results == {"lru": False, "lfu": True}


def test_rows_of_a_step_in_flight_are_never_evicted():
    cache = make_cache(8, ways=8)
    admit(cache, range(8))
    in_flight = cache.lookup(np.arange(4, dtype=np.int64))  # pinned until released
    slots = cache.admit(np.arange(100, 112, dtype=np.int64), rows_of(range(100, 112)), None)
    assert (slots >= 0).sum() == 4  # only the 4 unpinned ways could take new rows
    assert cached(cache, range(4)).all()
    assert torch.equal(cache.weight[torch.from_numpy(in_flight)][:, 0], torch.arange(4.0))
    cache.release(in_flight)
    admit(cache, range(200, 208))
    assert not cached(cache, range(4)).any()  # released: evictable again


def test_static_hot_set_is_never_evicted():
    cache = make_cache(8, ways=8)
    placed = cache.warm(np.array([1, 2, 3, 4, 5, 6], np.int64), rows_of([1, 2, 3, 4, 5, 6]),
                        None, max_fraction=0.5)  # fmt: skip
    assert placed == 4  # half of the 8 ways, hottest (first) rows
    for start in range(100, 400, 8):
        admit(cache, range(start, start + 8))
    assert cached(cache, [1, 2, 3, 4]).all() and not cached(cache, [5, 6]).any()
    assert cache.stats()["static"] == 4


# ---------------------------------------------------------------------------------------------
# profiles


def test_profile_counts_every_row_the_hasher_reads(tmp_path):
    config = engram_config("float32")
    hasher = NgramHasher(config, np.arange(VOCAB, dtype=np.int64))
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, VOCAB, int(rng.integers(1, 30))) for _ in range(20)]
    profile = profile_rows(hasher, docs, flush_ids=500)  # several merges
    for layer_index, layer_id in enumerate(config.layer_ids):
        want = collections.Counter()
        for doc in docs:
            history = np.empty(0, np.int64)
            for token in doc:  # one token at a time: independent of packing
                rows = hasher.row_ids(np.array([token]), np.array([0, 1]),
                                      hasher.lookback(history)[None])  # fmt: skip
                want.update(rows[layer_index, 0].tolist())
                history = np.append(history, token)
        got = dict(
            zip(profile.rows[layer_id].tolist(), profile.counts[layer_id].tolist(), strict=True)
        )
        assert got == dict(want)
        assert (np.diff(profile.counts[layer_id]) <= 0).all()
    profile.save(tmp_path / "p.npz")
    loaded = RowProfile.load(tmp_path / "p.npz")
    assert loaded.num_tokens == sum(map(len, docs))
    assert np.array_equal(loaded.rows[4], profile.rows[4])


def test_hot_profile_warms_the_cache(model, tmp_path):
    config, model_dir = model
    tables = open_tables(model_dir, config.layer_ids)
    steps = list(token_steps(config, 20, seed=5))
    hasher = NgramHasher(config, np.arange(VOCAB, dtype=np.int64))
    rng = np.random.default_rng(5)
    text = [np.minimum(rng.zipf(1.3, 400) - 1, VOCAB - 1)]
    profile_rows(hasher, text).save(tmp_path / "hot.npz")
    hit_rates = {}
    for name, profile in (("cold", None), ("warm", str(tmp_path / "hot.npz"))):
        off = OffloadConfig(tier="disk", cache_rows=200, hot_profile=profile, num_io_threads=2)
        with build_prefetcher(config, tables, off) as prefetcher:
            first = prefetcher.prefetch(steps[0])
            for i, layer_id in enumerate(config.layer_ids):
                assert_same_bits(
                    first.wait(layer_id), reference_rows(tables[layer_id], steps[0][i])
                )
            hit_rates[name] = prefetcher.stats["hit_rate"]
            cache = prefetcher.stats["layers"][1]["cache"]
        # At most half of each set's ways; sets fill unevenly, so somewhat under half in all.
        if profile is None:
            assert cache["static"] == 0
        else:
            assert 0.8 * cache["capacity"] / 2 <= cache["static"] <= cache["capacity"] / 2
    assert hit_rates["cold"] == 0 and hit_rates["warm"] > 0.2


# ---------------------------------------------------------------------------------------------
# pinned memory helpers (the CUDA calls themselves are checked in tests/gpu)


def test_registration_chunks_stay_under_the_limit():
    chunks = pinned.register_chunks(150 << 30)
    assert [size >> 30 for _, size in chunks] == [64, 64, 22]
    assert [off >> 30 for off, _ in chunks] == [0, 64, 128]
    with pytest.raises(ValueError, match="multiple of a page"):
        pinned.register_chunks(1 << 20, chunk=1000)


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(
    not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(),
    reason="needs Linux with transparent huge pages",
)


def _smaps_entry(address: int) -> dict[str, str]:
    """This process's /proc/self/smaps fields for the mapping holding `address`."""
    entry: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
    return entry


@needs_thp
def test_host_tables_ask_for_huge_pages():
    """HostMemory maps its own region (a VMA of its own), eligible only through madvise when
    the kernel setting is `madvise`."""
    mem = pinned.HostMemory(64 << 20)
    assert _smaps_entry(mem.ptr).get("THPeligible") == "1"


@needs_thp
def test_torch_tensors_ask_for_huge_pages_once_engram_serve_is_imported():
    """engram_serve sets THP_MEM_ALLOC_ENABLE before torch allocates (weights, KV cache)."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import engram_serve, torch
        from test_offload import _smaps_entry
        t = torch.empty(64 << 20, dtype=torch.uint8)
        print(_smaps_entry(t.data_ptr()).get("THPeligible"))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "1"


def test_cupy_is_optional_with_a_clear_error():
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs cupy"):
            pinned.CupyHostMemory(4096)
    else:
        pytest.skip("cupy is installed")


# ---------------------------------------------------------------------------------------------
# node-shared tables: real processes, resident memory from /proc/self/status

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from engram_serve.config import OffloadConfig
    from engram_serve.engram.config import EngramConfig
    from engram_serve.offload.prefetch import build_prefetcher
    from engram_serve.offload.tiers import open_tables

    def status():
        fields = {}
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    config = EngramConfig.from_json(sys.argv[1])
    shm_name = sys.argv[3] or None
    tables = open_tables(sys.argv[2], config.layer_ids)
    before = status()
    prefetcher = build_prefetcher(config, tables, OffloadConfig(tier="host", shm_name=shm_name))
    total = 0.0
    for fetcher in prefetcher.fetchers.values():
        total += float(fetcher.store.weight.float().sum())  # touch every page of the table
    rows = np.zeros((len(config.layer_ids), 3, config.num_heads), np.int64)
    prefetcher.prefetch(rows).wait(config.layer_ids[0])
    after = status()
    created = sorted({type(m).__name__ for f in prefetcher.fetchers.values()
                      for m in f.store._keepalive})
    print(json.dumps({"delta": {k: after[k] - before[k] for k in after}, "sum": total,
                      "memories": created}))
    """
)


def run_child(config_path: Path, model_dir: Path, shm_name: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(config_path), str(model_dir), shm_name],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_processes_share_one_dev_shm_table(tmp_path):
    config = EngramConfig(
        layer_ids=(2,), max_ngram_size=2, n_head_per_ngram=2,
        engram_vocab_size=(100_000,), head_dim=128, table_dtype="float32",
    )  # fmt: skip
    config_path = tmp_path / "engram.json"
    config_path.write_text(json.dumps(config.to_dict()))
    write_tables(tmp_path, config)
    table_bytes = open_table(tmp_path, 2).weight.nbytes  # ~100 MB
    name = f"test-{uuid.uuid4().hex[:12]}"
    try:
        first = run_child(config_path, tmp_path, name)
        assert pinned.shm_paths(name, 2)["weight"].stat().st_size == table_bytes
        second = run_child(config_path, tmp_path, name)
    finally:
        pinned.remove_shared(name, [2])
    private = run_child(config_path, tmp_path, "")
    assert first["sum"] == second["sum"] == private["sum"]
    # The second process maps the first one's pages: they show up as shared memory in its RSS,
    # but its private (anonymous) memory does not grow by the table.
    assert second["delta"]["RssShmem"] > 0.9 * table_bytes
    assert second["delta"]["RssAnon"] < 0.25 * table_bytes
    # The control without sharing makes its own copy, which the same measure catches.
    assert private["delta"]["RssAnon"] > 0.9 * table_bytes
    assert private["delta"]["RssShmem"] < 0.1 * table_bytes


def test_bench_offload_ratios_are_taken_within_rounds():
    """`bench offload` compares each tier with the device run of its own round: the machine's
    speed drifts between rounds (round 1 here is faster for every tier)."""
    from engram_serve.bench.offload import summarize

    tok_s = {0: {"device": 60.0, "disk": 57.0, "disk-no-cache": 61.0},
             1: {"disk-no-cache": 73.0, "disk": 70.0, "device": 72.0},
             2: {"device": 58.0, "disk": 56.0, "disk-no-cache": 50.0}}  # fmt: skip
    results = [{"name": name, "round": r, "output_tok_s": v}
               for r, tiers in tok_s.items() for name, v in tiers.items()]  # fmt: skip
    summary = summarize(results)
    assert summary["device"]["vs_device"] == 1.0
    assert summary["disk"]["output_tok_s"] == 57.0  # its median run
    assert summary["disk"]["runs_vs_device"] == [57 / 60, 70 / 72, 56 / 58]
    assert summary["disk"]["vs_device"] == pytest.approx(56 / 58)
    low, high = summary["disk"]["vs_device_quartiles"]
    assert 57 / 60 < low < 56 / 58 < high < 70 / 72  # between the three rounds' ratios
    assert summary["disk-no-cache"]["vs_device"] == pytest.approx(73 / 72)
    alone = summarize([{"name": "disk", "round": 0, "output_tok_s": 5.0}])
    assert alone["disk"]["vs_device"] is None  # no device run: nothing to compare with


def _resident_pages(path: Path) -> int:
    """How many of the file's pages are in the OS page cache (mincore over a fresh mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, np.uint8)
        failed = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        del view
    assert failed == 0, f"mincore failed: errno {ctypes.get_errno()}"
    return sum(v & 1 for v in vec)


def test_loading_a_table_into_ram_leaves_no_copy_in_the_page_cache(tmp_path, monkeypatch):
    """The device tier's copy of a table file equals the file's bytes, copied in several pieces
    (COPY_CHUNK_BYTES made small), and the file's pages, all cached before, are dropped from the
    page cache behind the copy."""
    from engram_serve.offload.tiers import device_store

    monkeypatch.setattr(pinned, "COPY_CHUNK_BYTES", 100_000)
    config = EngramConfig(engram_vocab_size=(20011, 20011), layer_ids=(2,), table_dtype="fp8_e4m3")
    layout = table_layouts(config)[0]
    path = table_path(tmp_path, 2)
    path.parent.mkdir(parents=True)
    write_random_table(path, layout, seed=3)
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # written back: dirty pages cannot be dropped
    data = path.read_bytes()  # every page cached (read, not mapped: mapped pages stay cached)
    assert _resident_pages(path) == -(-len(data) // os.sysconf("SC_PAGE_SIZE"))
    table = open_table(tmp_path, 2)
    store = device_store(table, CpuRuntime())
    for got, array in ((store.weight, table.weight), (store.scale, table.scale)):
        start = array.offset
        want = np.frombuffer(data, np.uint8, array.nbytes, start).reshape(array.shape[0], -1)
        assert np.array_equal(got.view(torch.uint8).numpy().reshape(want.shape), want)
    assert _resident_pages(path) <= 2  # at most the header's page and the last partial one
