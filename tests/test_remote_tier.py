"""The remote tier against a real Mooncake Store on loopback: a `mooncake_master` and one store
node (`mooncake_client`, which holds the published bytes) started on free ports per module.

Publishing puts the default model's tables once (again: nothing is put; interrupted: the copy is
not complete until a publish finishes it); rows read back equal the table files byte for byte;
the engine's greedy outputs and logprobs on the remote tier, with and without the row cache and
look-ahead, equal the device tier's on a non-zero Engram; two server processes read one
published copy and answer alike, each holding no table (RSS against the device tier's); a layout
that differs from engram.json is refused at start in one line. Faults: the master stopped under a
running server fails the step's requests (500, the read-error metric), /health and
engram_tables_ready report the state, and a restarted master (which has lost every key) is
"unpublished" until the tables are published again, when serving resumes without a restart."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_server_support import MODEL, ServeProcess, free_port, metric, wait_for

from engram_serve.config import EngineConfig, OffloadConfig, ServerConfig
from engram_serve.engine.request import SamplingParams
from engram_serve.engram.tables import open_table
from engram_serve.llm import build_engine
from engram_serve.offload.tiers import TableReadError, wait_reads
from engram_serve.server.api import build_app
from engram_serve.server.process import BackgroundServer

pytest.importorskip(
    "mooncake.store", reason="the remote tier's tests need Mooncake: pip install '.[remote]'"
)

from engram_serve.offload import remote  # noqa: E402  (after the skip: it needs Mooncake)

ENGINE = EngineConfig(
    max_num_seqs=8, max_num_batched_tokens=64, kv_block_size=16, num_kv_blocks=8, max_model_len=128
)
PROMPT = "The capital of France is"


class MooncakeStore:
    """`mooncake_master` and a store node contributing 512 MiB, as processes of this test."""

    def __init__(self, log_dir: Path) -> None:
        self.bin, self.log_dir = Path(sys.executable).parent, log_dir
        self.port = free_port()
        self.master = f"127.0.0.1:{self.port}"
        self.masters = 0
        self.start_master()
        self.node = self._spawn("node", "mooncake_client", "--master_server_address",
                                self.master, "--metadata_server", "P2PHANDSHAKE", "--host",
                                "127.0.0.1", "--port", str(free_port()),
                                "--global_segment_size", "512MB")  # fmt: skip
        self.wait_for_node()

    def _spawn(self, name: str, program: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115  (the process owns it)
        return subprocess.Popen([str(self.bin / program), *args], stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip

    def start_master(self) -> None:
        self.masters += 1
        ports = ["--port", str(self.port), "--metrics_port", str(free_port())]
        self.master_proc = self._spawn(f"master-{self.masters}", "mooncake_master", *ports)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, timeout_s=30)

    def wait_for_node(self) -> None:
        """Until the store node's memory is mounted on the current master: the first master logs
        the mount; on a restarted one the node mounts it again as it reconnects."""
        if self.masters == 1:
            log, line, count = self.log_dir / "master-1.log", "action=mount_segment", 1
        else:
            log, line, count = self.log_dir / "node.log", "Reconnected to master", self.masters - 1
        wait_for(lambda: log.read_text().count(line) >= count, timeout_s=60, interval_s=0.2)

    def stop_master(self) -> None:
        self.master_proc.terminate()
        self.master_proc.wait(timeout=30)

    def wait_for_node_to_miss_the_master(self) -> None:
        """Until the store node has missed 3 pings and dials the master anew. A master back
        sooner answers the node's pings without knowing its memory, and the node never mounts
        it again (Mooncake 0.3.13): the store stays empty until the node restarts."""
        log = self.log_dir / "node.log"
        wait_for(lambda: "reconnecting to" in log.read_text(), timeout_s=60, interval_s=0.2)

    def close(self) -> None:
        for proc in (self.node, self.master_proc):
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    running = MooncakeStore(tmp_path_factory.mktemp("mooncake"))
    yield running
    running.close()


def remote_tier(store: MooncakeStore, **options) -> OffloadConfig:
    return OffloadConfig(tier="remote", remote_master=store.master, **options)


# -- reading --------------------------------------------------------------------------------------


def test_ranges_merge_neighbours_of_a_chunk_and_keep_each_rows_place():
    ids = np.array([9, 2, 3, 40, 12, 2])  # unsorted, a duplicate; chunks of 10 rows
    order, chunk, src, length, dst, row_pos = remote.plan_ranges(ids, 10, 4, gap_bytes=8)
    assert ids[order].tolist() == [2, 2, 3, 9, 12, 40]
    # rows 2-3 merge (touching); 9 is 20 bytes on (> 8): its own range; 12 and 40: other chunks
    assert chunk.tolist() == [0, 0, 1, 4]
    assert list(zip(src.tolist(), length.tolist())) == [(8, 8), (36, 4), (8, 4), (0, 4)]
    assert dst.tolist() == [0, 8, 12, 16]
    assert row_pos.tolist() == [0, 0, 4, 8, 12, 16]
    _, chunk, _, length, _, _ = remote.plan_ranges(ids, 10, 4, gap_bytes=100)
    assert chunk.tolist() == [0, 1, 4] and length.tolist() == [32, 4, 4]  # 2..9 as one range


def test_published_rows_read_back_exactly_and_publishing_again_puts_nothing(
    store, default_model_dir
):
    first = remote.publish(default_model_dir, store.master, progress=False)
    assert first["state"] in ("published", "already published")
    again = remote.publish(default_model_dir, store.master, progress=False)
    assert again == {"prefix": first["prefix"], "published": 0, "state": "already published"}
    tables = remote.open_published(default_model_dir, store.master)
    rng = np.random.default_rng(0)
    with ThreadPoolExecutor(2) as pool:
        for layer_id, table in tables.items():
            store_ = remote.RemoteStore(table, pool)
            local = open_table(default_model_dir, layer_id)
            edges = np.array([0, table.chunk_rows - 1, table.chunk_rows, table.rows - 1])
            for ids in (edges, rng.integers(0, table.rows, 4000), np.array([7, 7, 3])):
                weight = np.empty((len(ids), table.width), np.uint8)
                scale = np.empty((len(ids), table.scale_row_bytes), np.uint8)
                store_.read(ids, weight, scale)
                np.testing.assert_array_equal(weight, local.weight[ids])
                np.testing.assert_array_equal(scale, local.scale[ids])
            # a decode-sized read is done in the caller's thread; its failure is raised on wait
            ids = np.array([7, 7, 3])
            weight = np.empty((len(ids), table.width), np.uint8)
            scale = np.empty((len(ids), table.scale_row_bytes), np.uint8)
            ((rows, read),) = store_.submit_reads(ids, weight, scale)
            assert read.done() and rows == slice(0, 3)
            np.testing.assert_array_equal(weight, local.weight[ids])
        past_the_end = np.array([table.rows + table.chunk_rows])  # a key never published
        reads = store_.submit_reads(past_the_end, weight[:1], scale[:1])
        with pytest.raises(TableReadError, match=r"layer_\d+/\d+ failed"):
            wait_reads(reads)
    store_.close()


def test_an_interrupted_publish_is_not_complete_until_a_publish_finishes_it(
    store, engram_model_dir, monkeypatch
):
    remote.unpublish(engram_model_dir, store.master)
    calls = []

    def fail_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("the network went away")
        return publish_layer(*args, **kwargs)

    publish_layer = remote._publish_layer
    monkeypatch.setattr(remote, "_publish_layer", fail_second_layer)
    with pytest.raises(ConnectionError):
        remote.publish(engram_model_dir, store.master, progress=False)
    with pytest.raises(RuntimeError, match="are unpublished at the Mooncake master"):
        remote.open_published(engram_model_dir, store.master)
    monkeypatch.setattr(remote, "_publish_layer", publish_layer)
    done = remote.publish(engram_model_dir, store.master, progress=False)
    assert done["published"] == 1  # the second layer's one chunk; the first layer's was there
    assert set(remote.open_published(engram_model_dir, store.master)) == {1, 14}


def test_a_published_layout_unlike_engram_json_is_refused_in_one_line(store, engram_model_dir):
    remote.publish(engram_model_dir, store.master, progress=False)
    client = remote.connect(store.master)
    key = f"{remote.content_key(engram_model_dir)}/layout"
    layout = json.loads(client.get(key))
    try:
        changed = json.loads(json.dumps(layout))
        changed["layers"]["1"]["chunk_rows"] += 1
        client.upsert(key, json.dumps(changed).encode())
        result = subprocess.run(
            [sys.executable, "-m", "engram_serve.cli", "serve", "--model", str(engram_model_dir),
             "--engram-tier", "remote", "--engram-remote-master", store.master],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        client.upsert(key, json.dumps(layout).encode())
        remote.disconnect(client)
    assert result.returncode == 1
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("engram-serve: error:")]
    assert "have layout" in line and "engram.json and this version imply" in line


# -- serving --------------------------------------------------------------------------------------


def _generate(engine) -> list[tuple[list[int], list[float]]]:
    tok = engine.tokenizer
    texts = ["The history of the printing press", "def merge_sort(items):", "Dear diary, today"]
    prompts = [tok.encode(t * 6)[: 30 + 9 * i] for i, t in enumerate(texts)]
    sampling = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    ids = [engine.add_request(p, sampling).request_id for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                logprobs = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
                done[out.request_id] = (c.token_ids, logprobs)
    return [done[i] for i in ids]


def test_remote_tier_outputs_equal_the_device_tier(store, engram_model_dir):
    remote.publish(engram_model_dir, store.master, progress=False)
    expected = _generate(build_engine(engram_model_dir, ENGINE, OffloadConfig(tier="device")))
    assert expected != _generate(build_engine(engram_model_dir, ENGINE, enable_engram=False))
    for offload in (remote_tier(store), remote_tier(store, cache_rows=3000)):
        engine = build_engine(engram_model_dir, ENGINE, offload)
        assert _generate(engine) == expected
        stats = engine.engram.prefetcher.stats
        assert stats["rows_read"]["remote"] > 0 and stats["tier_state"] == "ready"
        assert stats["store"] == ["mooncake-tcp"]
        assert (stats["warmed"] > 0) == (offload.cache_rows > 0)  # look-ahead: on by default
        engine.engram.prefetcher.close()


def _memory(pid: int) -> dict[str, int]:
    """Resident bytes, and of them the anonymous (the process's own, not shared libraries')."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return {"rss": fields["Rss"], "anonymous": fields["Anonymous"]}


def test_two_servers_share_one_published_copy(store, default_model_dir, tmp_path):
    remote.publish(default_model_dir, store.master, progress=False)
    flags = ["--model", str(default_model_dir), "--engram-tier", "remote",
             "--engram-remote-master", store.master, "--engram-cache-rows", "20000"]  # fmt: skip
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    servers = []
    try:
        for name in ("a", "b", "device"):
            (tmp_path / name).mkdir()
            args = flags if name != "device" else ["--model", str(default_model_dir)]
            servers.append(ServeProcess(tmp_path / name, args))
        texts = [httpx.post(f"{s.url}/v1/completions", json=body, timeout=120).json()
                 for s in servers]  # fmt: skip
        memory = [_memory(s.proc.pid) for s in servers]
    finally:
        for server in servers:
            server.stop()
    assert len({t["choices"][0]["text"] for t in texts}) == 1
    table_bytes = sum(f.stat().st_size for f in (default_model_dir / "engram_tables").glob("*"))
    print(f"tables {table_bytes >> 20} MiB; MiB resident (anonymous): " + ", ".join(
        f"{name} {m['rss'] >> 20} ({m['anonymous'] >> 20})"
        for name, m in zip(("remote a", "remote b", "device"), memory)))  # fmt: skip
    # Neither remote server holds the tables (the Mooncake client's own buffers aside).
    anonymous = [m["anonymous"] for m in memory]
    assert max(anonymous[:2]) < anonymous[2] - table_bytes // 2


def test_a_stopped_master_fails_requests_until_the_tables_are_published_again(
    store, engram_model_dir
):
    remote.publish(engram_model_dir, store.master, progress=False)
    engine = build_engine(engram_model_dir, ENGINE, remote_tier(store))  # no cache: every read
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    with BackgroundServer(build_app(engine, ServerConfig(served_model_name=MODEL))) as server:
        url = server.url

        def complete() -> httpx.Response:
            return httpx.post(f"{url}/v1/completions", json=body, timeout=120)

        def tables_state() -> str:
            return httpx.get(f"{url}/health", timeout=30).json()["engram_tables"]["state"]

        before = complete()
        assert before.status_code == 200 and tables_state() == "ready"
        assert metric(url, "engram_serve_engram_tables_ready", tier="remote") == 1
        store.stop_master()
        failed = complete()
        assert failed.status_code == 500
        assert "Engram rows could not be read" in failed.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200  # the process is sound
        assert tables_state() == "unreachable"
        assert metric(url, "engram_serve_engram_read_errors_total") == 1
        assert metric(url, "engram_serve_engram_tables_ready", tier="remote") == 0

        store.wait_for_node_to_miss_the_master()
        store.start_master()  # in memory: the new master knows no key
        store.wait_for_node()
        wait_for(lambda: tables_state() == "unpublished", timeout_s=60, interval_s=0.5)
        assert complete().status_code == 500
        assert metric(url, "engram_serve_engram_read_errors_total") == 2

        start = time.perf_counter()
        remote.publish(engram_model_dir, store.master, progress=False)
        wait_for(lambda: tables_state() == "ready", timeout_s=30, interval_s=0.2)
        after = complete()
        print(f"serving again {time.perf_counter() - start:.1f} s after the publish began")
        assert after.status_code == 200
        assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
        assert metric(url, "engram_serve_engram_tables_ready", tier="remote") == 1


def test_the_remote_flags_reach_the_offload_config():
    from engram_serve.cli import build_parser
    from engram_serve.engine_args import configs_from_args

    args = build_parser().parse_args(["serve", "--engram-tier", "remote",
                                      "--engram-remote-master", "10.0.0.5:50051",
                                      "--engram-remote-protocol", "rdma"])  # fmt: skip
    _, offload = configs_from_args(args)
    assert (offload.tier, offload.remote_master, offload.remote_protocol) == (
        "remote", "10.0.0.5:50051", "rdma")  # fmt: skip
    assert offload.looks_ahead
    with pytest.raises(ValueError, match="needs the store's master"):
        OffloadConfig(tier="remote")
    with pytest.raises(ValueError, match="only the remote tier takes one"):
        OffloadConfig(tier="disk", remote_master="10.0.0.5:50051")
