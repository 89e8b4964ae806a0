"""Triton fused Engram gate, both variants: RMSNorms, dot product, signed square root, sigmoid,
scaling of the shared value, and the residual add, in one pass over each token's branches.

Twin: `reference.fused_engram_gate`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engram_serve.kernels.launch import check_launch_device, check_tensor

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_ELEMENTS = 4096  # elements per program: BLOCK_R (token, branch) rows x BLOCK_D


@triton.jit
def _gate_kernel(
    h_ptr,  # [T, hc, D]
    key_ptr,  # [T, hc, D]
    value_ptr,  # [T, D]
    q_weight_ptr,  # [hc, D] (HAS_Q)
    k_weight_ptr,  # [hc, D] (HAS_K)
    out_ptr,  # [T, hc, D]
    num_rows,  # T * hc
    hc,
    dim,
    eps,
    inv_sqrt_dim,
    HAS_Q: tl.constexpr,
    HAS_K: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row r = (t, b): g = <h/rms(h) * qw_b, k/rms(k) * kw_b> / sqrt(D), rms(x) =
    sqrt(mean(x**2) + eps); a = sigmoid(sign(g) sqrt(max(|g|, 1e-6)));
    out = a * value_t (+ h)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    d = tl.arange(0, BLOCK_D)
    mask = (r < num_rows)[:, None] & (d < dim)[None, :]
    offs = r[:, None].to(tl.int64) * dim + d[None, :]  # [BR, BD]
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(key_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nq = h * tl.rsqrt(tl.sum(h * h, axis=1) / dim + eps)[:, None]
    nk = k * tl.rsqrt(tl.sum(k * k, axis=1) / dim + eps)[:, None]
    weight_offs = (r % hc)[:, None] * dim + d[None, :]
    if HAS_Q:
        nq *= tl.load(q_weight_ptr + weight_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_K:
        nk *= tl.load(k_weight_ptr + weight_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.sum(nq * nk, axis=1) * inv_sqrt_dim  # [BR]
    root = tl.sqrt(tl.maximum(tl.abs(g), 1e-6))
    a = tl.sigmoid(tl.where(g > 0, root, tl.where(g < 0, -root, 0.0)))  # [BR]
    token = (r // hc)[:, None].to(tl.int64)
    y = a[:, None] * tl.load(value_ptr + token * dim + d[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    if ADD_RESIDUAL:
        y += h
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def fused_engram_gate(
    h: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    add_residual: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per token t and branch b, in float32:

        g = <RMSNorm(h_b) * q_weight_b, RMSNorm(key_b) * k_weight_b> / sqrt(D),
        RMSNorm(x) = x / sqrt(mean(x**2) + eps),  a = sigmoid(sign(g) * sqrt(max(|g|, 1e-6))),
        out_b = a * value (+ h_b when add_residual)

    h, key `[T, hc, D]`, value `[T, D]`, q_weight/k_weight `[hc, D]` or None (ones), all float
    and contiguous on one device -> `[T, hc, D]` in h's dtype. v41 passes add_residual=True (the
    new hidden state); demo passes False (v, which feeds the short conv).
    """
    device = h.device
    check_launch_device(_gate_kernel, device)
    check_tensor("h", h, device, _FLOAT_DTYPES, dim=3)
    check_tensor("key", key, device, _FLOAT_DTYPES, dim=3)
    check_tensor("value", value, device, _FLOAT_DTYPES, dim=2)
    num_tokens, hc, dim = h.shape
    if key.shape != h.shape or value.shape != (num_tokens, dim):
        raise ValueError(
            f"need h, key [T, hc, D] and value [T, D]; got h {tuple(h.shape)}, "
            f"key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight)):
        if weight is not None:
            check_tensor(name, weight, device, _FLOAT_DTYPES, dim=2)
            if weight.shape != (hc, dim):
                raise ValueError(f"{name} must be [hc, D] = {(hc, dim)}, got {tuple(weight.shape)}")
    if out is None:
        out = torch.empty_like(h)
    else:
        check_tensor("out", out, device, _FLOAT_DTYPES)
        if out.shape != h.shape:
            raise ValueError(f"out must be {tuple(h.shape)}, got {tuple(out.shape)}")
    num_rows = num_tokens * hc
    if num_rows == 0:
        return out
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(_BLOCK_ELEMENTS // block_d, triton.next_power_of_2(num_rows)))
    _gate_kernel[(triton.cdiv(num_rows, block_r),)](
        h, key, value, h if q_weight is None else q_weight, h if k_weight is None else k_weight,
        out, num_rows, hc, dim, float(eps), 1.0 / math.sqrt(dim),
        HAS_Q=q_weight is not None, HAS_K=k_weight is not None, ADD_RESIDUAL=add_residual,
        BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return out
