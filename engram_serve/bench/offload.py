"""Offload benchmark, engine level: the Engram paper's throughput protocol on one engine, its
tables in each tier in turn.

    engram-serve bench offload [--num-seqs 32] [--low 64] [--high 256] [--table-gib 8] [--keep]
    engram-serve bench offload --level prefetcher ...   # the prefetcher alone, a sleep as forward
                                                        # pass (bench/offload_prefetcher.py)

1. Model: the embedded default backbone (SmolLM2-135M-Instruct; its files symlinked) with a fresh
   Engram at layers 1 and 14 whose FP8 tables total at least `--table-gib` on disk
   (`init_tables` with a large `engram_vocab_size`; identity retrofit: outputs equal the
   backbone's, and every row is still read). Deleted afterwards unless `--keep`; a directory
   kept earlier with the same Engram is reused.
2. Workload (bench/throughput.py): N sequences, prompt and output lengths uniform in
   [low, high], greedy, ignore_eos; output tokens per second. Prompts of random token ids
   (every n-gram new: the cache's worst case), or with `--prompts text` windows of English
   text, the cache starting from a hot set profiled on other text (see `text_workload`).
3. Tiers, one engine each in a process of its own, same workload, after a small warm-up:
   device (tables copied into RAM: the baseline), disk with cache and prefetch (the default,
   which includes the look-ahead: the next step's prompt rows read during this step; and
   without the look-ahead), disk with cache and no prefetch, disk with prefetch and no cache.
   Disk reads use O_DIRECT and the table files' pages are dropped before every run, so the OS
   page cache serves none of them. With `--remote-master HOST:PORT` (a Mooncake Store holding
   more than the tables) also the remote tier: the tables published there first (unpublished
   after, unless --keep), read with the cache and look-ahead ("remote") and without a cache;
   and the remote read path's rows/s for a decode- and a prefill-sized batch of random rows
   (one call a batch, neighbours merged) against one ranged read per row (`remote_read`).
4. Per tier: output tok/s and its ratio to device, cache hit rate, rows and bytes read per tier,
   rows read ahead, stall (time the forward pass waited for rows), bytes the process read from
   storage (/proc/self/io), CPU time and page faults, and how contended the machine was (load
   average, CPU pressure: the share of the run in which some task waited for a core). JSON and
   a PNG.
   The machine may be shared and its speed drifts: use --repeats (rounds of every tier, in
   order and then reversed); a tier's ratio to device is the median over rounds of its run
   against the device run of the same round. `--quiet SHARE` waits before each run until the
   CPU pressure of the last 10 s is at most SHARE (another process's threads slowed runs here
   10-30x).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from engram_serve.bench.harness import (
    alternating,
    bar_panels,
    drop_page_cache,
    figure,
    load_average,
    machine,
    progress,
    save,
    say,
)
from engram_serve.bench.throughput import (
    Workload,
    add_workload_args,
    make_workload,
    run_engine,
    text_corpus,
    workload_engine_config,
)
from engram_serve.config import EngineConfig, OffloadConfig
from engram_serve.engram.config import EngramConfig

MODEL_DIR = Path("results/bench-offload-model")
NOT_BACKBONE = {"engram.json", "engram_modules.safetensors", "engram_tables"}
TIER_NAMES = ("device", "disk", "disk-no-lookahead", "disk-no-prefetch", "disk-no-cache",
              "remote", "remote-no-cache")  # fmt: skip
REMOTE_BATCHES = {"decode": 512, "prefill": 8192}  # random rows of one layer
NAIVE_ROWS = 256  # one call per row: enough rows for a rate
COUNTERS = ("steps", "lookups", "unique_rows", "cache_hits", "cache_misses", "warmed", "stall_s")


# ---------------------------------------------------------------------------------------------
# the model


def engram_config(table_gib: float) -> EngramConfig:
    """The default model's Engram, each head's table tall enough that all tables together hold
    at least `table_gib` GiB (each head's prime is at least its engram_vocab_size)."""
    from engram_serve.model.default_model import DEFAULT_ENGRAM

    c = DEFAULT_ENGRAM
    stored_row = c.head_dim + c.head_dim // c.quant_block  # fp8 bytes + UE8M0 scales
    heads = len(c.layer_ids) * c.num_heads
    per_head = -(-int(table_gib * 2**30) // (heads * stored_row))
    return replace(c, engram_vocab_size=(per_head,) * (c.max_ngram_size - 1))


def is_built(model_dir: Path, config: EngramConfig) -> bool:
    from engram_serve.engram.tables import TableIntegrityError, read_engram_config, verify_tables

    try:
        found = read_engram_config(model_dir)
        return (
            found is not None
            and found.to_dict() == config.to_dict()
            and bool(verify_tables(model_dir))
        )
    except (TableIntegrityError, OSError, ValueError):
        return False


def build_model_dir(model_dir: Path, config: EngramConfig) -> float:
    """The default backbone's files symlinked into `model_dir`, plus fresh Engram memory
    (`init_tables`, identity retrofit). Returns seconds taken."""
    from engram_serve.engine.tokenizer import Tokenizer
    from engram_serve.engram.compression import load_compression, num_compressed
    from engram_serve.model.default_model import COMPLETE_MARKER, default_model_dir
    from engram_serve.model.retrofit import init_tables

    start = time.perf_counter()
    model_dir.mkdir(parents=True, exist_ok=True)
    for src in default_model_dir().iterdir():
        dst = model_dir / src.name
        if src.name not in NOT_BACKBONE | {COMPLETE_MARKER} and not dst.exists():
            dst.symlink_to(src.resolve())
    lookup = load_compression(Tokenizer(model_dir).hf_tokenizer)
    print(f"writing {table_gib(config):.2f} GiB of Engram tables into {model_dir}", flush=True)
    init_tables(model_dir, config, num_compressed(lookup), seed=0, identity=True)
    return time.perf_counter() - start


def table_files(model_dir: Path, config: EngramConfig) -> list[Path]:
    from engram_serve.engram.tables import table_path

    return [table_path(model_dir, layer_id) for layer_id in config.layer_ids]


def table_gib(config: EngramConfig) -> float:
    from engram_serve.engram.tables import table_layouts

    return sum(layout.header()[2] for layout in table_layouts(config)) / 2**30


def storage_read_bytes() -> int | None:
    """Bytes this process has read from storage (not the page cache), or None if unknown."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
        return int(fields["read_bytes"])
    except (OSError, KeyError, ValueError):
        return None


def wait_until_quiet(max_pressure: float, timeout_s: float = 900.0) -> float:
    """Block until the share of the last 10 s in which some task waited for a CPU (Linux PSI,
    avg10) is at most `max_pressure` (or `timeout_s` passed); returns seconds waited. On a
    shared 2-core machine, a run beside another process's threads ran 10-30x slower."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        try:
            with open("/proc/pressure/cpu") as f:
                avg10 = float(f.readline().split()[1].split("=")[1]) / 100
        except (OSError, IndexError, ValueError):
            break
        if avg10 <= max_pressure:
            break
        time.sleep(2)
    return time.perf_counter() - start


def cpu_waiting_s() -> float | None:
    """Seconds, since boot, in which some runnable task waited for a CPU (Linux PSI): its rise
    during a run shows other load on a shared machine (and this process's own extra threads)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# the text workload


def text_workload(args: argparse.Namespace, model_dir: Path) -> tuple[Workload, Path]:
    """Prompts of English text instead of random ids, and a row profile of other text.

    The corpus is CPython's bundled documentation (pydoc topics), tokenized by the model's
    tokenizer and cut in two: `engram-serve tables profile`'s counting runs over the first half
    (the hot set the disk tier's cache starts with, as a deployment would profile its own
    traffic), prompts are windows of the second half. Random ids never repeat an n-gram, so
    every row is read once and no cache helps: that is the worst case; text is the use case.
    """
    from engram_serve.engine.tokenizer import Tokenizer
    from engram_serve.engram.compression import load_compression
    from engram_serve.engram.ngram_hash import NgramHasher
    from engram_serve.engram.tables import read_engram_config
    from engram_serve.offload.cache import profile_rows

    tokenizer = Tokenizer(model_dir)
    corpus = text_corpus(model_dir)
    half = len(corpus) // 2
    hasher = NgramHasher(read_engram_config(model_dir), load_compression(tokenizer.hf_tokenizer))
    documents = [corpus[i : i + 1024] for i in range(0, half, 1024)]
    profile_path = model_dir / "text_profile.npz"
    profile_rows(hasher, documents).save(profile_path)
    rng = np.random.default_rng(args.seed)
    prompt_lens = rng.integers(args.low, args.high + 1, size=args.num_seqs)
    output_lens = rng.integers(args.low, args.high + 1, size=args.num_seqs)
    starts = rng.integers(half, len(corpus) - args.high, size=args.num_seqs)
    prompts = [corpus[s : s + n].tolist() for s, n in zip(starts, prompt_lens, strict=True)]
    return Workload(prompts, output_lens.tolist()), profile_path


# ---------------------------------------------------------------------------------------------
# runs


def tier_configs(
    args: argparse.Namespace, hot_profile: Path | None = None
) -> dict[str, OffloadConfig]:
    disk = OffloadConfig(
        tier="disk",
        direct_io=True,
        cache_rows=args.cache_rows,
        num_io_threads=args.io_threads,
        cache_policy=args.policy,
        hot_profile=None if hot_profile is None else str(hot_profile),
    )
    configs = {
        "device": OffloadConfig(tier="device"),
        "disk": disk,
        "disk-no-lookahead": replace(disk, lookahead=False),
        "disk-no-prefetch": replace(disk, prefetch=False),
        "disk-no-cache": replace(disk, cache_rows=0),
    }
    if args.remote_master is not None:
        remote = replace(disk, tier="remote", direct_io=False, remote_master=args.remote_master)
        configs.update({"remote": remote, "remote-no-cache": replace(remote, cache_rows=0)})
    missing = [name for name in args.tiers if name not in configs]
    if missing:
        raise SystemExit(f"tiers {missing} need the store: pass --remote-master HOST:PORT")
    return {name: configs[name] for name in args.tiers}


def remote_read_rates(model_dir: Path, master: str, rounds: int = 3) -> dict[str, Any]:
    """Rows/s of the remote tier's read path (RemoteStore.read) on random rows of the first
    layer, best of `rounds`, per batch size; and of the naive path, one ranged read per row."""
    from concurrent.futures import ThreadPoolExecutor

    from engram_serve.offload.remote import RemoteStore, open_published

    table = min(open_published(model_dir, master).items())[1]
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    with ThreadPoolExecutor(1) as pool:
        store = RemoteStore(table, pool)
        try:
            for name, rows in REMOTE_BATCHES.items():
                best = float("inf")
                for _ in range(rounds):
                    ids = np.unique(rng.integers(0, table.rows, rows))
                    weight = np.empty((len(ids), table.width), np.uint8)
                    scale = np.empty((len(ids), table.scale_row_bytes), np.uint8)
                    start = time.perf_counter()
                    store.read(ids, weight, scale)
                    best = min(best, (time.perf_counter() - start) / len(ids))
                out[name] = {"rows": rows, "rows_per_s": 1 / best}
            start = time.perf_counter()
            size = store.record_bytes
            for row in rng.integers(0, table.rows, NAIVE_ROWS).tolist():
                chunk, offset = divmod(row, table.chunk_rows)
                store.remote.read([f"{store.keys}{chunk}"], [[0]], [[offset * size]], [[size]],
                                  size, lambda _: None)  # fmt: skip
            out["naive"] = {"rows": NAIVE_ROWS,
                            "rows_per_s": NAIVE_ROWS / (time.perf_counter() - start)}  # fmt: skip
        finally:
            store.close()
    for name in REMOTE_BATCHES:
        out[name]["vs_naive"] = out[name]["rows_per_s"] / out["naive"]["rows_per_s"]
    return out


def counters(stats: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {key: stats[key] for key in COUNTERS}
    out["rows_read"], out["bytes_read"] = dict(stats["rows_read"]), dict(stats["bytes_read"])
    return out


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Counters of the measured run alone (the warm-up's taken out)."""
    out: dict[str, Any] = {}
    for key, value in after.items():
        if isinstance(value, dict):
            out[key] = {k: v - before[key].get(k, 0) for k, v in value.items()}
        else:
            out[key] = value - before[key]
    return out


def run_tier(
    name: str,
    model_dir: Path,
    config: EngramConfig,
    engine_config: EngineConfig,
    offload: OffloadConfig,
    workload: Workload,
) -> dict[str, Any]:
    from engram_serve.llm import build_engine

    drop_page_cache(table_files(model_dir, config))
    start = time.perf_counter()
    engine = build_engine(model_dir, engine_config, offload)
    build_s = time.perf_counter() - start
    prefetcher = engine.engram.prefetcher
    try:
        run_engine(engine, make_workload(2, 8, 16, engine.model_config.vocab_size, seed=1))
        drop_page_cache(table_files(model_dir, config))
        load, read_before, waiting = load_average(), storage_read_bytes(), cpu_waiting_s()
        before, cpu_before = counters(prefetcher.stats), os.times()
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = run_engine(engine, workload)
        cpu = [a - b for a, b in zip(os.times(), cpu_before, strict=True)]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
        stats = delta(counters(prefetcher.stats), before)
        read_after, waiting_after = storage_read_bytes(), cpu_waiting_s()
    finally:
        engine.close()
    looked_up = stats["cache_hits"] + stats["cache_misses"]
    result = {
        "name": name,
        "offload": {k: v for k, v in vars(offload).items() if v not in (None, 0, False)},
        "lookahead": prefetcher.warms,
        "build_s": build_s,
        "seconds": seconds,
        "output_tok_s": workload.num_output_tokens / seconds,
        "hit_rate": stats["cache_hits"] / looked_up if looked_up else None,
        **stats,
        "stall_ms_per_step": 1e3 * stats["stall_s"] / max(1, stats["steps"]),
        "storage_read_bytes": None if read_before is None else read_after - read_before,
        "cpu_user_s": cpu[0],  # all of the process's threads: forward, fetch and I/O
        "cpu_system_s": cpu[1],
        "page_faults": faults,  # minor: memory the run touched for the first time
        "cpu_pressure": None if waiting is None else (waiting_after - waiting) / seconds,
        "load_avg_before": load,
        "load_avg_after": load_average(),
    }
    return result


def run_in_own_process(*args: Any) -> dict[str, Any]:
    """`run_tier` in a fresh process. Runs in one process were not independent: a disk run after
    the device tier's stalled 1.6-2.1 s where the first run of a process stalled 0.4-0.6 s and
    runs in fresh processes 0.4-0.9 s (random prompts, same settings). Fresh processes still
    see what the last one did to the machine: a disk run right after a device run (or after a
    process that touched and freed 16 GiB) ran 63-66 tok/s where disk runs after disk runs ran
    72-77; hence the ABBA rounds in `run_all`."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
        return pool.submit(run_tier, *args).result()


def print_row(r: dict[str, Any], vs_device: float | None, quartiles: list | None = None) -> None:
    ratio = "     -" if vs_device is None else f"{vs_device:6.3f}"
    if quartiles is not None:
        ratio += f" (quartiles {quartiles[0]:.3f}-{quartiles[1]:.3f})"
    hit = "    -" if r["hit_rate"] is None else f"{r['hit_rate']:5.1%}"
    storage = r["storage_read_bytes"]
    say(
        f"{r['name']:18s} {r['output_tok_s']:8.1f} tok/s  x{ratio}  hit {hit}  "
        f"stall {r['stall_s']:6.2f} s  read {fmt_tiers(r['rows_read'])}  "
        f"ahead {r['warmed']:,}  storage {'-' if storage is None else storage / 2**20:,.0f} MiB  "
        f"cpu {(r['cpu_user_s'] + r['cpu_system_s']) / r['seconds']:.2f} cores "
        f"(sys {r['cpu_system_s']:.1f} s, {r['page_faults']:,} faults)  "
        f"cpu pressure {r['cpu_pressure'] or 0:.0%}  "
        f"load {r['load_avg_before']:.1f}-{r['load_avg_after']:.1f}"
    )


def fmt_tiers(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(d.items())) or "-"


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per tier: its median run by output tok/s, and `vs_device`, the median over rounds of its
    tok/s over the device run's of the same round, with the quartiles of those ratios
    (`vs_device_quartiles`: how far one round can be trusted). The machine's speed drifts
    between rounds by more than the tiers differ (65-77 tok/s for one tier's runs here), so a
    ratio within a round is the steadier measure."""
    by_tier: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_tier.setdefault(r["name"], []).append(r)
    device = {r["round"]: r["output_tok_s"] for r in by_tier.get("device", [])}
    summary = {}
    for name, runs in by_tier.items():
        ratios = [r["output_tok_s"] / device[r["round"]] for r in runs if r["round"] in device]
        runs = sorted(runs, key=lambda r: r["output_tok_s"])
        summary[name] = {
            **runs[(len(runs) - 1) // 2],
            "runs_tok_s": [r["output_tok_s"] for r in runs],
            "runs_vs_device": ratios,
            "vs_device": float(np.median(ratios)) if ratios else None,
            "vs_device_quartiles": np.percentile(ratios, [25, 75]).tolist() if ratios else None,
        }
    return summary


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    names = list(summary)
    runs = list(summary.values())
    with figure(path, 4, (20, 4.5)) as (_, axes):
        panels = (
            ("output tok/s (ratio to device)", [r["output_tok_s"] for r in runs]),
            ("stall s (forward waiting for rows)", [r["stall_s"] for r in runs]),
            ("cache hit rate", [r["hit_rate"] or 0.0 for r in runs]),
        )
        bar_panels(axes, names, panels)
        for i, r in enumerate(runs):
            if r["vs_device"] is not None:
                axes[0].annotate(f"{r['vs_device']:.3f}", (i, r["output_tok_s"]), ha="center",
                                 va="bottom", fontsize=8)  # fmt: skip
        ax, bottom = axes[3], [0] * len(runs)
        for tier in ("device", "cache", "disk", "remote"):
            values = [r["rows_read"].get(tier, 0) for r in runs]
            ax.bar(range(len(names)), values, bottom=bottom, label=tier)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title("rows read, by tier (read-ahead included)")
        ax.legend(fontsize=8)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engram-serve bench offload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--level", choices=["engine", "prefetcher"], default="engine")
    add_workload_args(p, num_seqs=32, low=64, high=256, max_num_batched_tokens=512)
    p.add_argument("--table-gib", type=float, default=8.0, help="all tables together, on disk")
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    p.add_argument("--keep", action="store_true", help="keep the model directory")
    p.add_argument("--cache-rows", type=int, default=1 << 21, help="all layers together")
    p.add_argument("--policy", choices=["lru", "lfu"], default="lfu")
    p.add_argument("--io-threads", type=int, default=32)
    p.add_argument("--remote-master", help="HOST:PORT of a Mooncake Store: the remote tiers")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (device tier: tables in HBM)")
    p.add_argument("--tiers", nargs="+", choices=TIER_NAMES, default=None,
                   help="default: all (the remote ones with --remote-master)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1, help="runs of every tier, interleaved")
    p.add_argument("--seed", type=int, default=0, help="the workload's")
    p.add_argument("--quiet", type=float, default=None, metavar="SHARE",
                   help="before each run, wait until CPU pressure (PSI avg10) is at most "
                        "SHARE (runs beside other processes are not comparable)")  # fmt: skip
    p.add_argument("--prompts", choices=["random", "text"], default="random",
                   help="random ids (every n-gram new: the worst case), or English text with "
                        "a profiled hot set")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("results/offload_engine"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    level = argparse.ArgumentParser(add_help=False)
    level.add_argument("--level", default="engine")
    known, rest = level.parse_known_args(argv)
    if known.level == "prefetcher":
        from engram_serve.bench import offload_prefetcher

        return offload_prefetcher.main(rest)
    args = parse_args(argv)
    config = engram_config(args.table_gib)
    model_dir = args.model_dir
    build_s = 0.0
    if not is_built(model_dir, config):
        if model_dir.exists() and any(model_dir.iterdir()):
            raise SystemExit(f"{model_dir} holds something else; pass an empty --model-dir")
        build_s = build_model_dir(model_dir, config)
    if args.tiers is None:
        args.tiers = [n for n in TIER_NAMES if args.remote_master or not n.startswith("remote")]
    remote = args.remote_master is not None and any(n.startswith("remote") for n in args.tiers)
    try:
        if remote:
            from engram_serve.offload.remote import publish

            publish(model_dir, args.remote_master)
        report = run_all(args, model_dir, config)
        if remote:
            report["remote_read"] = remote_read_rates(model_dir, args.remote_master)
            say(f"remote read path, rows/s: {json.dumps(report['remote_read'])}")
    finally:
        if remote and not args.keep:
            from engram_serve.offload.remote import unpublish

            unpublish(model_dir, args.remote_master)
        if not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
    report["model_build_s"] = build_s
    save(report, args.out, partial(plot, report["summary"]))
    return report


def run_all(args: argparse.Namespace, model_dir: Path, config: EngramConfig) -> dict[str, Any]:
    started = machine()
    table_bytes = sum(path.stat().st_size for path in table_files(model_dir, config))
    engine_config = workload_engine_config(args)
    hot_profile = None
    if args.prompts == "text":
        workload, hot_profile = text_workload(args, model_dir)
    else:
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        workload = make_workload(args.num_seqs, args.low, args.high, vocab, seed=args.seed)
    print(
        f"tables {table_bytes / 2**30:.2f} GiB in {model_dir}; {args.num_seqs} sequences of "
        f"{args.prompts} prompts, {workload.num_prompt_tokens} prompt + "
        f"{workload.num_output_tokens} output tokens; "
        f"load average {load_average():.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    tiers = tier_configs(args, hot_profile)
    results = []
    runs = alternating(list(tiers), args.repeats)
    for round_, name in progress(runs, "runs", total=args.repeats * len(tiers)):
        if args.quiet is not None:
            wait_until_quiet(args.quiet)
        r = run_in_own_process(name, model_dir, config, engine_config, tiers[name], workload)
        results.append({**r, "round": round_})
        print_row(r, None)
    summary = summarize(results)
    print(
        "\nmedian run of each tier, and the median (quartiles) of its ratios to the device run "
        "of its round:"
    )
    for r in summary.values():
        print_row(r, r["vs_device"], r["vs_device_quartiles"])
    return {
        "machine": started,
        "table_bytes": table_bytes,
        "engram": config.to_dict(),
        "engine": vars(engine_config),
        "num_seqs": args.num_seqs,
        "length_range": [args.low, args.high],
        "prompt_tokens": workload.num_prompt_tokens,
        "output_tokens": workload.num_output_tokens,
        "summary": summary,
        "results": results,
    }


if __name__ == "__main__":
    main()
