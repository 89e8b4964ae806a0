"""Soak test: mixed traffic with random client disconnects for a long while, then a reckoning.

    engram-serve bench soak --duration 600 --concurrency 8 --output soak.json

Starts `engram-serve serve` (the embedded default model unless --model; --url targets a running
server instead, --pid names its process for memory readings) and keeps `--concurrency` clients
busy: completions and chat, streaming and not, random lengths, temperatures and stop strings.
A share of requests is dropped on purpose: a stream closed after a random number of chunks, or
a plain request whose client gives up after a random delay.

Every request ends as exactly one of: completed (a whole, well-formed answer), aborted (this
client hung up before the answer was complete) or failed (anything else: an HTTP error, an
error event, a transport error the client did not cause). At the end it checks that
    sent == completed + aborted + failed,  failed == 0,
    the server's finished requests (stop + length + abort, from /metrics) == completed + aborted,
    server stop + length >= completed and server aborts <= aborted (a request may finish on the
        server just as its client hangs up: a "late abort"),
    no server-side errors, and the server idle afterwards (running 0, waiting 0, KV usage 0),
and reports the server's resident memory at start, after warm-up, at the end and at its peak.
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engram_serve.bench.harness import machine, save

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "Here is a short list of fruits:",
    "def fibonacci(n):",
    "Translate to French: Good morning, how are you?",
    "The three laws of thermodynamics are",
)
QUESTIONS = (
    "What is the tallest mountain on Earth?",
    "Write a haiku about autumn.",
    "Explain what a hash table is in two sentences.",
    "Name three primary colors.",
)
STOPS = ("\n\n", ".", " the ")
SUCCESS_REASONS = ("stop", "length")
IDLE_GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
REQUEST_TIMEOUT_S = 300.0  # a request that takes longer has failed


# -- one request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One request's random choices. `drop_after_chunks` (streams) or `drop_after_s` (plain):
    when this client hangs up; None: it waits for the whole answer."""

    path: str
    body: dict[str, Any]
    drop_after_chunks: int | None = None
    drop_after_s: float | None = None

    @property
    def kind(self) -> str:
        endpoint = "chat" if self.path.endswith("chat/completions") else "completions"
        return f"{endpoint}/{'stream' if self.body['stream'] else 'plain'}"


def plan_request(rng: random.Random, args: argparse.Namespace) -> Plan:
    max_tokens = rng.randint(1, args.max_tokens)
    body: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": rng.choice((0.0, 0.7, 1.0)),
        "stream": rng.random() < args.stream_fraction,
    }
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(STOPS)]
    if rng.random() < 0.5:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    else:
        path = "/v1/completions"
        body["prompt"] = rng.choice(PROMPTS)
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() >= args.disconnect_fraction:
        return Plan(path, body)
    if body["stream"]:
        return Plan(path, body, drop_after_chunks=rng.randint(0, max_tokens))
    return Plan(path, body, drop_after_s=rng.uniform(0.05, args.max_drop_s))


def sse_payloads(chunks: Iterator[bytes]) -> Iterator[str]:
    """The `data:` payloads of an event stream, lines split on LF (and CRLF) only."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                yield line[5:].lstrip(b" ").decode()


def run_stream(client: httpx.Client, url: str, plan: Plan) -> tuple[str, str]:
    """(outcome, detail) of a streamed request; hangs up after `drop_after_chunks` chunks."""
    chunks, finished, done = 0, 0, False
    with client.stream("POST", url + plan.path, json=plan.body, timeout=REQUEST_TIMEOUT_S) as r:
        if r.status_code != 200:
            return "failed", f"HTTP {r.status_code}: {_error_message(r.read())}"
        if plan.drop_after_chunks == 0:  # hung up as soon as the headers came
            return "aborted", "stream closed"
        for payload in sse_payloads(r.iter_bytes()):
            if payload == "[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                return "failed", f"error event: {event['error'].get('message')}"
            finished += sum(c.get("finish_reason") is not None for c in event["choices"])
            chunks += 1
            drop = plan.drop_after_chunks is not None and chunks >= plan.drop_after_chunks
            if drop and not finished:
                return "aborted", "stream closed"
    if done and finished == 1:
        return "completed", ""
    return "failed", f"stream ended (done={done}, finished choices={finished})"


def run_plain(client: httpx.Client, url: str, plan: Plan) -> tuple[str, str]:
    timeout = plan.drop_after_s if plan.drop_after_s is not None else REQUEST_TIMEOUT_S
    try:
        r = client.post(url + plan.path, json=plan.body, timeout=timeout)
    except httpx.TimeoutException:
        if plan.drop_after_s is None:
            return "failed", "timed out"
        return "aborted", "client gave up"
    if r.status_code != 200:
        return "failed", f"HTTP {r.status_code}: {_error_message(r.content)}"
    choices = r.json().get("choices") or [{}]
    if choices[0].get("finish_reason") not in SUCCESS_REASONS:
        return "failed", f"finish_reason {choices[0].get('finish_reason')!r}"
    return "completed", ""


def _error_message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    failures: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, outcome: str, detail: str) -> None:
        with self.lock:
            self.outcomes["sent"] += 1
            self.outcomes[outcome] += 1
            self.by_kind.setdefault(kind, Counter())[outcome] += 1
            if outcome == "failed":
                self.failures[detail] += 1


def client_loop(url: str, args: argparse.Namespace, seed: int, end: float, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client() as client:
        while time.monotonic() < end:
            plan = plan_request(rng, args)
            try:
                run = run_stream if plan.body["stream"] else run_plain
                outcome, detail = run(client, url, plan)
            except (httpx.HTTPError, ValueError, KeyError) as e:
                outcome, detail = "failed", f"{type(e).__name__}: {e}"
            tally.record(plan.kind, outcome, detail)


# -- the server -------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """The few /metrics samples the soak checks."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removeprefix("engram_serve_")
            if name == "request_success_total":
                out[s.labels.get("finished_reason", "")] += s.value
            elif name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                          "engram_read_errors_total", "generation_tokens_total"):  # fmt: skip
                out[name] += s.value
    return dict(out)


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ServerProcess:
    """`engram-serve serve` on a free loopback port, its output in `log_path`."""

    def __init__(self, args: argparse.Namespace, log_path: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.log_path = f"http://127.0.0.1:{port}", log_path
        command = [sys.executable, "-m", "engram_serve.cli", "serve", "--port", str(port),
                   *(["--model", args.model] if args.model else []), *args.server_args]  # fmt: skip
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 300
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start; see {log_path}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


class Monitor(threading.Thread):
    """Every `interval_s`: the server's RSS, /health latency and queue gauges."""

    def __init__(self, url: str, pid: int | None, interval_s: float, start_time: float):
        super().__init__(name="soak-monitor", daemon=True)
        self.url, self.pid, self.interval_s, self.t0 = url, pid, interval_s, start_time
        self.samples: list[dict[str, Any]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.samples.append(self.sample())

    def sample(self) -> dict[str, Any]:
        began = time.monotonic()
        try:
            health = httpx.get(f"{self.url}/health", timeout=10).status_code
            health_s = time.monotonic() - began
            metrics = scrape(self.url)
        except httpx.HTTPError as e:
            health, health_s, metrics = type(e).__name__, time.monotonic() - began, {}
        return {
            "t_s": round(began - self.t0, 1),
            "rss_bytes": rss_bytes(self.pid),
            "health": health,
            "health_ms": round(1e3 * health_s, 1),
            "running": metrics.get("num_requests_running", 0),
            "waiting": metrics.get("num_requests_waiting", 0),
        }


def wait_idle(url: str, timeout_s: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = scrape(url)
        idle = all(metrics.get(k, 0) == 0 for k in IDLE_GAUGES)
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


# -- the report -------------------------------------------------------------------------------


def reckon(tally: Tally, before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Client counts against the server's counters (deltas over the soak) and the checks."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("stop", "length", "abort", "error")}
    out = tally.outcomes
    server_ok = delta["stop"] + delta["length"]
    checks = {
        "outcomes_add_up": out["sent"] == out["completed"] + out["aborted"] + out["failed"],
        "no_failures": out["failed"] == 0,
        "server_finished_equals_client": server_ok + delta["abort"]
        == out["completed"] + out["aborted"],
        "server_success_covers_completed": server_ok >= out["completed"],
        "server_aborts_within_client_aborts": delta["abort"] <= out["aborted"],
        "no_server_errors": delta["error"] == 0
        and after.get("engram_read_errors_total", 0) == before.get("engram_read_errors_total", 0),
        "idle_at_end": all(after.get(k, 0) == 0 for k in IDLE_GAUGES),
    }
    return {
        "client": {k: out[k] for k in ("sent", "completed", "aborted", "failed")},
        "server": {
            "success": server_ok,
            "by_finish_reason": delta,
            "late_aborts": server_ok - out["completed"],  # finished as the client hung up
            "generation_tokens": after.get("generation_tokens_total", 0)
            - before.get("generation_tokens_total", 0),
        },
        "checks": checks,
    }


def memory_report(start: int | None, samples: list[dict[str, Any]], end: int | None) -> dict:
    readings = [s["rss_bytes"] for s in samples if s["rss_bytes"] is not None]
    warm = next((s["rss_bytes"] for s in samples if s["t_s"] >= 60), None)
    mib = 1 << 20

    def as_mib(value: int | None) -> float | None:
        return None if value is None else round(value / mib, 1)

    return {
        "rss_start_mib": as_mib(start),
        "rss_after_1min_mib": as_mib(warm),
        "rss_end_mib": as_mib(end),
        "rss_peak_mib": as_mib(max(readings + [v for v in (start, end) if v is not None],
                                   default=None)),  # fmt: skip
    }


def format_report(report: dict[str, Any]) -> str:
    c, s, m = report["client"], report["server"], report["memory"]
    health = [x["health_ms"] for x in report["samples"] if isinstance(x["health"], int)]
    lines = [
        f"{'duration (s)':<34}{report['duration_s']:>12.1f}",
        *(f"{'client ' + k:<34}{v:>12}" for k, v in c.items()),
        *(f"{'server ' + k:<34}{v:>12g}" for k, v in s["by_finish_reason"].items()),
        f"{'server late aborts':<34}{s['late_aborts']:>12g}",
        *(f"{k:<34}{str(v):>12}" for k, v in m.items()),
        f"{'/health max latency (ms)':<34}{max(health, default=float('nan')):>12.1f}",
        *(f"{'check ' + k:<34}{'ok' if v else 'FAILED':>12}" for k, v in report["checks"].items()),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram-serve bench soak", description=__doc__)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="the running server's process, for its RSS")
    parser.add_argument("--model", help="model of the started server (default: embedded)")
    parser.add_argument(
        "--server-args", nargs=argparse.REMAINDER,
        default=["--max-num-seqs", "8", "--max-model-len", "2048",
                 "--kv-cache-bytes", str(512 << 20), "--stats-interval", "60"],
        help="flags for the started server (last on the line)",
    )  # fmt: skip
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64, help="drawn from 1..this")
    parser.add_argument("--stream-fraction", type=float, default=0.5)
    parser.add_argument("--disconnect-fraction", type=float, default=0.25)
    parser.add_argument("--max-drop-s", type=float, default=2.0,
                        help="a plain request's client gives up after up to this")  # fmt: skip
    parser.add_argument("--sample-interval", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="soak.json")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    started = machine()
    server = None
    if args.url is None:
        log_path = Path(tempfile.mkdtemp(prefix="engram-soak-")) / "server.log"
        print(f"starting the server (log: {log_path})", file=sys.stderr)
        server = ServerProcess(args, log_path)
    url, pid = (server.url, server.pid) if server else (args.url.rstrip("/"), args.pid)
    try:
        report = soak(url, pid, args)
    finally:
        exit_code = server.stop() if server else None
    report = {"machine": started, **report, "server_exit_code": exit_code}
    print(format_report(report))
    save(report, args.output)
    if not all(report["checks"].values()):
        raise SystemExit(1)
    return report


def soak(url: str, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    before, rss_start = scrape(url), rss_bytes(pid)
    start = time.monotonic()
    monitor = Monitor(url, pid, args.sample_interval, start)
    monitor.start()
    tally = Tally()
    end = start + args.duration
    clients = [
        threading.Thread(target=client_loop, args=(url, args, args.seed * 1000 + i, end, tally))
        for i in range(args.concurrency)
    ]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    duration = time.monotonic() - start
    after = wait_idle(url)
    monitor.stopped.set()
    monitor.join()
    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("url", "pid")},
        "url": url,
        "duration_s": duration,
        **reckon(tally, before, after),
        "by_kind": {k: dict(v) for k, v in sorted(tally.by_kind.items())},
        "failures": dict(tally.failures.most_common(20)),
        "memory": memory_report(rss_start, monitor.samples, rss_bytes(pid)),
        "samples": monitor.samples,
    }
    return report


if __name__ == "__main__":
    main()
