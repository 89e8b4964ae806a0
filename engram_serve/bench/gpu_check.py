"""`engram-serve bench gpu-check` (`make gpu-check`): what one CUDA machine does for the Engram
path, as one JSON document, printed and written to `--out`. Under 10 minutes on one H100.

1. `device`: its name, and the two attributes the host tier relies on: 91 (a registered host
   pointer is a device pointer: UVA reads in place) and 113 (read-only host registration, for
   shared /dev/shm tables; without it they are re-mapped writable, offload/pinned.py).
2. `uva_gather`: GB/s of random rows read in place from a pinned host table (FP8 rows of
   256 bytes, V4.1's width) by `index_select` over the bytes, by `index_select` over the same
   rows viewed as int64 words (8 bytes a load instead of 1), and by the Triton gather (rows and
   UE8M0 scales, dequantized), for a decode-sized and a prefill-sized step; fresh ids on every
   repeat, so no read is served from L2.
3. `tiers_bitwise`: every tier (host read over UVA, host staged through pinned buffers, disk),
   each with an HBM row cache, gives the device tier's exact bits, step after step, while the
   compute stream is kept busy by a loop of large matmuls (the fetch runs on its side stream
   meanwhile, as in a forward pass).
4. `syncs_per_decode_step`: the engine on CUDA, with a runtime that counts the host's waits on
   the device (downloads, event and device synchronizations), and torch's sync debug mode
   catching hidden ones (`.item()`, `.tolist()`, pageable copies), per decode step, per tier.
5. `offload`: `engram-serve bench offload` at a small size, the in-HBM tables as its baseline.

A failing part is recorded as {"error": ...} and the others still run (device time is scarce);
the exit status is 1 if any part failed or any tier differed from the device tier.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_serve.bench.harness import machine, save
from engram_serve.config import EngineConfig, OffloadConfig
from engram_serve.device import (
    ATTR_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
    ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED,
    CudaRuntime,
)
from engram_serve.engram.config import EngramConfig

ROW_BYTES = 256  # V4.1's FP8 row; its UE8M0 scales are ROW_BYTES // 32 bytes more
STEP_ROWS = {"decode_32_seqs": 32 * 24, "prefill_8192_tokens": 8192 * 24}  # 24 heads a layer
# A small V4.1-format Engram (2 layers, orders 2-4, 8 heads, 256-wide FP8 rows; ~130 MB a layer)
# for the tier comparison; tests/gpu/test_offload_gpu.py uses it too.
ENGRAM = EngramConfig(
    variant="v41",
    layer_ids=(1, 3),
    max_ngram_size=4,
    n_head_per_ngram=8,
    engram_vocab_size=(20_000, 20_000, 20_000),
    head_dim=256,
    table_dtype="fp8_e4m3",
)
CACHED_TIERS = {
    "host uva + hbm cache": OffloadConfig(tier="host", host_gather="uva", cache_rows=4096),
    "host staged + hbm cache": OffloadConfig(tier="host", host_gather="staged", cache_rows=4096),
    "disk + hbm cache": OffloadConfig(tier="disk", cache_rows=4096),
}
ENGINE_TIERS = {
    "device": OffloadConfig(),
    "host": OffloadConfig(tier="host", cache_rows=4096),
    "disk": OffloadConfig(tier="disk", cache_rows=4096),
}


# ---------------------------------------------------------------------------------------------
# 1. the device


def device_facts(runtime: CudaRuntime) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(runtime.device)
    return {
        "name": props.name,
        "memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "attr_91_can_use_host_pointer_for_registered_mem": runtime.device_attribute(
            ATTR_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM
        ),
        "attr_113_host_register_read_only_supported": runtime.device_attribute(
            ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED
        ),
    }


# ---------------------------------------------------------------------------------------------
# 2. UVA gather bandwidth


def uva_gather(runtime: CudaRuntime, table_gib: float, repeats: int) -> dict[str, Any]:
    """GB/s read from a pinned host table, per method and step size (module docstring, 2)."""
    from engram_serve.offload import pinned

    num_rows = int(table_gib * 2**30) // ROW_BYTES
    rows_mem = pinned.HostMemory(num_rows * ROW_BYTES)
    scales_mem = pinned.HostMemory(num_rows * ROW_BYTES // 32)
    rows = rows_mem.array(np.uint8, (num_rows, ROW_BYTES))
    scales = scales_mem.array(np.uint8, (num_rows, ROW_BYTES // 32))
    rows.fill(0x38)  # FP8 1.0; every page backed (an untouched page would be the zero page)
    scales.fill(127)  # 2**0
    rows[:, :8] = np.arange(num_rows, dtype=np.int64)[:, None].view(np.uint8)  # each row's id
    start = time.perf_counter()
    try:
        rows_mem.pin(runtime)
        scales_mem.pin(runtime)
        out: dict[str, Any] = {
            "table_gib": (rows.nbytes + scales.nbytes) / 2**30,
            "pin_gb_s": (rows.nbytes + scales.nbytes) / (time.perf_counter() - start) / 1e9,
        }
        views = {
            "bytes": pinned.cuda_view(rows, runtime),
            "words": pinned.cuda_view(rows.view(np.int64), runtime),
            "scales": pinned.cuda_view(scales, runtime),
        }
        for step, num_ids in STEP_ROWS.items():
            out[step] = _gather_rates(runtime.device, views, num_rows, num_ids, repeats)
    finally:
        rows_mem.close()
        scales_mem.close()
    return out


def _gather_rates(
    dev: torch.device, views: dict[str, torch.Tensor], num_rows: int, num_ids: int, repeats: int
) -> dict[str, Any]:
    from engram_serve.bench.kernels import _cuda_time
    from engram_serve.kernels.gather import gather_rows

    ids = torch.randint(0, num_rows, (num_ids,), device=dev)
    got = views["bytes"].index_select(0, ids)
    if not torch.equal(got[:, :8].view(torch.int64)[:, 0], ids):
        raise AssertionError("rows read over UVA are not the rows asked for")
    if not torch.equal(views["words"].index_select(0, ids).view(torch.uint8), got):
        raise AssertionError("the int64 view read other bytes than the uint8 view")
    methods = {
        "index_select_uint8": (partial(torch.index_select, views["bytes"], 0), ROW_BYTES),
        "index_select_int64": (partial(torch.index_select, views["words"], 0), ROW_BYTES),
        "triton_gather": (
            lambda i: gather_rows(views["bytes"], i, views["scales"]),
            ROW_BYTES + ROW_BYTES // 32,
        ),
    }
    out: dict[str, Any] = {"rows": num_ids}
    for name, (method, row_bytes) in methods.items():
        id_sets = itertools.cycle(
            [torch.randint(0, num_rows, (num_ids,), device=dev) for _ in range(repeats + 1)]
        )
        ms = _cuda_time(lambda m=method, s=id_sets: m(next(s)), repeats)
        out[name] = {"ms": ms, "gb_s": num_ids * row_bytes / ms / 1e6}
    return out


# ---------------------------------------------------------------------------------------------
# 3. every tier against the device tier, the compute stream busy


def write_tables(model_dir: Path, config: EngramConfig = ENGRAM) -> dict[int, Any]:
    """Random tables of `config` in `model_dir`, opened (memory-mapped)."""
    from engram_serve.engram.tables import table_layouts, table_path, write_random_table
    from engram_serve.offload.tiers import open_tables

    for layout in table_layouts(config):
        path = table_path(model_dir, layout.layer_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_random_table(path, layout, seed=0)
    return open_tables(model_dir, config.layer_ids)


def zipf_steps(
    tables: dict[int, Any], num_steps: int, seed: int = 0, config: EngramConfig = ENGRAM
) -> Iterator[np.ndarray]:
    """Row ids [L, T, heads] of `num_steps` steps of 1-299 tokens (step 5 has none), Zipfian
    (s = 1.2), so a row cache both hits and misses."""
    rng = np.random.default_rng(seed)
    for step in range(num_steps):
        num_tokens = 0 if step == 5 else int(rng.integers(1, 300))
        yield np.stack([
            np.minimum(rng.zipf(1.2, (num_tokens, config.num_heads)) - 1, tables[lid].rows - 1)
            for lid in config.layer_ids
        ]).astype(np.int64)  # fmt: skip


class ComputeLoad:
    """`count` large matmuls queued on the current stream per call: the compute stream stays
    busy while rows are fetched on the side stream (the result buffer is reused, so the work
    is the same every call and nothing overflows)."""

    def __init__(self, dev: torch.device, size: int = 4096, count: int = 16) -> None:
        self.a = torch.randn(size, size, device=dev)
        self.out = torch.empty_like(self.a)
        self.count = count

    def __call__(self) -> None:
        for _ in range(self.count):
            torch.mm(self.a, self.a, out=self.out)


def tiers_bitwise(runtime: CudaRuntime, num_steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="engram-gpu-check-") as tmp:
        tables = write_tables(Path(tmp))
        steps = list(zipf_steps(tables, num_steps))
        load = ComputeLoad(runtime.device)
        return {
            name: _against_device_tier(runtime, tables, offload, steps, load)
            for name, offload in CACHED_TIERS.items()
        }


def _against_device_tier(
    runtime: CudaRuntime,
    tables: dict[int, Any],
    offload: OffloadConfig,
    steps: list[np.ndarray],
    load: Callable[[], None],
) -> dict[str, Any]:
    """Steps fetched one ahead (a step's fetch runs during the matmuls queued before it) and
    compared bit for bit, NaN bits included, with the device tier's rows."""
    from engram_serve.offload.prefetch import build_prefetcher

    mismatches = []
    with (
        build_prefetcher(ENGRAM, tables, OffloadConfig(tier="device"), runtime) as baseline,
        build_prefetcher(ENGRAM, tables, offload, runtime) as offloaded,
    ):
        pending = offloaded.prefetch(steps[0])
        for i, rows in enumerate(steps):
            load()
            handle = pending
            if i + 1 < len(steps):
                pending = offloaded.prefetch(steps[i + 1])
            want = baseline.prefetch(rows)
            for layer_id in ENGRAM.layer_ids:
                got, expected = handle.wait(layer_id), want.wait(layer_id)
                if not torch.equal(got.view(torch.int32), expected.view(torch.int32)):
                    mismatches.append({"step": i, "layer": layer_id})
        stats = offloaded.stats
    return {
        "steps": len(steps),
        "bit_exact": not mismatches,
        "mismatches": mismatches,
        **{k: stats[k] for k in ("hit_rate", "stall_s", "rows_read")},
    }


# ---------------------------------------------------------------------------------------------
# 4. host syncs per decode step


class _CountedEvent(torch.cuda.Event):
    counts: Counter

    def synchronize(self) -> None:
        self.counts["event_synchronize"] += 1
        super().synchronize()


class CountingRuntime(CudaRuntime):
    """CudaRuntime counting every wait of the host on the device that goes through it."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.counts: Counter = Counter()

    def download(self, tensor: torch.Tensor) -> np.ndarray:
        self.counts["download"] += 1
        return super().download(tensor)

    def synchronize(self) -> None:
        self.counts["device_synchronize"] += 1
        super().synchronize()

    def new_event(self, timing: bool = False) -> torch.cuda.Event:
        event = _CountedEvent(enable_timing=timing)
        event.counts = self.counts
        return event


def syncs_per_decode_step(num_seqs: int, decode_steps: int) -> dict[str, Any]:
    return {name: engine_syncs(offload, num_seqs, decode_steps) for name, offload in
            ENGINE_TIERS.items()}  # fmt: skip


def engine_syncs(offload: OffloadConfig, num_seqs: int, decode_steps: int) -> dict[str, Any]:
    """The default model on CUDA: one prefill step of `num_seqs` prompts (half greedy, half
    sampled), then `decode_steps` decode steps, each counted on its own."""
    from engram_serve.bench.throughput import make_workload
    from engram_serve.engine.request import SamplingParams
    from engram_serve.llm import build_engine

    runtime = CountingRuntime(torch.device("cuda"))
    config = EngineConfig(device="cuda", max_num_seqs=num_seqs, kv_cache_bytes=256 << 20)
    engine = build_engine(None, config, offload, runtime=runtime)
    vocab = engine.model_config.vocab_size
    try:
        for i, prompt in enumerate(make_workload(num_seqs, 16, 16, vocab).prompts):
            temperature = 0.0 if i % 2 == 0 else 0.8
            params = SamplingParams(temperature=temperature, max_tokens=decode_steps + 1,
                                    ignore_eos=True, seed=i)  # fmt: skip
            engine.add_request(prompt, params)
        engine.step()  # the prefill and each request's first token
        per_step, hidden_at = [], Counter()
        while engine.has_unfinished_requests():
            counts, where = _counted_step(engine, runtime)
            per_step.append(counts)
            hidden_at.update(where)
    finally:
        engine.close()
    keys = sorted({k for c in per_step for k in c})
    return {
        "decode_steps": len(per_step),
        "median": {k: float(np.median([c.get(k, 0) for c in per_step])) for k in keys},
        "max": {k: max(c.get(k, 0) for c in per_step) for k in keys},
        "sync_warnings_at": dict(hidden_at.most_common(10)),
    }


def _counted_step(engine: Any, runtime: CountingRuntime) -> tuple[dict[str, int], Counter]:
    """One engine step: the runtime's counts, plus torch's sync debug warnings (every
    synchronizing CUDA call, those the runtime cannot see included) and where they came from."""
    runtime.counts.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    counts = {**runtime.counts, "sync_debug_warnings": len(syncs)}
    return counts, Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)


# ---------------------------------------------------------------------------------------------
# 5. engram-serve bench offload, small


def offload_throughput(out_dir: Path) -> dict[str, Any]:
    """Output tok/s of the device tier (tables in HBM) and the disk tier with and without its
    cache, on 16 short sequences and 0.5 GiB of tables (bench/offload.py)."""
    from engram_serve.bench import offload

    report = offload.main([
        "--device", "cuda", "--table-gib", "0.5", "--num-seqs", "16", "--low", "32",
        "--high", "96", "--tiers", "device", "disk", "disk-no-cache",
        "--model-dir", str(out_dir / "gpu-check-model"),
        "--out", str(out_dir / "gpu_check_offload"),
    ])  # fmt: skip
    keep = ("output_tok_s", "vs_device", "hit_rate", "stall_s", "rows_read")
    return {name: {k: r[k] for k in keep} for name, r in report["summary"].items()}


# ---------------------------------------------------------------------------------------------


def _run_part(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """report[name] = fn(), or its error: one failing part must not cost the others their
    device time."""
    start = time.perf_counter()
    print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
    try:
        report[name] = fn()
    except (Exception, SystemExit) as error:  # SystemExit: a benchmark's argparse refusing
        traceback.print_exc()
        report[name] = {"error": f"{type(error).__name__}: {error}"}
    report["seconds"][name] = time.perf_counter() - start


def failures(report: dict[str, Any]) -> list[str]:
    """The parts that failed, and the tiers that differed from the device tier."""
    failed = [name for name, part in report.items() if isinstance(part, dict) and "error" in part]
    tiers = report.get("tiers_bitwise", {})
    return failed + [f"{name} differs" for name, r in tiers.items() if r.get("bit_exact") is False]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engram-serve bench gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--table-gib", type=float, default=4.0, help="the UVA gather's host table")
    p.add_argument("--repeats", type=int, default=20, help="timed gathers per method")
    p.add_argument("--steps", type=int, default=30, help="steps of the tier comparison")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps counted")
    p.add_argument("--num-seqs", type=int, default=8, help="sequences of the counted decode")
    p.add_argument("--out", type=Path, default=Path("results/gpu_check.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise SystemExit(f"gpu-check needs a CUDA device; this torch ({build}) sees none")
    runtime = CudaRuntime(torch.device("cuda"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "seconds": {}}
    _run_part(report, "device", partial(device_facts, runtime))
    _run_part(report, "uva_gather", partial(uva_gather, runtime, args.table_gib, args.repeats))
    _run_part(report, "tiers_bitwise", partial(tiers_bitwise, runtime, args.steps))
    _run_part(report, "syncs_per_decode_step",
              partial(syncs_per_decode_step, args.num_seqs, args.decode_steps))  # fmt: skip
    _run_part(report, "offload", partial(offload_throughput, args.out.parent))
    print(json.dumps(report, indent=2, default=str))
    save(report, args.out, default=str)
    failed = failures(report)
    if failed:
        raise SystemExit(f"gpu-check failed: {', '.join(failed)} (details in {args.out})")
    return report
