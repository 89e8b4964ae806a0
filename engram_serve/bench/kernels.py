"""Kernel benchmarks.

CPU: the CPU path's row gather (`gather_rows_cpu`) against `torch.index_select` on the same
rows of a table far larger than the caches (256-byte rows: 64 float32 values), plus the FP8
V4.1 format (256 FP8 bytes + 8 UE8M0 scales a row) against the reference twin. Both read the
table where the tiers keep it (offload/pinned.py's HostMemory, on transparent huge pages);
`index_select_4k_pages` reads a copy on 4 KiB pages, to show what the pages give apart from
what the kernel gives. Every method reads ids drawn the same way, fresh ones each
time (rows read before would be in cache), in turn within each repeat (so a busy machine
slows them alike), in rotating order. Two scenarios: `alone`, and
`beside_forward`, with matmuls running on torch's threads meanwhile, as the engine's CPU
prefetch gathers rows while the model computes.

Two id distributions: `uniform` (independent random rows), and `text` (a step's real rows:
windows of English text, CPython's bundled documentation, tokenized by the embedded SmolLM2
tokenizer, compressed, and hashed by NgramHasher for 3 orders x 8 heads into the same table;
repeated n-grams repeat rows, so the unique fraction is reported too).

CPU linear (`--linear`): one forward's matrix multiplies of the default model (its 30 layers'
fused q/k/v, o, fused gate/up and down weights, and the output head: 540 MB of float32) for
batches of 1 to 256 rows, `F.linear` (MKL) against kernels/cpu_linear.py; weight GB/s and
GFLOP/s. The weights are random (only their shapes matter) and, together, far larger than the
caches, as in the model.

CPU quantized linear (`--quant`): the same matmuls with the default model's own weights in their
GGUF formats (Q4_1 layers, q/k/v and gate/up fused; the Q8_0 embedding as the tied output
head), kernels/cpu_quant.py against the float32 path the model takes for the dequantized weights
(model/linear.py: kernels/cpu_linear.py up to its MAX_ROWS rows, MKL beyond), for 1 to 2048
rows; weight bytes held by each, and the largest difference of the outputs.

CPU decode attention (`--attention`): one decode step's paged attention over the default model's
layers (SmolLM2: 30 of 9 query heads, 3 KV heads of 64) for 1 to 64 sequences of 150-300 cached
tokens in blocks of 16 scattered over the pool, kernels/cpu_attention.py against its torch twin
(model/attention.decode_attention); K/V GB/s read.

GPU (skipped without CUDA): the Triton hash against NgramHasher (numba), the Triton gather from
device memory and from pinned host memory (UVA) against torch indexing, the fused gate against
its twin.

`python -m engram_serve.bench.kernels [--table-gib 2] [--repeats 20] [--linear] [--quant]
[--attention] [--json out.json]`
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import numpy as np
import torch

from engram_serve.bench.harness import load_average, machine, save
from engram_serve.engram.config import EngramConfig
from engram_serve.engram.ngram_hash import NgramHasher
from engram_serve.kernels import reference
from engram_serve.kernels.cpu_gather import gather_rows_cpu
from engram_serve.offload import pinned

ROW_BYTES = 256
NUM_HEADS = 24  # 3 orders x 8 heads, as DeepSeek-V4.1
# Rows one layer reads per step, as (sequences, new tokens each): a 32-sequence decode step, a
# 512-token prefill chunk, and four of them (2048 tokens, the engine's default token budget).
STEPS = {"decode_32": (32, 1), "prefill_512": (1, 512), "prefill_4x512": (4, 512)}


def _median_min(times: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(times)) * 1e3, "min_ms": float(min(times)) * 1e3}


def _time_in_turn(
    methods: dict[str, Callable[[], object]], repeats: int
) -> dict[str, dict[str, float]]:
    """Median and best time of each method over `repeats` passes, the methods in turn within a
    pass (so a busy machine slows them alike); a first pass warms up (and compiles)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(repeats + 1):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: _median_min(t) for name, t in times.items()}


def _call_each(fn: Callable[..., object], calls: list[tuple]) -> None:
    for args in calls:
        fn(*args)


def _race(methods: dict[str, Callable[[torch.Tensor], object]], id_sets: list[torch.Tensor]):
    """Time every method in turn, each on its own id sets (ids another method just read would
    be in cache), the order rotating from repeat to repeat; the first repeat warms up."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for i in range(len(id_sets) // len(names)):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            ids = id_sets[i * len(names) + names.index(name)]
            start = time.perf_counter()
            methods[name](ids)
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: _median_min(t) for name, t in times.items()}


class _TextSteps:
    """Row ids of one Engram layer for steps of real text, in a table of about `num_rows` rows
    (24 heads of equal prime height, as V4.1's 3 orders x 8 heads)."""

    def __init__(self, num_rows: int, seed: int = 0) -> None:
        from pydoc_data.topics import topics  # CPython's own documentation: English prose

        from transformers import AutoTokenizer

        from engram_serve.engram.compression import load_compression
        from engram_serve.model.default_model import GGUF_FILE, packaged_gguf_path

        tokenizer = AutoTokenizer.from_pretrained(packaged_gguf_path().parent, gguf_file=GGUF_FILE)
        config = EngramConfig(
            layer_ids=(1,), max_ngram_size=4, n_head_per_ngram=8,
            engram_vocab_size=(num_rows // NUM_HEADS,) * 3, seed=seed, pad_id=2,
        )  # fmt: skip
        self.hasher = NgramHasher(config, load_compression(tokenizer))
        text = "\n".join(topics.values())
        self.corpus = self.hasher.compress(np.array(tokenizer(text)["input_ids"]))
        self.rng = np.random.default_rng(seed)

    @property
    def num_rows(self) -> int:
        return int(self.hasher.table_rows[0])

    def __call__(self, num_seqs: int, seq_len: int) -> torch.Tensor:
        """`num_seqs` windows of `seq_len` tokens at random places, each with its lookback."""
        back = self.hasher.lookback_len
        starts = self.rng.integers(back, len(self.corpus) - seq_len, num_seqs)
        ids = np.concatenate([self.corpus[s : s + seq_len] for s in starts])
        lookback = np.stack([self.corpus[s - back : s] for s in starts])
        qsl = np.arange(num_seqs + 1) * seq_len
        rows = self.hasher.row_ids(ids, qsl, lookback)  # [1, T, 24]
        return torch.from_numpy(np.ascontiguousarray(rows[0]).reshape(-1))


def _id_sets(kind: str, steps: _TextSteps, shape: tuple[int, int], count: int):
    if kind == "text":
        return [steps(*shape) for _ in range(count)]
    gen = torch.Generator().manual_seed(shape[0] * shape[1])
    num_ids = shape[0] * shape[1] * NUM_HEADS
    return [torch.randint(0, steps.num_rows, (num_ids,), generator=gen) for _ in range(count)]


def _host_table(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, object]:
    """An empty table where the tiers put one: offload/pinned.py's HostMemory (huge pages)."""
    mem = pinned.HostMemory(int(np.prod(shape)) * dtype.itemsize)
    return torch.from_numpy(mem.array(np.uint8, (mem.nbytes,))).view(dtype).view(shape), mem


def _float32_tables(num_rows: int) -> dict[str, torch.Tensor]:
    """The same table twice: in a tier's memory, and on 4 KiB pages (NumPy's allocation; torch's
    own would be on huge pages too, engram_serve asks for them on import). Written in full so
    every page is really backed (an untouched page reads as the one shared zero page, which
    would make random reads look cache-friendly)."""
    table, mem = _host_table((num_rows, ROW_BYTES // 4), torch.float32)
    table.fill_(0.5)
    table[:, 0] = torch.arange(num_rows, dtype=torch.float32)  # a row's id, to check results
    small_pages = torch.from_numpy(np.empty(tuple(table.shape), dtype=np.float32))
    return {"tier": table, "small_pages": small_pages.copy_(table), "memory": mem}


def _fp8_tables(num_rows: int) -> dict[str, torch.Tensor]:
    rows, row_mem = _host_table((num_rows, ROW_BYTES), torch.uint8)
    rows.fill_(0x38)  # 1.0
    rows[:, :4] = torch.arange(num_rows, dtype=torch.int32)[:, None].view(torch.uint8)
    scales, scale_mem = _host_table((num_rows, ROW_BYTES // 32), torch.uint8)
    scales.fill_(127)
    return {"rows": rows, "scales": scales, "memory": (row_mem, scale_mem)}


def bench_cpu_gather(table_gib: float = 2.0, repeats: int = 20) -> dict:
    """The float32 and FP8 gathers on a `table_gib` GiB table; see the module docstring."""
    steps = _TextSteps(int(table_gib * 2**30) // ROW_BYTES)
    results: dict = {
        "table_rows": steps.num_rows, "row_bytes": ROW_BYTES,
        "table_gib": steps.num_rows * ROW_BYTES / 2**30, "load_average_start": load_average(),
    }  # fmt: skip
    results["float32"] = _cpu_cases(
        steps, repeats, ROW_BYTES // 4, _float32_methods(steps.num_rows)
    )
    results["fp8"] = _cpu_cases(steps, repeats, ROW_BYTES, _fp8_methods(steps.num_rows))
    results["load_average_end"] = load_average()
    return results


def _float32_methods(num_rows: int) -> tuple[str, Callable]:
    tables = _float32_tables(num_rows)
    tier, small_pages = tables["tier"], tables["small_pages"]

    def methods(out: torch.Tensor) -> dict[str, Callable[[torch.Tensor], object]]:
        return {
            "index_select": lambda ids: torch.index_select(tier, 0, ids, out=out),
            "index_select_4k_pages": lambda ids: torch.index_select(small_pages, 0, ids, out=out),
            "gather_rows_cpu": lambda ids: gather_rows_cpu(tier, ids, out=out),
        }

    return "index_select", methods


def _fp8_methods(num_rows: int) -> tuple[str, Callable]:
    tables = _fp8_tables(num_rows)
    rows, scales = tables["rows"], tables["scales"]

    def methods(out: torch.Tensor) -> dict[str, Callable[[torch.Tensor], object]]:
        return {
            "reference": lambda ids: reference.gather_rows(rows, ids, scales),
            "gather_rows_cpu": lambda ids: gather_rows_cpu(rows, ids, scales, out=out),
        }

    return "reference", methods


def _cpu_cases(steps: _TextSteps, repeats: int, width: int, baseline_and_methods) -> dict:
    """Every scenario, id distribution and step size for one table; the baseline's output is
    checked against ours on the first id set."""
    baseline, make_methods = baseline_and_methods
    results = {}
    for scenario, context in SCENARIOS.items():
        for kind in ("uniform", "text"):
            for case, shape in STEPS.items():
                methods = make_methods(torch.empty(shape[0] * shape[1] * NUM_HEADS, width))
                id_sets = _id_sets(kind, steps, shape, (repeats + 1) * len(methods))
                want = methods[baseline](id_sets[0]).clone()
                _check_same(want, methods["gather_rows_cpu"](id_sets[0]))
                with context():
                    timed = _race(methods, id_sets)
                results[f"{scenario}/{kind}/{case}"] = _summary(timed, baseline, id_sets)
    return results


@contextmanager
def _beside_forward() -> Iterator[None]:
    """The engine's CPU case: rows are gathered while the model computes on the same cores.
    A stand-in for the forward pass (SmolLM2-sized matmuls on torch's threads) runs meanwhile."""
    stop = threading.Event()

    def compute() -> None:
        x, w = torch.randn(512, 576), torch.randn(576, 1536)
        while not stop.is_set():
            torch.mm(x, w)

    thread = threading.Thread(target=compute, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


SCENARIOS = {"alone": nullcontext, "beside_forward": _beside_forward}


def _check_same(want: torch.Tensor, got: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def _summary(timed: dict, baseline: str, id_sets: list[torch.Tensor]) -> dict:
    ids = id_sets[1]
    out = {
        "rows": ids.numel(),
        "unique_fraction": ids.unique().numel() / max(1, ids.numel()),
        **{name: t for name, t in timed.items()},
    }
    ours = timed["gather_rows_cpu"]
    out["speedup_median"] = timed[baseline]["median_ms"] / ours["median_ms"]
    out["speedup_min"] = timed[baseline]["min_ms"] / ours["min_ms"]
    if "index_select_4k_pages" in timed:  # what huge pages add, on top of the kernel
        out["speedup_median_vs_4k_pages"] = (
            timed["index_select_4k_pages"]["median_ms"] / ours["median_ms"]
        )
    return out


LINEAR_ROWS = (1, 2, 4, 16, 64, 256)


def bench_cpu_linear(repeats: int = 10) -> dict:
    """Median and best time of the default model's matmuls, per batch size and method."""
    import torch.nn.functional as F

    from engram_serve.kernels.cpu_linear import linear_cpu
    from engram_serve.llm import resolve_model_dir
    from engram_serve.model.loader import load_model_config

    c = load_model_config(resolve_model_dir(None))
    d, hd = c.hidden_size, c.attn_head_dim
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd
    ff = c.intermediate_size
    shapes = [(qkv, d), (d, c.num_attention_heads * hd), (2 * ff, d), (d, ff)]
    gen = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(shape, generator=gen) for _ in range(c.num_hidden_layers) for shape in shapes
    ]
    weights.append(torch.randn(c.vocab_size, d, generator=gen))
    weight_bytes = sum(w.numel() for w in weights) * 4
    results: dict = {"weight_mb": weight_bytes / 1e6, "threads": torch.get_num_threads()}
    for rows in LINEAR_ROWS:
        inputs = {k: torch.randn(rows, k, generator=gen) for k in {w.shape[1] for w in weights}}
        calls = [(inputs[w.shape[1]], w) for w in weights]
        methods = {"mkl": F.linear, "cpu_linear": linear_cpu}
        entry = _time_in_turn({n: partial(_call_each, fn, calls) for n, fn in methods.items()},
                              repeats)  # fmt: skip
        for name in methods:
            seconds = entry[name]["median_ms"] / 1e3
            entry[name]["weight_gb_s"] = weight_bytes / seconds / 1e9
            entry[name]["gflop_s"] = 2 * rows * weight_bytes / 4 / seconds / 1e9
        entry["speedup_median"] = entry["mkl"]["median_ms"] / entry["cpu_linear"]["median_ms"]
        results[str(rows)] = entry
        print(
            f"  {rows:4d} rows  MKL {entry['mkl']['median_ms']:7.1f} ms "
            f"({entry['mkl']['gflop_s']:5.1f} GFLOP/s, {entry['mkl']['weight_gb_s']:5.1f} GB/s)"
            f"  cpu_linear {entry['cpu_linear']['median_ms']:7.1f} ms "
            f"({entry['cpu_linear']['gflop_s']:5.1f} GFLOP/s, "
            f"{entry['cpu_linear']['weight_gb_s']:5.1f} GB/s)  {entry['speedup_median']:4.2f}x",
            flush=True,
        )
    return results


QUANT_ROWS = (1, 8, 64, 256, 2048)
WARM_UP_S = 5.0


def default_model_weights() -> list:
    """The default model's linear weights as kernels/cpu_quant.py holds them: per layer the fused
    q/k/v, o, fused gate/up and down weights, then the output head (the tied embedding)."""
    from gguf import GGUFReader

    from engram_serve.kernels.cpu_quant import QuantizedWeight
    from engram_serve.model.default_model import packaged_gguf_path

    tensors = {t.name: t for t in GGUFReader(packaged_gguf_path()).tensors}

    def weight(name: str) -> QuantizedWeight:
        t = tensors[name]
        shape = (int(t.shape[1]), int(t.shape[0]))  # GGUF lists dimensions innermost first
        return QuantizedWeight.from_gguf(t.data, t.tensor_type.name, shape)

    layers = sorted({int(name.split(".")[1]) for name in tensors if name.startswith("blk.")})
    weights = []
    for i in layers:
        names = [["attn_q", "attn_k", "attn_v"], ["attn_output"], ["ffn_gate", "ffn_up"]]
        names.append(["ffn_down"])
        for group in names:
            weights.append(QuantizedWeight.concat([weight(f"blk.{i}.{n}.weight") for n in group]))
    weights.append(weight("token_embd.weight"))
    return weights


def bench_cpu_quant(repeats: int = 10) -> dict:
    """Median and best time of the default model's matmuls in its own block formats against the
    float32 path on the dequantized weights, per batch size."""
    from engram_serve.kernels import cpu_quant
    from engram_serve.model.linear import linear

    quantized = default_model_weights()
    dense = [w.dequantize() for w in quantized]
    quant_bytes = sum(w.nbytes for w in quantized)
    dense_bytes = sum(w.numel() * 4 for w in dense)
    results: dict = {
        "threads": torch.get_num_threads(),
        "formats": sorted({w.format for w in quantized}),
        "quant_mb": quant_bytes / 1e6,
        "float32_mb": dense_bytes / 1e6,
    }
    print(f"  weights: {quant_bytes / 1e6:.1f} MB quantized, {dense_bytes / 1e6:.1f} MB float32")
    gen = torch.Generator().manual_seed(0)
    # A process's first seconds of parallel launches run ~10 ms each here, later ~5 us.
    start, x = time.perf_counter(), torch.randn(1, quantized[0].shape[1], generator=gen)
    while time.perf_counter() - start < WARM_UP_S:
        cpu_quant.linear(x, quantized[0])
    for rows in QUANT_ROWS:
        inputs = {k: torch.randn(rows, k, generator=gen) for k in {w.shape[1] for w in dense}}
        methods = {
            "float32": partial(_call_each, linear, [(inputs[w.shape[1]], w) for w in dense]),
            "quant": partial(
                _call_each, cpu_quant.linear, [(inputs[w.shape[1]], w) for w in quantized]
            ),
        }
        entry = _time_in_turn(methods, max(2, repeats * 64 // max(64, rows)))
        for name, held in (("float32", dense_bytes), ("quant", quant_bytes)):
            seconds = entry[name]["median_ms"] / 1e3
            entry[name]["weight_gb_s"] = held / seconds / 1e9
            entry[name]["gflop_s"] = 2 * rows * dense_bytes / 4 / seconds / 1e9
        entry["speedup_median"] = entry["float32"]["median_ms"] / entry["quant"]["median_ms"]
        entry["max_abs_diff"] = max(
            (linear(inputs[d.shape[1]], d) - cpu_quant.linear(inputs[q.shape[1]], q)).abs().max()
            for d, q in zip(dense, quantized, strict=True)
        ).item()
        results[str(rows)] = entry
        dense_entry, quant_entry = entry["float32"], entry["quant"]
        print(
            f"  {rows:4d} rows  float32 {dense_entry['median_ms']:8.1f} ms "
            f"({dense_entry['gflop_s']:5.1f} GFLOP/s)  quant {quant_entry['median_ms']:8.1f} ms "
            f"({quant_entry['gflop_s']:5.1f} GFLOP/s, {quant_entry['weight_gb_s']:5.1f} GB/s)  "
            f"{entry['speedup_median']:5.2f}x  max |diff| {entry['max_abs_diff']:.2e}",
            flush=True,
        )
    return results


def _cuda_time(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `fn` on the current stream (CUDA events), after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


ATTENTION_SEQS = (1, 16, 64)


def bench_cpu_attention(repeats: int = 10) -> dict:
    """Median and best time of one decode step's attention, per batch size and method."""
    from engram_serve.kernels.cpu_attention import decode_attention_cpu
    from engram_serve.llm import resolve_model_dir
    from engram_serve.model.attention import decode_attention
    from engram_serve.model.loader import load_model_config

    c = load_model_config(resolve_model_dir(None))
    layers, heads, kv_heads = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    hd, block_size = c.attn_head_dim, 16
    scale = hd**-0.5
    gen = torch.Generator().manual_seed(0)
    results: dict = {"threads": torch.get_num_threads()}
    for num_seqs in ATTENTION_SEQS:
        lens = torch.randint(150, 301, (num_seqs,), generator=gen)
        blocks_per_seq = 300 // block_size + 1
        num_blocks = num_seqs * blocks_per_seq
        tables = torch.randperm(num_blocks, generator=gen).view(num_seqs, blocks_per_seq)
        shape = (num_blocks, block_size, kv_heads, hd)
        caches = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))]
        caches += [(torch.randn(shape), torch.randn(shape)) for _ in range(layers - 1)]
        q = torch.randn(num_seqs, heads, hd, generator=gen)
        methods = {
            "torch_twin": partial(
                decode_attention, q, block_tables=tables, seq_lens=lens,
                max_len=int(lens.max()), scale=scale,
            ),
            "cpu_attention": partial(
                decode_attention_cpu, q, block_tables=tables, seq_lens=lens, scale=scale
            ),
        }  # fmt: skip
        timed = _time_in_turn(
            {name: partial(_call_each, fn, caches) for name, fn in methods.items()}, repeats
        )
        kv_bytes = 2 * layers * int(lens.sum()) * kv_heads * hd * 4
        entry = {"kv_mb": kv_bytes / 1e6, **timed}
        for name in methods:
            entry[name]["kv_gb_s"] = kv_bytes / (entry[name]["median_ms"] / 1e3) / 1e9
        entry["speedup_median"] = (
            entry["torch_twin"]["median_ms"] / entry["cpu_attention"]["median_ms"]
        )
        results[str(num_seqs)] = entry
        print(
            f"  {num_seqs:3d} seqs ({entry['kv_mb']:6.1f} MB of K/V)  torch twin "
            f"{entry['torch_twin']['median_ms']:7.1f} ms  cpu_attention "
            f"{entry['cpu_attention']['median_ms']:7.1f} ms "
            f"({entry['cpu_attention']['kv_gb_s']:5.1f} GB/s)  {entry['speedup_median']:4.2f}x",
            flush=True,
        )
    return results


def bench_gpu(repeats: int = 50, host_table_gib: float = 4.0) -> dict:
    """Triton kernels on CUDA; {"skipped": reason} without it."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from engram_serve.kernels.gate import fused_engram_gate
    from engram_serve.kernels.hash import ngram_hash

    dev = torch.device("cuda")
    results: dict = {"device": torch.cuda.get_device_name(dev)}
    # Hash: the V4.1 layout (2 layers, orders 2-4, 8 heads), 8,192 packed tokens in 32 sequences.
    config = EngramConfig(
        variant="v41", layer_ids=(1, 14), max_ngram_size=4, n_head_per_ngram=8,
        engram_vocab_size=(16_000_000,) * 3, head_dim=256, table_dtype="fp8_e4m3",
    )  # fmt: skip
    hasher = NgramHasher(config, np.arange(99_092, dtype=np.int64))
    rng = np.random.default_rng(0)
    num_tokens, num_seqs = 8192, 32
    ids = rng.integers(0, hasher.num_compressed, num_tokens)
    qsl = np.arange(num_seqs + 1, dtype=np.int64) * (num_tokens // num_seqs)
    lookback = rng.integers(0, hasher.num_compressed, (num_seqs, 3))
    args = [torch.from_numpy(np.ascontiguousarray(a)).to(dev) for a in
            (ids, qsl, lookback, hasher.multipliers, hasher.primes, hasher.offsets)]  # fmt: skip
    start = time.perf_counter()
    for _ in range(5):
        want = hasher.row_ids(ids, qsl, lookback)
    numpy_ms = (time.perf_counter() - start) / 5 * 1e3
    if not np.array_equal(ngram_hash(*args).cpu().numpy(), want):
        raise AssertionError("Triton hash disagrees with NgramHasher")
    results["hash"] = {
        "tokens": num_tokens, "triton_ms": _cuda_time(lambda: ngram_hash(*args), repeats),
        "numpy_ms": numpy_ms,
    }  # fmt: skip
    results["gather"] = _bench_gpu_gather(dev, repeats, host_table_gib)
    results["gate"] = _bench_gpu_gate(dev, repeats, fused_engram_gate)
    return results


def _bench_gpu_gather(dev: torch.device, repeats: int, host_table_gib: float) -> dict:
    """FP8 V4.1 rows from HBM, from pinned host memory (UVA), and half from an HBM cache."""
    from engram_serve.kernels.gather import gather_rows

    num_rows = int(host_table_gib * 2**30) // ROW_BYTES
    tables = _fp8_tables(num_rows)
    device_rows, device_scales = (tables[name].to(dev) for name in ("rows", "scales"))
    host_rows, host_scales = (tables[name].pin_memory() for name in ("rows", "scales"))
    out: dict = {}
    for tokens in (512, 8192):
        ids = torch.randint(0, num_rows, (tokens, NUM_HEADS), device=dev)
        # Half the rows cached in HBM: hits and misses in one launch.
        slots = torch.where(ids % 2 == 0, torch.arange(ids.numel(), device=dev).view_as(ids), -1)
        cache, cache_scale = (
            device_rows[: ids.numel()].clone(),
            device_scales[: ids.numel()].clone(),
        )
        cases = {
            "device": partial(gather_rows, device_rows, ids, device_scales),
            "pinned_host": partial(gather_rows, host_rows, ids, host_scales),
            "pinned_host_half_cached": partial(
                gather_rows, host_rows, ids, host_scales,
                slots=slots, cache=cache, cache_scale=cache_scale,
            ),
            "torch_twin_device": partial(reference.gather_rows, device_rows, ids, device_scales),
        }  # fmt: skip
        moved = ids.numel() * (ROW_BYTES + ROW_BYTES // 32)
        for name, fn in cases.items():
            ms = _cuda_time(fn, repeats)
            out[f"{name}/{tokens}_tokens"] = {"ms": ms, "gb_per_s": moved / ms / 1e6}
    return out


def _bench_gpu_gate(dev: torch.device, repeats: int, fused_engram_gate) -> dict:
    out: dict = {}
    for tokens, hc, dim in ((512, 4, 4096), (8192, 4, 4096), (8192, 1, 576)):
        h, key = (torch.randn(tokens, hc, dim, device=dev, dtype=torch.bfloat16) for _ in "hk")
        value = torch.randn(tokens, dim, device=dev, dtype=torch.bfloat16)
        q_weight, k_weight = (torch.randn(hc, dim, device=dev) for _ in "qk")
        args = (h, key, value, q_weight, k_weight, 1e-6, True)
        out[f"{tokens}x{hc}x{dim}"] = {
            "triton_ms": _cuda_time(partial(fused_engram_gate, *args), repeats),
            "torch_twin_ms": _cuda_time(partial(reference.fused_engram_gate, *args), repeats),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table-gib", type=float, default=2.0, help="CPU table size")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--skip-cpu", action="store_true", help="skip the CPU gather")
    parser.add_argument("--linear", action="store_true", help="also the CPU linear kernel")
    parser.add_argument(
        "--quant", action="store_true", help="also the CPU block-quantized linear kernel"
    )
    parser.add_argument(
        "--attention", action="store_true", help="also the CPU decode attention kernel"
    )
    args = parser.parse_args(argv)
    results = {"machine": machine()}
    if args.linear:
        print(f"CPU linear, the default model's matmuls, {torch.get_num_threads()} threads")
        results["cpu_linear"] = bench_cpu_linear(args.repeats)
    if args.quant:
        print(
            f"CPU quantized linear, the default model's weights, {torch.get_num_threads()} threads"
        )
        results["cpu_quant"] = bench_cpu_quant(args.repeats)
    if args.attention:
        threads = torch.get_num_threads()
        print(f"CPU decode attention, the default model's layers, {threads} threads")
        results["cpu_attention"] = bench_cpu_attention(args.repeats)
    if not args.skip_cpu:
        results["cpu_gather"] = cpu = bench_cpu_gather(args.table_gib, args.repeats)
        print(
            f"CPU gather, {cpu['table_gib']:.2f} GiB table of {ROW_BYTES}-byte rows, "
            f"{torch.get_num_threads()} threads, "
            f"load {cpu['load_average_start']:.1f} -> {cpu['load_average_end']:.1f}"
        )
        for fmt, baseline in (("float32", "index_select"), ("fp8", "reference")):
            for case, r in cpu[fmt].items():
                print(
                    f"  {fmt:7s} {case:36s} {r['rows']:6d} rows"
                    f" ({r['unique_fraction']:4.0%} unique)"
                    f"  {baseline} {r[baseline]['median_ms']:8.3f} ms"
                    f"  gather_rows_cpu {r['gather_rows_cpu']['median_ms']:8.3f} ms"
                    f"  speedup {r['speedup_median']:5.2f}x (min-based {r['speedup_min']:5.2f}x)"
                    + (
                        f"; vs index_select on 4 KiB pages {r['speedup_median_vs_4k_pages']:5.2f}x"
                        if "speedup_median_vs_4k_pages" in r
                        else ""
                    )
                )
    results["gpu"] = gpu = bench_gpu()
    print("GPU:", json.dumps(gpu, indent=2))
    if args.json:
        save(results, args.json)


if __name__ == "__main__":
    main()
