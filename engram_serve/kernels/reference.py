"""Pure-torch twins of the Engram kernels: the CPU path and the oracle the Triton kernels are
tested against. Each function states its formula; shapes are in the comments.

Byte formats (DeepSeek-V4.1 checkpoints):
- FP8-E4M3 ("E4M3FN"): sign bit, 4 exponent bits (bias 7), 3 mantissa bits. Exponent field 0 is
  subnormal: (-1)^s * m/8 * 2**-6. Otherwise (-1)^s * (1 + m/8) * 2**(e-7). No infinities; only
  0x7F and 0xFF (all exponent and mantissa bits set) are NaN, so the largest value is 448.
- UE8M0: an unsigned power of two, value = 2**(byte - 127); 0xFF is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_FP8_VIEW_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e8m0fnu") if hasattr(torch, name)
)


def _fp8_e4m3_value(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def _ue8m0_value(byte: int) -> float:
    return math.nan if byte == 0xFF else 2.0 ** (byte - 127)


# Every value of both formats is exactly representable in float32 (2**-127 as a subnormal), so
# a 256-entry table decodes exactly on any device.
FP8_E4M3_TABLE = torch.tensor([_fp8_e4m3_value(b) for b in range(256)], dtype=torch.float32)
UE8M0_TABLE = torch.tensor([_ue8m0_value(b) for b in range(256)], dtype=torch.float32)


@dataclass(frozen=True)
class DecodeTables:
    """The two 256-entry decode tables on one device. The serving path uploads them once and
    passes them in: without them each call copies the CPU tables to the bytes' device (a
    blocking host-to-device copy on CUDA)."""

    fp8_e4m3: torch.Tensor = FP8_E4M3_TABLE
    ue8m0: torch.Tensor = UE8M0_TABLE


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of an FP8 tensor: uint8 passes through, torch float8 dtypes are viewed."""
    if t.dtype == torch.uint8:
        return t
    if t.dtype in _FP8_VIEW_DTYPES:
        return t.view(torch.uint8)
    raise TypeError(f"expected uint8 or float8 bytes, got {t.dtype}")


def _lookup(table: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """table[b] for bytes of any shape: an index_select, which every device runs in place."""
    return table.to(b.device).index_select(0, b.reshape(-1).long()).view(b.shape)


def decode_fp8_e4m3(b: torch.Tensor, tables: DecodeTables = DecodeTables()) -> torch.Tensor:
    """FP8-E4M3 bytes (any shape) -> float32 of the same shape, exact."""
    return _lookup(tables.fp8_e4m3, as_bytes(b))


def decode_ue8m0(b: torch.Tensor, tables: DecodeTables = DecodeTables()) -> torch.Tensor:
    """UE8M0 bytes (any shape) -> float32 2**(byte - 127), exact."""
    return _lookup(tables.ue8m0, as_bytes(b))


def dequantize_rows(
    rows: torch.Tensor,
    scales: torch.Tensor,
    block: int = 32,
    tables: DecodeTables = DecodeTables(),
) -> torch.Tensor:
    """Row-wise block scales: out[r, i] = fp8(rows[r, i]) * ue8m0(scales[r, i // block]).

    rows `[..., W]` FP8 bytes, scales `[..., W / block]` UE8M0 bytes -> float32 `[..., W]`.
    `tables`: the decode tables on the rows' device.
    """
    width = rows.shape[-1]
    if width % block or scales.shape != (*rows.shape[:-1], width // block):
        raise ValueError(
            f"rows {tuple(rows.shape)} need scales of shape "
            f"{(*rows.shape[:-1], width // block)} (one per {block} values), "
            f"got {tuple(scales.shape)}"
        )
    values = decode_fp8_e4m3(rows, tables).unflatten(-1, (width // block, block))
    return (values * decode_ue8m0(scales, tables)[..., None]).flatten(-2)  # [..., W]


def dequantize_blocks(w: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Square block scales (weights):
    out[m, k] = fp8(w[m, k]) * ue8m0(scale[m // block, k // block]).

    w `[M, K]` FP8 bytes, scale `[ceil(M/block), ceil(K/block)]` UE8M0 bytes -> float32 `[M, K]`.
    """
    m, k = w.shape
    expected = (-(-m // block), -(-k // block))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"weight {(m, k)} with {block}x{block} blocks needs scale {expected}, "
            f"got {tuple(scale.shape)}"
        )
    s = decode_ue8m0(scale).repeat_interleave(block, 0)[:m].repeat_interleave(block, 1)[:, :k]
    return decode_fp8_e4m3(w) * s


def ngram_hash(
    compressed_ids: torch.Tensor,
    query_start_loc: torch.Tensor,
    lookback: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows (offsets given) or per-head hashes of every Engram layer, `[L, T, (N-1)*H]` int64.

    For layer l, order n = 2..N, head j (column c = (n-2)*H + j):
        out[l, t, c] = (XOR_{k<n} x[t-k] * multipliers[l, k]) mod primes[l, c] + offsets[l, c]
    where x[t-k] before a sequence's chunk start is read from its lookback.

    compressed_ids [T] of S sequences packed flat, query_start_loc [S+1], lookback [S, N-1]
    (each sequence's previous ids, oldest first), multipliers [L, N], primes [L, (N-1)*H]:
    int64. Products stay below int64's limit when ids < V' and multipliers < int64_max // V'.
    """
    num_layers, max_ngram = multipliers.shape
    num_seqs, num_back = lookback.shape[0], max_ngram - 1
    # Each sequence's lookback laid immediately before its new tokens: x[t-k] = extended[pos - k].
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), query_start_loc.diff())
    token_pos = torch.arange(compressed_ids.shape[0]) + (seq_of_token + 1) * num_back  # [T]
    extended = torch.empty(compressed_ids.shape[0] + num_seqs * num_back, dtype=torch.int64)
    extended[token_pos] = compressed_ids
    lookback_pos = query_start_loc[:-1, None] + torch.arange(num_seqs)[:, None] * num_back
    extended[lookback_pos + torch.arange(num_back)] = lookback
    windows = extended[token_pos[None, :] - torch.arange(max_ngram)[:, None]]  # [N, T]
    products = multipliers[:, :, None] * windows[None]  # [L, N, T]
    mix, orders = products[:, 0], []
    for k in range(1, max_ngram):
        mix = mix ^ products[:, k]
        orders.append(mix)
    heads = primes.shape[1] // num_back
    mix = torch.stack(orders, dim=1).repeat_interleave(heads, dim=1)  # [L, (N-1)*H, T]
    rows = mix % primes[:, :, None]  # mix >= 0, so `%` is the floor remainder
    if offsets is not None:
        rows += offsets[:, :, None]
    return rows.transpose(1, 2).contiguous()


def gather_rows(
    table: torch.Tensor, row_ids: torch.Tensor, scale: torch.Tensor | None = None, block: int = 32
) -> torch.Tensor:
    """out[..., :] = table[row_ids[...], :] as float32; FP8 tables are dequantized with `scale`.

    table `[R, W]` float32/bf16/fp16, or FP8 bytes with scale `[R, W / block]` UE8M0 bytes;
    row_ids int64 `[...]` -> float32 `[..., W]`.
    """
    if table.dim() != 2:
        raise ValueError(f"table must be [rows, width], got shape {tuple(table.shape)}")
    if row_ids.numel() and (int(row_ids.min()) < 0 or int(row_ids.max()) >= table.shape[0]):
        raise IndexError(
            f"row ids span [{int(row_ids.min())}, {int(row_ids.max())}], "
            f"outside a table of {table.shape[0]} rows"
        )
    flat = row_ids.reshape(-1)  # [n]
    is_fp8 = table.dtype == torch.uint8 or table.dtype in _FP8_VIEW_DTYPES
    if is_fp8:
        if scale is None:
            raise ValueError("an FP8 table needs its UE8M0 `scale` tensor")
        rows = dequantize_rows(table[flat], scale[flat], block)  # [n, W]
    else:
        if scale is not None:
            raise ValueError(f"`scale` is only for FP8 tables, got a {table.dtype} table")
        rows = table[flat].float()  # [n, W]
    return rows.reshape(*row_ids.shape, table.shape[1])


def engram_gate(
    h: torch.Tensor,
    key: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """The Engram context gate, one scalar per token per branch.

    g = <RMSNorm(h_b) * q_weight_b, RMSNorm(key_b) * k_weight_b> / sqrt(D),
    RMSNorm(x) = x / sqrt(mean(x**2) + eps); a = sigmoid(sign(g) * sqrt(max(|g|, 1e-6))).

    h, key `[T, hc, D]`; q_weight, k_weight `[hc, D]` (None: ones) -> a `[T, hc]`, in h's dtype.
    Computed in float32.
    """
    if h.shape != key.shape or h.dim() != 3:
        raise ValueError(
            f"h and key must both be [T, hc, D], got {tuple(h.shape)}, {tuple(key.shape)}"
        )
    hf, kf = h.float(), key.float()
    nq = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)  # [T, hc, D]
    nk = kf * torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + eps)  # [T, hc, D]
    if q_weight is not None:
        nq = nq * q_weight.float()
    if k_weight is not None:
        nk = nk * k_weight.float()
    g = (nq * nk).sum(-1) / math.sqrt(h.shape[-1])  # [T, hc]
    # The signed square root keeps the sign and softens large logits before the sigmoid.
    g = g.abs().clamp_min(1e-6).sqrt() * g.sign()
    return torch.sigmoid(g).to(h.dtype)


def gather_rows_cached(
    table: torch.Tensor,
    row_ids: torch.Tensor,
    slots: torch.Tensor,
    cache: torch.Tensor,
    scale: torch.Tensor | None = None,
    cache_scale: torch.Tensor | None = None,
    block: int = 32,
) -> torch.Tensor:
    """Gather through a row cache: out[i] = cache[slots[i]] where slots[i] >= 0 (a hit), else
    table[row_ids[i]] (a miss), each dequantized as `gather_rows` does.

    cache `[num_slots, W]` holds rows in the table's format (with cache_scale for FP8);
    slots int64 shaped like row_ids, -1 for a miss -> float32 `[..., W]`.
    """
    if slots.shape != row_ids.shape:
        raise ValueError(f"slots {tuple(slots.shape)} must match row_ids {tuple(row_ids.shape)}")
    hits = slots >= 0  # [...]
    out = torch.empty(*row_ids.shape, table.shape[1], dtype=torch.float32, device=row_ids.device)
    out[hits] = gather_rows(cache, slots[hits], cache_scale, block)
    out[~hits] = gather_rows(table, row_ids[~hits], scale, block)
    return out


def fused_engram_gate(
    h: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    add_residual: bool,
) -> torch.Tensor:
    """The gate applied to the shared value, all in float32, rounded once to h's dtype:

    y_b = a_b * value (+ h_b when add_residual), a = engram_gate(h, key, q_weight, k_weight, eps).

    h, key `[T, hc, D]`, value `[T, D]` -> `[T, hc, D]`. v41: add_residual=True gives the new
    hidden state; demo: add_residual=False gives v, the short conv's input.
    """
    a = engram_gate(h.float(), key.float(), q_weight, k_weight, eps)  # [T, hc]
    if value.shape != (h.shape[0], h.shape[2]):
        raise ValueError(
            f"value must be [T, D] = {(h.shape[0], h.shape[2])}, got {tuple(value.shape)}"
        )
    y = a[..., None] * value.float()[:, None, :]  # [T, hc, D]
    if add_residual:
        y = y + h.float()
    return y.to(h.dtype)
