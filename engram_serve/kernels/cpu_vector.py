"""16-lane float32 vectors for numba kernels: a numba type held in one SIMD register (two on
AVX2), and the few operations the block-quantized kernels (kernels/cpu_quant.py) need.

A block-quantized weight multiplies each block of 32 values by the block's scale: a vector of
products times a scalar, summed into a running vector across blocks. numba cannot express that
with plain loops: LLVM's loop vectorizer only vectorizes innermost loops, which here are the
16- and 32-element block loops, and it unrolls those into scalar code (numba turns LLVM's SLP
vectorizer off), or vectorizes along K, where every lane would need its own scale (a gather).
Written with these vectors, the 4-bit kernel's 8-row tile ran 20.6 G weights/s (one row of x, a
3072 x 576 weight in cache) on one core of a 2-vCPU AVX-512 Xeon (family 6, model 167), against
3.4 for the best plain-loop version (dequantize a tile into an L1 buffer, then
kernels/cpu_linear.py's tile) and 0.2-1.6 for the others tried.

The operations are exact IEEE arithmetic (no fast-math flags): `fma` rounds once, `hsum` adds in
a fixed tree. Loads and stores take an array and the (row, column) of the first of 16
consecutive elements along the last axis, which must lie in the array: nothing is checked.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.typing import signature
from numba.extending import intrinsic, models, register_model

LANES = 16
_F32X16 = ir.VectorType(ir.FloatType(), LANES)
_I32X16 = ir.VectorType(ir.IntType(32), LANES)
_I8X16 = ir.VectorType(ir.IntType(8), LANES)
_I16X16 = ir.VectorType(ir.IntType(16), LANES)


class Float32x16(types.Type):
    def __init__(self) -> None:
        super().__init__(name="float32x16")


float32x16 = Float32x16()


@register_model(Float32x16)
class _Float32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _F32X16)


def _element_pointer(context, builder, sig, args, vector_type):
    """Pointer to array[row, col], as one to `vector_type`, for the intrinsics' (array, row, col,
    ...) arguments."""
    array_type = sig.args[0]
    array = context.make_array(array_type)(context, builder, args[0])
    indices = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:3], sig.args[1:3])]
    pointer = cgutils.get_item_pointer(context, builder, array_type, array, indices)
    return builder.bitcast(pointer, vector_type.as_pointer())


def _splat(builder, value):
    one = builder.insert_element(ir.Constant(_F32X16, ir.Undefined), value, ir.IntType(32)(0))
    return builder.shuffle_vector(
        one, ir.Constant(_F32X16, ir.Undefined), ir.Constant(_I32X16, [0] * LANES)
    )


@intrinsic
def splat(typingctx, value):
    """The vector whose lanes all hold `value` (converted to float32)."""

    def codegen(context, builder, sig, args):
        return _splat(builder, context.cast(builder, args[0], sig.args[0], types.float32))

    return float32x16(value), codegen


@intrinsic
def load(typingctx, array, row, col):
    """array[row, col : col + 16] of a float32 array."""

    def codegen(context, builder, sig, args):
        return builder.load(_element_pointer(context, builder, sig, args, _F32X16), align=4)

    return float32x16(array, row, col), codegen


@intrinsic
def store(typingctx, array, row, col, value):
    """array[row, col : col + 16] = value, for a float32 array."""

    def codegen(context, builder, sig, args):
        builder.store(args[3], _element_pointer(context, builder, sig, args, _F32X16), align=4)

    return types.void(array, row, col, value), codegen


@intrinsic
def store_bf16(typingctx, array, row, col, value):
    """array[row, col : col + 16] = value as bfloat16 bits, for a uint16 array: rounded to the
    nearest, ties to even, as torch converts finite values (NaN is not kept)."""

    def codegen(context, builder, sig, args):
        bits = builder.bitcast(args[3], _I32X16)
        lsb = builder.and_(builder.lshr(bits, _i32x16(16)), _i32x16(1))
        rounded = builder.add(bits, builder.add(_i32x16(0x7FFF), lsb))
        high = builder.trunc(builder.lshr(rounded, _i32x16(16)), _I16X16)
        builder.store(high, _element_pointer(context, builder, sig, args, _I16X16), align=2)

    return types.void(array, row, col, value), codegen


def _i32x16(value: int) -> ir.Constant:
    return ir.Constant(_I32X16, [value] * LANES)


@intrinsic
def load_int8(typingctx, array, row, col):
    """array[row, col : col + 16] of an int8 array, as float32."""

    def codegen(context, builder, sig, args):
        raw = builder.load(_element_pointer(context, builder, sig, args, _I8X16), align=1)
        return builder.sitofp(raw, _F32X16)

    return float32x16(array, row, col), codegen


@intrinsic
def load_nibbles(typingctx, array, row, col):
    """(low, high): the low and the high 4 bits of the 16 bytes array[row, col : col + 16] of a
    uint8 array, as float32 values 0..15."""

    def codegen(context, builder, sig, args):
        raw = builder.load(_element_pointer(context, builder, sig, args, _I8X16), align=1)
        wide = builder.zext(raw, _I32X16)
        low = builder.and_(wide, ir.Constant(_I32X16, [15] * LANES))
        high = builder.lshr(wide, ir.Constant(_I32X16, [4] * LANES))
        values = [builder.sitofp(v, _F32X16) for v in (low, high)]
        return context.make_tuple(builder, sig.return_type, values)

    return types.UniTuple(float32x16, 2)(array, row, col), codegen


@intrinsic
def ramp(typingctx, start):
    """The vector start, start + 1, ..., start + 15 (float32)."""

    def codegen(context, builder, sig, args):
        value = context.cast(builder, args[0], sig.args[0], types.float32)
        steps = ir.Constant(_F32X16, [float(i) for i in range(LANES)])
        return builder.fadd(_splat(builder, value), steps)

    return float32x16(start), codegen


@intrinsic
def lookup_nibbles(typingctx, table, array, row, col):
    """(low, high): table[lane] looked up by the low and by the high 4 bits of the 16 bytes
    array[row, col : col + 16] of a uint8 array; one VPERMPS each. AVX-512F only (the caller
    checks cpu_target.compiles_avx512)."""

    def codegen(context, builder, sig, args):
        codes = signature(sig.return_type, *sig.args[1:])  # (array, row, col)
        raw = builder.load(_element_pointer(context, builder, codes, args[1:], _I8X16), align=1)
        wide = builder.zext(raw, _I32X16)  # VPERMPS reads an index's low 4 bits: no mask
        high = builder.lshr(wide, ir.Constant(_I32X16, [4] * LANES))
        fn_type = ir.FunctionType(_F32X16, [_F32X16, _I32X16])
        fn = cgutils.get_or_insert_function(
            builder.module, fn_type, "llvm.x86.avx512.permvar.sf.512"
        )
        values = [builder.call(fn, [args[0], index]) for index in (wide, high)]
        return context.make_tuple(builder, sig.return_type, values)

    return types.UniTuple(float32x16, 2)(table, array, row, col), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c, rounded once."""

    def codegen(context, builder, sig, args):
        fn_type = ir.FunctionType(_F32X16, [_F32X16] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.fma.v16f32")
        return builder.call(fn, args)

    return float32x16(a, b, c), codegen


@intrinsic
def mul(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fmul(*args)

    return float32x16(a, b), codegen


@intrinsic
def sub(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fsub(*args)

    return float32x16(a, b), codegen


@intrinsic
def hsum(typingctx, vector):
    """The sum of the lanes, as float32: halves added pairwise (8 + 8, 4 + 4, 2 + 2, 1 + 1)."""

    def codegen(context, builder, sig, args):
        v = args[0]
        width = LANES
        while width > 1:
            width //= 2
            halves = [
                builder.shuffle_vector(
                    v,
                    ir.Constant(v.type, ir.Undefined),
                    ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(lo, lo + width))),
                )
                for lo in (0, width)
            ]
            v = builder.fadd(*halves)
        return builder.extract_element(v, ir.IntType(32)(0))

    return types.float32(vector), codegen
