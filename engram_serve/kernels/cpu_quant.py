"""Weight-only block-quantized linear layers for the CPU path: `linear(x, weight)` = x @ W^T with
W kept in a GGUF block format (`QuantizedWeight`), activations and sums in float32.

A decode step is bound by reading the weights. Dequantized to float32 the default model's are
537.9 MB; here they stay 111.5 MB (its GGUF's 96.4 MB of Q4_1 and Q8_0 blocks, with the fp16
scales widened to float32 so that every weight is computed exactly as gguf-py computes it:
Q4_1 66.4 -> 79.6 MB, Q8_0 30.1 -> 31.9 MB; see QuantizedWeight for the layout). Products are
those of the dequantized weights, summed in another order:

- up to DEQUANTIZED_TILE_ROWS - 1 rows of x (decode): tiles of 8 weight rows, each block of 32
  values dequantized in registers (kernels/cpu_vector.py's 16-lane vectors: nibbles or int8
  widened, converted, times the block's scale plus its offset, the very values dequantize()
  gives) and multiplied into 16-lane running sums, rows of x in pairs sharing the dequantized
  block; the next tile's rows prefetched meanwhile. Per block and 8 weight rows one 16-byte
  load, 16 conversions and 32 FMAs on 512-bit registers (checked with inspect_asm).
- DEQUANTIZED_TILE_ROWS..BAND_MIN_ROWS rows: the tile dequantized once into L1, then
  kernels/cpu_linear.py's tile (so the output equals cpu_linear's on dequantize(), bit for bit).
- more rows (prefill; products in bfloat16 from BFLOAT16_BAND_MIN_ROWS rows, batched decode
  too): bands of BAND_ELEMENTS weights dequantized into one buffer and multiplied by torch: in
  float32 (MKL), or in bfloat16 (oneDNN), dequantized straight into bfloat16.

All the default model's matmuls (`python -m engram_serve.bench.kernels --quant`), on a 2-vCPU
KVM "Intel(R) Xeon(R) Processor" (family 6, model 167; AVX-512, AMX), one thread
(OMP_NUM_THREADS=1), load average 3.3-3.9 from other work; float32 is the model's path for the
dequantized weights (model/linear.py):

    rows   float32 ms   quantized ms
       1         26.4            9.6   (2.74x; 11.6 GB/s of blocks)
       8         37.8           25.3   (1.49x)
      64         99.1           99.8   (same kernel: both compute-bound)
     256        339.7          430.8   (0.79x)
    2048       4229.0         6392.0   (0.66x: MKL on bands of the weight)

(a second run, the machine twice as slow: 2.48x, 1.43x, 0.92x, 0.81x, 0.67x).

On two threads the machine's load made every parallel launch wait for a descheduled thread
(~6 ms each, for float32 alike): 753 against 772 ms for one row, nothing to compare. Loop shapes
tried, one thread, the 4-bit layers at one row: without the prefetch 14.1 ms (5.6 GB/s), with
it 7.7-9.7; before the vectors (kernels/cpu_vector.py) 3.4 G weights/s at best against 20.6 with
them, on a weight in cache. Dequantizing in registers costs each pair of rows of x the
conversions again, which at 16 rows cost more than a dequantized tile: hence the switch there.
"""

from __future__ import annotations

import gguf
import numba
import numpy as np
import torch
from numba import types
from numba.extending import overload

from engram_serve.kernels.cpu_linear import MAX_ROWS, linear_tile, num_tiles
from engram_serve.kernels.cpu_prefetch import prefetch_bytes
from engram_serve.kernels.cpu_target import compiles_avx512
from engram_serve.kernels.cpu_threads import launch_parallel
from engram_serve.kernels.cpu_vector import (
    fma,
    hsum,
    load,
    load_int8,
    load_nibbles,
    lookup_nibbles,
    mul,
    ramp,
    splat,
    store,
    store_bf16,
    sub,
)

FORMATS = ("q4_0", "q4_1", "q8_0", "q4_k", "q6_k")
QUANTIZABLE = ("q4_0", "q4_1", "q8_0")  # what gguf-py's reference quantizer implements
BLOCK = 32  # the kernels' unit along K: every format's blocks split into blocks of 32
TILE = 8  # weight rows per tile
DEQUANTIZED_TILE_ROWS = 16
# Above this many rows of x (float32 products), linear() dequantizes bands of BAND_ELEMENTS
# weights into a buffer and multiplies with torch (_banded). 4 M (16 MB in float32) keeps each
# of the default model's prefill weights in one band: with 1 M its 4 prefill steps of 2,048
# tokens took 3.66-3.95 s, with 4 M 3.42-3.50 (3 rounds each, alternating; 2-core Xeon family 6
# model 167).
BAND_MIN_ROWS = MAX_ROWS
# bfloat16 products run banded from this many rows, batched decode included. The default model's
# four layer matrices, float32 tiles against bfloat16 bands (oneDNN on AMX), ms: 8 rows 0.46 /
# 0.75, 16 0.70 / 0.84, 24 0.83 / 0.88, 32 1.15 / 0.91, 48 1.46 / 1.15, 64 2.85 / 1.65, 128
# 4.94 / 1.85 (2-core Xeon family 6 model 167).
BFLOAT16_BAND_MIN_ROWS = 32
BAND_ELEMENTS = 1 << 22
_SUPER = 256  # values in a K-quant super-block (Q4_K, Q6_K)
# 4-bit blocks dequantized by looking their codes up in the block's 16 values (one VPERMPS per
# 16 weights) rather than converting each code and scaling it: the same values, fewer
# instructions. AVX-512 only; elsewhere the conversions.
_NIBBLE_TABLES = compiles_avx512()
# A 16-lane vector fills one of AVX-512's 32 registers but two of AVX2's 16, where a tile's 8 or
# 16 running sums spill to the stack on every block. There a lone row of x runs the tile as two
# halves of 4 weight rows, and a pair of rows as four quarters of 2: x is read again from L1,
# nothing spills, the sums are the same. 2-core AMD EPYC (AVX2, no AVX-512), one thread, Q4_1
# weights, whole tile against split, 3072 x 576: 1 row 228 / 165 us, 2 rows 337 / 209, 8 rows
# 1217 / 742; 576 x 1536: 138 / 110, 190 / 116, 597 / 363.
_SPLIT_TILES = not compiles_avx512()


class QuantizedWeight:
    """A [N, K] weight (out_features x in_features, F.linear's layout) in block form.

    Two storage kinds, both in float32 scales so that every dequantized value is computed
    exactly as gguf-py computes it (one rounding at most):

    - 4-bit (q4_0, q4_1, q4_k): `codes` uint8 [N, K/2], block b's byte j holding value j in its
      low and value j + 16 in its high 4 bits; `scale` float32 [N, K/32]; with `offset` float32
      [N, K/32] the value is scale * q + offset (q4_1; q4_k, whose sub-block scale and min are
      folded in: d * sc, -dmin * m), without it scale * (q - 8) (q4_0).
    - int8 (q8_0, q6_k): `codes` int8 [N, K] (q6_k's 6-bit values minus 32), `scale` [N, K/G]
      for groups of G = 32 (q8_0) or 16 (q6_k, whose d * scale is folded in), value
      scale * q (+ offset [N, K/G] where present, see concat).

    `format` names the GGUF format the weight came from; a concat of several formats names its
    storage: q4_1 (4-bit with offsets, from q4_1 and q4_k parts), q8_0 or q6_k (int8 codes in
    groups of 32 or 16, with offsets where any part had them; -0.0 for the parts without, which
    leaves their values unchanged).
    """

    def __init__(
        self,
        format: str,
        codes: np.ndarray,
        scale: np.ndarray,
        offset: np.ndarray | None,
    ) -> None:
        nibbles = codes.dtype == np.uint8
        self.format = format
        self.shape = (codes.shape[0], codes.shape[1] * (2 if nibbles else 1))
        self.codes, self.scale, self.offset = codes, scale, offset

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays if a is not None)

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(codes, scale, offset): what the kernels take (offset None where absent)."""
        return self.codes, self.scale, self.offset

    @property
    def group(self) -> int:
        """Values sharing one scale (and offset)."""
        return self.shape[1] // self.scale.shape[1]

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.format}, {self.shape}, {self.nbytes} bytes)"

    @classmethod
    def from_gguf(cls, data: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedWeight:
        """The weight from a GGUF tensor's raw blocks: `data` uint8 [N, row_bytes] (GGUFReader's
        `tensor.data`), `type_name` its `tensor.tensor_type.name` ("Q4_1", ...), `shape` (N, K)."""
        format = type_name.lower()
        if format not in FORMATS:
            raise ValueError(
                f"unsupported GGUF tensor type {type_name!r}: QuantizedWeight takes "
                f"{', '.join(f.upper() for f in FORMATS)}"
            )
        qtype = gguf.GGMLQuantizationType[format.upper()]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n, k = shape
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise ValueError(f"{type_name} data must be a 2-D uint8 array, got {_describe(data)}")
        if k <= 0 or k % block_size:
            raise ValueError(f"{type_name} needs K a multiple of {block_size}, got shape {shape}")
        if data.shape != (n, k // block_size * type_size):
            raise ValueError(
                f"{type_name} {shape} takes {n} rows of {k // block_size * type_size} bytes, "
                f"got {data.shape}"
            )
        blocks = data.reshape(n, k // block_size, type_size)
        return cls(format, *_UNPACK[format](blocks))

    @classmethod
    def quantize(cls, w: torch.Tensor, format: str) -> QuantizedWeight:
        """`w` float32 [N, K] quantized by llama.cpp's reference quantizer (gguf-py), for the
        formats in QUANTIZABLE."""
        if format not in QUANTIZABLE:
            raise ValueError(
                f"cannot quantize to {format!r}: gguf-py's quantizer implements "
                f"{', '.join(QUANTIZABLE)}"
            )
        if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] % BLOCK or not w.shape[1]:
            raise ValueError(
                f"quantize needs a float32 [N, K] weight with K a multiple of {BLOCK}, got "
                f"{w.dtype} {tuple(w.shape)}"
            )
        qtype = gguf.GGMLQuantizationType[format.upper()]
        data = gguf.quants.quantize(w.detach().cpu().contiguous().numpy(), qtype)
        return cls.from_gguf(data, format.upper(), tuple(w.shape))

    def dequantize(self) -> torch.Tensor:  # [N, K] float32
        return self.take_rows(torch.arange(self.shape[0]))

    def take_rows(self, ids: torch.Tensor) -> torch.Tensor:  # [len(ids), K] float32
        """dequantize()[ids], dequantizing only those rows (an embedding lookup)."""
        rows = _row_ids(ids, self.shape[0])
        out = torch.empty(len(rows), self.shape[1])
        launch_parallel(_dequantize_rows, self.arrays, rows, out.numpy())
        return out

    def permute_rows(self, perm: np.ndarray) -> QuantizedWeight:
        """The weight with row i = this weight's row perm[i]; perm a permutation of range(N)."""
        perm = np.asarray(perm)
        if perm.shape != (self.shape[0],) or not np.array_equal(
            np.sort(perm), np.arange(self.shape[0])
        ):
            raise ValueError(f"perm must be a permutation of range({self.shape[0]})")
        arrays = (None if a is None else _copy(a[perm]) for a in self.arrays)
        return QuantizedWeight(self.format, *arrays)

    @staticmethod
    def concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """The parts stacked along N (fused q/k/v, gate/up). Parts of one storage kind are
        stacked as they are; others are all converted to int8 codes (4-bit values are exact in
        int8), which keeps every dequantized value and costs up to 1.5 bytes a value."""
        if not parts:
            raise ValueError("concat needs at least one weight")
        k = parts[0].shape[1]
        if any(p.shape[1] != k for p in parts):
            raise ValueError(f"concat needs one K, got shapes {[p.shape for p in parts]}")
        formats = {p.format for p in parts}
        with_offset = any(p.offset is not None for p in parts)
        kinds = {(p.codes.dtype, p.group, p.offset is not None) for p in parts}
        if len(kinds) == 1:
            dtype, group, _ = kinds.pop()
            format = formats.pop() if len(formats) == 1 else "q4_1"
            converted = [p.arrays for p in parts]
        else:
            group = min(p.group for p in parts)
            format = "q6_k" if group == 16 else "q8_0"
            converted = [_as_int8(p, group, with_offset) for p in parts]
        codes, scale, offset = (
            None if arrays[0] is None else _copy(np.concatenate(arrays))
            for arrays in zip(*converted, strict=True)
        )
        return QuantizedWeight(format, codes, scale, offset)


def _describe(data: object) -> str:
    if isinstance(data, np.ndarray):
        return f"{data.dtype} {data.shape}"
    return type(data).__name__


_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int8): torch.int8,
                 np.dtype(np.float32): torch.float32}  # fmt: skip


def _copy(array: np.ndarray) -> np.ndarray:
    """A contiguous copy in torch's allocator, which puts large arrays on huge pages."""
    out = torch.empty(array.shape, dtype=_TORCH_DTYPES[array.dtype]).numpy()
    np.copyto(out, array)
    return out


def _row_ids(ids: torch.Tensor, num_rows: int) -> np.ndarray:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point():
        raise ValueError(f"ids must be a 1-D integer tensor, got {ids!r:.80}")
    rows = ids.detach().cpu().to(torch.int64).numpy()
    if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
        raise ValueError(f"ids span [{rows.min()}, {rows.max()}], outside [0, {num_rows})")
    return rows


# --- GGUF blocks -> storage --------------------------------------------------------------------


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:  # [N, B] float32 of the fp16 at byte `at`
    return blocks[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """[N, B, 32] values 0..15 -> [N, B * 16] bytes: value j low, value j + 16 high."""
    n = values.shape[0]
    return (values[..., :16] | (values[..., 16:] << 4)).reshape(n, -1)


def _unpack_q4_0(blocks):  # [N, B, 18]: d (fp16), 16 bytes of nibbles (value j low, j + 16 high)
    return _copy(blocks[..., 2:].reshape(len(blocks), -1)), _copy(_f16(blocks, 0)), None


def _unpack_q4_1(blocks):  # [N, B, 20]: d, m (fp16), 16 bytes as Q4_0
    codes = _copy(blocks[..., 4:].reshape(len(blocks), -1))
    return codes, _copy(_f16(blocks, 0)), _copy(_f16(blocks, 2))


def _unpack_q8_0(blocks):  # [N, B, 34]: d (fp16), 32 int8 values
    codes = blocks[..., 2:].reshape(len(blocks), -1).view(np.int8)
    return _copy(codes), _copy(_f16(blocks, 0)), None


def _unpack_q4_k(blocks):
    """[N, B, 144]: d, dmin (fp16); 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32;
    128 bytes of nibbles, 32 bytes per pair of sub-blocks (the first's low, the second's high)."""
    n, num = blocks.shape[:2]
    packed = blocks[..., 4:16].astype(np.uint8)
    sc, mn = np.empty((n, num, 8), np.uint8), np.empty((n, num, 8), np.uint8)
    sc[..., :4], mn[..., :4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    sc[..., 4:] = (packed[..., 8:12] & 15) | ((packed[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    scale = _f16(blocks, 0)[..., None] * sc.astype(np.float32)  # [N, B, 8], exact
    offset = -(_f16(blocks, 2)[..., None] * mn.astype(np.float32))
    qs = blocks[..., 16:].reshape(n, num, 4, 1, 32)
    values = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(n, num * 8, 32)
    return _copy(_pack_nibbles(values)), _copy(scale.reshape(n, -1)), _copy(offset.reshape(n, -1))


def _unpack_q6_k(blocks):
    """[N, B, 210]: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales (one per 16
    values), d (fp16). Each half of 128 values: ql[l] and ql[l + 32] give values l and l + 32 in
    their low bits and l + 64, l + 96 in their high ones; qh[l] the top bits of all four."""
    n, num = blocks.shape[:2]
    ql = blocks[..., :128].reshape(n, num, 2, 2, 32)  # [half, (l, l + 32), 32]
    qh = blocks[..., 128:192].reshape(n, num, 2, 1, 32)
    low = np.concatenate([ql & 15, ql >> 4], axis=3)  # [half, 4 quarters, 32]
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
    codes = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(n, -1)
    scales = blocks[..., 192:208].view(np.int8).astype(np.float32)  # [N, B, 16]
    scale = _f16(blocks, 208)[..., None] * scales
    return _copy(codes), _copy(scale.reshape(n, -1)), None


_UNPACK = {
    "q4_0": _unpack_q4_0,
    "q4_1": _unpack_q4_1,
    "q8_0": _unpack_q8_0,
    "q4_k": _unpack_q4_k,
    "q6_k": _unpack_q6_k,
}


def _as_int8(weight: QuantizedWeight, group: int, with_offset: bool):
    """(codes, scale, offset) as int8 codes with `group` values a scale; offset None unless
    `with_offset` (then -0.0 for a weight without offsets: x + -0.0 is x, signed zeros too)."""
    codes, scale, offset = weight.arrays
    n, k = weight.shape
    if codes.dtype == np.uint8:
        values = np.stack([codes.reshape(n, -1, 16) & 15, codes.reshape(n, -1, 16) >> 4], 2)
        values = values.reshape(n, k).astype(np.int8)
        codes = values if offset is not None else values - np.int8(8)
    repeat = weight.group // group
    scale = np.repeat(scale, repeat, axis=1)
    if offset is not None:
        offset = np.repeat(offset, repeat, axis=1)
    elif with_offset:
        offset = np.full_like(scale, -0.0)
    return codes, scale, offset if with_offset else None


# --- kernels -----------------------------------------------------------------------------------


def block_weights(w, row, block):
    """(low, high): the float32 values of weight row `row`, columns 32 block + 0..15 and
    32 block + 16..31, from the kernels' weight tuple `w` (QuantizedWeight.arrays)."""


@overload(block_weights, jit_options={"boundscheck": False})
def _block_weights(w, row, block):
    codes, _, offset = w.types
    has_offset = not isinstance(offset, types.NoneType)
    if codes.dtype == types.uint8 and _NIBBLE_TABLES:
        # The block's 16 possible values computed once, as below, then looked up by the codes.
        if has_offset:

            def table_offset(w, row, block):
                codes, scale, offset = w
                table = fma(splat(scale[row, block]), ramp(0), splat(offset[row, block]))
                return lookup_nibbles(table, codes, row, block * 16)

            return table_offset

        def table_signed(w, row, block):
            codes, scale, _ = w
            table = mul(splat(scale[row, block]), ramp(-8))
            return lookup_nibbles(table, codes, row, block * 16)

        return table_signed
    if codes.dtype == types.uint8 and has_offset:

        def nibbles_offset(w, row, block):
            codes, scale, offset = w
            low, high = load_nibbles(codes, row, block * 16)
            s, o = splat(scale[row, block]), splat(offset[row, block])
            return fma(s, low, o), fma(s, high, o)

        return nibbles_offset
    if codes.dtype == types.uint8:

        def nibbles_signed(w, row, block):
            codes, scale, _ = w
            low, high = load_nibbles(codes, row, block * 16)
            s, eight = splat(scale[row, block]), splat(np.float32(8.0))
            return mul(s, sub(low, eight)), mul(s, sub(high, eight))

        return nibbles_signed

    if has_offset:

        def int8_offset(w, row, block):
            codes, scale, offset = w
            low, high, g_low, g_high = _int8_block(codes, scale, row, block)
            return (
                fma(splat(scale[row, g_low]), low, splat(offset[row, g_low])),
                fma(splat(scale[row, g_high]), high, splat(offset[row, g_high])),
            )

        return int8_offset

    def int8(w, row, block):
        codes, scale, _ = w
        low, high, g_low, g_high = _int8_block(codes, scale, row, block)
        return mul(splat(scale[row, g_low]), low), mul(splat(scale[row, g_high]), high)

    return int8


@numba.njit(inline="always", boundscheck=False)
def _int8_block(codes, scale, row, block):
    """The block's two halves as float32 codes, and their groups: 2 block, 2 block + 1 for
    groups of 16 (scale [N, K/16]), else block twice."""
    low, high = load_int8(codes, row, block * BLOCK), load_int8(codes, row, block * BLOCK + 16)
    if scale.shape[1] * 16 == codes.shape[1]:
        return low, high, 2 * block, 2 * block + 1
    return low, high, block, block


def prefetch_rows(w, first, last):
    """Ask for weight rows first..last - 1 of the weight tuple `w`: codes, scales, offsets."""


@overload(prefetch_rows, jit_options={"boundscheck": False})
def _prefetch_rows(w, first, last):
    has_offset = not isinstance(w.types[2], types.NoneType)

    def impl(w, first, last):
        codes, scale, offset = w  # C-contiguous: the rows are one run of bytes in each
        prefetch_bytes(
            codes.ctypes.data + first * codes.strides[0], (last - first) * codes.strides[0]
        )
        prefetch_bytes(
            scale.ctypes.data + first * scale.strides[0], (last - first) * scale.strides[0]
        )
        if has_offset:
            prefetch_bytes(
                offset.ctypes.data + first * offset.strides[0], (last - first) * offset.strides[0]
            )

    return impl


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _step(w, row, block, x_low, x_high, acc):
    """acc + weight row `row`'s block times x's, lane by lane."""
    low, high = block_weights(w, row, block)
    return fma(high, x_high, fma(low, x_low, acc))


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _step2(w, row, block, xa_low, xa_high, xb_low, xb_high, a, b):
    """_step for two rows of x sharing the block's dequantized weights."""
    low, high = block_weights(w, row, block)
    return fma(high, xa_high, fma(low, xa_low, a)), fma(high, xb_high, fma(low, xb_low, b))


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _pair8(x, w, out, m, o):
    """Rows m, m + 1 of x against weight rows o..o + 7: 16 running 16-lane sums."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = splat(np.float32(0.0))
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = splat(np.float32(0.0))
    for block in range(x.shape[1] // BLOCK):
        c = block * BLOCK
        xal, xah = load(x, m, c), load(x, m, c + 16)
        xbl, xbh = load(x, m + 1, c), load(x, m + 1, c + 16)
        a0, b0 = _step2(w, o, block, xal, xah, xbl, xbh, a0, b0)
        a1, b1 = _step2(w, o + 1, block, xal, xah, xbl, xbh, a1, b1)
        a2, b2 = _step2(w, o + 2, block, xal, xah, xbl, xbh, a2, b2)
        a3, b3 = _step2(w, o + 3, block, xal, xah, xbl, xbh, a3, b3)
        a4, b4 = _step2(w, o + 4, block, xal, xah, xbl, xbh, a4, b4)
        a5, b5 = _step2(w, o + 5, block, xal, xah, xbl, xbh, a5, b5)
        a6, b6 = _step2(w, o + 6, block, xal, xah, xbl, xbh, a6, b6)
        a7, b7 = _step2(w, o + 7, block, xal, xah, xbl, xbh, a7, b7)
    out[m, o], out[m, o + 1], out[m, o + 2], out[m, o + 3] = hsum(a0), hsum(a1), hsum(a2), hsum(a3)
    out[m, o + 4], out[m, o + 5], out[m, o + 6], out[m, o + 7] = (
        hsum(a4),
        hsum(a5),
        hsum(a6),
        hsum(a7),
    )
    out[m + 1, o], out[m + 1, o + 1], out[m + 1, o + 2] = hsum(b0), hsum(b1), hsum(b2)
    out[m + 1, o + 3], out[m + 1, o + 4], out[m + 1, o + 5] = hsum(b3), hsum(b4), hsum(b5)
    out[m + 1, o + 6], out[m + 1, o + 7] = hsum(b6), hsum(b7)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _pair2(x, w, out, m, o):
    """Rows m, m + 1 of x against weight rows o, o + 1: _pair8's sums for a quarter tile."""
    a0 = a1 = b0 = b1 = splat(np.float32(0.0))
    for block in range(x.shape[1] // BLOCK):
        c = block * BLOCK
        xal, xah = load(x, m, c), load(x, m, c + 16)
        xbl, xbh = load(x, m + 1, c), load(x, m + 1, c + 16)
        a0, b0 = _step2(w, o, block, xal, xah, xbl, xbh, a0, b0)
        a1, b1 = _step2(w, o + 1, block, xal, xah, xbl, xbh, a1, b1)
    out[m, o], out[m, o + 1] = hsum(a0), hsum(a1)
    out[m + 1, o], out[m + 1, o + 1] = hsum(b0), hsum(b1)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _row4(x, w, out, m, o):
    """Row m of x against weight rows o..o + 3: _row8's sums for half a tile."""
    a0 = a1 = a2 = a3 = splat(np.float32(0.0))
    for block in range(x.shape[1] // BLOCK):
        xl, xh = load(x, m, block * BLOCK), load(x, m, block * BLOCK + 16)
        a0 = _step(w, o, block, xl, xh, a0)
        a1 = _step(w, o + 1, block, xl, xh, a1)
        a2 = _step(w, o + 2, block, xl, xh, a2)
        a3 = _step(w, o + 3, block, xl, xh, a3)
    out[m, o], out[m, o + 1], out[m, o + 2], out[m, o + 3] = hsum(a0), hsum(a1), hsum(a2), hsum(a3)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _row8(x, w, out, m, o):
    """Row m of x against weight rows o..o + 7: 8 running sums."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = splat(np.float32(0.0))
    for block in range(x.shape[1] // BLOCK):
        xl, xh = load(x, m, block * BLOCK), load(x, m, block * BLOCK + 16)
        a0 = _step(w, o, block, xl, xh, a0)
        a1 = _step(w, o + 1, block, xl, xh, a1)
        a2 = _step(w, o + 2, block, xl, xh, a2)
        a3 = _step(w, o + 3, block, xl, xh, a3)
        a4 = _step(w, o + 4, block, xl, xh, a4)
        a5 = _step(w, o + 5, block, xl, xh, a5)
        a6 = _step(w, o + 6, block, xl, xh, a6)
        a7 = _step(w, o + 7, block, xl, xh, a7)
    out[m, o], out[m, o + 1], out[m, o + 2], out[m, o + 3] = hsum(a0), hsum(a1), hsum(a2), hsum(a3)
    out[m, o + 4], out[m, o + 5], out[m, o + 6], out[m, o + 7] = (
        hsum(a4),
        hsum(a5),
        hsum(a6),
        hsum(a7),
    )


@numba.njit(nogil=True, cache=True, boundscheck=False)
def quant_tile(x, w, out, tile):
    """out[:, o : o + TILE] = x @ W[o : o + TILE]^T for x `[M, K]` float32, W the weight tuple
    `w` (QuantizedWeight.arrays), out `[M, N]`, o = TILE * tile: one thread's share. Rows of x
    two at a time, an odd last row alone; a short last tile row by row."""
    rows, k = x.shape
    n = w[0].shape[0]
    o = TILE * tile
    if o + TILE > n:
        for r in range(o, n):
            for m in range(rows):
                acc = splat(np.float32(0.0))
                for block in range(k // BLOCK):
                    c = block * BLOCK
                    acc = _step(w, r, block, load(x, m, c), load(x, m, c + 16), acc)
                out[m, r] = hsum(acc)
        return
    if rows >= DEQUANTIZED_TILE_ROWS:
        # Dequantized once into L1 for all the rows of x, then multiplied as float32.
        tile_weights = np.empty((TILE, k), np.float32)
        for r in range(TILE):
            for block in range(k // BLOCK):
                low, high = block_weights(w, o + r, block)
                store(tile_weights, r, block * BLOCK, low)
                store(tile_weights, r, block * BLOCK + 16, high)
        for part in range(num_tiles(TILE, k)):
            linear_tile(x, tile_weights, out[:, o : o + TILE], part)
        return
    # The next tile's rows, while this one computes: the hardware's prefetchers alone left the
    # 4-bit layers at 5.6 GB/s on one core, against 8.2-10.3 GB/s with this.
    prefetch_rows(w, o + TILE, min(n, o + 2 * TILE))
    paired = rows - rows % 2
    for m in range(0, paired, 2):
        if _SPLIT_TILES:
            for quarter in range(0, TILE, 2):
                _pair2(x, w, out, m, o + quarter)
        else:
            _pair8(x, w, out, m, o)
    if paired < rows:
        if _SPLIT_TILES:
            _row4(x, w, out, paired, o)
            _row4(x, w, out, paired, o + 4)
        else:
            _row8(x, w, out, paired, o)


def matmul_tile(x, w, out, tile):
    """One tile of out = x @ W^T (numba only) for either weight tuple: (float32 [N, K],), as
    kernels/cpu_linear.py's linear_tile takes it, or QuantizedWeight.arrays (quant_tile)."""


def tile_count(w, k):
    """Tiles of matmul_tile for weight tuple `w` and K = k (numba only)."""


@overload(matmul_tile)
def _matmul_tile(x, w, out, tile):
    if w.types[0].dtype == types.float32:
        return lambda x, w, out, tile: linear_tile(x, w[0], out, tile)
    return lambda x, w, out, tile: quant_tile(x, w, out, tile)


@overload(tile_count)
def _tile_count(w, k):
    if w.types[0].dtype == types.float32:
        return lambda w, k: num_tiles(w[0].shape[0], k)
    return lambda w, k: (w[0].shape[0] + TILE - 1) // TILE


def kernel_arrays(weight: torch.Tensor | QuantizedWeight) -> tuple:
    """The weight tuple matmul_tile takes."""
    if isinstance(weight, QuantizedWeight):
        return weight.arrays
    return (weight.detach().contiguous().numpy(),)


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def _linear_kernel(x, w, out):
    for tile in numba.prange((w[0].shape[0] + TILE - 1) // TILE):
        quant_tile(x, w, out, tile)


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def _dequantize_rows(w, rows, out):
    """out[i] = W[rows[i]], for out `[len(rows), K]`: float32, or bfloat16 bits (uint16)."""
    for i in numba.prange(len(rows)):
        for block in range(out.shape[1] // BLOCK):
            low, high = block_weights(w, rows[i], block)
            _store_values(out, i, block * BLOCK, low)
            _store_values(out, i, block * BLOCK + 16, high)


def _store_values(out, row, col, value):
    """cpu_vector.store, or store_bf16 into an array of bfloat16 bits (uint16)."""


@overload(_store_values, jit_options={"boundscheck": False})
def _store_values_impl(out, row, col, value):
    if out.dtype == types.uint16:
        return lambda out, row, col, value: store_bf16(out, row, col, value)
    return lambda out, row, col, value: store(out, row, col, value)


def supports(x: torch.Tensor, weight: object) -> bool:
    """Whether linear() serves this call: float32 CPU x `[M, K]`, M >= 1, and a QuantizedWeight
    of K columns."""
    return (
        isinstance(weight, QuantizedWeight)
        and isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 2
        and x.shape[0] >= 1
        and x.shape[1] == weight.shape[1]
    )


def linear(
    x: torch.Tensor,  # [M, K] float32, M >= 1
    weight: QuantizedWeight,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    num_threads: int | None = None,  # None: torch's thread count
    prefill_dtype: torch.dtype = torch.float32,  # the banded products' (`banded`)
) -> torch.Tensor:  # [M, N] float32
    if not supports(x, weight):
        raise ValueError(
            f"linear needs float32 CPU x [M >= 1, K] and a QuantizedWeight [N, K], got x "
            f"{_tensor(x)} and {weight!r:.80}"
        )
    if banded(x.shape[0], prefill_dtype):
        out = _banded(x, weight, num_threads, prefill_dtype)
    else:
        out = torch.empty(x.shape[0], weight.shape[0])
        x_np = x.detach().contiguous().numpy()
        launch_parallel(_linear_kernel, x_np, weight.arrays, out.numpy(), num_threads=num_threads)
    return out if bias is None else out.add_(bias)


def banded(rows: int, dtype: torch.dtype) -> bool:
    """Whether linear() multiplies `rows` rows of x by torch on dequantized bands of W, in
    `dtype`, rather than with its float32 tiles."""
    return rows > BAND_MIN_ROWS or (dtype == torch.bfloat16 and rows >= BFLOAT16_BAND_MIN_ROWS)


def _tensor(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def _banded(
    x: torch.Tensor, weight: QuantizedWeight, num_threads: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """x @ W^T for many rows: W dequantized a band of rows at a time into one buffer, each band
    multiplied by torch into its columns of the output: in float32 (MKL), or in bfloat16
    (oneDNN: AMX tiles or AVX512-BF16 where the CPU has them; x, the band and the products'
    float32 sums rounded to bfloat16). A bfloat16 band is dequantized straight into bfloat16."""
    n, k = weight.shape
    band = max(TILE, BAND_ELEMENTS // k)
    direct = dtype in (torch.float32, torch.bfloat16)  # else float32, then converted
    buffer = torch.empty(min(band, n), k, dtype=dtype if direct else torch.float32)
    values = buffer.view(torch.uint16) if buffer.dtype == torch.bfloat16 else buffer
    out = torch.empty(x.shape[0], n)
    x = x.detach().to(dtype).contiguous()
    for lo in range(0, n, band):
        hi = min(n, lo + band)
        rows = np.arange(lo, hi)
        launch_parallel(
            _dequantize_rows, weight.arrays, rows, values.numpy(), num_threads=num_threads
        )
        out[:, lo:hi] = torch.mm(x, buffer[: hi - lo].to(dtype).t())
    return out
