"""The Engram model format: a model directory with `engram.json` carries Engram memory.

    engram.json                           the EngramConfig fields (EngramConfig.to_dict)
    engram_modules.safetensors            module weights, `model.layers.{L}.engram.<name>`
    engram_tables/layer_{L}.safetensors   `weight [rows, W]`; fp8 adds `scale [rows, W/32]` UE8M0
    engram_tables/manifest.json           per file: size, rows, dtype, sha256, quick sha256

Layer L's table holds every head's rows stacked, rows = sum of the layer's primes (see
engram/ngram_hash.py). Table files are ordinary safetensors whose header is padded so the data
starts at a 4 KiB boundary; fp8_e4m3 rows are stored as uint8 bytes. A table may be far larger
than RAM: it is written in chunks and read through a memory map or pread, never loaded whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from engram_serve.engram.config import EngramConfig, TableDtype
from engram_serve.engram.ngram_hash import find_primes
from engram_serve.kernels.reference import dequantize_rows

ENGRAM_JSON = "engram.json"
MODULES_FILE = "engram_modules.safetensors"
TABLE_DIR = "engram_tables"
MANIFEST = f"{TABLE_DIR}/manifest.json"
FORMAT = "engram-serve-tables/1"
QUICK_BYTES = 1 << 20  # the quick checksum covers this much at each end of a file
DATA_ALIGN = 4096  # table data starts page-aligned, so direct I/O can read it
RNG_BLOCK_ROWS = 4096  # rows drawn per RNG stream: contents never depend on the chunk size
INIT_STD = 0.02
FP8_E4M3_MAX = 448.0

# safetensors dtype tag, numpy dtype holding the bytes
_ST_DTYPES: dict[str, tuple[str, Any]] = {
    "float32": ("F32", np.float32),
    "float16": ("F16", np.float16),
    "bfloat16": ("BF16", np.uint16),  # numpy has no bfloat16; torch views it back
    "uint8": ("U8", np.uint8),
}
_ST_TAGS = {tag: name for name, (tag, _) in _ST_DTYPES.items()}
_STORED_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class TableIntegrityError(RuntimeError):
    """A table file or the manifest is missing, truncated, corrupt or disagrees with engram.json."""


# ---------------------------------------------------------------------------------------------
# safetensors headers, written and read without loading any data


def safetensors_header(
    entries: Iterable[tuple[str, str, tuple[int, ...]]],
    metadata: dict[str, str] | None = None,
    align: int = 8,
) -> tuple[bytes, dict[str, int], int]:
    """Header bytes for tensors `(name, dtype, shape)` laid out back to back in that order.

    Returns (header, absolute file offset of each tensor, total file size). The JSON is padded
    with spaces so the data starts at a multiple of `align` (a multiple of 8).
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    starts, pos = {}, 0
    for name, dtype, shape in entries:
        tag, np_dtype = _ST_DTYPES[dtype]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        starts[name], pos = pos, pos + nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    data_offset = -(-(8 + len(text)) // align) * align
    text += b" " * (data_offset - 8 - len(text))
    head = struct.pack("<Q", len(text)) + text
    return head, {n: data_offset + s for n, s in starts.items()}, data_offset + pos


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(header dict, data offset) of a safetensors file; TableIntegrityError if unreadable."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise TableIntegrityError(f"{path}: {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if 8 + length > size:
            raise TableIntegrityError(
                f"{path}: header claims {length} bytes but the file has {size} (truncated?)"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TableIntegrityError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + length


# ---------------------------------------------------------------------------------------------
# layout of one layer's table


@dataclass(frozen=True)
class TableLayout:
    layer_id: int
    rows: int
    width: int  # W, values per row
    table_dtype: TableDtype
    quant_block: int = 32

    @property
    def is_fp8(self) -> bool:
        return self.table_dtype == "fp8_e4m3"

    @property
    def stored_dtype(self) -> str:
        return "uint8" if self.is_fp8 else _STORED_DTYPE[self.table_dtype]

    @property
    def row_bytes(self) -> int:
        return self.width * np.dtype(_ST_DTYPES[self.stored_dtype][1]).itemsize

    @property
    def scale_width(self) -> int:
        """UE8M0 scales per row (fp8 only)."""
        return self.width // self.quant_block if self.is_fp8 else 0

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        out = [("weight", self.stored_dtype, (self.rows, self.width))]
        if self.is_fp8:
            out.append(("scale", "uint8", (self.rows, self.scale_width)))
        return out

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "layer_id": str(self.layer_id),
            "table_dtype": self.table_dtype,
            "quant_block": str(self.quant_block),
        }

    def header(self) -> tuple[bytes, dict[str, int], int]:
        return safetensors_header(self.entries(), self.metadata(), align=DATA_ALIGN)


def table_layouts(config: EngramConfig) -> list[TableLayout]:
    """One layout per Engram layer; rows = the sum of the layer's per-head primes."""

    rows = find_primes(config).sum(axis=1)  # [L]
    return [
        TableLayout(layer_id, int(r), config.head_dim, config.table_dtype, config.quant_block)
        for layer_id, r in zip(config.layer_ids, rows, strict=True)
    ]


def table_path(model_dir: str | Path, layer_id: int) -> Path:
    return Path(model_dir) / TABLE_DIR / f"layer_{layer_id}.safetensors"


def read_engram_config(model_dir: str | Path) -> EngramConfig | None:
    """The directory's EngramConfig, or None when it has no `engram.json` (a plain model)."""
    path = Path(model_dir) / ENGRAM_JSON
    return EngramConfig.from_json(path) if path.exists() else None


# ---------------------------------------------------------------------------------------------
# initial contents


def quantize_fp8_rows(x: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """float32 `[n, W]` -> FP8-E4M3 bytes `[n, W]` and UE8M0 scale bytes `[n, W/block]`.

    Each block of `block` values gets the smallest power of two 2**e with amax / 2**e <= 448,
    stored as the byte e + 127; values are x / 2**e rounded to E4M3 (never NaN).
    """
    n, width = x.shape
    blocks = x.reshape(n, width // block, block)  # [n, W/b, b]
    amax = np.abs(blocks).max(axis=-1)  # [n, W/b]
    with np.errstate(divide="ignore"):
        exponent = np.ceil(np.log2(amax / FP8_E4M3_MAX))
    exponent = np.clip(np.nan_to_num(exponent, neginf=-127.0), -127, 127)
    scaled = np.clip(blocks / np.exp2(exponent)[..., None], -FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = torch.from_numpy(scaled.reshape(n, width).astype(np.float32)).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).numpy(), (exponent + 127).astype(np.uint8)


def _random_rows(
    layout: TableLayout, seed: int, start: int, count: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows [start, start + count) of a fresh table: N(0, 0.02^2) values in the table's dtype.

    Row r's values come from RNG stream (seed, layer, r // RNG_BLOCK_ROWS), so any chunking of
    the writes gives the same table. `start` must be a multiple of RNG_BLOCK_ROWS.
    """
    first, last = start // RNG_BLOCK_ROWS, -(-(start + count) // RNG_BLOCK_ROWS)
    parts = []
    for block in range(first, last):
        rng = np.random.default_rng([seed, layout.layer_id, block])
        n = min(RNG_BLOCK_ROWS, layout.rows - block * RNG_BLOCK_ROWS)
        parts.append(rng.standard_normal((n, layout.width), dtype=np.float32))
    x = np.concatenate(parts)[:count] * np.float32(INIT_STD)  # [count, W]
    if layout.is_fp8:
        return quantize_fp8_rows(x, layout.quant_block)
    if layout.table_dtype == "bfloat16":
        bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
        return bits.view(np.uint16), None
    return x.astype(_ST_DTYPES[layout.stored_dtype][1]), None


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write_random_table(
    path: str | Path, layout: TableLayout, seed: int, chunk_bytes: int = 64 << 20, bar=None
) -> None:
    """Write a seeded random table file in chunks of rows whose float32 values take about
    `chunk_bytes` (the working set is a few times that), so tables may exceed RAM."""
    header, offsets, size = layout.header()
    bytes_per_row = layout.row_bytes + layout.scale_width
    blocks_per_chunk = max(1, chunk_bytes // (RNG_BLOCK_ROWS * 4 * layout.width))
    chunk_rows = blocks_per_chunk * RNG_BLOCK_ROWS
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)
        for start in range(0, layout.rows, chunk_rows):
            count = min(chunk_rows, layout.rows - start)
            weight, scale = _random_rows(layout, seed, start, count)
            _pwrite_all(f.fileno(), weight, offsets["weight"] + start * layout.row_bytes)
            if scale is not None:
                _pwrite_all(f.fileno(), scale, offsets["scale"] + start * layout.scale_width)
            if bar is not None:
                bar.update(count * bytes_per_row)


# ---------------------------------------------------------------------------------------------
# checksums and the manifest


def file_digests(path: str | Path, full: bool = True) -> dict[str, Any]:
    """{"size", "quick_sha256"[, "sha256"]}. The quick digest hashes the first and last
    QUICK_BYTES (the whole file when smaller): it catches truncation and header damage in
    milliseconds; only the full sha256 catches a flipped byte in the middle."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= 2 * QUICK_BYTES:
            quick = hashlib.sha256(f.read())
        else:
            quick = hashlib.sha256(f.read(QUICK_BYTES))
            f.seek(size - QUICK_BYTES)
            quick.update(f.read(QUICK_BYTES))
        out: dict[str, Any] = {"size": size, "quick_sha256": quick.hexdigest()}
        if full:
            f.seek(0)
            full_hash = hashlib.sha256()
            while block := f.read(8 << 20):
                full_hash.update(block)
            out["sha256"] = full_hash.hexdigest()
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / MANIFEST
    if not path.exists():
        raise TableIntegrityError(
            f"{path} is missing: the Engram tables were never initialised or their writing was "
            "interrupted (run `engram-serve tables init`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TableIntegrityError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TableIntegrityError(f"{path}: not an engram-serve manifest (format {FORMAT!r})")
    return manifest


# ---------------------------------------------------------------------------------------------
# public entry points


def _check_disk_space(model_dir: Path, needed: int, replaced: Iterable[Path]) -> None:
    reclaimed = sum(p.stat().st_size for p in replaced if p.exists())
    free = shutil.disk_usage(model_dir).free + reclaimed
    margin = 64 << 20
    if needed + margin > free:
        raise OSError(
            f"not enough disk space for the Engram tables in {model_dir}: they need "
            f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB is free"
        )


def write_tables(
    model_dir: str | Path,
    config: EngramConfig,
    num_compressed: int,
    modules: dict[str, torch.Tensor],
    *,
    seed: int = 0,
    identity: bool = False,
    progress: bool = True,
    chunk_bytes: int = 64 << 20,
) -> dict[str, Any]:
    """Write a model's Engram memory: engram.json, tables of seeded random rows, the given module
    weights (float32, contiguous, named `model.layers.{L}.engram.<name>`) and the manifest.
    Returns the manifest.

    `num_compressed` is the compressed vocabulary size of the model's tokenizer (the hash
    multipliers derive from it; it is recorded so a mismatched tokenizer can be caught). `seed`
    seeds the contents (config.seed seeds the hashing); `identity` records that the modules'
    value path is zero. The manifest is written last: an interrupted run leaves none, and
    verify_tables then says so.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    layouts = table_layouts(config)
    paths = [table_path(model_dir, lay.layer_id) for lay in layouts]
    sizes = [lay.header()[2] for lay in layouts]
    module_bytes = sum(t.numel() * t.element_size() for t in modules.values())
    _check_disk_space(model_dir, sum(sizes) + module_bytes, [*paths, model_dir / MODULES_FILE])

    (model_dir / TABLE_DIR).mkdir(parents=True, exist_ok=True)
    (model_dir / MANIFEST).unlink(missing_ok=True)
    _write_json_atomic(model_dir / ENGRAM_JSON, config.to_dict())
    files: dict[str, Any] = {}
    with tqdm(
        total=sum(sizes),
        desc="Writing Engram tables",
        unit="B",
        unit_scale=True,
        disable=not progress,
    ) as bar:
        for layout, path in zip(layouts, paths, strict=True):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                write_random_table(tmp, layout, seed, chunk_bytes, bar)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            files[f"{TABLE_DIR}/{path.name}"] = {
                "layer_id": layout.layer_id,
                "rows": layout.rows,
                "width": layout.width,
                "dtype": layout.table_dtype,
                **file_digests(path),
            }
    files[MODULES_FILE] = _write_modules(model_dir, modules, config)
    manifest = {
        "format": FORMAT,
        "num_compressed": int(num_compressed),
        "seed": seed,
        "identity": identity,
        "quick_bytes": QUICK_BYTES,
        "files": files,
    }
    _write_json_atomic(model_dir / MANIFEST, manifest)
    return manifest


def _write_modules(
    model_dir: Path, modules: dict[str, torch.Tensor], config: EngramConfig
) -> dict[str, Any]:
    path = model_dir / MODULES_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    entries = [(name, "float32", tuple(t.shape)) for name, t in modules.items()]
    header, _, _ = safetensors_header(entries, {"format": "pt"})
    with open(tmp, "wb") as f:
        f.write(header)
        for t in modules.values():  # float32, contiguous, in header order
            f.write(memoryview(t.numpy()).cast("B"))
    os.replace(tmp, path)
    return {"layer_ids": list(config.layer_ids), **file_digests(path)}


def verify_tables(
    model_dir: str | Path, full: bool = False, table_files: bool = True
) -> dict[str, Any]:
    """Check the Engram files against engram.json and the manifest; returns the manifest.

    Quick (default): every file exists with the manifest's size, headers match engram.json's
    shapes and dtype, quick checksums match. `full`: also the sha256 of every byte.
    `table_files=False`: the manifest's table entries only, not the files (the remote tier
    reads published rows and needs no table file here).
    Raises TableIntegrityError naming the file at fault.
    """
    model_dir = Path(model_dir)
    config = read_engram_config(model_dir)
    if config is None:
        raise TableIntegrityError(f"{model_dir / ENGRAM_JSON} is missing: not an Engram model")
    manifest = read_manifest(model_dir)
    for layout in table_layouts(config):
        rel = f"{TABLE_DIR}/{table_path(model_dir, layout.layer_id).name}"
        entry = _manifest_entry(manifest, rel, model_dir)
        for key, want in (
            ("rows", layout.rows),
            ("width", layout.width),
            ("dtype", layout.table_dtype),
        ):
            if entry.get(key) != want:
                raise TableIntegrityError(
                    f"{model_dir / MANIFEST}: {rel} has {key}={entry.get(key)!r}, "
                    f"engram.json implies {want!r}"
                )
        if table_files:
            _check_file(model_dir / rel, entry, full)
            _check_table_header(model_dir / rel, layout)
    entry = _manifest_entry(manifest, MODULES_FILE, model_dir)
    _check_file(model_dir / MODULES_FILE, entry, full)
    _check_module_names(model_dir / MODULES_FILE, config)
    return manifest


def _manifest_entry(manifest: dict[str, Any], rel: str, model_dir: Path) -> dict[str, Any]:
    entry = manifest.get("files", {}).get(rel)
    if entry is None:
        raise TableIntegrityError(f"{model_dir / MANIFEST} lists no entry for {rel}")
    return entry


def _check_file(path: Path, entry: dict[str, Any], full: bool) -> None:
    if not path.exists():
        raise TableIntegrityError(f"{path} is missing")
    size = path.stat().st_size
    if size != entry["size"]:
        kind = "truncated" if size < entry["size"] else "larger than recorded"
        raise TableIntegrityError(f"{path}: {kind}: {size} bytes, manifest says {entry['size']}")
    digests = file_digests(path, full=full)
    if digests["quick_sha256"] != entry["quick_sha256"]:
        raise TableIntegrityError(f"{path}: quick checksum mismatch (first/last MiB changed)")
    if full and digests["sha256"] != entry["sha256"]:
        raise TableIntegrityError(f"{path}: sha256 mismatch: the file is corrupt")


def _check_table_header(path: Path, layout: TableLayout) -> None:
    header, data_offset = read_safetensors_header(path)
    for name, dtype, shape in layout.entries():
        got = header.get(name)
        want = {"dtype": _ST_DTYPES[dtype][0], "shape": list(shape)}
        if got is None or {k: got.get(k) for k in want} != want:
            raise TableIntegrityError(
                f"{path}: tensor {name!r} is {got and {k: got.get(k) for k in want}}, "
                f"engram.json implies {want}"
            )
    end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    if data_offset + end != path.stat().st_size:
        raise TableIntegrityError(
            f"{path}: header describes {data_offset + end} bytes, file has {path.stat().st_size}"
        )


def _check_module_names(path: Path, config: EngramConfig) -> None:
    header, _ = read_safetensors_header(path)
    for layer_id in config.layer_ids:
        prefix = f"model.layers.{layer_id}.engram."
        if not any(name.startswith(prefix) for name in header):
            raise TableIntegrityError(f"{path}: no weights named {prefix}* for Engram layer")


@dataclass(frozen=True)
class EngramTable:
    """One layer's table, memory-mapped: nothing is read until rows are touched.

    `weight [rows, W]` holds the stored values (uint8 FP8 bytes, float32, float16, or bfloat16
    bits as uint16); `scale [rows, W/32]` the fp8 UE8M0 bytes. Row r's bytes are at
    `data_offset + r * row_bytes` (its scales at `scale_offset + r * scale_row_bytes`), for
    readers that pread instead.
    """

    path: Path
    layer_id: int
    rows: int
    width: int
    table_dtype: TableDtype
    quant_block: int
    data_offset: int
    row_bytes: int
    scale_offset: int | None
    scale_row_bytes: int
    weight: np.ndarray  # [rows, W] read-only memmap
    scale: np.ndarray | None  # [rows, W/quant_block] read-only memmap (fp8)

    def weight_tensor(self) -> torch.Tensor:
        """`weight` as a torch view (bfloat16 for bf16 tables, uint8 bytes for fp8)."""
        t = _as_torch(self.weight)
        return t.view(torch.bfloat16) if self.table_dtype == "bfloat16" else t

    def scale_tensor(self) -> torch.Tensor | None:
        return None if self.scale is None else _as_torch(self.scale)

    def gather(self, row_ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """float32 rows `[..., W]` (fp8 dequantized); reads only the rows asked for."""
        ids = np.asarray(row_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            raise IndexError(f"row ids outside [0, {self.rows}) for {self.path}")
        flat = ids.reshape(-1)
        weight = torch.from_numpy(np.ascontiguousarray(self.weight[flat]))  # [n, W]
        if self.scale is not None:
            scale = torch.from_numpy(np.ascontiguousarray(self.scale[flat]))
            rows = dequantize_rows(weight, scale, self.quant_block)
        elif self.table_dtype == "bfloat16":
            rows = weight.view(torch.bfloat16).float()
        else:
            rows = weight.float()
        return rows.reshape(*ids.shape, self.width)


def _as_torch(a: np.ndarray) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # a read-only map: torch warns that writes are undefined
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def open_table(model_dir: str | Path, layer_id: int) -> EngramTable:
    """Memory-map layer `layer_id`'s table. Checks the header against the file size (a
    truncated file would fault on access), not the checksums: see verify_tables."""
    path = table_path(model_dir, layer_id)
    if not path.exists():
        raise TableIntegrityError(f"{path} is missing (no Engram table for layer {layer_id})")
    header, data_offset = read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT or "weight" not in header:
        raise TableIntegrityError(f"{path}: not an engram-serve table file")
    table_dtype = meta["table_dtype"]
    quant_block = int(meta.get("quant_block", 32))
    rows, width = header["weight"]["shape"]
    layout = TableLayout(int(meta["layer_id"]), rows, width, table_dtype, quant_block)
    _check_table_header(path, layout)
    np_dtype = _ST_DTYPES[_ST_TAGS[header["weight"]["dtype"]]][1]
    weight_offset = data_offset + header["weight"]["data_offsets"][0]
    weight = np.memmap(path, np_dtype, "r", weight_offset, (rows, width))
    scale, scale_offset = None, None
    if layout.is_fp8:
        scale_offset = data_offset + header["scale"]["data_offsets"][0]
        scale = np.memmap(path, np.uint8, "r", scale_offset, (rows, layout.scale_width))
    return EngramTable(
        path=path,
        layer_id=layout.layer_id,
        rows=rows,
        width=width,
        table_dtype=table_dtype,
        quant_block=quant_block,
        data_offset=weight_offset,
        row_bytes=layout.row_bytes,
        scale_offset=scale_offset,
        scale_row_bytes=layout.scale_width,
        weight=weight,
        scale=scale,
    )
