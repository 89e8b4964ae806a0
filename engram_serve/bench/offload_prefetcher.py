"""Offload benchmark, prefetcher level: the prefetcher fed a hashed, Zipf-like token stream,
tiers side by side, a sleep standing in for the forward pass (bench/offload.py runs the engine).

    engram-serve bench offload --level prefetcher [--table-gib 8] [--steps 60]

1. Writes a DeepSeek-V4.1-shaped table (2 Engram layers, orders 2-4, 8 heads, 256-byte FP8 rows +
   UE8M0 scales) of >= 8 GiB with O_DIRECT writes of real bytes (a sparse file would read as
   holes, without touching the disk), then drops it from the page cache.
2. Builds an engine-like step stream: 64 decoding sequences (one token each per step) plus, every
   few steps, a 512-token prefill chunk. Token ids come from a Zipf-like "text" model (phrases
   drawn from a Zipfian phrase book, mixed with Zipfian single tokens) so n-grams repeat as in
   text; they are hashed by NgramHasher exactly as the engine hashes a step.
3. Drives each configuration through the same steps. Between prefetch() and each wait() the
   forward pass is stood in for by a sleep (`--compute-ms` per step, split over the layers
   before each Engram layer). Disk reads use O_DIRECT, so the page cache serves none of them.
4. Reports rows/s, hit rate, rows and bytes per tier, stall; checks every 10th step's rows against
   a direct read of the file, bit for bit. Writes JSON and a PNG.
5. Compares cache policies (LRU, LFU, each with and without a profiled static hot set) by hit
   rate over a longer stream: cache-only, no I/O.
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_serve.bench.harness import (
    bar_panels,
    drop_page_cache,
    figure,
    machine,
    progress,
    save,
    say,
)
from engram_serve.bench.offload import fmt_tiers
from engram_serve.config import OffloadConfig
from engram_serve.engram.config import EngramConfig
from engram_serve.engram.ngram_hash import NgramHasher
from engram_serve.kernels.reference import gather_rows
from engram_serve.offload.cache import RowCache, RowProfile, profile_rows
from engram_serve.offload.prefetch import build_prefetcher
from engram_serve.offload.tiers import open_tables

COMPRESSED_VOCAB = 100_000
WRITE_CHUNK = 64 << 20
ROW_WIDTH = 256
V41_LAYERS = (1, 14)


def bench_config(table_gib: float, layers: tuple[int, ...] = V41_LAYERS) -> EngramConfig:
    """V4.1's shape with the per-head table height chosen so all tables total `table_gib`."""
    heads = 3 * 8
    stored_row = ROW_WIDTH + ROW_WIDTH // 32
    per_head = int(table_gib * 2**30 / (len(layers) * heads * stored_row)) + 1
    return EngramConfig(
        variant="v41",
        layer_ids=layers,
        max_ngram_size=4,
        n_head_per_ngram=8,
        engram_vocab_size=(per_head,) * 3,
        head_dim=ROW_WIDTH,
        table_dtype="fp8_e4m3",
    )


# ---------------------------------------------------------------------------------------------
# the table on disk


def write_table_file(path: Path, layout: Any, seed: int) -> None:
    """Real random FP8 bytes and UE8M0 scales (2^-7..2^7), written with O_DIRECT in 64 MiB
    chunks: fast, and nothing lands in the page cache."""
    header, offsets, size = layout.header()
    rng = np.random.default_rng(seed)
    weight_bytes = np.frombuffer(rng.bytes(WRITE_CHUNK), np.uint8)
    scale_bytes = rng.integers(120, 135, WRITE_CHUNK, dtype=np.uint8)
    buf = mmap.mmap(-1, WRITE_CHUNK)  # page-aligned, as O_DIRECT needs
    chunk = np.frombuffer(buf, np.uint8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for index, start in enumerate(range(0, size, WRITE_CHUNK)):
            end = min(start + WRITE_CHUNK, size)
            chunk[:] = weight_bytes
            chunk.view(np.uint64)[::512] ^= np.uint64(index)  # no two chunks alike
            if end > offsets["scale"]:
                cut = max(0, offsets["scale"] - start)
                chunk[cut:] = scale_bytes[: WRITE_CHUNK - cut]
            if start == 0:
                chunk[: len(header)] = np.frombuffer(header, np.uint8)
            length = -(-(end - start) // 4096) * 4096
            if os.pwrite(fd, memoryview(buf)[:length], start) != length:
                raise OSError(f"short write to {path}")
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_tables(model_dir: Path, config: EngramConfig, seed: int = 0) -> float:
    """Write every layer's table file under `model_dir`; returns seconds taken."""
    from engram_serve.engram.tables import table_layouts, table_path

    start = time.perf_counter()
    for layout in table_layouts(config):
        path = table_path(model_dir, layout.layer_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        expected = layout.header()[2]
        if path.exists() and path.stat().st_size == expected:
            continue  # kept from an earlier run (--keep-table)
        free = shutil.disk_usage(path.parent).free
        if free < expected + (1 << 30):
            raise OSError(
                f"{path.parent}: {free / 2**30:.1f} GiB free, need {expected / 2**30:.1f}"
            )
        print(f"writing {path} ({expected / 2**30:.2f} GiB)", file=sys.stderr)
        write_table_file(path, layout, seed + layout.layer_id)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# the token stream


class ZipfText:
    """A Zipf-like token source: half phrases (2-6 tokens) from a Zipfian phrase book, half
    single Zipfian tokens, so n-grams recur roughly as in text (common phrases, a long tail)."""

    def __init__(self, seed: int, vocab: int = COMPRESSED_VOCAB, phrases: int = 200_000) -> None:
        book_rng = np.random.default_rng(12345)  # the same "language" for every seed
        self.vocab = vocab
        lengths = book_rng.integers(2, 7, phrases)
        self.book = np.split(self._tokens(book_rng, lengths.sum()), np.cumsum(lengths)[:-1])
        self.rng = np.random.default_rng(seed)

    def _tokens(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(rng.zipf(1.15, n) - 1, self.vocab - 1).astype(np.int64)

    def take(self, n: int) -> np.ndarray:
        out: list[np.ndarray] = []
        size = 0
        while size < n:
            if self.rng.random() < 0.5:
                rank = min(int(self.rng.zipf(1.1)) - 1, len(self.book) - 1)
                piece = self.book[rank]
            else:
                piece = self._tokens(self.rng, 1)
            out.append(piece)
            size += len(piece)
        return np.concatenate(out)[:n]


def make_steps(
    hasher: NgramHasher,
    num_steps: int,
    decode_seqs: int,
    prefill_chunk: int,
    prefill_every: int,
    seed: int,
) -> list[np.ndarray]:
    """Row ids `[L, T, C]` per step: every decoding sequence's next token, plus a prefill
    chunk of a new document every `prefill_every` steps; lookbacks carried per sequence."""
    text = ZipfText(seed)
    histories = [text.take(int(text.rng.integers(16, 256))) for _ in range(decode_seqs)]
    steps = []
    for step in range(num_steps):
        chunks = [text.take(1) for _ in range(decode_seqs)]
        lookbacks = [hasher.lookback(h) for h in histories]
        if prefill_chunk and step % prefill_every == 0:
            chunks.append(text.take(prefill_chunk))
            lookbacks.append(hasher.lookback(np.empty(0, np.int64)))
        qsl = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
        steps.append(hasher.row_ids(np.concatenate(chunks), qsl, np.stack(lookbacks)))
        histories = [np.concatenate([h[-8:], c]) for h, c in zip(histories, chunks, strict=False)]
    return steps


# ---------------------------------------------------------------------------------------------
# runs


def check_rows(tables: dict[int, Any], layer_id: int, ids: np.ndarray, got: torch.Tensor) -> bool:
    table = tables[layer_id]
    want = gather_rows(table.weight_tensor(), torch.from_numpy(ids), table.scale_tensor())
    return bool(torch.equal(got.view(torch.int32), want.view(torch.int32)))


def run_config(
    name: str,
    config: EngramConfig,
    tables: dict[int, Any],
    offload: OffloadConfig,
    steps: list[np.ndarray],
    compute_s: float,
    check_every: int = 10,
) -> dict[str, Any]:
    drop_page_cache(t.path for t in tables.values())
    gc.collect()
    start = time.perf_counter()
    prefetcher = build_prefetcher(config, tables, offload)
    build_s = time.perf_counter() - start
    per_layer_compute = compute_s / len(config.layer_ids)
    checked, identical, check_s = 0, True, 0.0
    start = time.perf_counter()
    try:
        for index, rows in enumerate(steps):
            handle = prefetcher.prefetch(rows)
            for i, layer_id in enumerate(config.layer_ids):
                time.sleep(per_layer_compute)  # the layers before this Engram layer
                out = handle.wait(layer_id)
                if index % check_every == 0:
                    t = time.perf_counter()
                    identical &= check_rows(tables, layer_id, rows[i], out)
                    checked += 1
                    check_s += time.perf_counter() - t
        wall = time.perf_counter() - start - check_s
        stats = prefetcher.stats
    finally:
        prefetcher.close()
    lookups = stats["lookups"]
    result = {
        "name": name,
        "offload": {k: v for k, v in vars(offload).items() if v not in (None, 0, False)},
        "build_s": build_s,
        "wall_s": wall,
        "compute_s": compute_s * len(steps),
        "rows_per_s": lookups / wall,
        "unique_rows_per_s": stats["unique_rows"] / wall,
        "stall_s": stats["stall_s"],
        "stall_ms_per_step": 1e3 * stats["stall_s"] / len(steps),
        "hit_rate": stats["hit_rate"],
        "lookups": lookups,
        "unique_rows": stats["unique_rows"],
        "rows_read": stats["rows_read"],
        "bytes_read": stats["bytes_read"],
        "table_bytes": stats["table_bytes"],
        "bit_identical": identical,
        "steps_checked": checked,
    }
    say(
        f"{name:28s} rows/s {result['rows_per_s']:>12,.0f}  hit {result['hit_rate']:6.1%}  "
        f"stall {result['stall_ms_per_step']:8.2f} ms/step  wall {wall:6.2f} s  "
        f"read {fmt_tiers(result['rows_read'])}  identical {identical}"
    )
    return result


def text_profile(hasher: NgramHasher, tokens: int) -> RowProfile:
    """Row profile of other text of the same distribution (a different seed): what
    `engram-serve tables profile` would count over a training corpus."""
    text = ZipfText(seed=999)
    return profile_rows(hasher, [text.take(1024) for _ in range(max(1, tokens // 1024))])


def policy_hit_rates(
    config: EngramConfig, profile: RowProfile, steps: list[np.ndarray], capacities: list[int]
) -> list[dict[str, Any]]:
    """Hit rate of the first Engram layer's cache per policy and size, with and without a
    static hot set (half the cache) from `profile`."""
    layer_id = config.layer_ids[0]
    out = []
    for capacity in capacities:
        for policy in ("lru", "lfu"):
            for hot in (0.0, 0.5):
                cache = RowCache(capacity, 1, 0, torch.uint8, None, policy)
                if hot:
                    ids = profile.hot_rows(layer_id, int(cache.capacity * hot))
                    cache.warm(ids, torch.zeros((len(ids), 1), dtype=torch.uint8), None, hot)
                for rows in steps:
                    unique = np.unique(rows[0])
                    slots = cache.lookup(unique)
                    cache.release(slots)
                    miss = unique[slots < 0]
                    cache.admit(miss, torch.zeros((len(miss), 1), dtype=torch.uint8), None)
                c = cache.counts
                rate = c["hits"] / max(1, c["hits"] + c["misses"])
                out.append({"capacity": capacity, "policy": policy, "hot_fraction": hot,
                            "hit_rate": rate})  # fmt: skip
                print(f"cache {capacity:>9,} rows  {policy}  hot {hot:.0%}  hit rate {rate:6.1%}")
    return out


def plot(results: list[dict[str, Any]], policies: list[dict[str, Any]], path: Path) -> None:
    with figure(path, 4, (20, 4.5)) as (_, axes):
        panels = (
            ("row lookups / s", [r["rows_per_s"] for r in results]),
            ("stall ms / step", [r["stall_ms_per_step"] for r in results]),
            ("cache hit rate", [r["hit_rate"] for r in results]),
        )
        bar_panels(axes, [r["name"] for r in results], panels)
        ax = axes[3]
        for policy in ("lru", "lfu"):
            for hot in (0.0, 0.5):
                pts = [p for p in policies if p["policy"] == policy and p["hot_fraction"] == hot]
                ax.plot([p["capacity"] for p in pts], [p["hit_rate"] for p in pts], marker="o",
                        label=f"{policy}{' + hot set' if hot else ''}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("cache rows (layer 1)")
        ax.set_title("hit rate by policy")
        ax.legend(fontsize=8)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engram-serve bench offload --level prefetcher",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--table-gib", type=float, default=8.0, help="all tables together (>= 8)")
    p.add_argument("--dir", type=Path, default=None, help="where to write tables (default: tmp)")
    p.add_argument("--keep-table", action="store_true", help="keep (and reuse) the table files")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--decode-seqs", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--prefill-every", type=int, default=4)
    p.add_argument("--compute-ms", type=float, default=20.0, help="stand-in forward per step")
    p.add_argument("--cache-rows", type=int, default=1 << 21, help="all layers together")
    p.add_argument("--io-threads", type=int, default=32)
    p.add_argument("--policy", choices=["lru", "lfu"], default="lfu")
    p.add_argument("--policy-steps", type=int, default=400)
    p.add_argument("--profile-tokens", type=int, default=1 << 18, help="hot-set profile text")
    p.add_argument("--skip-device", action="store_true", help="no in-RAM baseline (saves RAM)")
    p.add_argument("--out", type=Path, default=Path("results/offload_prefetcher"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = machine()
    config = bench_config(args.table_gib)
    hasher = NgramHasher(config, np.arange(COMPRESSED_VOCAB, dtype=np.int64))
    base = args.dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    model_dir = (
        base / "bench-offload-tables"
        if args.keep_table
        else Path(tempfile.mkdtemp(prefix="bench-offload-", dir=base))
    )
    try:
        write_s = make_tables(model_dir, config)
        tables = open_tables(model_dir, config.layer_ids)
        table_bytes = sum(t.path.stat().st_size for t in tables.values())
        print(f"tables: {table_bytes / 2**30:.2f} GiB in {model_dir} (written in {write_s:.1f} s)")
        steps = make_steps(hasher, args.steps, args.decode_seqs, args.prefill_chunk,
                           args.prefill_every, seed=1)  # fmt: skip
        tokens = sum(s.shape[1] for s in steps)
        print(f"{len(steps)} steps, {tokens} tokens, {tokens * config.num_heads * 2:,} lookups")
        compute_s = args.compute_ms / 1e3
        profile = text_profile(hasher, args.profile_tokens)
        profile_path = model_dir / "hot_rows.npz"
        profile.save(profile_path)
        disk = OffloadConfig(tier="disk", direct_io=True, num_io_threads=args.io_threads,
                             cache_rows=args.cache_rows, cache_policy=args.policy,
                             hot_profile=str(profile_path))  # fmt: skip
        configs = {
            "disk + cache + prefetch": disk,
            "disk + cache, no prefetch": replace(disk, prefetch=False),
            "disk + cache w/o hot set": replace(disk, hot_profile=None),
            "disk, no cache + prefetch": replace(disk, cache_rows=0, hot_profile=None),
        }
        if not args.skip_device:
            configs = {"device (RAM)": OffloadConfig(tier="device"), **configs}
        results = [
            run_config(name, config, tables, off, steps, compute_s)
            for name, off in progress(configs.items(), "configurations", total=len(configs))
        ]
        policy_steps = make_steps(hasher, args.policy_steps, args.decode_seqs,
                                  args.prefill_chunk, args.prefill_every, seed=2)  # fmt: skip
        capacities = [1 << 14, 1 << 16, 1 << 18, 1 << 20]
        policies = policy_hit_rates(config, profile, policy_steps, capacities)
    finally:
        if not args.keep_table:
            shutil.rmtree(model_dir, ignore_errors=True)
    report = {
        "machine": started,
        "table_bytes": table_bytes,
        "config": config.to_dict(),
        "steps": len(steps),
        "tokens": tokens,
        "compute_ms_per_step": args.compute_ms,
        "results": results,
        "policies": policies,
    }
    save(report, args.out, partial(plot, results, policies))
    return report


if __name__ == "__main__":
    main()
