"""Table integrity end to end, on a copy of the default model's Engram files: damaged tables are
refused when the engine is built (`build_engine`, `engram-serve serve --model DIR`) with a
message naming the file; a flipped byte in the middle passes the default quick check and is
caught by `engram-serve tables verify`. And a disk-tier table that breaks while serving (truncated
under the running server, so reads past its new end come back short) fails only the requests of
the step that needed its rows, with a 500 body and a metric, while the server keeps serving."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_server_support import free_port, metric, sse_data, wait_for

from engram_serve.config import EngineConfig, OffloadConfig, ServerConfig
from engram_serve.engine.request import SamplingParams
from engram_serve.engram.tables import (
    DATA_ALIGN,
    ENGRAM_JSON,
    MANIFEST,
    MODULES_FILE,
    TABLE_DIR,
    TableIntegrityError,
    open_table,
    table_path,
    verify_tables,
)
from engram_serve.llm import LLM, build_engine
from engram_serve.offload.tiers import DiskStore, TableReadError
from engram_serve.server.api import build_app
from engram_serve.server.process import BackgroundServer

MODEL = "smol-tables"
SMALL = EngineConfig(max_num_seqs=1, kv_cache_bytes=32 << 20, max_model_len=256)
SMALL_FLAGS = ["--max-num-seqs", "1", "--kv-cache-bytes", str(32 << 20), "--max-model-len", "256"]
PROMPT = "The capital of France is"


@pytest.fixture
def model_copy(tmp_path, default_model_dir) -> Path:
    """The default model with its own copy of every Engram file (to damage); the backbone files
    are links to the cached ones, which nothing here writes."""
    out = tmp_path / "model"
    out.mkdir()
    for item in default_model_dir.iterdir():
        if item.name == TABLE_DIR:
            shutil.copytree(item, out / item.name)
        elif item.name in (ENGRAM_JSON, MODULES_FILE):
            shutil.copy2(item, out / item.name)
        elif item.is_file():
            os.symlink(item, out / item.name)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engram_serve.cli", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


# -- damaged files are refused at load ------------------------------------------------------------


def _truncate_table(model: Path) -> None:
    path = table_path(model, 14)
    os.truncate(path, path.stat().st_size - 100)


def _flip_near_start(model: Path) -> None:
    _flip_byte(table_path(model, 1), DATA_ALIGN + 10)


def _break_header(model: Path) -> None:
    _flip_byte(table_path(model, 1), 20)  # inside the JSON header: its checksum changes


def _damage_modules(model: Path) -> None:
    path = model / MODULES_FILE
    _flip_byte(path, path.stat().st_size - 5)


def _remove_manifest(model: Path) -> None:
    (model / MANIFEST).unlink()


def _change_engram_json(model: Path) -> None:
    raw = json.loads((model / ENGRAM_JSON).read_text())
    raw["engram_vocab_size"] = [v + 1000 for v in raw["engram_vocab_size"]]
    (model / ENGRAM_JSON).write_text(json.dumps(raw))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated table": (_truncate_table, r"layer_14\.safetensors: truncated: \d+ bytes, manifest"),
    "flipped byte near the start": (_flip_near_start, r"layer_1\.safetensors: quick checksum"),
    "damaged header": (_break_header, r"layer_1\.safetensors: quick checksum"),
    "damaged module weights": (_damage_modules, r"engram_modules\.safetensors: quick checksum"),
    "no manifest": (_remove_manifest, r"manifest\.json is missing.*tables init"),
    "engram.json changed": (_change_engram_json, r"engram\.json implies"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_build_engine_refuses_damaged_engram_files(model_copy, damage):
    verify_tables(model_copy, full=True)  # the copy is whole
    hurt, message = DAMAGE[damage]
    hurt(model_copy)
    with pytest.raises(TableIntegrityError, match=message):
        build_engine(model_copy, SMALL)


def test_serve_refuses_a_truncated_table_without_a_traceback(model_copy):
    _truncate_table(model_copy)
    run = _cli("serve", "--model", str(model_copy), "--port", str(free_port()), *SMALL_FLAGS)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("engram-serve: error:") and "layer_14.safetensors: truncated" in last


def test_a_flipped_byte_in_the_middle_needs_the_full_verification(model_copy):
    path = table_path(model_copy, 1)
    _flip_byte(path, path.stat().st_size // 2)
    build_engine(model_copy, SMALL)  # the quick check at load reads only both ends of a file
    quick = _cli("tables", "verify", str(model_copy), "--quick")
    assert quick.returncode == 0, quick.stderr
    full = _cli("tables", "verify", str(model_copy))
    assert full.returncode == 1 and "Traceback" not in full.stderr
    assert "layer_1.safetensors: sha256 mismatch" in full.stderr


# -- a table that breaks while serving ------------------------------------------------------------


def test_a_read_error_names_the_file(model_copy):
    """A real OSError from the read (a closed descriptor: EBADF) comes out as TableReadError."""
    table = open_table(model_copy, 1)
    with ThreadPoolExecutor(2) as pool:
        store = DiskStore(table, pool)
        rows = table.weight[:3].copy()
        store.close()
        with pytest.raises(TableReadError, match=r"layer_1\.safetensors: read failed"):
            store.read(np.arange(3), rows, None)


class Truncation:
    """Cut layer 1's table file to its first data page under the running engine; put it back
    on leaving."""

    def __init__(self, model: Path):
        self.path = table_path(model, 1)
        self.cut = open_table(model, 1).data_offset + 4096
        with open(self.path, "rb") as f:
            f.seek(self.cut)
            self.tail = f.read()

    def __enter__(self) -> Truncation:
        os.truncate(self.path, self.cut)
        return self

    def __exit__(self, *exc: object) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.cut)
            f.write(self.tail)


def test_a_table_truncated_while_serving_fails_only_that_step(model_copy, caplog):
    engine = build_engine(model_copy, SMALL, OffloadConfig(tier="disk"))
    tokenizer, greedy = engine.tokenizer, SamplingParams(temperature=0, max_tokens=6)
    first, second = tokenizer.encode(PROMPT), tokenizer.encode("Once upon a time")
    reference = LLM.from_engine(engine).generate(second, greedy)[0].outputs[0].token_ids

    # The engine alone: one running request (max_num_seqs=1) fails; the waiting one is untouched.
    with Truncation(model_copy), caplog.at_level(logging.ERROR):
        failed = engine.add_request(first, greedy)
        waiting = engine.add_request(second, greedy)
        outputs = engine.step()
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in outputs] == [
        (failed.request_id, True, "error")
    ]
    assert engine.num_running == 0 and engine.num_waiting == 1 and engine.kv_cache_usage == 0
    assert "layer_1.safetensors: short read" in caplog.text  # the log names the file
    while engine.has_unfinished_requests():  # the file is whole again
        outputs = engine.step()
    assert outputs[0].request_id == waiting.request_id
    assert outputs[0].outputs[0].token_ids == reference

    with BackgroundServer(build_app(engine, ServerConfig(served_model_name=MODEL))) as server:
        _serve_through_a_truncation(server.url, model_copy)


def _serve_through_a_truncation(url: str, model: Path) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    before = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert before.status_code == 200
    read_errors = metric(url, "engram_serve_engram_read_errors_total")  # 1: the engine's own
    with Truncation(model) as truncation:
        for route, request in (("/v1/completions", body), ("/v1/chat/completions", chat)):
            reply = httpx.post(url + route, json=request, timeout=60)
            assert reply.status_code == 500, reply.text
            error = reply.json()["error"]
            assert (error["type"], error["code"]) == ("InternalServerError", 500)
            assert "Engram rows could not be read" in error["message"]
            assert str(truncation.path) not in error["message"]  # paths stay in the log
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                          timeout=60) as r:  # fmt: skip
            assert r.status_code == 200  # the stream had begun: the error comes as an event
            events = sse_data(list(r.iter_lines()))
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 500
        assert httpx.get(f"{url}/health").status_code == 200
    assert metric(url, "engram_serve_request_success_total", finished_reason="error") == 3
    assert metric(url, "engram_serve_engram_read_errors_total") == read_errors + 3
    wait_for(lambda: metric(url, "engram_serve_kv_cache_usage_perc") == 0)
    after = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert after.status_code == 200
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
