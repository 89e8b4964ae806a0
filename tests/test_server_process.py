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
    deadline_s = 6.0
    server = serve(["--shutdown-timeout", str(deadline_s), "--stats-interval", "1"])
    long_lines: list[str] = []
    ended: dict[str, float] = {}

    def long_stream() -> None:  # ~20 s of tokens: cannot finish within the deadline
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 480, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                long_lines.append(line)
        ended["long"] = time.monotonic()

    short: dict[str, httpx.Response] = {}
    threads = [
        threading.Thread(target=long_stream),
        threading.Thread(target=lambda: short.setdefault("r", _complete(server.url, 10))),
    ]
    threads[0].start()
    wait_for(lambda: len(long_lines) > 4)
    threads[1].start()
    wait_for(lambda: metric(server.url, "engram_serve_num_requests_running") == 2)

    server.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    wait_for(server.refuses_connections, timeout_s=3)  # stops accepting at once
    for thread in threads:
        thread.join(timeout=60)

    response = short["r"]
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 10, "in-flight work may finish"
    events = sse_data(long_lines)
    assert events[-1] == "[DONE]"
    assert "shutting down" in events[-2]["error"]["message"]
    assert all("choices" in e for e in events[:-2])
    assert deadline_s - 0.5 <= ended["long"] - sent <= deadline_s + 5
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
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
