"""IEEE half precision (float16) in the CPU kernels, for the 16-bit KV cache.

numba has no float16 type on the CPU, so a float16 array reaches a kernel as its bits (`uint16`,
`as_bits`), and two LLVM conversions turn bits into float32 and back: `fpext` and `fptrunc`,
which x86 compiles to F16C's vcvtph2ps / vcvtps2ph, vectorized, and round to nearest even like
torch's `.to(torch.float16)` (tests/test_kernels.py checks both against torch, bit for bit).

Kernels written once for float32 and float16 caches read a cache element with `load(x)` and
write one with `store(cache, value)`: numba compiles each for the array's element type, so the
float32 path is unchanged (the conversion is the identity there).
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

CACHE_DTYPES = (torch.float32, torch.float16)


@intrinsic
def _half_to_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _float_to_half(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


def load(x):
    """A cache element as float32 (in compiled code only)."""
    raise NotImplementedError("load runs inside numba kernels")


def store(cache, value):
    """`value` (float32) as an element of `cache`'s type (in compiled code only)."""
    raise NotImplementedError("store runs inside numba kernels")


@overload(load, inline="always")
def _load(x):
    if x == types.uint16:
        return lambda x: _half_to_float(x)
    return lambda x: np.float32(x)


@overload(store, inline="always")
def _store(cache, value):
    if cache.dtype == types.uint16:
        return lambda cache, value: _float_to_half(np.float32(value))
    return lambda cache, value: np.float32(value)


def as_bits(cache: torch.Tensor) -> np.ndarray:
    """A float32 or float16 CPU tensor as the array a kernel takes: itself, or its bits."""
    if cache.dtype == torch.float16:
        return cache.view(torch.int16).numpy().view(np.uint16)
    if cache.dtype == torch.float32:
        return cache.numpy()
    raise ValueError(f"the CPU kernels take float32 or float16 caches, got {cache.dtype}")
