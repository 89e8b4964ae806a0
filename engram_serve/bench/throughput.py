"""Offline throughput, the Engram paper's protocol scaled to this machine: N sequences with prompt
and output lengths uniform in [low, high], random token ids, ignore_eos; output tokens per
second. One run measures, side by side on the same model and requests:

- our engine (Engram on, tables as configured) and our engine with Engram off, in `--rounds`
  alternating runs (A B B A ...), averaged;
- Hugging Face transformers' batched `generate` (batches of `--hf-batch` prompts, left-padded,
  each batch generating its longest requested output, as vLLM's HF backend does; only the
  requested tokens count);
- single-stream decode speed;
- model FLOPs utilisation against this machine's fp32 matmul peak, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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


def make_workload(num_seqs: int, low: int, high: int, vocab: int, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(low, high + 1, size=num_seqs)
    output_lens = rng.integers(low, high + 1, size=num_seqs)
    # Ids below 10,000 avoid special tokens, as nano-vllm's benchmark does.
    prompts = [rng.integers(0, min(vocab, 10_000), size=n).tolist() for n in prompt_lens]
    return Workload(prompts, output_lens.tolist())


def matmul_peak_gflops(size: int = 2048, trials: int = 10, repeat: int = 2) -> float:
    """This machine's fp32 matrix-multiply throughput with torch's own threads: the best of
    `trials` timings, since other work on a shared machine only ever slows one down (single
    timings here range over 80-118 GFLOP/s)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeat):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeat / best / 1e9


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


def run_hf(model_dir: Path, workload: Workload, batch_size: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = model.generation_config.pad_token_id or model.generation_config.eos_token_id or 0
    pad = pad[0] if isinstance(pad, list) else pad
    start = time.perf_counter()
    for i in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[i : i + batch_size]
        max_out = max(workload.output_lens[i : i + batch_size])
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
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


def single_stream_decode(engine, num_tokens: int = 64) -> float:
    """Decode tokens per second for one request (prefill excluded)."""
    from engram_serve.engine.request import SamplingParams

    engine.add_request(
        [1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=num_tokens + 1, ignore_eos=True)
    )
    engine.step()  # prefill and first token
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return num_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="engram-serve bench throughput", description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--low", type=int, default=100, help="shortest prompt/output")
    parser.add_argument("--high", type=int, default=1024, help="longest prompt/output")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each engine, A B B A")
    parser.add_argument("--engram-tier", default="device")
    parser.add_argument("--output", default="results/throughput.json")
    args = parser.parse_args(argv)

    from engram_serve.llm import build_engine, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    engine_config = EngineConfig(
        max_num_seqs=args.num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=2 * args.high + 8,
        kv_cache_bytes=4 << 30,
    )
    offload = OffloadConfig(tier=args.engram_tier)
    results: dict = {
        "num_seqs": args.num_seqs,
        "length_range": [args.low, args.high],
        "threads": torch.get_num_threads(),
    }
    peak_before = matmul_peak_gflops()
    engines = {
        "engram": build_engine(model_dir, engine_config, offload, enable_engram=True),
        "no_engram": build_engine(model_dir, engine_config, offload, enable_engram=False),
    }
    config = engines["engram"].model_config
    workload = make_workload(args.num_seqs, args.low, args.high, config.vocab_size)
    flops = model_flops(config, workload)
    results.update(
        prompt_tokens=workload.num_prompt_tokens,
        output_tokens=workload.num_output_tokens,
        model_gflop=flops / 1e9,
    )
    for engine in engines.values():
        run_engine(engine, make_workload(2, 8, 16, config.vocab_size, seed=1))  # warm-up
    # Rounds in A B B A order, so a drift in the machine's speed (other work, clocks) cancels
    # out of the ratio instead of landing on whichever engine ran second.
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(args.rounds):
        for name in list(engines)[:: 1 if round_ % 2 == 0 else -1]:
            seconds[name].append(run_engine(engines[name], workload))
            print(f"round {round_ + 1}/{args.rounds} {name}: {seconds[name][-1]:.1f} s", flush=True)
    for name, engine in engines.items():
        mean = sum(seconds[name]) / len(seconds[name])
        results[name] = {
            "seconds": mean,
            "seconds_per_round": seconds[name],
            "output_tok_s": workload.num_output_tokens / mean,
            "total_tok_s": (workload.num_output_tokens + workload.num_prompt_tokens) / mean,
            "preemptions": engine.scheduler.num_preemptions,
            "single_stream_decode_tok_s": single_stream_decode(engine),
        }
    results["engram_vs_no_engram"] = (
        results["engram"]["output_tok_s"] / results["no_engram"]["output_tok_s"]
    )
    del engines
    if not args.skip_hf:
        seconds = run_hf(model_dir, workload, args.hf_batch)
        results["transformers"] = {
            "seconds": seconds,
            "output_tok_s": workload.num_output_tokens / seconds,
        }
        results["engram_vs_transformers"] = (
            results["engram"]["output_tok_s"] / results["transformers"]["output_tok_s"]
        )
    # The peak is measured before and after the runs and the better one kept.
    results["matmul_peak_gflops"] = peak = max(peak_before, matmul_peak_gflops())
    for name in ("engram", "no_engram", "transformers"):
        if name in results:
            results[name]["mfu"] = flops / results[name]["seconds"] / 1e9 / peak
            _print_row(name, results[name])
    print(
        f"model FLOPs of the workload: {flops / 1e9:.1f} GFLOP; "
        f"matmul peak {results['matmul_peak_gflops']:.1f} GFLOP/s"
    )
    print(json.dumps(results, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    return results


def _print_row(name: str, r: dict) -> None:
    extra = (
        f"  single-stream {r['single_stream_decode_tok_s']:.1f} tok/s"
        if "single_stream_decode_tok_s" in r
        else ""
    )
    print(
        f"{name:13s} {r['output_tok_s']:8.1f} output tok/s  MFU {r['mfu']:.2f}  "
        f"({r['seconds']:.1f} s){extra}",
        flush=True,
    )


if __name__ == "__main__":
    main()
