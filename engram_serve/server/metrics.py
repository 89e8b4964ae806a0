"""Prometheus metrics, named as vLLM names them with the prefix `engram_serve_`, and the periodic
stats log line.

Everything is updated on the engine thread by `ServerMetrics.observe` (after each step, each batch
of commands, and on idle wake-ups), so values that live in objects only that thread may touch
(the scheduler, the prefetcher's counters) are read safely. The structured-output metrics are the
exception: the route that compiled a request's grammar updates them (`observe_structured`;
prometheus_client's metrics are thread-safe). Cumulative engine counters become
Prometheus counters by adding what changed since the previous call.

With several worker processes, set PROMETHEUS_MULTIPROC_DIR (to an empty directory) before the
workers start: prometheus_client then keeps values in files there, `render_metrics` merges every
process's files, and gauges combine as their `multiprocess_mode` says.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)

from engram_serve.engine.engine import Engine
from engram_serve.engine.request import RequestOutput, StructuredOutputs

logger = logging.getLogger("engram_serve.stats")

PREFIX = "engram_serve_"
FINISH_REASONS = ("stop", "length", "abort", "error")  # request_success_total's label values
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
COMPILE_BUCKETS = (1e-5, 1e-4, 1e-3, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)  # fmt: skip
STALL_BUCKETS = (1e-5, 1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 10.0)  # fmt: skip


def length_buckets(max_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_len."""
    buckets, scale = [], 1
    while True:
        for step in (1, 2, 5):
            if step * scale > max_len:
                return buckets
            buckets.append(step * scale)
        scale *= 10


def is_multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The exposition text: this process's registry, or every worker's merged."""
    if is_multiprocess():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


def mark_process_dead() -> None:
    """Drop this worker's live gauges from the merged view (call when a worker exits)."""
    if is_multiprocess():
        multiprocess.mark_process_dead(os.getpid())


class ServerMetrics:
    """The metrics of one engine; `observe` is the AsyncEngine's per-step callback."""

    def __init__(
        self,
        model_name: str,
        max_model_len: int,
        registry: CollectorRegistry | None = None,
        stats_interval_s: float = 10.0,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        if not is_multiprocess():  # process_* metrics have no meaning once merged
            ProcessCollector(registry=self.registry)
        self.labels = {"model_name": model_name}
        self._make_engine_metrics(max_model_len)
        self.engram = EngramMetrics(self.registry, model_name)
        self.stats_logger = StatsLogger(stats_interval_s)
        self._last = {"prompt": 0, "generation": 0, "preemptions": 0, "read_errors": 0}
        self._tokens_seen: dict[str, tuple[int, float | None]] = {}  # id -> (count, last time)

    def _make_engine_metrics(self, max_model_len: int) -> None:
        names, r = list(self.labels), self.registry

        def gauge(name: str, doc: str, mode: str) -> Gauge:
            return Gauge(PREFIX + name, doc, names, registry=r, multiprocess_mode=mode)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, names + list(extra), registry=r)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, names, registry=r, buckets=buckets)

        self.num_running = gauge("num_requests_running", "Requests in the batch.", "livesum")
        self.num_waiting = gauge("num_requests_waiting", "Requests waiting to run.", "livesum")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV cache usage, 1 = 100%.", "livemax")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens computed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Requests preempted (by recompute).")
        self.read_errors = counter(
            "engram_read_errors", "Steps whose Engram rows could not be read (requests failed)."
        )
        self.request_success = counter(
            "request_success", "Finished requests, by finish reason.", ("finished_reason",)
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS
        )
        self.itl = histogram("inter_token_latency_seconds", "Between output tokens.", ITL_BUCKETS)
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS
        )
        lengths = length_buckets(max_model_len)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt length.", lengths)
        self.generation_len = histogram(
            "request_generation_tokens", "Generated tokens per request.", lengths
        )
        self.structured_requests = counter(
            "structured_output_requests",
            "Requests with a structured output (engine requests: n per prompt), by kind.",
            ("kind",),
        )
        self.grammar_compile = histogram(
            "structured_output_compile_seconds",
            "Seconds a request's grammar took to compile (a cached one: microseconds).",
            COMPILE_BUCKETS,
        )
        # Every series exists from the start, at 0: a dashboard shows 0 rather than "no data".
        for metric in (
            self.num_running, self.num_waiting, self.kv_usage, self.prompt_tokens,
            self.generation_tokens, self.preemptions, self.read_errors, self.ttft, self.itl,
            self.e2e, self.queue_time, self.prompt_len, self.generation_len,
            self.grammar_compile,
        ):  # fmt: skip
            metric.labels(**self.labels)
        for reason in FINISH_REASONS:
            self.request_success.labels(**self.labels, finished_reason=reason)
        for kind in StructuredOutputs.KINDS:
            self.structured_requests.labels(**self.labels, kind=kind)

    def observe_structured(self, kind: str, num_requests: int, compile_s: float) -> None:
        """Engine requests added with a structured output of `kind`, and its compile time."""
        self.structured_requests.labels(**self.labels, kind=kind).inc(num_requests)
        self.grammar_compile.labels(**self.labels).observe(compile_s)

    # -- called on the engine thread ------------------------------------------------------------

    def observe(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        self._observe_requests(outputs)
        self._observe_engine(engine)
        prefetcher = getattr(getattr(engine, "engram", None), "prefetcher", None)
        engram_stats = read_engram_stats(prefetcher)
        self.engram.update(engram_stats)
        self.stats_logger.maybe_log(engine, engram_stats, time.monotonic())

    def _observe_requests(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            timing = output.metrics
            count = len(output.outputs[0].token_ids)
            seen, last_time = self._tokens_seen.get(output.request_id, (0, None))
            if timing is not None and count > seen and timing.last_token_time is not None:
                if seen == 0 and timing.first_token_time is not None:
                    self.ttft.labels(**self.labels).observe(
                        timing.first_token_time - timing.arrival_time
                    )
                elif last_time is not None:
                    gap = (timing.last_token_time - last_time) / (count - seen)
                    for _ in range(count - seen):
                        self.itl.labels(**self.labels).observe(gap)
                self._tokens_seen[output.request_id] = (count, timing.last_token_time)
            if output.finished:
                self._tokens_seen.pop(output.request_id, None)
                self._observe_finished(output)

    def _observe_finished(self, output: RequestOutput) -> None:
        completion, timing = output.outputs[0], output.metrics
        reason = completion.finish_reason or "unknown"
        self.request_success.labels(**self.labels, finished_reason=reason).inc()
        self.prompt_len.labels(**self.labels).observe(len(output.prompt_token_ids))
        self.generation_len.labels(**self.labels).observe(len(completion.token_ids))
        if timing is None:
            return
        if timing.finished_time is not None:
            self.e2e.labels(**self.labels).observe(timing.finished_time - timing.arrival_time)
        if timing.first_scheduled_time is not None:
            self.queue_time.labels(**self.labels).observe(
                timing.first_scheduled_time - timing.arrival_time
            )

    def _observe_engine(self, engine: Engine) -> None:
        self.num_running.labels(**self.labels).set(engine.num_running)
        self.num_waiting.labels(**self.labels).set(engine.num_waiting)
        self.kv_usage.labels(**self.labels).set(engine.kv_cache_usage)
        current = {
            "prompt": engine.stats.num_prompt_tokens,
            "generation": engine.stats.num_generation_tokens,
            "preemptions": engine.scheduler.num_preemptions,
            "read_errors": engine.stats.num_failed_steps,
        }
        counters = {
            "prompt": self.prompt_tokens,
            "generation": self.generation_tokens,
            "preemptions": self.preemptions,
            "read_errors": self.read_errors,
        }
        for key, value in current.items():
            if value > self._last[key]:
                counters[key].labels(**self.labels).inc(value - self._last[key])
            self._last[key] = value


# -- Engram offload -------------------------------------------------------------------------------


def read_engram_stats(prefetcher: Any) -> Mapping[str, Any]:
    """The prefetcher's cumulative counters (`stats`, a property or a method), or {}."""
    if prefetcher is None:
        return {}
    stats = getattr(prefetcher, "stats", None)
    if callable(stats):
        stats = stats()
    return stats if isinstance(stats, Mapping) else {}


def per_tier(value: Any, default_tier: str) -> dict[str, float]:
    """A counter given per tier ({tier: n}) or as one number (for `default_tier`)."""
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items() if isinstance(v, int | float)}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {default_tier: value}
    return {}


class EngramMetrics:
    """Engram offload metrics from the prefetcher's stats dict. Keys read (each optional; others
    are ignored):

        lookups        int                 row lookups (tokens x hash columns), all layers
        cache_hits     int | {tier: int}   fast-tier cache hits (a bare number: tier "cache")
        cache_misses   int | {tier: int}
        rows_read      {tier: int}         rows read from each backing tier
        bytes_read     {tier: int}
        stall_s        float               seconds the model waited for rows (cumulative)
        steps          int                 prefetches started (one per engine step)
        table_bytes    {tier: int}         bytes of tables (and cache) held in each tier
        tier           str                 the backing tier
        tier_state     str                 "ready", or why the tier cannot serve rows now
    """

    COUNTERS = {
        "lookups": ("engram_lookups", "Engram row lookups."),
        "cache_hits": ("engram_cache_hits", "Engram row-cache hits, by tier."),
        "cache_misses": ("engram_cache_misses", "Engram row-cache misses, by tier."),
        "rows_read": ("engram_rows_read", "Engram rows read, by tier."),
        "bytes_read": ("engram_bytes_read", "Engram bytes read, by tier."),
    }

    def __init__(self, registry: CollectorRegistry, model_name: str):
        self.model_name = model_name
        labels = ["model_name", "tier"]
        self.counters = {
            key: Counter(PREFIX + name, doc, labels, registry=registry)
            for key, (name, doc) in self.COUNTERS.items()
        }
        self.table_bytes = Gauge(
            PREFIX + "engram_table_bytes", "Bytes of Engram tables held, by tier.", labels,
            registry=registry, multiprocess_mode="livemax",
        )
        self.tables_ready = Gauge(
            PREFIX + "engram_tables_ready",
            "1 while the Engram tables can be read, 0 while not (a remote store down or "
            "unpublished), by tier.", labels, registry=registry, multiprocess_mode="livemin",
        )  # fmt: skip
        self.stall = Histogram(
            PREFIX + "engram_prefetch_stall_seconds",
            "Per step, seconds the model waited for Engram rows.",
            ["model_name"], registry=registry, buckets=STALL_BUCKETS,
        )
        self._last: dict[tuple[str, str], float] = {}
        self._last_stall, self._last_steps = 0.0, 0

    def update(self, stats: Mapping[str, Any]) -> None:
        if not stats:
            return
        for key, counter in self.counters.items():
            default_tier = "cache" if key.startswith("cache_") else "all"
            for tier, value in per_tier(stats.get(key), default_tier).items():
                delta = self._delta((key, tier), value)
                if delta > 0:
                    counter.labels(self.model_name, tier).inc(delta)
        for tier, value in per_tier(stats.get("table_bytes"), "all").items():
            self.table_bytes.labels(self.model_name, tier).set(value)
        if isinstance(stats.get("tier_state"), str):
            ready = stats["tier_state"] == "ready"
            self.tables_ready.labels(self.model_name, str(stats.get("tier"))).set(ready)
        self._update_stall(stats)

    def _delta(self, key: tuple[str, str], value: float) -> float:
        """What a cumulative value gained; a value that went down was reset and counts whole."""
        last = self._last.get(key, 0)
        self._last[key] = value
        return value - last if value >= last else value

    def _update_stall(self, stats: Mapping[str, Any]) -> None:
        stall, steps = stats.get("stall_s"), stats.get("steps")
        if not isinstance(stall, int | float):
            return
        stepped = steps != self._last_steps if steps is not None else stall != self._last_stall
        if stepped:  # one observation per engine step (a reset counts from zero)
            waited = stall - self._last_stall if stall >= self._last_stall else stall
            self.stall.labels(self.model_name).observe(waited)
        self._last_stall, self._last_steps = stall, steps


# -- the log line ---------------------------------------------------------------------------------


class StatsLogger:
    """Every `interval_s`, while there is work: throughput over the interval, queue sizes, KV
    usage and the Engram cache hit rate."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._last_time = time.monotonic()
        self._last = (0, 0, 0.0, 0.0)  # prompt tokens, generation tokens, hits, misses
        self._was_active = False

    def maybe_log(self, engine: Engine, engram_stats: Mapping[str, Any], now: float) -> None:
        elapsed = now - self._last_time
        if self.interval_s <= 0 or elapsed < self.interval_s:
            return
        hits = sum(per_tier(engram_stats.get("cache_hits"), "cache").values())
        misses = sum(per_tier(engram_stats.get("cache_misses"), "cache").values())
        current = (engine.stats.num_prompt_tokens, engine.stats.num_generation_tokens, hits, misses)
        prompt_tps = (current[0] - self._last[0]) / elapsed
        generation_tps = (current[1] - self._last[1]) / elapsed
        looked_up = (current[2] - self._last[2]) + (current[3] - self._last[3])
        active = bool(prompt_tps or generation_tps or engine.num_running or engine.num_waiting)
        if active or self._was_active:
            hits_now = current[2] - self._last[2]
            hit_rate = f"{100 * hits_now / looked_up:.1f}%" if looked_up else "n/a"
            logger.info(
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
                "Engram cache hit rate: %s",
                prompt_tps, generation_tps, engine.num_running, engine.num_waiting,
                100 * engine.kv_cache_usage, hit_rate,
            )
        self._last_time, self._last, self._was_active = now, current, active
