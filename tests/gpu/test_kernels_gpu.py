"""CUDA-only checks of the Triton kernels: reading a pinned host table in place (UVA), and the
timing benchmarks of bench/kernels.py. Skipped without CUDA (tests/conftest.py).

The kernels' equality with their twins is tests/test_kernels.py, which runs compiled on CUDA
when it is there. Kernel modules are imported inside the tests: importing triton at collection
time would fix its interpreter choice for the whole run (see kernels/launch.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from engram_serve.kernels import reference as ref

pytestmark = pytest.mark.gpu


def _fp8_table(num_rows: int, width: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (num_rows, width), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 140, (num_rows, width // 32), dtype=torch.uint8, generator=gen)
    return rows, scales


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)


def test_gather_reads_a_pinned_host_table_in_place():
    from engram_serve.kernels.gather import gather_rows

    rows, scales = _fp8_table(100_000)
    ids = torch.randint(0, 100_000, (4096, 24))
    want = ref.gather_rows(rows, ids, scales)
    host_rows, host_scales = rows.pin_memory(), scales.pin_memory()
    _same(gather_rows(host_rows, ids.cuda(), host_scales), want)
    # Hits from an HBM cache and misses from host memory in one launch.
    cached = torch.arange(0, 100_000, 7)
    slot_of_row = torch.full((100_000,), -1)
    slot_of_row[cached] = torch.arange(len(cached))
    got = gather_rows(
        host_rows, ids.cuda(), host_scales, slots=slot_of_row[ids].cuda(),
        cache=rows[cached].cuda(), cache_scale=scales[cached].cuda(),
    )  # fmt: skip
    _same(got, want)


def test_gather_refuses_a_pageable_host_table():
    from engram_serve.kernels.gather import gather_rows

    rows, scales = _fp8_table(10)
    with pytest.raises(ValueError, match="must be pinned"):
        gather_rows(rows, torch.zeros(3, dtype=torch.int64, device="cuda"), scales)


def test_kernel_benchmarks_run_and_report(capsys):
    from engram_serve.bench.kernels import bench_gpu

    results = bench_gpu(repeats=20, host_table_gib=1.0)
    with capsys.disabled():
        print(json.dumps(results, indent=2))
    assert results["hash"]["triton_ms"] > 0
    timings = [r["ms"] for r in results["gather"].values()]
    timings += [t for r in results["gate"].values() for t in r.values()]
    assert timings and all(t > 0 for t in timings)
