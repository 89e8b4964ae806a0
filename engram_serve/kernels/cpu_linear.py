"""The CPU path's matrix multiply for small batches: `F.linear` (out = x @ weight^T + bias) for
at most `MAX_ROWS` rows of float32.

A decode step multiplies one row per running sequence by every weight of the model, so it is
bound by reading the weights (540 MB a step for the default model), and MKL's sgemm serves such
short, wide products poorly on this project's 2-core AVX2 machines: over the default model's
weights it read 5.6 GB/s for one row and ran 44 GFLOP/s for 64, where this kernel read
10.8 GB/s and ran 79 GFLOP/s (`python -m engram_serve.bench.kernels --linear`). The kernel
walks the weight in tiles of 8 output rows (4 where K > 1024, where 8 would not fit in L1, and
without AVX-512, where their sums would not fit in the registers; see WIDE_TILE_MAX_K), which stay
in L1 while the input rows pass them two at a time: 16 (or 8) running sums, each vectorized
along K; an odd last row (a single decoding sequence, too) keeps 8 (or 4) sums. On an AVX-512
Xeon, against the earlier 4-row tiles with one sum for a lone row, in turns: 1.13-1.24x for the
default model's K = 576 products at 37 and 64 rows, 1.0-1.3x for one row.

Sums are taken in another order than MKL's, so results differ from `F.linear` in the last bits
(tests/test_kernels.py bounds it), and a paired row's from a lone row's.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from engram_serve.kernels.cpu_target import compiles_avx512
from engram_serve.kernels.cpu_threads import launch_parallel

MAX_ROWS = 256  # above this MKL's blocked sgemm is as fast or faster
# A tile's output columns: 8 weight rows while they fit in L1 beside the input rows passing them
# (8 x 1024 floats = 32 KiB), else 4. Always 4 without AVX-512: a pair's 16 sums, one AVX2
# register each, leave none of its 16 for the weights and spill; with 4 columns nothing spills
# and the sums are the same. 2-core AMD EPYC (AVX2, no AVX-512), one thread, K = 576, 8 columns
# against 4: 16 rows 37.9 / 69.4 GFLOP/s, 64 rows 37.3 / 72.2.
WIDE_TILE_MAX_K = 1024 if compiles_avx512() else 0


@numba.njit(inline="always")
def tile_width(k):
    return 8 if k <= WIDE_TILE_MAX_K else 4


@numba.njit(inline="always")
def num_tiles(n, k):
    """Tiles of a product with `n` outputs of length-`k` dot products (see linear_tile)."""
    width = tile_width(k)
    return (n + width - 1) // width


@numba.njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
def linear_tile(x, weight, out, tile):
    """out[:, o : o + width] = x @ weight[o : o + width]^T for x `[M, K]`, weight `[N, K]`, out
    `[M, N]`, where width = tile_width(K) and o = width * tile: one thread's share of a product
    (kernels/cpu_decode.py calls it too). Rows two at a time, an odd last row alone; a short
    last tile (N % width outputs) one dot product at a time."""
    rows, k = x.shape
    n = weight.shape[0]
    width = tile_width(k)
    o = width * tile
    if o + width > n:
        for m in range(rows):
            for col in range(o, n):
                acc = np.float32(0.0)
                for i in range(k):
                    acc += weight[col, i] * x[m, i]
                out[m, col] = acc
        return
    paired = rows - rows % 2
    for m in range(0, paired, 2):
        if width == 8:
            _pair8(x, weight, out, m, o)
        else:
            _pair4(x, weight, out, m, o)
    if paired < rows:
        if width == 8:
            _row8(x, weight, out, paired, o)
        else:
            _row4(x, weight, out, paired, o)


@numba.njit(inline="always", fastmath=True, boundscheck=False)
def _pair4(x, weight, out, m, o):
    """Rows m, m + 1 against weight rows o..o + 3: 8 running sums, each vectorized along K."""
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    for i in range(x.shape[1]):
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


@numba.njit(inline="always", fastmath=True, boundscheck=False)
def _row4(x, weight, out, m, o):
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for i in range(x.shape[1]):
        xa = x[m, i]
        a0 += weight[o, i] * xa
        a1 += weight[o + 1, i] * xa
        a2 += weight[o + 2, i] * xa
        a3 += weight[o + 3, i] * xa
    out[m, o], out[m, o + 1], out[m, o + 2], out[m, o + 3] = a0, a1, a2, a3


@numba.njit(inline="always", fastmath=True, boundscheck=False)
def _pair8(x, weight, out, m, o):
    """Rows m, m + 1 against weight rows o..o + 7: 16 running sums."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = np.float32(0.0)
    for i in range(x.shape[1]):
        w0, w1, w2, w3 = weight[o, i], weight[o + 1, i], weight[o + 2, i], weight[o + 3, i]
        w4, w5, w6, w7 = weight[o + 4, i], weight[o + 5, i], weight[o + 6, i], weight[o + 7, i]
        xa, xb = x[m, i], x[m + 1, i]
        a0 += w0 * xa
        a1 += w1 * xa
        a2 += w2 * xa
        a3 += w3 * xa
        a4 += w4 * xa
        a5 += w5 * xa
        a6 += w6 * xa
        a7 += w7 * xa
        b0 += w0 * xb
        b1 += w1 * xb
        b2 += w2 * xb
        b3 += w3 * xb
        b4 += w4 * xb
        b5 += w5 * xb
        b6 += w6 * xb
        b7 += w7 * xb
    out[m, o], out[m, o + 1], out[m, o + 2], out[m, o + 3] = a0, a1, a2, a3
    out[m, o + 4], out[m, o + 5], out[m, o + 6], out[m, o + 7] = a4, a5, a6, a7
    out[m + 1, o], out[m + 1, o + 1], out[m + 1, o + 2], out[m + 1, o + 3] = b0, b1, b2, b3
    out[m + 1, o + 4], out[m + 1, o + 5], out[m + 1, o + 6], out[m + 1, o + 7] = b4, b5, b6, b7


@numba.njit(inline="always", fastmath=True, boundscheck=False)
def _row8(x, weight, out, m, o):
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    for i in range(x.shape[1]):
        xa = x[m, i]
        a0 += weight[o, i] * xa
        a1 += weight[o + 1, i] * xa
        a2 += weight[o + 2, i] * xa
        a3 += weight[o + 3, i] * xa
        a4 += weight[o + 4, i] * xa
        a5 += weight[o + 5, i] * xa
        a6 += weight[o + 6, i] * xa
        a7 += weight[o + 7, i] * xa
    out[m, o], out[m, o + 1], out[m, o + 2], out[m, o + 3] = a0, a1, a2, a3
    out[m, o + 4], out[m, o + 5], out[m, o + 6], out[m, o + 7] = a4, a5, a6, a7


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=True, boundscheck=False)
def _linear_kernel(x, weight, out):
    """out[m, o] = x[m] . weight[o] for x `[M, K]`, weight `[N, K]`, out `[M, N]`."""
    for tile in numba.prange(num_tiles(weight.shape[0], weight.shape[1])):
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
