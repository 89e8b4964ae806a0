"""Software prefetch for the compiled CPU kernels: ask for cache lines before they are read, so
many DRAM misses are in flight at once instead of the one or two that a loop's own loads overlap.
Hardware prefetchers follow a stream only within a 4 KiB page, so rows gathered at random and KV
cache blocks in block-table order need these hints (kernels/cpu_gather.py,
kernels/cpu_attention.py)."""

from __future__ import annotations

import numba
from llvmlite import ir
from numba.extending import intrinsic

CACHE_LINE = 64


@intrinsic
def prefetch(typingctx, address):
    """LLVM's prefetch of the cache line at an integer address (read, keep in all levels)."""

    def codegen(context, builder, signature, args):
        i32, pointer = ir.IntType(32), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [pointer, i32, i32, i32])
        prefetch = builder.module.declare_intrinsic("llvm.prefetch", [pointer], fnty)
        builder.call(prefetch, [builder.inttoptr(args[0], pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return numba.types.void(numba.types.intp), codegen


@numba.njit(inline="always")
def prefetch_bytes(address, num_bytes):
    """Prefetch every cache line of [address, address + num_bytes)."""
    for line in range(0, num_bytes, CACHE_LINE):
        prefetch(address + line)
