"""Helpers shared by the server tests (this module holds no tests): scraping /metrics, reading SSE
streams, waiting, a tiny random-weight model with the real SmolLM2 tokenizer (fast enough for
fuzzing), and `engram-serve serve` run as a real process (ServeProcess)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

import engram_serve
from engram_serve.config import EngineConfig, ServerConfig
from engram_serve.llm import build_engine
from engram_serve.server.api import build_app
from engram_serve.server.process import BackgroundServer

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"
)  # fmt: skip


@contextmanager
def in_process_server(
    model_dir: Path, config: EngineConfig, **server: Any
) -> Iterator[BackgroundServer]:
    """`model_dir`'s engine behind the real app (ServerConfig(**server)), served by uvicorn on a
    free port of this process until the block ends."""
    app = build_app(build_engine(model_dir, config), ServerConfig(**server))
    with BackgroundServer(app) as running:
        yield running


def metric(url: str, sample: str, **labels: str) -> float:
    """Sum of the /metrics samples named `sample` whose labels include `labels`; 0 if none."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


class Scrape:
    """One read of /metrics; `delta(earlier, name, **labels)` is what a sample gained since an
    earlier read (samples summed over the labels not given, as `metric` does)."""

    def __init__(self, url: str):
        text = httpx.get(f"{url}/metrics", timeout=10).text
        self.samples = [
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def value(self, sample: str, **labels: str) -> float:
        return sum(
            value
            for name, have, value in self.samples
            if name == sample and all(have.get(k) == v for k, v in labels.items())
        )

    def delta(self, earlier: Scrape, sample: str, **labels: str) -> float:
        return self.value(sample, **labels) - earlier.value(sample, **labels)


def engram_columns(model_dir) -> int:
    """Row lookups per token: hash columns ((N-1) orders x H heads) x Engram layers, read from
    the model's engram.json."""
    engram = json.loads((model_dir / "engram.json").read_text())
    per_layer = (engram["max_ngram_size"] - 1) * engram["n_head_per_ngram"]
    return per_layer * len(engram["layer_ids"])


def table_file_bytes(model_dir) -> int:
    """Bytes of every tensor in the Engram table files, from their safetensors headers."""
    total = 0
    for path in sorted((model_dir / "engram_tables").glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(t["data_offsets"][1] - t["data_offsets"][0]
                     for name, t in header.items() if name != "__metadata__")  # fmt: skip
    return total


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05):
    """Poll until `predicate()` is truthy; return its value, or raise after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


def post_then_leave(
    url: str, path: str, body: dict, until: Callable[[], Any], headers: dict | None = None
) -> None:
    """A client that leaves a non-streaming request: send `body` on a raw socket, wait until
    `until()` holds (the server's own state says the request is in the engine), check that no
    byte of a response came, then close the connection."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        wait_for(until, timeout_s=60)
        sock.setblocking(False)
        try:
            answered = sock.recv(1)
        except BlockingIOError:
            answered = b""
        assert answered == b"", "the server answered before the client left"


def sse_data(lines: list[str]) -> list[Any]:
    """The `data:` payloads of an SSE stream's lines: parsed JSON, or the string "[DONE]"."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dir(root: Path, default_model_dir: Path) -> Path:
    """A 2-layer Llama with random weights and the default model's tokenizer and chat template:
    real text in and out, microseconds per step."""
    from helpers import save_tiny_hf
    from transformers import LlamaConfig

    out = root / "tiny-llama"
    out.mkdir(parents=True, exist_ok=True)
    generation = json.loads((default_model_dir / "generation_config.json").read_text())
    save_tiny_hf(
        out,
        LlamaConfig(
            vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
            tie_word_embeddings=True, eos_token_id=generation.get("eos_token_id"),
        ),
    )  # fmt: skip
    for name in TOKENIZER_FILES:
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, out / name)
    return out


MODEL = "smol-proc"
REPO_ROOT = Path(engram_serve.__file__).resolve().parents[1]
SMALL_ENGINE = ["--max-num-seqs", "4", "--kv-cache-bytes", str(128 << 20), "--max-model-len", "512"]


class ServeProcess:
    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str] | None = None):
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        self.log_path = tmp_path / "serve.log"
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "engram_serve.cli", "serve", "--port", str(port),
                   "--served-model-name", MODEL, *SMALL_ENGINE, *args]  # fmt: skip
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": python_path, **(env or {})},
            )  # fmt: skip
        wait_for(self._healthy, timeout_s=120, interval_s=0.2)

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited early:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return self.log_path.read_text()

    def refuses_connections(self) -> bool:
        try:
            httpx.get(f"{self.url}/health", timeout=1)
        except httpx.ConnectError:
            return True
        except httpx.TransportError:
            return False
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
