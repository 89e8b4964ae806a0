"""Offline throughput, the Engram paper's protocol scaled to this machine: N sequences with prompt
and output lengths uniform in [low, high] (`--output-len` fixes the outputs'), random token ids
or windows of real text (`--prompts text`), ignore_eos; output tokens per second. One run
measures, side by side on the same model and requests:

- our engine (Engram on, tables as configured) and our engine with Engram off, in `--rounds`
  alternating runs (A B B A ...), their median, and with `--also` the engine in other dtypes and
  weight formats (`bfloat16/gguf`, `float32/none`, ...) in the same alternation;
- Hugging Face transformers' batched `generate` in each of `--hf-dtype` (batches of `--hf-batch`
  prompts, left-padded, each batch generating its longest requested output, as vLLM's HF backend
  does; only the requested tokens count), in the same alternation;
- single-stream decode speed;
- model FLOPs utilisation against this machine's fp32 matmul peak, measured in the same run;
- with `--ceiling`, the MFU ceiling of the engine's own schedule: its steps replayed as the
  model's matmuls alone, plus the time to read each step's KV cache once at this machine's memory
  bandwidth (see `ceiling_seconds`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engram_serve.bench.harness import alternating, machine, progress, save, say
from engram_serve.config import EngineConfig, ModelConfig, OffloadConfig


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(
    num_seqs: int,
    low: int,
    high: int,
    vocab: int,
    seed: int = 0,
    output_len: int | None = None,
    corpus: np.ndarray | None = None,
) -> Workload:
    """Prompt lengths uniform in [low, high], output lengths too unless `output_len` fixes them;
    prompts of random ids, or windows of `corpus` (token ids of real text, `text_corpus`) at
    random offsets."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(low, high + 1, size=num_seqs)
    output_lens = rng.integers(low, high + 1, size=num_seqs)
    if output_len is not None:
        output_lens[:] = output_len
    if corpus is None:  # ids below 10,000 avoid special tokens, as nano-vllm's benchmark does
        prompts = [rng.integers(0, min(vocab, 10_000), size=n).tolist() for n in prompt_lens]
    else:
        starts = rng.integers(0, len(corpus) - high, size=num_seqs)
        prompts = [corpus[s : s + n].tolist() for s, n in zip(starts, prompt_lens, strict=True)]
    return Workload(prompts, output_lens.tolist())


def text_corpus(model_dir: Path) -> np.ndarray:
    """CPython's bundled documentation (pydoc topics: English prose and code examples), as the
    model's token ids: real text that every Python installation carries."""
    from pydoc_data.topics import topics

    from engram_serve.engine.tokenizer import Tokenizer

    return np.array(Tokenizer(model_dir).encode("\n".join(topics.values())), dtype=np.int64)


def matmul_peak_gflops(
    size: int = 2048, trials: int = 10, repeat: int = 2, device: str = "cpu"
) -> float:
    """This machine's fp32 matrix-multiply throughput with torch's own threads (or the GPU's):
    the best of `trials` timings, since other work on a shared machine only ever slows one down
    (on the 2-core VMs this project runs on, single timings range over 80-118 GFLOP/s on one
    CPU kind and 160-451 on another)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    seconds = best_seconds(lambda: [a @ b for _ in range(repeat)], trials, device)
    return 2 * size**3 * repeat / seconds / 1e9


def best_seconds(fn, trials: int, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    best = float("inf")
    for _ in range(trials):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def model_flops(config: ModelConfig, workload: Workload) -> float:
    """Matmul FLOPs of the workload: 2 x (weights used per token) per token computed, plus
    attention scores and values (4 x context x hidden per token per layer). The LM head runs once
    per output token (not on prompt tokens)."""
    hd = config.attn_head_dim
    attn_proj = (
        config.hidden_size * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    )
    mlp = 3 * config.hidden_size * config.intermediate_size
    per_token = 2 * config.num_hidden_layers * (attn_proj + mlp)
    lm_head = 2 * config.hidden_size * config.vocab_size
    attn_width = config.num_attention_heads * hd
    total = 0.0
    for prompt, out_len in zip(workload.prompts, workload.output_lens):
        tokens = len(prompt) + out_len
        context_sum = tokens * (tokens + 1) / 2  # each token attends to everything before it
        total += per_token * tokens + lm_head * out_len
        total += 4 * config.num_hidden_layers * attn_width * context_sum
    return total


def run_engine(engine, workload: Workload) -> float:
    """Seconds to finish every request."""
    from engram_serve.engine.request import SamplingParams

    start = time.perf_counter()
    for prompt, out_len in zip(workload.prompts, workload.output_lens):
        engine.add_request(
            prompt, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        )
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def load_hf(model_dir: Path, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """transformers' model of `model_dir`, for run_hf."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def run_hf(model: torch.nn.Module, workload: Workload, batch_size: int) -> float:
    """Seconds for transformers' batched `generate` to finish every request."""
    device = model.device
    pad = model.generation_config.pad_token_id or model.generation_config.eos_token_id or 0
    pad = pad[0] if isinstance(pad, list) else pad
    start = time.perf_counter()
    for i in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[i : i + batch_size]
        max_out = max(workload.output_lens[i : i + batch_size])
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=device)  # fmt: skip
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_out,
                min_new_tokens=max_out,
                do_sample=False,
                pad_token_id=pad,
            )
    return time.perf_counter() - start


@dataclass(frozen=True)
class Step:
    num_tokens: int  # rows through the layers
    num_sampled: int  # rows through the LM head
    kv_bytes: int  # the KV cache of every sequence's context after the step, all layers


class ScheduleRecorder(torch.nn.Module):
    """Wraps an engine's model and notes each step."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.steps: list[Step] = []

    def forward(self, batch) -> torch.Tensor:
        logits = self.model(batch)
        token_bytes = sum(2 * k[0, 0].numel() * k.element_size() for k in batch.cache.k)
        context = int(batch.attn.seq_lens.sum())
        self.steps.append(Step(batch.token_ids.numel(), logits.shape[0], context * token_bytes))
        return logits


def record_schedule(engine, workload: Workload) -> list[Step]:
    """The engine's steps for the workload, as ScheduleRecorder notes them."""
    model = engine.model
    engine.model = recorder = ScheduleRecorder(model)
    try:
        run_engine(engine, workload)
    finally:
        engine.model = model
    return recorder.steps


def memory_read_gbps(gib: int = 1, trials: int = 5) -> float:
    """This machine's memory read bandwidth with torch's threads: the best of `trials` sums
    over `gib` GiB."""
    a = torch.ones(gib << 28)
    return a.numel() * a.element_size() / best_seconds(a.sum, trials) / 1e9


def ceiling_seconds(config: ModelConfig, steps: list[Step], seed: int = 0) -> dict:
    """Replays `steps` as the model's matmuls alone: per layer the fused QKV, the output, the
    fused gate/up and the down projection, then the LM head on the sampled rows, with weights of
    the model's shapes (one set per layer, so they stream from memory as the model's do). Each
    step runs once with torch's `F.linear` (MKL) and once with the CPU kernel, and the faster
    counts (`best`). `kv_read` is the time to read every step's KV cache once at the measured
    memory bandwidth, which attention cannot do without. Norms, Engram, sampling and the
    attention arithmetic cost nothing here, so the workload's model FLOPs over `best + kv_read`
    seconds is the highest MFU an engine that runs its layers one after another could reach on
    this schedule with these kernels."""
    from engram_serve.kernels.cpu_linear import MAX_ROWS, linear_cpu

    gen = torch.Generator().manual_seed(seed)
    d, ff, hd = config.hidden_size, config.intermediate_size, config.attn_head_dim
    qkv = hd * (config.num_attention_heads + 2 * config.num_key_value_heads)
    shapes = [(qkv, d), (d, config.num_attention_heads * hd), (2 * ff, d), (d, ff)]
    layers = [
        [torch.randn(shape, generator=gen) for shape in shapes]
        for _ in range(config.num_hidden_layers)
    ]
    lm_head = torch.randn(config.vocab_size, d, generator=gen)

    def ours(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return linear_cpu(x, weight) if x.shape[0] <= MAX_ROWS else F.linear(x, weight)

    def step_inputs(step: Step) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Rows of each input width the layers take, and the LM head's rows."""
        inputs = {k: torch.randn(step.num_tokens, k, generator=gen) for _, k in shapes}
        return inputs, torch.randn(step.num_sampled, d, generator=gen)

    def step_seconds(kernel, inputs: dict[int, torch.Tensor], sampled: torch.Tensor) -> float:
        start = time.perf_counter()
        for weights in layers:
            for weight in weights:
                kernel(inputs[weight.shape[1]], weight)
        if len(sampled):
            kernel(sampled, lm_head)
        return time.perf_counter() - start

    for kernel in (F.linear, ours):  # warm-up: compiles the kernel, faults the weights in
        step_seconds(kernel, *step_inputs(steps[0]))
    seconds = {"mkl": 0.0, "ours": 0.0, "best": 0.0}
    for step in steps:
        inputs = step_inputs(step)  # the same rows for both kernels
        mkl, our = step_seconds(F.linear, *inputs), step_seconds(ours, *inputs)
        seconds["mkl"] += mkl
        seconds["ours"] += our
        seconds["best"] += min(mkl, our)
    gbps = memory_read_gbps()
    seconds["kv_read"] = sum(step.kv_bytes for step in steps) / gbps / 1e9
    return {"seconds": seconds["best"] + seconds["kv_read"], "parts": seconds, "read_gbps": gbps}


def single_stream_decode(engine, num_tokens: int = 64) -> float:
    """Decode tokens per second for one request (prefill excluded), of at most `num_tokens` (fewer
    where the engine's context length is shorter)."""
    from engram_serve.engine.request import SamplingParams

    prompt = [1, 2, 3, 4]
    num_tokens = min(num_tokens, engine.max_model_len - len(prompt) - 1)
    engine.add_request(
        prompt, SamplingParams(temperature=0.0, max_tokens=num_tokens + 1, ignore_eos=True)
    )
    engine.step()  # prefill and first token
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return num_tokens / (time.perf_counter() - start)


def add_workload_args(
    parser: argparse.ArgumentParser, num_seqs: int, low: int, high: int, max_num_batched_tokens: int
) -> None:
    """The workload's flags (`make_workload`) and the engine's step budget, with these defaults."""
    parser.add_argument("--num-seqs", type=int, default=num_seqs)
    parser.add_argument("--low", type=int, default=low, help="shortest prompt/output")
    parser.add_argument("--high", type=int, default=high, help="longest prompt/output")
    parser.add_argument("--max-num-batched-tokens", type=int, default=max_num_batched_tokens)


def workload_engine_config(args: argparse.Namespace, **fields: Any) -> EngineConfig:
    """An engine sized for the workload flags (`add_workload_args`) on `--device`."""
    return EngineConfig(
        max_num_seqs=args.num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=2 * args.high + 8,
        device=args.device,
        **fields,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="engram-serve bench throughput", description=__doc__)
    parser.add_argument("--model", default=None)
    add_workload_args(parser, num_seqs=64, low=100, high=1024, max_num_batched_tokens=2048)
    parser.add_argument("--output-len", type=int, default=None,
                        help="every output this long, at most --high (default: drawn as the "
                             "prompts' lengths)")
    parser.add_argument("--prompts", choices=["random", "text"], default="random",
                        help="random ids, or windows of real text (pydoc topics)")
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-dtype", nargs="+", default=["float32"],
                        help="transformers in each of these dtypes (float32 is `transformers`)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each engine, A B B A")
    parser.add_argument(
        "--also", nargs="*", default=[], metavar="DTYPE/QUANTIZATION",
        help="more engines (Engram on) beside the defaults, e.g. bfloat16/gguf float32/none",
    )  # fmt: skip
    parser.add_argument("--engram-tier", default="device")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the engines and transformers")
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also replay the engine's steps as matmuls and KV reads alone: its MFU ceiling",
    )
    parser.add_argument("--output", default="results/throughput.json")
    args = parser.parse_args(argv)
    if args.output_len is not None and not 1 <= args.output_len <= args.high:
        parser.error(f"--output-len must be in [1, --high = {args.high}]")

    from engram_serve.llm import build_engine, resolve_engine_config, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    engine_config = workload_engine_config(args, kv_cache_bytes=4 << 30)
    offload = OffloadConfig(tier=args.engram_tier)
    results: dict = {
        "machine": machine(),
        "num_seqs": args.num_seqs,
        "length_range": [args.low, args.high],
    }
    peaks = [matmul_peak_gflops(device=args.device)]
    engines = {
        "engram": build_engine(model_dir, engine_config, offload, enable_engram=True),
        "no_engram": build_engine(model_dir, engine_config, offload, enable_engram=False),
    }
    resolved = resolve_engine_config(engine_config, model_dir)
    results["defaults"] = {
        "dtype": resolved.dtype,
        "quantization": resolved.quantization,
        "kv_cache_dtype": resolved.cache_dtype,
    }
    for spec in args.also:  # the same engine in another dtype / weight format
        dtype, _, quantization = spec.partition("/")
        other = dataclasses.replace(engine_config, dtype=dtype, quantization=quantization or "auto")
        engines[spec] = build_engine(model_dir, other, offload, enable_engram=True)
    config = engines["engram"].model_config
    corpus = text_corpus(model_dir) if args.prompts == "text" else None
    workload = make_workload(args.num_seqs, args.low, args.high, config.vocab_size,
                             output_len=args.output_len, corpus=corpus)  # fmt: skip
    flops = model_flops(config, workload)
    results.update(
        prompt_tokens=workload.num_prompt_tokens,
        output_tokens=workload.num_output_tokens,
        model_gflop=flops / 1e9,
    )
    # transformers' models run in the same alternation as the engines.
    hf_names = {d: "transformers" if d == "float32" else f"transformers/{d}" for d in args.hf_dtype}
    hf_models = {} if args.skip_hf else {
        name: load_hf(model_dir, args.device, dtype) for dtype, name in hf_names.items()
    }  # fmt: skip
    runners = {name: partial(run_engine, engine, workload) for name, engine in engines.items()}
    runners |= {name: partial(run_hf, m, workload, args.hf_batch) for name, m in hf_models.items()}
    for engine in engines.values():
        run_engine(engine, make_workload(2, 8, 16, config.vocab_size, seed=1))  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    runs = alternating(list(runners), args.rounds)
    for i, (round_, name) in enumerate(progress(runs, "runs", total=args.rounds * len(runners))):
        if i % len(runners) == 0:  # before each round
            peaks.append(matmul_peak_gflops(device=args.device))
        seconds[name].append(runners[name]())
        say(f"round {round_ + 1}/{args.rounds} {name}: {seconds[name][-1]:.1f} s")
    del runners, hf_models  # transformers' models freed before the single-stream runs
    for name in seconds:
        median = float(np.median(seconds[name]))  # a round in a slow spell moves it least
        results[name] = {
            "seconds": median,
            "seconds_per_round": seconds[name],
            "output_tok_s": workload.num_output_tokens / median,
            "total_tok_s": (workload.num_output_tokens + workload.num_prompt_tokens) / median,
        }
    for name, engine in engines.items():
        results[name]["preemptions"] = engine.scheduler.num_preemptions
        results[name]["single_stream_decode_tok_s"] = single_stream_decode(engine)
    results["engram_vs_no_engram"] = (
        results["engram"]["output_tok_s"] / results["no_engram"]["output_tok_s"]
    )
    if args.ceiling:
        steps = record_schedule(engines["engram"], workload)
        peaks.append(matmul_peak_gflops(device=args.device))
        results["ceiling"] = ceiling_seconds(config, steps)
    del engines
    if "transformers" in results:
        results["engram_vs_transformers"] = (
            results["engram"]["output_tok_s"] / results["transformers"]["output_tok_s"]
        )
    # The peak is measured before every round and at the end, and the best kept: a shared
    # machine's speed drifts, and a run in a slow spell is not let off.
    peaks.append(matmul_peak_gflops(device=args.device))
    results["matmul_peak_gflops"] = peak = max(peaks)
    results["matmul_peak_gflops_each"] = peaks
    for name in ("engram", "no_engram", *args.also, *hf_names.values(), "ceiling"):
        if name in results:
            results[name]["mfu"] = flops / results[name]["seconds"] / 1e9 / peak
            _print_row(name, results[name])
    print(
        f"model FLOPs of the workload: {flops / 1e9:.1f} GFLOP; "
        f"matmul peak {results['matmul_peak_gflops']:.1f} GFLOP/s"
    )
    print(json.dumps(results, indent=2))
    save(results, args.output)
    return results


def _print_row(name: str, r: dict) -> None:
    extra = (
        f"  single-stream {r['single_stream_decode_tok_s']:.1f} tok/s"
        if "single_stream_decode_tok_s" in r
        else ""
    )
    speed = f"{r['output_tok_s']:8.1f} output tok/s" if "output_tok_s" in r else " " * 21
    print(f"{name:13s} {speed}  MFU {r['mfu']:.2f}  ({r['seconds']:.1f} s){extra}", flush=True)


if __name__ == "__main__":
    main()
