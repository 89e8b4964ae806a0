"""`engram-serve serve` as a real process: graceful shutdown on SIGTERM, the stats log line, and
metrics merged over several worker processes (prometheus multiprocess mode)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from test_server_support import MODEL, ServeProcess, metric, sse_data, wait_for


@pytest.fixture
def serve(default_model_dir, tmp_path):
    started = []

    def start(args: list[str], env: dict[str, str] | None = None) -> ServeProcess:
        started.append(ServeProcess(tmp_path, args, env))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def _complete(url: str, max_tokens: int, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": max_tokens, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json={**body, **extra}, timeout=60)


def test_sigterm_finishes_short_requests_and_aborts_long_ones_at_the_deadline(serve):
    """The drain, by states and their order rather than by durations: after SIGTERM the server
    refuses connections while both requests go on; the short one finishes; the long one keeps
    streaming through the drain and is then cut with the shutdown error, not before the deadline.
    The long request asks for 4000 tokens, minutes of decoding on any CPU, so it is still
    running at the deadline however fast the machine (were it not, the test fails, never passes
    without having drained)."""
    # The short request outlives a few polls of the metrics (5 tokens took ~0.1 s: the poll
    # could miss both running), yet ends well within the deadline.
    deadline_s, long_tokens, short_tokens = 6.0, 4000, 32
    server = serve(["--shutdown-timeout", str(deadline_s), "--stats-interval", "1",
                    "--max-model-len", "4096", "--kv-cache-bytes", str(256 << 20)])  # fmt: skip
    long_events: list[str] = []
    ended: dict[str, float] = {}

    def long_stream() -> None:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": long_tokens, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            long_events.extend(line for line in r.iter_lines() if line)
        ended["long"] = time.monotonic()

    short: dict[str, httpx.Response] = {}

    def short_request() -> None:
        short["r"] = _complete(server.url, short_tokens)
        ended["short"] = time.monotonic()

    threads = [threading.Thread(target=long_stream), threading.Thread(target=short_request)]
    threads[0].start()
    wait_for(lambda: len(long_events) > 4, timeout_s=60)
    threads[1].start()
    wait_for(lambda: metric(server.url, "engram_serve_num_requests_running") == 2, timeout_s=60)

    server.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    at_sigterm = len(long_events)
    wait_for(server.refuses_connections, timeout_s=deadline_s)
    assert "long" not in ended, "new connections are refused while in-flight work goes on"
    for thread in threads:
        thread.join(timeout=120)

    response = short["r"]
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == short_tokens, "in-flight work ends"
    events = sse_data(long_events)
    assert events[-1] == "[DONE]"
    assert "shutting down" in events[-2]["error"]["message"]
    tokens = events[:-2]
    assert all("choices" in e for e in tokens)
    assert at_sigterm < len(tokens) < long_tokens, "it streamed through the drain, then was cut"
    assert ended["short"] < ended["long"]
    assert ended["long"] - sent >= deadline_s - 0.5, "cut at the deadline, not before"
    assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    log = server.log()
    assert "Draining" in log
    assert "Avg prompt throughput" in log and "Engram cache hit rate" in log


def test_workers_share_one_merged_metrics_view(serve, tmp_path):
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    server = serve(["--workers", "2"], env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})

    def worker_pids() -> set[str]:
        return {p.stem.rsplit("_", 1)[-1] for p in metrics_dir.glob("gauge_livesum_*.db")}

    wait_for(lambda: len(worker_pids()) == 2, timeout_s=120, interval_s=0.2)
    num_requests, max_tokens = 6, 2
    for _ in range(num_requests):  # a new connection each: any worker may answer
        assert _complete(server.url, max_tokens).status_code == 200
    for _ in range(4):  # whichever worker answers the scrape, it reports every worker's counts
        assert metric(server.url, "engram_serve_request_success_total") == num_requests
        tokens = metric(server.url, "engram_serve_generation_tokens_total")
        assert tokens == num_requests * max_tokens
        assert metric(server.url, "engram_serve_time_to_first_token_seconds_count") == num_requests
        assert metric(server.url, "engram_serve_num_requests_running") == 0
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) is not None
