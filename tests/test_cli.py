"""The command line, run as a user would: a real process, its output parsed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engram_serve.engine.request import SamplingParams
from engram_serve.llm import LLM


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engram_serve.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_prints_the_greedy_completion(default_model_dir):
    run = _cli(
        "generate",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--json",
        "--model",
        str(default_model_dir),
        "--max-model-len",
        "512",
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    offline = (
        LLM(default_model_dir, max_model_len=512)
        .generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0]
        .outputs[0]
    )
    assert result["token_ids"] == offline.token_ids and result["text"] == offline.text


def test_bad_flags_fail_with_a_message():
    run = _cli("serve", "--engram-tier", "tape")
    assert run.returncode == 2 and "invalid choice: 'tape'" in run.stderr
    run = _cli("tables", "verify", "/nonexistent-model-dir", "--quick")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("engram-serve: error:") and "nonexistent-model-dir" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("command", [["generate", "hi"], ["serve"]])
def test_device_cuda_without_a_gpu_is_one_line(command):
    run = _cli(*command, "--device", "cuda")
    assert run.returncode == 1 and run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line.startswith("engram-serve: error: --device cuda needs a CUDA GPU, but this torch")
    assert line.endswith("sees none; use --device cpu")
