"""The CPU path's matrix multiply for small batches: `F.linear` (out = x @ weight^T + bias) for
at most `MAX_ROWS` rows of float32.

A decode step multiplies one row per running sequence by every weight of the model, so it is
bound by reading the weights (540 MB a step for the default model), and MKL's sgemm serves such
short, wide products poorly on this project's 2-core AVX2 machines: over the default model's
weights it read 5.6 GB/s for one row and ran 44 GFLOP/s for 64, where this kernel read
10.8 GB/s and ran 79 GFLOP/s (`python -m engram_serve.bench.kernels --linear`). The kernel
walks the weight in tiles of 4 output rows, which stay in L1 while the input rows pass them two
at a time: 8 running sums, each vectorized along K. A single row (one decoding sequence) takes
one dot product at a time, which is what reads memory fastest.

Sums are taken in another order than MKL's, so results differ from `F.linear` in the last bits
(tests/test_kernels.py bounds it), and a paired row's from a lone row's.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from engram_serve.kernels.cpu_threads import launch_parallel

MAX_ROWS = 256  # above this MKL's blocked sgemm is as fast or faster


@numba.njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
def linear_tile(x, weight, out, tile):
    """out[:, 4 tile : 4 tile + 4] = x @ weight[4 tile : 4 tile + 4]^T for x `[M, K]`, weight
    `[N, K]`, out `[M, N]`: one thread's share of a product (kernels/cpu_decode.py calls it too)."""
    rows, k = x.shape
    n = weight.shape[0]
    paired = rows - rows % 2
    o = 4 * tile
    # Rows two at a time against 4 weight rows; an odd last row, and a short last tile (N % 4
    # outputs), one dot product at a time.
    full = o + 4 <= n
    for m in range(0, paired if full else 0, 2):
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
        for i in range(k):
            w0, w1, w2, w3 = weight[o, i], weight[o + 1, i], weight[o + 2, i], weight[o + 3, i]
            xa, xb = x[m, i], x[m + 1, i]
            a0 += w0 * xa
            a1 += w1 * xa
            a2 += w2 * xa
            a3 += w3 * xa
            b0 += w0 * xb
            b1 += w1 * xb
            b2 += w2 * xb
            b3 += w3 * xb
        out[m, o], out[m, o + 1], out[m, o + 2], out[m, o + 3] = a0, a1, a2, a3
        out[m + 1, o], out[m + 1, o + 1], out[m + 1, o + 2], out[m + 1, o + 3] = b0, b1, b2, b3
    for m in range(paired if full else 0, rows):
        for col in range(o, min(o + 4, n)):
            acc = np.float32(0.0)
            for i in range(k):
                acc += weight[col, i] * x[m, i]
            out[m, col] = acc


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=True, boundscheck=False)
def _linear_kernel(x, weight, out):
    """out[m, o] = x[m] . weight[o] for x `[M, K]`, weight `[N, K]`, out `[M, N]`."""
    for tile in numba.prange((weight.shape[0] + 3) // 4):
        linear_tile(x, weight, out, tile)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel serves this call: float32 CPU tensors, x `[M, K]` with M <= MAX_ROWS."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
    )


def linear_cpu(
    x: torch.Tensor,  # [M, K] float32, 1 <= M <= MAX_ROWS
    weight: torch.Tensor,  # [N, K] float32
    bias: torch.Tensor | None = None,  # [N]
    num_threads: int | None = None,  # None: torch's thread count
) -> torch.Tensor:  # [M, N]
    if not supports(x, weight):
        raise ValueError(
            f"linear_cpu needs float32 CPU tensors and x of 1..{MAX_ROWS} rows, got x "
            f"{x.dtype} {tuple(x.shape)} on {x.device}, weight {weight.dtype}"
        )
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    out = torch.empty(x.shape[0], weight.shape[0])
    x_np, weight_np = x.detach().contiguous().numpy(), weight.detach().contiguous().numpy()
    launch_parallel(_linear_kernel, x_np, weight_np, out.numpy(), num_threads=num_threads)
    return out if bias is None else out.add_(bias)
