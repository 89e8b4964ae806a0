"""`engram-serve bench serve`: the metric definitions on hand-made timings, the arrival process,
and short runs against a live `engram-serve serve` process (a tiny random-weight model with the
real tokenizer, so every request takes milliseconds), failures included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_server_support import MODEL, Scrape, ServeProcess, tiny_model_dir

from engram_serve.bench import serve as bench
from engram_serve.bench.serve import RequestResult

API_KEY = "bench-key"
MAX_MODEL_LEN = 512  # test_server_process.SMALL_ENGINE's context

# -- metrics on hand-made timings -----------------------------------------------------------------


def _done(start_s: float, chunk_s: list[float], prompt: int, output: int) -> RequestResult:
    usage = {"prompt_tokens": prompt, "completion_tokens": output}
    return bench.finish(RequestResult(start_s=start_s, chunk_s=chunk_s), usage)


def _three_requests() -> list[RequestResult]:
    return [
        _done(0.0, [0.1, 0.3, 0.6], prompt=10, output=3),  # one token per chunk
        _done(0.5, [0.2, 0.4], prompt=20, output=4),  # two tokens per chunk
        RequestResult(error="HTTP 400: too long"),
    ]


def test_metrics_follow_the_vllm_definitions():
    s = bench.summarize(_three_requests(), duration_s=2.0, slos={}, percentiles=[90])
    assert (s["num_requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["errors"] == {"HTTP 400: too long": 1}
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 7)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(3.5)
    assert s["total_token_throughput"] == pytest.approx(18.5)
    assert s["mean_ttft_ms"] == pytest.approx(150)  # 100 and 200
    assert s["mean_e2el_ms"] == pytest.approx(500)  # 600 and 400
    # TPOT excludes the first token: (600 - 100) / 2 and (400 - 200) / 3.
    assert s["mean_tpot_ms"] == pytest.approx((250 + 200 / 3) / 2)
    # ITL pools chunk gaps over requests: 200, 300 and 200 (a 2-token chunk is one gap).
    assert s["mean_itl_ms"] == pytest.approx(700 / 3)
    assert s["median_itl_ms"] == pytest.approx(200)
    assert s["p90_itl_ms"] == pytest.approx(280)  # linear between 200 and 300
    assert s["peak_concurrent_requests"] == 2  # [0, 0.6] and [0.5, 0.9] overlap
    assert s["timeline"]["output_tok_s"] == [7.0]  # every token within the first second
    assert s["good_requests"] is None and s["request_goodput"] is None


@pytest.mark.parametrize(
    ("slos", "good"),
    [({"ttft": 150}, 1), ({"tpot": 100}, 1), ({"ttft": 150, "tpot": 100}, 0),
     ({"e2el": 600}, 2), ({"e2el": 599}, 1)],
)  # fmt: skip
def test_goodput_counts_requests_within_every_slo(slos, good):
    s = bench.summarize(_three_requests(), duration_s=2.0, slos=slos, percentiles=[99])
    assert s["good_requests"] == good
    assert s["request_goodput"] == pytest.approx(good / 2.0)


def test_without_usage_each_chunk_counts_as_one_token():
    result = bench.finish(RequestResult(chunk_s=[0.1, 0.2, 0.3]), usage=None)
    assert result.ok and result.usage_missing and result.output_tokens == 3
    assert not bench.finish(RequestResult(), {"completion_tokens": 0}).ok


def test_arrivals_poisson_and_gamma():
    rng = np.random.default_rng(0)
    assert not bench.arrival_times(5, math.inf, 1.0, rng).any()  # all at once
    for burstiness in (0.25, 1.0, 4.0):
        times = bench.arrival_times(20_000, 10.0, burstiness, rng)
        gaps = np.diff(times)
        assert times[0] == 0 and (gaps >= 0).all()
        assert gaps.mean() == pytest.approx(0.1, rel=0.05)
        # Gamma gaps of shape k have a coefficient of variation of 1/sqrt(k): 1 for Poisson.
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_bad_arguments_are_refused_with_a_reason(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--endpoint", "/v1/chat/completions"])  # random ids cannot go to chat
    assert "token ids" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--input-len", "9:3"])
    assert "LOW <= HIGH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--percentiles", "90,150"])
    assert "[0, 100]" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown metric 'latency'"):
        bench.parse_goodput(["latency:5"])
    with pytest.raises(SystemExit):
        bench.main(["--constrained-fraction", "0.5"])
    assert "needs --constrained-body" in capsys.readouterr().err


def test_a_constrained_share_is_spread_evenly():
    requests = [bench.BenchRequest([1], 4, 1) for _ in range(10)]
    body = {"guided_choice": ["yes", "no"]}
    cases = ((0.0, []), (0.5, [1, 3, 5, 7, 9]), (0.3, [3, 6, 9]), (1.0, [*range(10)]))
    for fraction, marked in cases:
        constrained = bench.constrain(requests, fraction, body)
        assert [i for i, r in enumerate(constrained) if r.extra == body] == marked, fraction
        assert all(r.extra in ({}, body) for r in constrained)


# -- against a live server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("bench-serve")
    model_dir = tiny_model_dir(root, default_model_dir)
    process = ServeProcess(root, ["--model", str(model_dir), "--no-engram", "--api-key", API_KEY])
    yield process
    process.stop()


def _run(server: ServeProcess, tmp_path: Path, *args: str) -> dict:
    output = tmp_path / "result.json"
    base = ["--base-url", server.url, "--api-key", API_KEY, "--output", str(output),
            "--no-progress"]  # fmt: skip
    summary = bench.main([*base, *args])
    saved = json.loads(output.read_text())  # strict JSON: no NaN or Infinity
    assert saved["completed"] == summary["completed"]
    assert saved["completed"] + saved["failed"] == saved["num_requests"] == len(saved["requests"])
    return saved


def test_random_token_id_run(server, tmp_path):
    s = _run(server, tmp_path, "--num-prompts", "12", "--input-len", "8:24", "--output-len",
             "4:8", "--ignore-eos", "--max-concurrency", "3", "--request-rate", "100",
             "--goodput", "e2el:60000", "ttft:60000")  # fmt: skip
    assert s["model"] == MODEL  # read from /v1/models
    assert (s["num_requests"], s["completed"], s["failed"]) == (12, 12, 0)
    for r in s["requests"]:
        assert r["ok"] and 8 <= r["prompt_tokens"] <= 24  # token-id prompts: exact lengths
        assert r["output_tokens"] == r["max_tokens"]  # ignore_eos, counted from usage
        assert 0 < r["ttft_s"] <= r["latency_s"]
        assert not r["usage_missing"]
    assert s["total_output_tokens"] == sum(r["output_tokens"] for r in s["requests"])
    assert s["total_input_tokens"] == sum(r["prompt_tokens"] for r in s["requests"])
    assert 1 <= s["peak_concurrent_requests"] <= 3
    assert s["good_requests"] == 12
    timeline = s["timeline"]
    assert sum(timeline["output_tok_s"]) == pytest.approx(s["total_output_tokens"])  # 1 s buckets
    for name in bench.LATENCY_METRICS:
        assert s[f"mean_{name}_ms"] > 0
        assert s[f"median_{name}_ms"] <= s[f"p90_{name}_ms"] <= s[f"p99_{name}_ms"]
    assert (tmp_path / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_constrained_share_reaches_the_server_as_structured_outputs(server, tmp_path):
    before = Scrape(server.url)
    s = _run(server, tmp_path, "--num-prompts", "6", "--input-len", "8", "--output-len", "8",
             "--constrained-fraction", "0.5", "--constrained-body",
             '{"guided_choice": ["yes", "no"]}', "--num-warmups", "0")  # fmt: skip
    assert s["completed"] == 6 and s["constrained_fraction"] == 0.5
    added = Scrape(server.url).delta(before, "engram_serve_structured_output_requests_total")
    assert added == 3


def test_failed_requests_are_counted_with_their_errors(server, tmp_path):
    lines = [
        {"prompt": "Hello there", "max_tokens": 4},
        {"prompt": list(range(100, 100 + MAX_MODEL_LEN + 50))},  # longer than the context
        {"prompt": "A fine day", "max_tokens": 4},
        {"prompt": [10**7], "max_tokens": 4},  # not a token id of this vocabulary
        {"prompt": "Once upon", "max_tokens": 10 * MAX_MODEL_LEN},  # prompt + max_tokens too long
        {"prompt": [300, 301, 302], "max_tokens": 4},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    s = _run(server, tmp_path, "--dataset", "jsonl", "--dataset-path", str(path),
             "--ignore-eos", "--max-concurrency", "2")  # fmt: skip
    assert (s["num_requests"], s["completed"], s["failed"]) == (6, 3, 3)
    assert [r["ok"] for r in s["requests"]] == [True, False, True, False, False, True]
    assert sum(s["errors"].values()) == 3
    assert all(message.startswith("HTTP 400: ") for message in s["errors"])
    assert s["total_output_tokens"] == 12  # only the completed requests count


def test_a_wrong_api_key_fails_every_request(server, tmp_path):
    s = _run(server, tmp_path, "--api-key", "wrong", "--model", MODEL, "--num-prompts", "5",
             "--num-warmups", "0", "--input-len", "8", "--output-len", "4")  # fmt: skip
    assert (s["completed"], s["failed"]) == (0, 5)
    assert list(s["errors"].values()) == [5] and next(iter(s["errors"])).startswith("HTTP 401")
    assert s["mean_ttft_ms"] is None and s["output_throughput"] == 0


def test_chat_endpoint_with_a_text_file(server, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Tell me a story.\n\nWhat is two plus two?\n")
    s = _run(server, tmp_path, "--endpoint", "/v1/chat/completions", "--dataset", "text",
             "--dataset-path", str(path), "--num-prompts", "5", "--output-len", "6",
             "--ignore-eos", "--save-detailed")  # fmt: skip
    assert (s["completed"], s["failed"]) == (5, 0)
    for r in s["requests"]:
        assert r["output_tokens"] == 6 and r["prompt_tokens"] > 0  # the chat template's tokens
        # At most one chunk per token: the role-only opening chunk is not output.
        assert len(r["itl_s"]) + 1 <= r["output_tokens"]
    prompt_tokens = [r["prompt_tokens"] for r in s["requests"]]
    assert prompt_tokens[0] == prompt_tokens[2] == prompt_tokens[4] != prompt_tokens[1]  # cycled
