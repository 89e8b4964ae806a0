"""A real Prometheus server scrapes the live server's /metrics every second; its HTTP API must
then show the request-latency and Engram metrics. Skipped when the `prometheus` binary is absent
(Debian: apt-get install prometheus)."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from test_server_support import (
    engram_columns,
    free_port,
    in_process_server,
    sse_data,
    table_file_bytes,
    wait_for,
)

from engram_serve.config import EngineConfig

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the `prometheus` binary is not installed (Debian: apt-get install prometheus)",
)
MODEL = "smol-prom"

CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: engram-serve
    scrape_interval: 1s
    static_configs:
      - targets: ["{target}"]
"""


@pytest.fixture(scope="module")
def server(default_model_dir):
    config = EngineConfig(max_num_seqs=4, kv_cache_bytes=128 << 20, max_model_len=512)
    with in_process_server(default_model_dir, config, served_model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("prometheus")
    (root / "prometheus.yml").write_text(CONFIG.format(target=f"{server.host}:{server.port}"))
    url = f"http://127.0.0.1:{free_port()}"
    with open(root / "prometheus.log", "w") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address={url[7:]}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: _ready(url, proc), timeout_s=60, interval_s=0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ready(url: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, "prometheus exited; see prometheus.log"
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _query(url: str, promql: str) -> float | None:
    """The value of an instant query with one result, or None while it has none."""
    reply = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert reply["status"] == "success", reply
    results = reply["data"]["result"]
    return float(results[0]["value"][1]) if results else None


def _query_all(url: str, names: dict[str, str]) -> dict[str, float | None]:
    return {key: _query(url, promql) for key, promql in names.items()}


def test_prometheus_scrapes_latency_and_engram_metrics(server, prometheus, default_model_dir):
    """What Prometheus stored, before and after two requests (one streamed), against what the
    responses report: exact deltas, read from a scrape that began after both had returned."""
    queries = {
        "success": 'sum(engram_serve_request_success_total{finished_reason="length"})',
        "other_finishes": 'sum(engram_serve_request_success_total{finished_reason!="length"})',
        "ttft": "sum(engram_serve_time_to_first_token_seconds_count)",
        "e2e": "sum(engram_serve_e2e_request_latency_seconds_count)",
        "prompt": "sum(engram_serve_prompt_tokens_total)",
        "generation": "sum(engram_serve_generation_tokens_total)",
        "lookups": "sum(engram_serve_engram_lookups_total)",
        "stalls": "sum(engram_serve_engram_prefetch_stall_seconds_count)",
    }
    wait_for(lambda: _query(prometheus, 'up{job="engram-serve"}') == 1, timeout_s=30)

    def scraped() -> dict[str, float] | None:
        """The engine's series exist at 0 from the start; the Engram counters only once a
        step has looked rows up (absent: 0)."""
        values = _query_all(prometheus, queries)
        if any(values[key] is None for key in queries if key not in ("lookups", "stalls")):
            return None
        return {key: value or 0.0 for key, value in values.items()}

    before = wait_for(scraped, timeout_s=30, interval_s=0.5)
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6,
            "ignore_eos": True}  # fmt: skip
    plain = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert plain.status_code == 200
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      ) as streamed:  # fmt: skip
        assert streamed.status_code == 200
        events = sse_data(list(streamed.iter_lines()))
    done = time.time()
    usages = [plain.json()["usage"], events[-2]["usage"]]
    assert [u["completion_tokens"] for u in usages] == [6, 6]

    def scraped_after_both() -> bool:  # the scrape's own start time, in Prometheus' clock
        return (_query(prometheus, 'timestamp(up{job="engram-serve"})') or 0) > done

    wait_for(scraped_after_both, timeout_s=30, interval_s=0.5)
    after = wait_for(scraped)
    delta = {key: after[key] - before[key] for key in queries}
    prompt = sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert delta["success"] == 2 and delta["other_finishes"] == 0
    assert delta["ttft"] == delta["e2e"] == 2
    assert delta["prompt"] == prompt and delta["generation"] == generated
    # Each computed token (the prompt, each output token but the last) once per hash column and
    # Engram layer; one prefetch-stall observation per engine step, one step per output token.
    assert delta["lookups"] == (prompt + generated - 2) * engram_columns(default_model_dir)
    assert delta["stalls"] == generated
    assert _query(prometheus, "sum(engram_serve_engram_table_bytes)") == table_file_bytes(
        default_model_dir
    )
    assert _query(prometheus, 'engram_serve_num_requests_running{model_name="smol-prom"}') == 0


def test_every_series_exists_at_zero_before_the_first_request():
    """Dashboards show 0, not "no data", on a server that has served nothing yet."""
    from prometheus_client import generate_latest

    from engram_serve.server.metrics import FINISH_REASONS, ServerMetrics

    text = generate_latest(ServerMetrics("m", max_model_len=64).registry).decode()
    labels = 'model_name="m"'
    for reason in FINISH_REASONS:
        success = f'engram_serve_request_success_total{{finished_reason="{reason}",{labels}}}'
        assert f"{success} 0.0" in text
    for series in ("generation_tokens_total", "num_preemptions_total", "engram_read_errors_total",
                   "time_to_first_token_seconds_count", "num_requests_running"):  # fmt: skip
        assert f"engram_serve_{series}{{{labels}}} 0.0" in text
