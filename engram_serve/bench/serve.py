"""Serving benchmark: a load generator for any OpenAI-compatible server (engram-serve, vLLM, ...).

    engram-serve bench serve --base-url http://127.0.0.1:8000 --max-concurrency 8 \\
        --input-len 64:256 --output-len 32:64 --ignore-eos --goodput ttft:500 tpot:100

Every request streams with `stream_options.include_usage`. Per request the client records, on
its own clock: TTFT (send -> first chunk carrying output), the gaps between output chunks (ITL),
end-to-end latency (send -> last output chunk; the trailing usage chunk does not count) and the
output tokens the server reports in the usage chunk. A chunk carrying several tokens is one gap,
so ITL can read lower than TPOT = (latency - TTFT) / (output tokens - 1).

Datasets: `random` sends random token ids as `prompt: [ids]` to /v1/completions (the prompt length
is then exact and needs no tokenizer here; a length range LO:HI is drawn uniformly, a single
number is a fixed length); `text` reads one prompt per non-empty line; `jsonl` reads objects with
"prompt" (text or token ids) and optionally "max_tokens". Arrivals: all at once (rate inf),
Poisson at --request-rate, or gamma with shape --burstiness (< 1 burstier, > 1 smoother); at
most --max-concurrency requests in flight. A failed request (HTTP error, error event, dropped
stream) is counted and its message kept, never dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from engram_serve.bench.harness import figure, machine, save

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
SLO_METRICS = ("ttft", "tpot", "e2el")  # what --goodput may bound, in ms
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]
    max_tokens: int
    prompt_len: int | None  # known for token-id prompts; text prompts learn it from usage
    extra: dict[str, Any] = field(default_factory=dict)  # body fields of this request alone


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start_s: float = 0.0  # send time, seconds after the benchmark started
    ttft_s: float | None = None  # None when the request failed
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunk_s: list[float] = field(default_factory=list)  # output chunk arrivals, from start_s
    max_tokens: int = 0  # as requested
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_missing: bool = False

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.latency_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


# -- datasets -------------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, int]:
    """N -> (N, N); "LOW:HIGH" -> (LOW, HIGH); "64:256" -> (64, 256), both ends included."""
    try:
        low, _, high = text.partition(":")
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW:HIGH, got {text!r}") from None
    if not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"need 0 < LOW <= HIGH, got {text!r}")
    return bounds


def random_requests(
    num: int, input_len: tuple[int, int], output_len: tuple[int, int],
    id_range: tuple[int, int], rng: np.random.Generator,
) -> list[BenchRequest]:
    in_lens = rng.integers(input_len[0], input_len[1] + 1, size=num)
    out_lens = rng.integers(output_len[0], output_len[1] + 1, size=num)
    return [
        BenchRequest(rng.integers(id_range[0], id_range[1], size=n).tolist(), int(m), int(n))
        for n, m in zip(in_lens, out_lens, strict=True)
    ]


def file_requests(
    path: Path, kind: str, num: int | None, output_len: tuple[int, int], rng: np.random.Generator
) -> list[BenchRequest]:
    """Prompts in file order, cycled when `num` asks for more than the file holds."""
    entries = [_entry(line, kind, path, i) for i, line in enumerate(path.read_text().splitlines())
               if line.strip()]
    if not entries:
        raise SystemExit(f"{path} holds no prompts")
    num = num or len(entries)
    out_lens = rng.integers(output_len[0], output_len[1] + 1, size=num)
    requests = []
    for i in range(num):
        prompt, max_tokens = entries[i % len(entries)]
        length = len(prompt) if isinstance(prompt, list) else None
        requests.append(BenchRequest(prompt, max_tokens or int(out_lens[i]), length))
    return requests


def _entry(line: str, kind: str, path: Path, index: int) -> tuple[str | list[int], int | None]:
    if kind == "text":
        return line, None
    where = f"{path} line {index + 1}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{where}: not JSON ({e})") from None
    prompt = record.get("prompt") if isinstance(record, dict) else None
    is_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
    if not (isinstance(prompt, str) or is_ids):
        raise SystemExit(f'{where}: needs "prompt": a string or a list of token ids')
    max_tokens = record.get("max_tokens")
    if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens > 0):
        raise SystemExit(f'{where}: "max_tokens" must be a positive integer')
    return prompt, max_tokens


def arrival_times(num: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start. Gaps are gamma(shape=burstiness, mean=1/rate):
    burstiness 1 is a Poisson process; rate inf sends everything at once."""
    if math.isinf(rate):
        return np.zeros(num)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)
    gaps[0] = 0.0  # the first request starts the clock
    return np.cumsum(gaps)


def parse_percentiles(text: str) -> list[float]:
    """"90,99" -> [90.0, 99.0]."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 90,99, got {text!r}") from None
    if not all(0 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"percentiles lie in [0, 100], got {text!r}")
    return values


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:100"] -> {"ttft": 500.0, "tpot": 100.0} (milliseconds)."""
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS:
            raise SystemExit(f"--goodput: unknown metric {name!r}; choose from {SLO_METRICS}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise SystemExit(f"--goodput: {item!r} needs a number of ms, e.g. {name}:500") from None
        if slos[name] <= 0:
            raise SystemExit(f"--goodput: {item!r} must be positive")
    return slos


# -- one request ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    base_url: str
    endpoint: str
    model: str
    headers: dict[str, str]
    sampling: dict[str, Any]  # extra body fields: temperature, ignore_eos, --extra-body

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "stream": True, "stream_options": {"include_usage": True},
            **self.sampling, **request.extra,
        }
        if self.endpoint == CHAT:
            body["messages"] = [{"role": "user", "content": request.prompt}]
            body["max_completion_tokens"] = request.max_tokens
        else:
            body["prompt"] = request.prompt
            body["max_tokens"] = request.max_tokens
        return body


def _is_output(chunk: dict[str, Any], endpoint: str) -> bool:
    """Whether a chunk carries generated output. Completions: any choice (its text may be empty,
    e.g. a special token). Chat: content, reasoning or tool calls, or the finish; the opening
    role-only delta is sent before any token exists and does not count."""
    choices = chunk.get("choices") or []
    if endpoint != CHAT:
        return bool(choices)
    keys = ("content", "reasoning_content", "reasoning", "tool_calls")
    return any(
        any(c.get("delta", {}).get(k) for k in keys) or c.get("finish_reason") for c in choices
    )


async def send(client: httpx.AsyncClient, target: Target, request: BenchRequest,
               clock0: float) -> RequestResult:
    result = RequestResult(max_tokens=request.max_tokens, prompt_tokens=request.prompt_len or 0)
    sent = time.perf_counter()
    result.start_s = sent - clock0
    usage = None
    try:
        url, body = target.base_url + target.endpoint, target.body(request)
        async with client.stream("POST", url, json=body, headers=target.headers) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {_error_message(response.text)}"
                return result
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, ": comments"
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return finish(result, usage)
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error event: {_error_message(data)}"
                    return result
                usage = chunk.get("usage") or usage
                if _is_output(chunk, target.endpoint):
                    result.chunk_s.append(now - sent)
    except Exception as e:  # a failed request is a result to count, never a crash of the run
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.error = "the stream ended without data: [DONE]"
    return result


def finish(result: RequestResult, usage: dict[str, Any] | None) -> RequestResult:
    """Fill in the timings of a stream that ended with [DONE], from its output chunk times."""
    if not result.chunk_s:
        result.error = "the stream ended without any output"
        return result
    result.ok = True
    result.ttft_s, result.latency_s = result.chunk_s[0], result.chunk_s[-1]
    result.itl_s = np.diff(result.chunk_s).tolist()
    if usage and "completion_tokens" in usage:
        result.output_tokens = int(usage["completion_tokens"])
        result.prompt_tokens = int(usage.get("prompt_tokens") or result.prompt_tokens)
    else:  # the server ignored include_usage: one token per chunk is the best guess
        result.output_tokens, result.usage_missing = len(result.chunk_s), True
    return result


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:300] or "(empty body)"
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return str(error)[:300]


# -- the run --------------------------------------------------------------------------------------


async def run_requests(
    target: Target, requests: list[BenchRequest], arrivals: np.ndarray,
    max_concurrency: int | None, timeout_s: float, num_warmups: int, progress: bool,
) -> tuple[list[RequestResult], float]:
    """Send `requests` at their arrival times; return their results (in order) and the seconds
    from the first send to the last answer."""
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=30.0, pool=None)
    gate = asyncio.Semaphore(max_concurrency or len(requests))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        for _ in range(num_warmups):  # also a readiness check: a broken setup fails here, loudly
            warm = await send(client, target, requests[0], time.perf_counter())
            if not warm.ok:
                raise SystemExit(f"the warm-up request failed: {warm.error}")
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)

        async def limited(request: BenchRequest) -> RequestResult:
            async with gate:
                result = await send(client, target, request, clock0)
            bar.update(1)
            return result

        clock0 = time.perf_counter()
        tasks = []
        for request, at in zip(requests, arrivals, strict=True):
            delay = clock0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - clock0
        bar.close()
    return list(results), duration


# -- metrics --------------------------------------------------------------------------------------


def summarize(
    results: list[RequestResult], duration_s: float, slos: dict[str, float],
    percentiles: list[float],
) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    samples_ms = {
        "ttft": [r.ttft_s * 1e3 for r in done],
        "tpot": [r.tpot_s * 1e3 for r in done if r.tpot_s is not None],
        "itl": [gap * 1e3 for r in done for gap in r.itl_s],
        "e2el": [r.latency_s * 1e3 for r in done],
    }
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    good = sum(_meets(r, slos) for r in done)
    timeline = throughput_timeline(done)
    summary: dict[str, Any] = {
        "duration_s": duration_s,
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "peak_output_throughput": max(timeline["output_tok_s"], default=0.0),
        "peak_concurrent_requests": peak_concurrency(done),
        "goodput_slos_ms": slos,
        "good_requests": good if slos else None,
        "request_goodput": good / duration_s if slos else None,
        "usage_missing": sum(r.usage_missing for r in done),
        "errors": dict(Counter(r.error for r in results if not r.ok).most_common()),
    }
    for name, values in samples_ms.items():
        summary.update(_stats(name, values, percentiles))
    summary["timeline"] = timeline
    return summary


def _stats(name: str, values_ms: list[float], percentiles: list[float]) -> dict[str, float | None]:
    keys = ["mean", "median", "std", *(f"p{p:g}" for p in percentiles)]
    if not values_ms:
        return {f"{k}_{name}_ms": None for k in keys}
    v = np.asarray(values_ms)
    stats = [v.mean(), np.median(v), v.std(), *np.percentile(v, percentiles)]
    return {f"{k}_{name}_ms": float(s) for k, s in zip(keys, stats, strict=True)}


def _meets(result: RequestResult, slos: dict[str, float]) -> bool:
    """DistServe's goodput: a request counts when every bounded metric is within its SLO
    (TPOT of a one-token answer is undefined and taken as met)."""
    measured = {"ttft": result.ttft_s, "tpot": result.tpot_s, "e2el": result.latency_s}
    return all(measured[k] is None or measured[k] * 1e3 <= limit for k, limit in slos.items())


def throughput_timeline(done: list[RequestResult], bucket_s: float = 1.0) -> dict[str, list]:
    """Output tokens per second and requests in flight, per `bucket_s`. A request's tokens are
    spread evenly over its output chunks (exact when each chunk is one token)."""
    if not done:
        return {"t_s": [], "output_tok_s": [], "in_flight": []}
    end = max(r.start_s + r.latency_s for r in done)
    edges = np.arange(0.0, end + bucket_s, bucket_s)
    times = np.concatenate([r.start_s + np.asarray(r.chunk_s) for r in done])
    weights = np.concatenate([np.full(len(r.chunk_s), r.output_tokens / len(r.chunk_s))
                              for r in done])
    tokens, _ = np.histogram(times, bins=edges, weights=weights)
    mids = edges[:-1] + bucket_s / 2
    in_flight = [int(sum(r.start_s <= t < r.start_s + r.latency_s for r in done)) for t in mids]
    return {"t_s": mids.tolist(), "output_tok_s": (tokens / bucket_s).tolist(),
            "in_flight": in_flight}


def peak_concurrency(done: list[RequestResult]) -> int:
    events = sorted([(r.start_s, 1) for r in done] + [(r.start_s + r.latency_s, -1) for r in done])
    level = peak = 0
    for _, step in events:  # ends sort before starts at the same instant
        level += step
        peak = max(peak, level)
    return peak


# -- report ---------------------------------------------------------------------------------------


def format_table(s: dict[str, Any], percentiles: list[float]) -> str:
    rows: list[tuple[str, Any]] = [
        ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]),
        ("Maximum request concurrency", s["max_concurrency"]),
        ("Request rate configured (RPS)", s["request_rate"]),
        ("Benchmark duration (s)", s["duration_s"]),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", s["request_throughput"]),
    ]
    if s["request_goodput"] is not None:
        rows.append(("Request goodput (req/s)", s["request_goodput"]))
    rows += [
        ("Output token throughput (tok/s)", s["output_throughput"]),
        ("Peak output token throughput (tok/s)", s["peak_output_throughput"]),
        ("Peak concurrent requests", s["peak_concurrent_requests"]),
        ("Total token throughput (tok/s)", s["total_token_throughput"]),
    ]
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]
    lines += [_row(label, value) for label, value in rows]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in LATENCY_METRICS:
        lines.append("{:-^60}".format(f" {titles[name]} "))
        for stat in ["mean", "median", *(f"p{p:g}" for p in percentiles)]:
            label = f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {name.upper()} (ms)"
            lines.append(_row(label, s[f"{stat}_{name}_ms"]))
    lines.append("=" * 60)
    if s["errors"]:
        lines += ["Errors:"] + [f"  {n} x {message}" for message, n in s["errors"].items()]
    return "\n".join(lines)


def _row(label: str, value: Any) -> str:
    if isinstance(value, float) and not math.isinf(value):
        value = f"{value:.2f}"
    return f"{label + ':':<44}{'-' if value is None else value:>16}"


def plot(results: list[RequestResult], summary: dict[str, Any], path: Path) -> None:
    """Latency CDFs (TTFT, E2EL; TPOT, ITL) and output throughput over time."""
    done = [r for r in results if r.ok]
    series = {
        "ttft": [r.ttft_s * 1e3 for r in done],
        "e2el": [r.latency_s * 1e3 for r in done],
        "tpot": [r.tpot_s * 1e3 for r in done if r.tpot_s is not None],
        "itl": [g * 1e3 for r in done for g in r.itl_s],
    }
    with figure(path, 3, (16, 4.5), dpi=100) as (fig, axes):
        for ax, names in zip(axes[:2], [("ttft", "e2el"), ("tpot", "itl")], strict=False):
            for name in names:
                values = np.sort(series[name])
                if len(values):
                    ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                            label=name.upper())
            ax.set(xlabel="ms", ylabel="fraction of samples", title="CDF: " + ", ".join(
                n.upper() for n in names))
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
        timeline, ax = summary["timeline"], axes[2]
        ax.step(timeline["t_s"], timeline["output_tok_s"], where="mid", color="tab:blue")
        ax.set(xlabel="time since start (s)", ylabel="output tok/s (1 s buckets)",
               title="Throughput over time")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.step(timeline["t_s"], timeline["in_flight"], where="mid", color="tab:orange",
                  alpha=0.7)
        twin.set_ylabel("requests in flight", color="tab:orange")
        twin.set_ylim(bottom=0)
        concurrency = summary["max_concurrency"] or "unlimited"
        fig.suptitle(f"{summary['model']} @ {summary['base_url']}: {summary['completed']} ok, "
                     f"{summary['failed']} failed, max concurrency {concurrency}")


# -- CLI ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram-serve bench serve", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_argument_group("server")
    target.add_argument("--base-url", default="http://127.0.0.1:8000")
    target.add_argument("--endpoint", default=COMPLETIONS, choices=[COMPLETIONS, CHAT])
    target.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    target.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer key (default: $OPENAI_API_KEY)")
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", default="random", choices=["random", "text", "jsonl"])
    data.add_argument("--dataset-path", type=Path, help="the text or JSONL file")
    data.add_argument("--num-prompts", type=int, default=None,
                      help="requests to send (default: 100 random, or every prompt in the file)")
    data.add_argument("--input-len", type=parse_range, default=(64, 256),
                      help="random prompt length in tokens: N or LOW:HIGH (uniform)")
    data.add_argument("--output-len", type=parse_range, default=(32, 64),
                      help="max_tokens: N or LOW:HIGH (uniform); JSONL max_tokens wins")
    data.add_argument("--token-id-range", type=parse_range, default=(100, 10_000),
                      help="random prompt token ids are drawn from [LOW, HIGH)")
    data.add_argument("--seed", type=int, default=0, help="seed of the dataset and arrivals")
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="requests per second (default inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier")
    load.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    load.add_argument("--num-warmups", type=int, default=1, help="untimed requests sent first")
    load.add_argument("--request-timeout", type=float, default=600.0,
                      help="seconds a request may wait for its next bytes")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument("--ignore-eos", action="store_true",
                          help="send ignore_eos (vLLM/engram-serve extension) for exact lengths")
    sampling.add_argument("--constrained-body", type=json.loads, default={},
                          help="JSON fields added to the constrained requests' bodies alone (a "
                               "response_format, a guided_json, ...)")
    sampling.add_argument("--constrained-fraction", type=float, default=0.0,
                          help="the share of requests, spread evenly, that get --constrained-body")
    sampling.add_argument("--extra-body", type=json.loads, default={},
                          help="JSON object merged into every request body")
    report = parser.add_argument_group("report")
    report.add_argument("--goodput", nargs="+", metavar="METRIC:MS",
                        help="SLOs for goodput, e.g. ttft:500 tpot:100 e2el:5000")
    report.add_argument("--percentiles", type=parse_percentiles, default=[90.0, 99.0],
                        help="percentiles to report besides mean and median (default 90,99)")
    report.add_argument("--output", type=Path, default=Path("results/bench_serve.json"),
                        help="JSON results; the PNG goes beside it")
    report.add_argument("--save-detailed", action="store_true",
                        help="keep every request's inter-token gaps in the JSON")
    report.add_argument("--no-plot", action="store_true")
    report.add_argument("--no-progress", action="store_true")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.dataset != "random" and args.dataset_path is None:
        parser.error(f"--dataset {args.dataset} needs --dataset-path")
    if args.dataset == "random" and args.endpoint == CHAT:
        parser.error("random prompts are token ids, which only /v1/completions takes; "
                     "use a text or jsonl dataset for chat")
    for name in ("num_prompts", "max_concurrency"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.request_rate <= 0 or args.burstiness <= 0:
        parser.error("--request-rate and --burstiness must be positive")
    if not isinstance(args.extra_body, dict) or not isinstance(args.constrained_body, dict):
        parser.error("--extra-body and --constrained-body must be JSON objects")
    if not 0.0 <= args.constrained_fraction <= 1.0:
        parser.error("--constrained-fraction must be in [0, 1]")
    if args.constrained_fraction > 0 and not args.constrained_body:
        parser.error("--constrained-fraction needs --constrained-body")


def load_requests(args: argparse.Namespace, rng: np.random.Generator) -> list[BenchRequest]:
    if args.dataset == "random":
        requests = random_requests(args.num_prompts or 100, args.input_len, args.output_len,
                                   args.token_id_range, rng)  # fmt: skip
    else:
        requests = file_requests(
            args.dataset_path, args.dataset, args.num_prompts, args.output_len, rng
        )
    if args.endpoint == CHAT and any(isinstance(r.prompt, list) for r in requests):
        raise SystemExit(f"{args.dataset_path}: token-id prompts need --endpoint {COMPLETIONS}")
    return constrain(requests, args.constrained_fraction, args.constrained_body)


def constrain(
    requests: list[BenchRequest], fraction: float, body: dict[str, Any]
) -> list[BenchRequest]:
    """Request i gets `body` where floor((i + 1) f) > floor(i f): round(n f) of n, spread evenly
    (f = 0.5: every second one), so constrained and free requests share the same load."""
    return [
        replace(r, extra=body) if math.floor((i + 1) * fraction) > math.floor(i * fraction) else r
        for i, r in enumerate(requests)
    ]


def first_model(base_url: str, headers: dict[str, str]) -> str:
    try:
        response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise SystemExit(f"could not read the model id from {base_url}/v1/models ({e}); "
                         "pass --model") from None


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    slos = parse_goodput(args.goodput)
    rng = np.random.default_rng(args.seed)
    requests = load_requests(args, rng)
    arrivals = arrival_times(len(requests), args.request_rate, args.burstiness, rng)
    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sampling = {"temperature": args.temperature}
    if args.ignore_eos:
        sampling["ignore_eos"] = True
    sampling.update(args.extra_body)
    target = Target(base_url, args.endpoint, args.model or first_model(base_url, headers), headers,
                    sampling)

    settings = _settings(args, target)  # the load average before the run, among them
    results, duration = asyncio.run(run_requests(
        target, requests, arrivals, args.max_concurrency, args.request_timeout, args.num_warmups,
        progress=not args.no_progress,
    ))
    summary = {
        **settings,
        **summarize(results, duration, slos, args.percentiles),
        "requests": [_request_record(r, args.save_detailed) for r in results],
    }
    print(format_table(summary, args.percentiles))
    save(summary, args.output, None if args.no_plot else partial(plot, results, summary),
         allow_nan=False)  # fmt: skip
    return summary


def _settings(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """What was run, where, and how busy this machine was (a shared machine skews latencies)."""
    return {
        "machine": machine(), "base_url": target.base_url,
        "endpoint": target.endpoint, "model": target.model, "dataset": args.dataset,
        "input_len": list(args.input_len) if args.dataset == "random" else None,
        "output_len": list(args.output_len),
        # JSON has no infinity; "inf" is what --request-rate takes.
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "sampling": target.sampling,
        "constrained_fraction": args.constrained_fraction,
        "constrained_body": args.constrained_body,
    }


def _request_record(result: RequestResult, detailed: bool) -> dict[str, Any]:
    record = asdict(result)
    record.pop("chunk_s")
    record["tpot_s"] = result.tpot_s
    if not detailed:
        record.pop("itl_s")
    return record


if __name__ == "__main__":
    main()
