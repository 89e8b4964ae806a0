"""The Engram model format: table files, module weights, manifest, integrity checks."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engram_serve.engram.config import EngramConfig
from engram_serve.engram.ngram_hash import find_primes
from engram_serve.engram.tables import (
    DATA_ALIGN,
    ENGRAM_JSON,
    MANIFEST,
    MODULES_FILE,
    QUICK_BYTES,
    RNG_BLOCK_ROWS,
    TableIntegrityError,
    open_table,
    quantize_fp8_rows,
    read_engram_config,
    table_path,
    verify_tables,
)
from engram_serve.kernels.reference import FP8_E4M3_TABLE
from engram_serve.model.retrofit import init_tables

HIDDEN = 64
# ~160k rows of 33 bytes per layer: files of ~5 MiB, larger than the two quick-checksum MiBs.
CONFIG = EngramConfig(
    variant="v41",
    layer_ids=(1, 3),
    max_ngram_size=3,
    n_head_per_ngram=2,
    engram_vocab_size=(40000, 40000),
    head_dim=32,
    table_dtype="fp8_e4m3",
)


def make(path, config=CONFIG, **kwargs):
    return init_tables(path, config, 1000, hidden_size=HIDDEN, progress=False, **kwargs)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    make(path, seed=7)
    return path


@pytest.fixture
def fresh(tmp_path):
    """A model directory of our own, to damage."""
    make(tmp_path, seed=7)
    return tmp_path


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def test_layout_and_manifest(fp8_dir):
    assert read_engram_config(fp8_dir) == CONFIG
    manifest = json.loads((fp8_dir / MANIFEST).read_text())
    rows = find_primes(CONFIG).sum(axis=1)
    for layer_id, want_rows in zip(CONFIG.layer_ids, rows, strict=True):
        path = table_path(fp8_dir, layer_id)
        entry = manifest["files"][f"engram_tables/{path.name}"]
        assert entry["rows"] == want_rows and entry["width"] == 32
        assert entry["size"] == path.stat().st_size
        table = open_table(fp8_dir, layer_id)
        assert (table.rows, table.width, table.table_dtype) == (want_rows, 32, "fp8_e4m3")
        assert table.weight.shape == (want_rows, 32) and table.weight.dtype == np.uint8
        assert table.scale.shape == (want_rows, 1)
        assert table.data_offset % DATA_ALIGN == 0 and table.row_bytes == 32
        assert table.scale_offset == table.data_offset + want_rows * 32
        assert table.path.stat().st_size == table.scale_offset + want_rows
    assert manifest["num_compressed"] == 1000


def test_readable_by_safetensors(fp8_dir):
    """The files are plain safetensors; the memory map sees exactly the stored bytes."""
    table = open_table(fp8_dir, 3)
    with safe_open(table.path, framework="np") as f:
        assert np.array_equal(f.get_tensor("weight"), table.weight)
        assert np.array_equal(f.get_tensor("scale"), table.scale)
    # pread at the advertised offsets gives the same row
    row = 12345
    with open(table.path, "rb") as f:
        raw = os.pread(f.fileno(), table.row_bytes, table.data_offset + row * table.row_bytes)
    assert raw == table.weight[row].tobytes()


def test_fp8_rows_decode_to_finite_gaussians(fp8_dir):
    table = open_table(fp8_dir, 1)
    weight = np.asarray(table.weight)
    assert not np.isin(weight, [0x7F, 0xFF]).any()  # the two E4M3 NaN bytes
    assert (np.asarray(table.scale) < 0xFF).all()  # 0xFF is UE8M0's NaN
    rows = table.gather(np.arange(0, table.rows, 7))
    assert torch.isfinite(rows).all()
    assert abs(rows.std().item() - 0.02) < 0.001 and abs(rows.mean().item()) < 0.001
    # different rows really differ (not one repeated block)
    assert not torch.equal(rows[0], rows[RNG_BLOCK_ROWS // 7 + 1])


def test_quantize_fp8_rows_error_bound():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype(np.float32) * np.logspace(-30, 30, 64)[:, None]
    x[0] = 0  # an all-zero block
    x[1, :32] = 1e-40  # subnormal float32
    q, scale = quantize_fp8_rows(x.astype(np.float32), 32)
    assert not np.isin(q, [0x7F, 0xFF]).any() and (scale < 0xFF).all()
    values = FP8_E4M3_TABLE[torch.from_numpy(q).long()].numpy().reshape(64, 2, 32)
    deq = values * np.exp2(scale.astype(np.float64) - 127)[..., None]
    amax = np.abs(x.reshape(64, 2, 32)).max(-1, keepdims=True)
    # E4M3 keeps 3 mantissa bits: error at most 1/16 of the value, or of the block's
    # smallest normal step for tiny values.
    assert (np.abs(deq - x.reshape(64, 2, 32)) <= amax / 16 + 1e-45).all()
    assert np.all(deq[0] == 0)


def test_chunked_write_equals_single_write(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    small = make(a, seed=3, chunk_bytes=1)  # one RNG block (4096 rows) per chunk
    large = make(b, seed=3, chunk_bytes=1 << 30)  # the whole table at once
    for name, entry in small["files"].items():
        assert entry["sha256"] == large["files"][name]["sha256"], name
    other = make(tmp_path / "c", seed=4)
    first = f"engram_tables/{table_path(a, 1).name}"
    assert other["files"][first]["sha256"] != small["files"][first]["sha256"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_float_tables(tmp_path, dtype):
    config = replace(CONFIG, variant="demo", engram_vocab_size=(3000, 3000))
    make(tmp_path, config, dtype=dtype)
    verify_tables(tmp_path, full=True)
    assert read_engram_config(tmp_path).table_dtype == dtype  # engram.json records the override
    table = open_table(tmp_path, 3)
    assert table.scale is None and table.row_bytes == 32 * {"float32": 4}.get(dtype, 2)
    want_torch = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    assert table.weight_tensor().dtype == want_torch[dtype]
    rows = table.gather(np.array([[0, 1], [table.rows - 1, 5]]))
    assert rows.shape == (2, 2, 32) and rows.dtype == torch.float32
    assert torch.equal(rows[1, 0], table.weight_tensor()[-1].float())
    assert 0.015 < table.weight_tensor().float().std() < 0.025


def test_module_weights(tmp_path):
    make(tmp_path, identity=True)
    weights = load_file(tmp_path / MODULES_FILE)
    for layer_id in CONFIG.layer_ids:
        wkv = weights[f"model.layers.{layer_id}.engram.wkv.weight"]  # [(hc+1)*D, (N-1)*H*W]
        assert wkv.shape == (2 * HIDDEN, CONFIG.engram_dim)
        assert (wkv[HIDDEN:] == 0).all()  # identity: the value rows are zero
        assert wkv[:HIDDEN].abs().sum() > 0  # the key rows are not
        assert (weights[f"model.layers.{layer_id}.engram.q_weight"] == 1).all()
    make(tmp_path / "random", identity=False)
    wkv = load_file(tmp_path / "random" / MODULES_FILE)["model.layers.1.engram.wkv.weight"]
    assert wkv[HIDDEN:].abs().sum() > 0


def test_verify_ok(fp8_dir):
    assert verify_tables(fp8_dir)["num_compressed"] == 1000
    verify_tables(fp8_dir, full=True)


def test_truncated_table(fresh):
    path = table_path(fresh, 3)
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(TableIntegrityError, match=r"layer_3\.safetensors: truncated"):
        verify_tables(fresh)
    with pytest.raises(TableIntegrityError, match="layer_3"):
        open_table(fresh, 3)


def test_flipped_byte_in_the_middle_needs_full_check(fresh):
    path = table_path(fresh, 1)
    assert path.stat().st_size > 3 * QUICK_BYTES
    flip_byte(path, path.stat().st_size // 2)
    verify_tables(fresh)  # the quick check reads only both ends
    with pytest.raises(TableIntegrityError, match=r"layer_1\.safetensors: sha256 mismatch"):
        verify_tables(fresh, full=True)


def test_flipped_byte_near_the_start(fresh):
    flip_byte(table_path(fresh, 1), DATA_ALIGN + 10)
    with pytest.raises(TableIntegrityError, match=r"layer_1\.safetensors: quick checksum"):
        verify_tables(fresh)


def test_module_file_checked(fresh):
    flip_byte(fresh / MODULES_FILE, (fresh / MODULES_FILE).stat().st_size - 5)
    with pytest.raises(TableIntegrityError, match=MODULES_FILE):
        verify_tables(fresh)


def test_manifest_disagrees_with_engram_json(fresh):
    manifest = json.loads((fresh / MANIFEST).read_text())
    manifest["files"]["engram_tables/layer_3.safetensors"]["rows"] += 1
    (fresh / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TableIntegrityError, match=r"layer_3\.safetensors has rows="):
        verify_tables(fresh)


def test_engram_json_changed_after_init(fresh):
    """Tables made for another config: the row count no longer matches the primes."""
    raw = json.loads((fresh / ENGRAM_JSON).read_text())
    raw["engram_vocab_size"] = [50000, 50000]
    (fresh / ENGRAM_JSON).write_text(json.dumps(raw))
    with pytest.raises(TableIntegrityError, match="engram.json implies"):
        verify_tables(fresh)


def test_missing_manifest_and_files(fresh):
    os.remove(table_path(fresh, 3))
    with pytest.raises(TableIntegrityError, match=r"layer_3\.safetensors is missing"):
        verify_tables(fresh)
    os.remove(fresh / MANIFEST)
    with pytest.raises(TableIntegrityError, match="manifest.json is missing"):
        verify_tables(fresh)
    with pytest.raises(TableIntegrityError, match="layer 7"):
        open_table(fresh, 7)


def test_refuses_when_the_disk_is_too_small(tmp_path):
    huge = replace(CONFIG, engram_vocab_size=(10**15, 10**15))  # petabytes of rows
    with pytest.raises(OSError, match="not enough disk space"):
        make(tmp_path, huge)
    assert list(tmp_path.iterdir()) == []  # checked before anything is written


def test_hidden_size_from_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="hidden_size"):
        init_tables(tmp_path, CONFIG, 1000, progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 48}))
    init_tables(tmp_path, replace(CONFIG, engram_vocab_size=(500, 500)), 1000, progress=False)
    wkv = load_file(tmp_path / MODULES_FILE)["model.layers.1.engram.wkv.weight"]
    assert wkv.shape == (2 * 48, CONFIG.engram_dim)
