"""Triton row gather: table rows by id, from device memory or pinned host memory read in place
(UVA), optionally through a fast-tier cache, FP8 rows dequantized on the fly.

Twins: `reference.gather_rows` (no cache) and `reference.gather_rows_cached`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engram_serve.kernels.launch import check_launch_device, check_tensor
from engram_serve.kernels.reference import _FP8_VIEW_DTYPES

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP8_DTYPES = (torch.uint8, *_FP8_VIEW_DTYPES)
_BLOCK_ELEMENTS = 4096  # elements per program: BLOCK_N rows x BLOCK_W columns


@triton.jit
def _gather_kernel(
    table_ptr,  # [R, W] float or FP8 bytes
    scale_ptr,  # [R, W / QUANT_BLOCK] UE8M0 bytes (IS_FP8)
    cache_ptr,  # [num_slots, W], the table's format (HAS_CACHE)
    cache_scale_ptr,  # [num_slots, W / QUANT_BLOCK] (HAS_CACHE and IS_FP8)
    ids_ptr,  # [n] int64 table rows
    slots_ptr,  # [n] int64 cache slots, -1 = miss (HAS_CACHE)
    out_ptr,  # [n, W]
    num_rows,
    width,
    IS_FP8: tl.constexpr,
    HAS_CACHE: tl.constexpr,
    QUANT_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """out[i] = dq(cache[slot[i]]) if slot[i] >= 0 else dq(table[ids[i]]), where dq is the
    identity for float rows and fp8(b) * 2**(scale_byte - 127) per QUANT_BLOCK values for FP8.
    A persistent grid: program p handles row blocks p, p + P, p + 2P, ..."""
    cols = tl.arange(0, BLOCK_W)
    c_mask = cols < width
    scale_width = width // QUANT_BLOCK
    for block in range(tl.program_id(0), tl.cdiv(num_rows, BLOCK_N), tl.num_programs(0)):
        r = block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        r_mask = r < num_rows
        row = tl.load(ids_ptr + r, mask=r_mask, other=0)  # [BN] int64
        mask = r_mask[:, None] & c_mask[None, :]
        if HAS_CACHE:
            slot = tl.load(slots_ptr + r, mask=r_mask, other=-1)
            hit = (slot >= 0)[:, None]
            from_cache = tl.load(cache_ptr + slot[:, None] * width + cols[None, :], mask=mask & hit)
            from_table = tl.load(table_ptr + row[:, None] * width + cols[None, :], mask=mask & ~hit)
            x = tl.where(hit, from_cache, from_table)  # [BN, BW]
        else:
            x = tl.load(table_ptr + row[:, None] * width + cols[None, :], mask=mask)
        if IS_FP8:
            scale_cols = cols[None, :] // QUANT_BLOCK
            if HAS_CACHE:
                s_cache = tl.load(
                    cache_scale_ptr + slot[:, None] * scale_width + scale_cols, mask=mask & hit
                )
                s_table = tl.load(
                    scale_ptr + row[:, None] * scale_width + scale_cols, mask=mask & ~hit
                )
                s = tl.where(hit, s_cache, s_table)
            else:
                s = tl.load(scale_ptr + row[:, None] * scale_width + scale_cols, mask=mask)
            # FP8-E4M3 byte -> float32 bits: sign, exponent rebiased 7 -> 127, mantissa 3 -> 23
            # bits; exponent 0 is subnormal (m * 2**-9) and S.1111.111 is NaN.
            b = x.to(tl.uint32)
            exponent = (b >> 3) & 0xF
            mantissa = b & 0x7
            normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
            magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
            value = tl.where((b & 0x80) != 0, -magnitude, magnitude)
            value = tl.where((b & 0x7F) == 0x7F, float("nan"), value)
            # UE8M0 byte u -> 2**(u - 127): float32 bits u << 23, 0 -> 2**-127 (subnormal),
            # 0xFF -> NaN.
            u = s.to(tl.uint32)
            scale_bits = tl.where(u == 0, 0x400000, tl.where(u == 0xFF, 0x7FC00000, u << 23))
            x = value * scale_bits.to(tl.uint32).to(tl.float32, bitcast=True)
        out = out_ptr + r[:, None].to(tl.int64) * width + cols[None, :]
        tl.store(out, x.to(out_ptr.dtype.element_ty), mask=mask)


def gather_rows(
    table: torch.Tensor,
    row_ids: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    slots: torch.Tensor | None = None,
    cache: torch.Tensor | None = None,
    cache_scale: torch.Tensor | None = None,
    block: int = 32,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    max_programs: int | None = None,
) -> torch.Tensor:
    """out[..., :] = table[row_ids[...], :], read from `cache[slots[...]]` where slots >= 0.

    FP8 rows (uint8 or float8_e4m3fn bytes) are dequantized on the fly:
        out[i, w] = fp8(rows[i, w]) * 2**(scale[i, w // block] - 127)
    float32/bf16/fp16 rows are converted to `out_dtype`.

    table [R, W] on the device or in pinned host memory (read in place over UVA); scale
    [R, W / block] UE8M0 bytes alongside it for FP8; row_ids int64 [...] on the device;
    slots int64 like row_ids (-1: miss, read the table) with cache [num_slots, W] (and
    cache_scale) on the device in the table's format. Returns out_dtype [..., W].
    max_programs caps the grid (a side-stream gather then leaves SMs to the main stream).
    Ids and slots are not range-checked (that would need a device sync).
    """
    device = row_ids.device
    check_launch_device(_gather_kernel, device)
    check_tensor("row_ids", row_ids, device, (torch.int64,))
    is_fp8 = table.dtype in _FP8_DTYPES
    _check_table("table", table, scale, device, is_fp8, block, allow_host=True)
    width = table.shape[1]
    if slots is not None or cache is not None:
        if slots is None or cache is None:
            raise ValueError("slots and cache go together")
        check_tensor("slots", slots, device, (torch.int64,))
        if slots.shape != row_ids.shape:
            raise ValueError(
                f"slots {tuple(slots.shape)} must match row_ids {tuple(row_ids.shape)}"
            )
        if cache.dtype != table.dtype or cache.dim() != 2 or cache.shape[1] != width:
            raise ValueError(
                f"cache {cache.dtype} {tuple(cache.shape)} must be in the table's format, "
                f"{table.dtype} rows of width {width}"
            )
        _check_table("cache", cache, cache_scale, device, is_fp8, block, allow_host=False)
    want = (*row_ids.shape, width)
    if out is None:
        out = torch.empty(want, dtype=out_dtype, device=device)
    else:
        check_tensor("out", out, device, _FLOAT_DTYPES)
        if tuple(out.shape) != want:
            raise ValueError(f"out must be {want}, got {tuple(out.shape)}")
    num_rows = row_ids.numel()
    if num_rows == 0:
        return out
    block_w = triton.next_power_of_2(width)
    block_n = max(1, min(_BLOCK_ELEMENTS // block_w, triton.next_power_of_2(num_rows)))
    num_blocks = triton.cdiv(num_rows, block_n)
    grid = (num_blocks if max_programs is None else max(1, min(num_blocks, max_programs)),)
    has_cache = cache is not None
    _gather_kernel[grid](
        _bytes(table) if is_fp8 else table, _bytes(scale) if is_fp8 else table,
        (_bytes(cache) if is_fp8 else cache) if has_cache else table,
        _bytes(cache_scale) if has_cache and is_fp8 else table,
        row_ids, slots if has_cache else row_ids, out, num_rows, width,
        IS_FP8=is_fp8, HAS_CACHE=has_cache, QUANT_BLOCK=block, BLOCK_N=block_n, BLOCK_W=block_w,
    )  # fmt: skip
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _check_table(
    name: str,
    table: torch.Tensor,
    scale: torch.Tensor | None,
    device: torch.device,
    is_fp8: bool,
    block: int,
    allow_host: bool,
) -> None:
    # A table in pinned host memory is read in place by device threads (UVA); pageable host
    # memory cannot be, and the CPU path calls the twin instead.
    on_host = allow_host and device.type == "cuda" and table.device.type == "cpu"
    if on_host and not table.is_pinned():
        raise ValueError(f"{name} in host memory must be pinned to be read in place over UVA")
    table_device = table.device if on_host else device
    check_tensor(name, table, table_device, _FP8_DTYPES + _FLOAT_DTYPES, dim=2)
    if not is_fp8:
        if scale is not None:
            raise ValueError(f"{name}: a scale is only for FP8 rows, got {table.dtype} rows")
        return
    width = table.shape[1]
    if scale is None:
        raise ValueError(f"{name}: FP8 rows need their UE8M0 scale [rows, W / {block}]")
    check_tensor(f"{name} scale", scale, table_device, (torch.uint8, *_FP8_VIEW_DTYPES), dim=2)
    if on_host and not scale.is_pinned():
        raise ValueError(f"{name} scale in host memory must be pinned, as the table is")
    if width % block or tuple(scale.shape) != (table.shape[0], width // block):
        raise ValueError(
            f"{name} {tuple(table.shape)} needs a scale of shape {(table.shape[0], width // block)}"
            f" (one per {block} values), got {tuple(scale.shape)}"
        )
