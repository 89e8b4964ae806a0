"""The remote tier: a model's Engram tables published once into a Mooncake Store cluster, and
read by every server that names the store's master (`--engram-remote-master HOST:PORT`).

    engram-serve tables publish MODEL_DIR --remote-master HOST:PORT    # once, from any machine
    engram-serve serve --model MODEL_DIR --engram-tier remote --engram-remote-master HOST:PORT

Keys, under a prefix named by the tables' content (the manifest's sha256 of every table file):

    engram/{content}/layout              JSON: the format, and each layer's rows, width, dtype,
                                         record size and rows per chunk
    engram/{content}/layer_{L}/{chunk}   rows [chunk * chunk_rows, ...) of layer L, one record a
                                         row: its stored bytes, then its UE8M0 scales (fp8)
    engram/{content}/complete            written last: a half-finished publish is never seen
                                         as complete, and a publish again finishes it

A server checks at start that the copy is complete and that its layout is the one engram.json
implies and this version writes, and refuses with one line otherwise. Chunks are put with a hard
pin: the store never evicts a table.

Reads. On loopback TCP each ranged read costs ~25-30 us whatever its size (1 KiB or 64 KiB
objects alike: one request and reply on one connection, ~20 us of this process's CPU and ~6 us
of the store node's), threads of one client add nothing, and one call carries many ranges;
bandwidth is ~1-1.7 GB/s. So a read is one call with every row of the batch, sorted, and
neighbouring rows of a chunk merged into one range while the bytes between them cost less than a
range (MERGE_GAP_BYTES); records land packed in a registered bounce buffer and are split into
the staging's rows and scales. Scales travel with their row (on the disk tier they stay in
RAM): a second read a row would double the requests, and a copy per server is what publishing
once avoids. The call is `batch_get_into_multi_buffer_ranges` on a get session: the replicas of
every chunk are queried once (`batch_get_session_start`, renewed by the probe below) and a read
asks the master nothing (`get_into_ranges` queries it once per chunk a call: 16-row reads took
0.86 ms that way and 0.45 ms on the session).

Store state (`RemoteTables.state`): "ready", "unreachable" (the master does not answer) or
"unpublished" (the completion marker is gone). A thread probes the marker every PROBE_S and
renews the get session then (a lease outlives several probes); reads while the state is not
"ready" fail at once with TableReadError (the step's requests fail and the read-error metric
counts them) instead of waiting out the store's RPC timeout (~4 s each). The master keeps its
index in memory: a restarted master has lost every key, so a server reports "unpublished" (in
/health and the metrics) until the tables are published again, then the probe opens a session
on the new copy and reads resume with no restart; the store nodes and this client reconnect to
the new master by themselves.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import logging
import re
import socket
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
from tqdm.auto import tqdm

from engram_serve.engram.config import EngramConfig
from engram_serve.engram.tables import (
    TABLE_DIR,
    TableLayout,
    open_table,
    read_engram_config,
    read_manifest,
    table_layouts,
    verify_tables,
)
from engram_serve.offload.tiers import StagedStore, TableReadError

log = logging.getLogger(__name__)

FORMAT = "engram-serve-remote/1"
KEY_ROOT = "engram"
CHUNK_BYTES = 4 << 20  # one store object: long merged ranges, few keys (34 for the default)
MERGE_GAP_BYTES = 16 << 10  # read the bytes between two rows rather than make a second range
PROBE_S = 1.0
LOCAL_BUFFER_BYTES = 2 * CHUNK_BYTES  # the client's own buffer: a put is copied through it
_NOT_FOUND = -704  # Mooncake's OBJECT_NOT_FOUND; -900 (RPC_FAIL) and the rest: unreachable


def content_key(model_dir: str | Path) -> str:
    """The key prefix of a model's published tables: a digest of its manifest's table sha256s."""
    files = read_manifest(Path(model_dir))["files"]
    digests = sorted(
        f"{rel}:{e['sha256']}" for rel, e in files.items() if rel.startswith(TABLE_DIR)
    )
    return f"{KEY_ROOT}/{hashlib.sha256(chr(10).join(digests).encode()).hexdigest()[:16]}"


def record_layout(config: EngramConfig) -> dict[str, Any]:
    """The published layout engram.json implies (what `layout` must hold)."""
    return {"format": FORMAT, "layers": {str(lay.layer_id): _layer_layout(lay)
                                         for lay in table_layouts(config)}}  # fmt: skip


def _layer_layout(layout: TableLayout) -> dict[str, Any]:
    record = layout.row_bytes + layout.scale_width
    return {
        "rows": layout.rows,
        "width": layout.width,
        "table_dtype": layout.table_dtype,
        "quant_block": layout.quant_block,
        "record_bytes": record,
        "chunk_rows": max(1, CHUNK_BYTES // record),
    }


_open_clients: set[Any] = set()  # connected clients, closed at exit if still open
_open_tables: weakref.WeakSet = weakref.WeakSet()  # RemoteTables, closed at exit before them


def connect(master: str, protocol: str = "tcp") -> Any:
    """A Mooncake Store client of `master` (HOST:PORT) that contributes no memory of its own."""
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        raise RuntimeError(
            f"the remote tier needs Mooncake ({e}): pip install 'engram-serve[remote]'"
        ) from None
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"the remote master must be HOST:PORT, got {master!r}")
    client = MooncakeDistributedStore()
    code = client.setup(_local_address(host, int(port)), "P2PHANDSHAKE", 0, LOCAL_BUFFER_BYTES,
                        protocol, "", master)  # fmt: skip
    if code != 0:
        raise ConnectionError(f"cannot reach the Mooncake master at {master} (error {code})")
    if not _open_clients:
        atexit.register(_disconnect_all)
    _open_clients.add(client)
    return client


def disconnect(client: Any) -> None:
    if client in _open_clients:  # closed once: a second close of a client is not safe
        _open_clients.discard(client)
        client.close()


def _disconnect_all() -> None:
    """At exit, what is still open: each table's probe thread stopped first, then the clients.
    Mooncake's threads must stop before the interpreter does (else the process aborts,
    "terminate called without an active exception")."""
    for tables in list(_open_tables):
        tables.close()
    for client in list(_open_clients):
        disconnect(client)


def _local_address(host: str, port: int) -> str:
    """This machine's address on the route to the master (what the store's peers dial back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP: no packet is sent
        return s.getsockname()[0]


# ---------------------------------------------------------------------------------------------
# publishing


def publish(model_dir: str | Path, master: str, protocol: str = "tcp",
            progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Put a model's tables into the store at `master`, once: chunks already there are kept, the
    completion marker goes last. Returns {"prefix", "published" (chunks put now), "state"}."""
    model_dir = Path(model_dir)
    config = _engram_config(model_dir)
    verify_tables(model_dir)
    prefix, layout = content_key(model_dir), record_layout(config)
    client = connect(master, protocol)
    try:
        if client.is_exist(f"{prefix}/complete") == 1:
            _check_layout(client, prefix, layout, master)
            return {"prefix": prefix, "published": 0, "state": "already published"}
        pinned = _hard_pin()
        _put(client, f"{prefix}/layout", json.dumps(layout).encode(), pinned, upsert=True)
        total = sum(lay["rows"] * lay["record_bytes"] for lay in layout["layers"].values())
        put = 0
        with tqdm(total=total, desc=f"Publishing to {master}", unit="B", unit_scale=True,
                  disable=not progress) as bar:  # fmt: skip
            for layer_id, lay in layout["layers"].items():
                put += _publish_layer(client, prefix, open_table(model_dir, int(layer_id)), lay,
                                      pinned, bar.update)  # fmt: skip
        _put(client, f"{prefix}/complete", b"1", pinned, upsert=True)
    finally:
        disconnect(client)
    return {"prefix": prefix, "published": put, "state": "published"}


def _publish_layer(client: Any, prefix: str, table: Any, lay: dict[str, Any], pinned: Any,
                   progress: Callable[[int], None]) -> int:  # fmt: skip
    chunk_rows, rows = lay["chunk_rows"], lay["rows"]
    keys = [f"{prefix}/layer_{table.layer_id}/{c}" for c in range(-(-rows // chunk_rows))]
    there = client.batch_is_exist(keys)
    put = 0
    for chunk, (key, exists) in enumerate(zip(keys, there)):
        start, stop = chunk * chunk_rows, min(rows, (chunk + 1) * chunk_rows)
        if exists != 1:
            weight = np.asarray(table.weight[start:stop]).view(np.uint8).reshape(stop - start, -1)
            parts = (
                [weight] if table.scale is None else [weight, np.asarray(table.scale[start:stop])]
            )
            _put(client, key, np.ascontiguousarray(np.concatenate(parts, axis=1)), pinned)
            put += 1
        progress((stop - start) * lay["record_bytes"])
    return put


def _hard_pin() -> Any:
    from mooncake.store import ReplicateConfig

    config = ReplicateConfig()
    config.with_hard_pin = True  # a table is not a cache: never evicted
    return config


def _put(client: Any, key: str, value: Any, config: Any, upsert: bool = False) -> None:
    code = (client.upsert if upsert else client.put)(key, memoryview(value), config)
    if code != 0:
        raise ConnectionError(f"putting {key} into the Mooncake store failed (error {code})")


def unpublish(model_dir: str | Path, master: str, protocol: str = "tcp") -> dict[str, Any]:
    """Remove a model's published tables: the marker first, so no server starts on a copy being
    removed, then every key under the prefix. Returns {"prefix", "removed"}."""
    prefix = content_key(model_dir)
    client = connect(master, protocol)
    try:
        client.remove(f"{prefix}/complete", True)
        removed = client.remove_by_regex(f"^{re.escape(prefix)}/", True)
    finally:
        disconnect(client)
    if removed < 0:
        raise ConnectionError(f"removing {prefix}/* from the store at {master} failed ({removed})")
    return {"prefix": prefix, "removed": removed}


def _engram_config(model_dir: Path) -> EngramConfig:
    config = read_engram_config(model_dir)
    if config is None:
        raise ValueError(f"{model_dir} has no engram.json: not an Engram model")
    return config


def _check_layout(client: Any, prefix: str, want: dict[str, Any], master: str) -> None:
    raw = client.get(f"{prefix}/layout")
    got = json.loads(raw) if raw else None
    if got != want:
        raise ValueError(
            f"the tables published at {master} under {prefix} have layout {got}; engram.json "
            f"and this version imply {want} (unpublish them and publish again)"
        )


# ---------------------------------------------------------------------------------------------
# serving


@dataclass(frozen=True)
class PublishedTable:
    """One layer's published table as the offload reads it (tiers.EngramTable's fields; no
    rows here)."""

    layer_id: int
    rows: int
    width: int
    table_dtype: str
    quant_block: int
    row_bytes: int
    scale_row_bytes: int
    chunk_rows: int
    remote: RemoteTables
    weight: None = None
    scale: None = None
    path: None = None
    data_offset: None = None
    scale_offset: None = None


class RemoteTables:
    """One process's connection to the published tables: the client, the state its probe keeps,
    and registered bounce buffers shared by the layers' reads."""

    def __init__(self, model_dir: str | Path, master: str, protocol: str = "tcp") -> None:
        model_dir = Path(model_dir)
        self.master, self.protocol = master, protocol
        self.prefix = content_key(model_dir)
        self.layout = record_layout(_engram_config(model_dir))
        self.client = connect(master, protocol)
        self.marker = f"{self.prefix}/complete"
        self.chunk_keys = [
            f"{self.prefix}/layer_{layer_id}/{chunk}"
            for layer_id, lay in self.layout["layers"].items()
            for chunk in range(-(-lay["rows"] // lay["chunk_rows"]))
        ]  # what the get session covers
        self.state = "ready"
        self._lock = threading.Lock()
        self._free: list[np.ndarray] = []
        self._registered: list[np.ndarray] = []
        self._closed = threading.Event()
        try:
            if self._probe() != "ready":
                raise RuntimeError(
                    f"the Engram tables of {model_dir} are {self.state} at the Mooncake master "
                    f"{master} (key {self.marker}): run `engram-serve tables publish {model_dir} "
                    f"--remote-master {master}`"
                )
            _check_layout(self.client, self.prefix, self.layout, master)
        except BaseException:
            disconnect(self.client)
            raise
        self._monitor = threading.Thread(target=self._watch, name="engram-remote", daemon=True)
        self._monitor.start()
        _open_tables.add(self)

    def tables(self) -> dict[int, PublishedTable]:
        out = {}
        for layer_id, lay in self.layout["layers"].items():
            scale_bytes = lay["width"] // lay["quant_block"] if lay["table_dtype"] == "fp8_e4m3" \
                else 0  # fmt: skip
            out[int(layer_id)] = PublishedTable(
                int(layer_id), lay["rows"], lay["width"], lay["table_dtype"], lay["quant_block"],
                lay["record_bytes"] - scale_bytes, scale_bytes, lay["chunk_rows"], self,
            )  # fmt: skip
        return out

    def describe(self) -> str:
        return f"the Engram tables at the Mooncake master {self.master} are {self.state}"

    def _probe(self) -> str:
        """The marker's state; where it is there, the get session opened (or its leases renewed)
        on every chunk, and "ready" only if that succeeded."""
        code = self.client.is_exist(self.marker)
        state = "ready" if code == 1 else "unpublished" if code == 0 else "unreachable"
        if state == "ready":
            codes = self.client.batch_get_session_start(self.chunk_keys)
            failed = [c for c in codes if c != 0]
            if failed or len(codes) != len(self.chunk_keys):
                state = "unpublished" if _NOT_FOUND in failed else "unreachable"
        self._set_state(state)
        return state

    def _set_state(self, state: str) -> None:
        if state != self.state:
            (log.info if state == "ready" else log.error)(
                "Engram tables at %s: %s -> %s", self.master, self.state, state
            )
        self.state = state

    def _watch(self) -> None:
        while not self._closed.wait(PROBE_S):
            try:
                self._probe()
            except Exception:  # the client closed under the probe: the process is ending
                return

    def read(
        self,
        keys: list[str],
        dst: list[list[int]],
        src: list[list[int]],
        sizes: list[list[int]],
        nbytes: int,
        out: Callable[[np.ndarray], None],
    ) -> None:
        """Ranges `src` of objects `keys` (on the get session) into a bounce buffer at offsets
        `dst`, in one call; then `out(buffer[:nbytes])`. A key whose ranges fail (its lease
        lapsed, say) has the session renewed and is read again once; TableReadError if it fails
        again."""
        if self.state != "ready":
            raise TableReadError(errno.EIO, self.describe())
        buf = self._acquire(nbytes)
        try:
            base = buf.ctypes.data
            pointers = [[base + offset for offset in offsets] for offsets in dst]
            got = self.client.batch_get_into_multi_buffer_ranges(keys, pointers, sizes, src)
            failed = [i for i, (n, want) in enumerate(zip(got, sizes)) if n != sum(want)]
            if failed and self._probe() == "ready":
                got = self.client.batch_get_into_multi_buffer_ranges(
                    [keys[i] for i in failed], [pointers[i] for i in failed],
                    [sizes[i] for i in failed], [src[i] for i in failed],
                )  # fmt: skip
                failed = [i for i, n in zip(failed, got) if n != sum(sizes[i])]
                if failed:  # the master has the keys; the store node did not answer
                    self._set_state("unreachable")
            if failed:
                raise TableReadError(
                    errno.EIO, f"{self.describe()}: reading {keys[failed[0]]} failed "
                    f"(error {min(got)})",
                )  # fmt: skip
            out(buf[:nbytes])
        finally:
            self._release(buf)

    def _acquire(self, nbytes: int) -> np.ndarray:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))
        buf = np.empty(max(nbytes, 1 << 20), np.uint8)
        code = self.client.register_buffer(buf.ctypes.data, buf.nbytes)
        if code != 0:
            raise TableReadError(
                errno.EIO, f"registering a {buf.nbytes}-byte buffer failed ({code})"
            )
        with self._lock:
            self._registered.append(buf)
        return buf

    def _release(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._monitor.join()
        self.client.batch_get_session_end(self.chunk_keys)
        for buf in self._registered:
            self.client.unregister_buffer(buf.ctypes.data)
        disconnect(self.client)


def open_published(model_dir: str | Path, master: str,
                   protocol: str = "tcp") -> dict[int, PublishedTable]:  # fmt: skip
    """Every Engram layer's published table (checked: complete, and laid out as engram.json
    implies); RuntimeError or ValueError with one line otherwise."""
    return RemoteTables(model_dir, master, protocol).tables()


def plan_ranges(ids: np.ndarray, chunk_rows: int, record_bytes: int,
                gap_bytes: int = MERGE_GAP_BYTES) -> tuple[np.ndarray, ...]:  # fmt: skip
    """The ranged reads of rows `ids [n]`: rows sorted, neighbours of a chunk closer than
    `gap_bytes` merged. Returns (order [n]: the sorted rows' places in `ids`, span_chunk [s],
    span_src [s]: byte offset in its chunk, span_len [s], span_dst [s]: offset in the packed
    buffer, row_pos [n]: each sorted row's offset in the packed buffer)."""
    order = np.argsort(ids, kind="stable")
    rows = ids[order]
    chunk = rows // chunk_rows
    start = (rows - chunk * chunk_rows) * record_bytes  # [n] bytes into the chunk
    end = start + record_bytes
    new = np.ones(len(rows), bool)
    new[1:] = (chunk[1:] != chunk[:-1]) | (start[1:] - end[:-1] > gap_bytes)
    first = np.flatnonzero(new)
    span = np.cumsum(new) - 1  # [n] each row's span
    last = np.append(first[1:] - 1, len(rows) - 1)
    span_src, span_len = start[first], end[last] - start[first]
    span_dst = np.cumsum(span_len) - span_len
    row_pos = span_dst[span] + start - span_src[span]
    return order, chunk[first], span_src, span_len, span_dst, row_pos


@numba.njit(nogil=True, cache=True)
def _unpack(packed, row_pos, order, weight, scale):
    """Record i of `packed` (at byte row_pos[i]) into weight[order[i]], then scale[order[i]]."""
    row_bytes, scale_bytes = weight.shape[1], scale.shape[1]
    for i in range(row_pos.shape[0]):
        start, row = row_pos[i], order[i]
        weight[row, :] = packed[start : start + row_bytes]
        scale[row, :] = packed[start + row_bytes : start + row_bytes + scale_bytes]


class RemoteStore(StagedStore):
    """Remote tier: one layer's published rows, read by the I/O threads into staging (see the
    module docstring for the read)."""

    tier = "remote"
    # One call carries a batch's ranges (measured: more threads on one client only queue);
    # a look-ahead of many chunks is still split so that a step's own reads need not wait.
    min_chunk_rows, max_chunk_rows = 1 << 14, 1 << 14
    # A decode step's misses (tens of rows, ~0.5 ms) are read in the engine thread at step
    # start: on a CPU the forward pass keeps busy, the hand-offs of a pool's read (our thread,
    # Mooncake's, the store node's, each waiting for a core) made the first Engram layer wait
    # ~4 ms a step for them.
    inline_rows = 64

    def __init__(self, table: Any, io_pool: Any) -> None:
        if not isinstance(table, PublishedTable):
            raise ValueError(
                f"the remote tier reads published tables; layer {table.layer_id}'s is not one "
                "(open them with offload.remote.open_published)"
            )
        self.remote, self.table = table.remote, table
        self.mode = f"mooncake-{table.remote.protocol}"
        self.record_bytes = table.row_bytes + table.scale_row_bytes
        self.keys = f"{table.remote.prefix}/layer_{table.layer_id}/"
        self.gap_bytes = MERGE_GAP_BYTES
        super().__init__(io_pool, {"remote": table.rows * self.record_bytes})

    @property
    def state(self) -> str:
        return self.remote.state

    def _read_chunk(
        self, ids: np.ndarray, weight_out: np.ndarray, scale_out: np.ndarray | None
    ) -> None:
        order, chunk, src, length, dst, row_pos = plan_ranges(
            ids, self.table.chunk_rows, self.record_bytes, self.gap_bytes
        )
        cut = np.flatnonzero(np.diff(chunk)) + 1  # spans grouped by chunk
        keys = [self.keys + str(c) for c in chunk[np.append(0, cut)].tolist()] if len(ids) else []
        row_bytes, n = self.table.row_bytes, len(ids)

        weight = weight_out.view(np.uint8).reshape(n, row_bytes)
        scale = np.empty((n, 0), np.uint8) if scale_out is None else scale_out

        def split(packed: np.ndarray) -> None:
            _unpack(packed, row_pos, order, weight, scale)

        def per_chunk(a: np.ndarray) -> list[list[int]]:
            return [part.tolist() for part in np.split(a, cut)]

        if n:
            self.remote.read(keys, per_chunk(dst), per_chunk(src), per_chunk(length),
                             int(length.sum()), split)  # fmt: skip

    def close(self) -> None:
        self.remote.close()
