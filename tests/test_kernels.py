"""The Triton kernels, the CPU hash and the CPU gather against their twins.

Without CUDA the kernels run on CPU tensors in Triton's interpreter, which Triton 3.9 picks when
`@triton.jit` decorates a function, its own library included: TRITON_INTERPRET=1 must be set
before anything imports triton (hence here, above the imports). With CUDA they run compiled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from engram_serve.engram.config import EngramConfig  # noqa: E402
from engram_serve.engram.ngram_hash import NgramHasher  # noqa: E402
from engram_serve.kernels import cpu_gather, cpu_hash  # noqa: E402
from engram_serve.kernels import reference as ref  # noqa: E402
from engram_serve.kernels.cpu_gather import gather_rows_cpu  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# FP8 values times large UE8M0 scales overflow to inf, as in the reference.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

if HAS_TRITON:
    import triton.language as tl

    from engram_serve.kernels.gate import fused_engram_gate
    from engram_serve.kernels.gather import gather_rows
    from engram_serve.kernels.hash import ngram_hash
    from engram_serve.kernels.launch import is_interpreted

    if DEVICE.type == "cpu" and not is_interpreted(tl.standard.sum):
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run "
            "on CPU tensors; set the variable in the environment or in tests/conftest.py"
        )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_same_floats(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-for-bit, NaN included, and the sign of zero too."""
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    both = ~want.isnan()
    assert torch.equal(got.signbit()[both], want.signbit()[both])


# --- hashing ------------------------------------------------------------------------------

# A compressed vocabulary of V4.1's size makes the multipliers ~2**46, so products reach ~2**63:
# the kernel must multiply in int64 exactly as NumPy does.
V41_VOCAB = 99_092
HASH_CONFIGS = {
    "N4_H3": EngramConfig(
        layer_ids=(1, 14), max_ngram_size=4, n_head_per_ngram=3,
        engram_vocab_size=(1_000_003, 2_000_003, 3_000_017),
    ),
    "N3_H5_one_layer": EngramConfig(
        layer_ids=(2,), max_ngram_size=3, n_head_per_ngram=5, engram_vocab_size=(5003, 7001)
    ),
}  # fmt: skip
SEQ_LENS = {
    "one_token": [1],
    "T1023": [1023],
    "empty_sequences_between": [0, 5, 0, 7, 1, 0],
    "decode_37": [1] * 37,
    "mixed": [300, 1, 2, 3, 50],
}


@pytest.fixture(scope="module")
def hashers() -> dict[str, NgramHasher]:
    lookup = np.random.default_rng(0).integers(0, V41_VOCAB, size=V41_VOCAB + 1000)
    lookup[:V41_VOCAB] = np.arange(V41_VOCAB)  # every compressed id occurs
    return {name: NgramHasher(config, lookup) for name, config in HASH_CONFIGS.items()}


def _packed_batch(hasher: NgramHasher, lens: list[int], seed: int):
    rng = np.random.default_rng(seed)
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = rng.integers(0, hasher.num_compressed, qsl[-1])
    # Lookback ids span the whole vocabulary, pad id included.
    lookback = rng.integers(0, hasher.num_compressed, (len(lens), hasher.lookback_len))
    lookback[0, 0] = hasher.pad_id
    return ids, qsl, lookback


def _hash_args(hasher: NgramHasher, ids, qsl, lookback) -> list[torch.Tensor]:
    arrays = (ids, qsl, lookback, hasher.multipliers, hasher.primes)
    return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(DEVICE) for a in arrays]


def _reference_hash(hasher: NgramHasher, ids, qsl, lookback, offsets: bool) -> np.ndarray:
    args = [torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in (ids, qsl, lookback)]
    extra = {"offsets": torch.from_numpy(hasher.offsets)} if offsets else {}
    multipliers, primes = torch.from_numpy(hasher.multipliers), torch.from_numpy(hasher.primes)
    return ref.ngram_hash(*args, multipliers, primes, **extra).numpy()


@pytest.mark.parametrize("config_name", HASH_CONFIGS)
@pytest.mark.parametrize("lens", SEQ_LENS.values(), ids=SEQ_LENS.keys())
def test_cpu_hash_kernel_equals_its_twin(hashers, config_name, lens):
    hasher = hashers[config_name]
    ids, qsl, lookback = _packed_batch(hasher, lens, seed=len(lens))
    np.testing.assert_array_equal(
        hasher.row_ids(ids, qsl, lookback), _reference_hash(hasher, ids, qsl, lookback, True)
    )
    np.testing.assert_array_equal(
        hasher.hash_packed(ids, qsl, lookback), _reference_hash(hasher, ids, qsl, lookback, False)
    )
    assert hasher.multipliers.max() > 2**45  # the products really come near int64's limit


@settings(max_examples=300, deadline=None)
@given(
    x=st.one_of(st.integers(0, 2**63 - 1), st.integers(2**63 - 2**20, 2**63 - 1)),
    p=st.one_of(st.integers(2, 5000), st.integers(4000, 4200), st.integers(2, 2**49)),
)
def test_cpu_remainder_by_reciprocal_is_exact(x, p):
    """The float64-reciprocal remainder of kernels/cpu_hash.py against Python's exact `%`,
    for tiny primes (large quotient error) and values at int64's limit (wrapping products)."""
    small_p = p < cpu_hash.ONE_ESTIMATE_MIN_PRIME
    assert cpu_hash.remainder(np.int64(x), np.int64(p), 1.0 / p, small_p) == x % p


def test_cpu_hash_refuses_inconsistent_packing(hashers):
    hasher = hashers["N4_H3"]
    ids, qsl, lookback = _packed_batch(hasher, [3, 4], seed=0)
    with pytest.raises(ValueError, match="must rise from 0 to the 7 packed tokens"):
        hasher.hash_packed(ids, np.array([0, 5, 4]), lookback)
    with pytest.raises(ValueError, match="must rise from 0"):
        hasher.hash_packed(ids, np.array([0, 3, 9]), lookback)
    with pytest.raises(ValueError, match="must describe the same sequences"):
        hasher.hash_packed(ids, qsl, lookback[:1])


@needs_triton
@pytest.mark.parametrize("config_name", HASH_CONFIGS)
@pytest.mark.parametrize("lens", SEQ_LENS.values(), ids=SEQ_LENS.keys())
def test_hash_kernel_equals_its_twin(hashers, config_name, lens):
    hasher = hashers[config_name]
    ids, qsl, lookback = _packed_batch(hasher, lens, seed=len(lens))
    args = _hash_args(hasher, ids, qsl, lookback)
    offsets = torch.from_numpy(hasher.offsets).to(DEVICE)
    rows = ngram_hash(*args, offsets=offsets).cpu().numpy()
    np.testing.assert_array_equal(rows, _reference_hash(hasher, ids, qsl, lookback, True))
    hashes = ngram_hash(*args).cpu().numpy()
    np.testing.assert_array_equal(hashes, _reference_hash(hasher, ids, qsl, lookback, False))


@needs_triton
def test_hash_kernel_empty_batches(hashers):
    hasher = hashers["N4_H3"]
    num_layers, num_cols = hasher.primes.shape
    for lens in ([0], [0, 0, 0]):  # sequences with no new tokens
        args = _hash_args(hasher, *_packed_batch(hasher, lens, seed=0))
        assert ngram_hash(*args).shape == (num_layers, 0, num_cols)
    no_seqs = _hash_args(hasher, np.zeros(0), np.zeros(1), np.zeros((0, 3)))
    assert ngram_hash(*no_seqs).shape == (num_layers, 0, num_cols)


@needs_triton
def test_hash_kernel_refuses_bad_inputs(hashers):
    hasher = hashers["N4_H3"]
    ids, qsl, lookback, mult, primes = _hash_args(hasher, *_packed_batch(hasher, [4, 2], seed=0))
    with pytest.raises(TypeError, match="compressed_ids must be int64, got int32"):
        ngram_hash(ids.int(), qsl, lookback, mult, primes)
    with pytest.raises(ValueError, match=r"lookback must be \[S, N-1\] = \(2, 3\)"):
        ngram_hash(ids, qsl, lookback[:, :2].contiguous(), mult, primes)
    with pytest.raises(ValueError, match="lookback must be contiguous"):
        ngram_hash(ids, qsl, lookback.T.contiguous().T, mult, primes)
    with pytest.raises(ValueError, match=r"need primes \[L, \(N-1\)\*H\]"):
        ngram_hash(ids, qsl, lookback, mult, primes[:, :-1].contiguous())
    with pytest.raises(ValueError, match="offsets must match primes"):
        ngram_hash(ids, qsl, lookback, mult, primes, offsets=primes[:1].contiguous())
    with pytest.raises(ValueError, match="query_start_loc is on meta"):
        ngram_hash(ids, qsl.to("meta"), lookback, mult, primes)


# --- gather ------------------------------------------------------------------------------

ID_SHAPES = {"one": (1,), "T1023": (1023,), "tokens_x_heads": (7, 5), "empty": (0,),
             "empty_2d": (0, 24)}  # fmt: skip


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [24, 64])
@pytest.mark.parametrize("shape", ID_SHAPES.values(), ids=ID_SHAPES.keys())
def test_gather_kernel_float_rows_equal_twin(dtype, width, shape):
    gen = _gen(width)
    table = torch.randn(301, width, generator=gen).to(dtype)
    ids = torch.randint(0, 301, shape, generator=gen)
    got = gather_rows(table.to(DEVICE), ids.to(DEVICE))
    assert got.dtype == torch.float32 and got.shape == (*shape, width)
    _assert_same_floats(got.cpu(), ref.gather_rows(table, ids))


def _fp8_table(num_rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 rows holding every byte value (NaN, +-0, subnormals), and scales including
    2**-127 (byte 0), 1 (127), 2**127 (254) and NaN (255)."""
    gen = _gen(seed)
    rows = torch.randint(0, 256, (num_rows, width), dtype=torch.uint8, generator=gen)
    rows.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scales = torch.randint(100, 150, (num_rows, width // 32), dtype=torch.uint8, generator=gen)
    scales.view(-1)[:8] = torch.tensor([0, 1, 127, 254, 255, 120, 130, 127], dtype=torch.uint8)
    return rows, scales


@needs_triton
@pytest.mark.parametrize("shape", ID_SHAPES.values(), ids=ID_SHAPES.keys())
def test_gather_kernel_fp8_rows_equal_twin(shape):
    rows, scales = _fp8_table(97, 64, seed=1)
    ids = torch.randint(0, 97, shape, generator=_gen(2))
    if ids.numel():
        ids.view(-1)[:4] = torch.tensor([0, 1, 2, 3])[: ids.numel()]  # all 256 bytes appear
    want = ref.gather_rows(rows, ids, scales)
    _assert_same_floats(gather_rows(rows.to(DEVICE), ids.to(DEVICE), scales.to(DEVICE)).cpu(), want)
    # torch's float8 dtypes are the same bytes
    fp8 = gather_rows(
        rows.view(torch.float8_e4m3fn).to(DEVICE),
        ids.to(DEVICE),
        scales.view(torch.float8_e8m0fnu).to(DEVICE),
    )
    _assert_same_floats(fp8.cpu(), want)


@needs_triton
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gather_kernel_through_cache_equals_twin(fp8):
    gen = _gen(3)
    if fp8:
        table, scale = _fp8_table(200, 64, seed=4)
        cache, cache_scale = _fp8_table(50, 64, seed=5)  # unlike any table row: hits must show
    else:
        table, scale = torch.randn(200, 64, generator=gen).bfloat16(), None
        cache, cache_scale = torch.randn(50, 64, generator=gen).bfloat16(), None
    ids = torch.randint(0, 200, (33, 6), generator=gen)
    slots = torch.randint(0, 50, (33, 6), generator=gen)
    slots[torch.rand(33, 6, generator=gen) < 0.4] = -1
    want = ref.gather_rows_cached(table, ids, slots, cache, scale, cache_scale)
    # The twin itself: hits come from the cache, misses from the table.
    hits = slots >= 0
    _assert_same_floats(want[hits], ref.gather_rows(cache, slots[hits], cache_scale))
    _assert_same_floats(want[~hits], ref.gather_rows(table, ids[~hits], scale))

    def on_device(t):
        return None if t is None else t.to(DEVICE)

    got = gather_rows(
        table.to(DEVICE), ids.to(DEVICE), on_device(scale),
        slots=slots.to(DEVICE), cache=cache.to(DEVICE), cache_scale=on_device(cache_scale),
    )  # fmt: skip
    _assert_same_floats(got.cpu(), want)


@needs_triton
def test_gather_kernel_cache_holding_table_rows_changes_nothing():
    rows, scales = _fp8_table(120, 32, seed=6)
    ids = torch.randint(0, 120, (1023,), generator=_gen(7))
    cached_rows = torch.arange(0, 120, 3)  # every third table row sits in the cache
    slot_of_row = torch.full((120,), -1)
    slot_of_row[cached_rows] = torch.arange(len(cached_rows))
    slots = slot_of_row[ids]
    got = gather_rows(
        rows.to(DEVICE), ids.to(DEVICE), scales.to(DEVICE), slots=slots.to(DEVICE),
        cache=rows[cached_rows].to(DEVICE), cache_scale=scales[cached_rows].to(DEVICE),
    )  # fmt: skip
    _assert_same_floats(got.cpu(), ref.gather_rows(rows, ids, scales))


@needs_triton
def test_gather_kernel_output_dtype_and_capped_grid():
    table = torch.randn(64, 40, generator=_gen(8))
    ids = torch.randint(0, 64, (300,), generator=_gen(9))
    want = ref.gather_rows(table, ids)
    got = gather_rows(table.to(DEVICE), ids.to(DEVICE), out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    # Within one bf16 rounding: the interpreter truncates where the GPU rounds to nearest.
    torch.testing.assert_close(got.cpu().float(), want, rtol=2**-7, atol=0)
    # One program walks every row block (the persistent loop).
    _assert_same_floats(gather_rows(table.to(DEVICE), ids.to(DEVICE), max_programs=1).cpu(), want)
    out = torch.empty(300, 40, device=DEVICE)
    assert gather_rows(table.to(DEVICE), ids.to(DEVICE), out=out) is out


@needs_triton
def test_gather_kernel_refuses_bad_inputs():
    rows, scales = (t.to(DEVICE) for t in _fp8_table(10, 64, seed=0))
    ids = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="FP8 rows need their UE8M0 scale"):
        gather_rows(rows, ids)
    with pytest.raises(ValueError, match=r"needs a scale of shape \(10, 2\)"):
        gather_rows(rows, ids, scales[:, :1].contiguous())
    with pytest.raises(ValueError, match="a scale is only for FP8 rows"):
        gather_rows(rows.float(), ids, scales)
    with pytest.raises(TypeError, match="row_ids must be int64"):
        gather_rows(rows, ids.int(), scales)
    with pytest.raises(ValueError, match="table must have 2 dimensions"):
        gather_rows(rows.float().view(-1), ids)
    with pytest.raises(ValueError, match="slots and cache go together"):
        gather_rows(rows, ids, scales, slots=ids)
    with pytest.raises(ValueError, match="must be in the table's format"):
        gather_rows(rows, ids, scales, slots=ids, cache=rows.float())


# --- gate --------------------------------------------------------------------------------

GATE_SHAPES = {"T1_hc1": (1, 1, 64), "T1023_hc3": (1023, 3, 16), "hc4_D576": (5, 4, 576),
               "empty": (0, 2, 32)}  # fmt: skip


def _gate_inputs(shape, dtype, weights):
    """h, key, value, q_weight, k_weight; the first half of the keys small (small logits,
    where the signed square root is steep) and the last one zero (a logit of exactly 0)."""
    num_tokens, hc, dim = shape
    gen = _gen(dim)
    h, key = (torch.randn(shape, generator=gen).to(dtype) for _ in "hk")
    key[: num_tokens // 2] *= 0.01
    key[num_tokens - 1 :] = 0
    value = torch.randn(num_tokens, dim, generator=gen).to(dtype)
    qw, kw = (1 + 0.3 * torch.randn(hc, dim, generator=gen) if weights else None for _ in "qk")
    return h, key, value, qw, kw


@pytest.mark.parametrize("weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("add_residual", [True, False], ids=["v41", "demo"])
@pytest.mark.parametrize("shape", GATE_SHAPES.values(), ids=GATE_SHAPES.keys())
def test_cpu_gate_equals_twin_and_each_token_is_computed_alone(weights, add_residual, shape):
    from engram_serve.kernels.cpu_gate import fused_engram_gate_cpu

    h, key, value, qw, kw = _gate_inputs(shape, torch.float32, weights)
    got = fused_engram_gate_cpu(h, key, value, qw, kw, 1e-6, add_residual)
    want = ref.fused_engram_gate(h, key, value, qw, kw, 1e-6, add_residual)
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if shape[0]:  # the last token's logit is 0: its gate is exactly sigmoid(0)
        gate = (got[-1] - h[-1]) if add_residual else got[-1]
        torch.testing.assert_close(gate, 0.5 * value[-1].expand_as(gate), rtol=0, atol=1e-6)
        alone = fused_engram_gate_cpu(h[-1:], key[-1:], value[-1:], qw, kw, 1e-6, add_residual)
        assert torch.equal(alone, got[-1:])


def test_cpu_gate_refuses_what_it_cannot_run():
    from engram_serve.kernels.cpu_gate import fused_engram_gate_cpu

    h = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="needs float32 CPU tensors"):
        fused_engram_gate_cpu(h.bfloat16(), h.bfloat16(), h[:, 0].bfloat16(), None, None, 0, True)
    with pytest.raises(ValueError, match=r"need h, key \[T, hc, D\] and value \[T, D\]"):
        fused_engram_gate_cpu(h, h, h[:, 0, :4], None, None, 1e-6, True)
    with pytest.raises(ValueError, match=r"q_weight must be \[hc, D\] = \(2, 8\)"):
        fused_engram_gate_cpu(h, h, h[:, 0], h[0, :1], None, 1e-6, True)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("add_residual", [True, False], ids=["v41", "demo"])
@pytest.mark.parametrize("shape", GATE_SHAPES.values(), ids=GATE_SHAPES.keys())
def test_gate_kernel_equals_twin(dtype, weights, add_residual, shape):
    h, key, value, qw, kw = _gate_inputs(shape, dtype, weights)
    eps = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps

    def on_device(t):
        return None if t is None else t.to(DEVICE)

    got = fused_engram_gate(*map(on_device, (h, key, value, qw, kw)), eps, add_residual)
    want = ref.fused_engram_gate(h, key, value, qw, kw, eps, add_residual)
    assert got.dtype == dtype and got.shape == shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


def test_fused_gate_twin_gives_the_v41_module_output():
    from engram_serve.model.engram import EngramV41

    config = EngramConfig(
        variant="v41", layer_ids=(1,), max_ngram_size=3, n_head_per_ngram=2,
        engram_vocab_size=(101, 103), head_dim=8, hc_mult=2, table_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    module = EngramV41(config, hidden_size=32)
    with torch.no_grad():
        module.q_weight.normal_(1, 0.3)
        module.k_weight.normal_(1, 0.3)
    hidden = torch.randn(9, 2, 32)
    rows = torch.randn(9, config.num_heads, config.head_dim)
    with torch.no_grad():
        kv = module.wkv(rows.flatten(1))  # [T, (hc+1)*D]
        key, value = kv[:, :64].unflatten(1, (2, 32)), kv[:, 64:]
        want = module(hidden, rows)
        got = ref.fused_engram_gate(
            hidden, key, value, module.q_weight, module.k_weight, config.rms_norm_eps, True
        )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_triton
def test_gate_kernel_refuses_bad_inputs():
    h = torch.randn(4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"need h, key \[T, hc, D\] and value \[T, D\]"):
        fused_engram_gate(h, h, h[:, 0, :4].contiguous(), None, None, 1e-6, True)
    with pytest.raises(ValueError, match=r"q_weight must be \[hc, D\] = \(2, 8\)"):
        fused_engram_gate(h, h, h[:, 0].contiguous(), h[0, :1], None, 1e-6, True)
    strided = h.transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="key must be contiguous"):
        fused_engram_gate(h, strided, h[:, 0].contiguous(), None, None, 1e-6, True)
    with pytest.raises(TypeError, match="h must be float32, bfloat16, float16, got int64"):
        fused_engram_gate(h.long(), h, h[:, 0].contiguous(), None, None, 1e-6, True)


# --- CPU gather --------------------------------------------------------------------------


@pytest.fixture(params=["real_sizes", "tiny_sizes"])
def cpu_gather_sizes(request, monkeypatch):
    """The real threshold, and a tiny one under which a few thousand rows are split over every
    thread."""
    if request.param == "tiny_sizes":
        monkeypatch.setattr(cpu_gather, "_MIN_ROWS_PER_THREAD", 100)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "fp8", "float8_e4m3fn"])
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (9000,)], ids=str)
def test_cpu_gather_equals_reference(cpu_gather_sizes, num_threads, dtype, shape):
    gen = _gen(len(shape))
    if dtype in ("fp8", "float8_e4m3fn"):
        table, scale = _fp8_table(5000, 64, seed=3)
        if dtype == "float8_e4m3fn":
            table, scale = table.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu)
    else:
        table, scale = torch.randn(5000, 48, generator=gen).to(getattr(torch, dtype)), None
        table.view(-1)[:4] = torch.tensor([0.0, -0.0, float("nan"), float("inf")])
    ids = torch.randint(0, 5000, shape, generator=gen)
    if ids.numel():
        ids.view(-1)[:2] = torch.tensor([0, 1])[: ids.numel()]  # the special values appear
    got = gather_rows_cpu(table, ids, scale, num_threads=num_threads)
    assert got.dtype == torch.float32
    _assert_same_floats(got, ref.gather_rows(table, ids, scale))


def test_cpu_gather_writes_into_out_and_handles_strided_tables():
    table = torch.randn(100, 64, generator=_gen(0))
    ids = torch.randint(0, 100, (6000,), generator=_gen(1))
    out = torch.empty(6000, 64)
    assert gather_rows_cpu(table, ids, out=out) is out
    assert torch.equal(out, ref.gather_rows(table, ids))
    strided = table[:, ::2]  # not contiguous: falls back to the reference, same result
    assert torch.equal(gather_rows_cpu(strided, ids), ref.gather_rows(strided, ids))


def test_cpu_gather_refuses_what_the_reference_refuses():
    table = torch.randn(10, 64)
    rows, scales = _fp8_table(10, 64, seed=0)
    for bad in (torch.tensor([10]), torch.tensor([-1, 3])):
        with pytest.raises(IndexError, match="outside a table of 10 rows"):
            ref.gather_rows(table, bad)
        with pytest.raises(IndexError, match="outside a table of 10 rows"):
            gather_rows_cpu(table, bad)
    with pytest.raises(ValueError, match="needs its UE8M0 `scale`"):
        gather_rows_cpu(rows, torch.tensor([1]))
    with pytest.raises(ValueError, match="`scale` is only for FP8 tables"):
        gather_rows_cpu(table, torch.tensor([1]), scales)
    with pytest.raises(ValueError, match=r"needs a scale of shape \(10, 2\)"):
        gather_rows_cpu(rows, torch.tensor([1]), scales[:, :1])
    with pytest.raises(ValueError, match="out must be a contiguous float32 tensor"):
        gather_rows_cpu(table, torch.tensor([1, 2]), out=torch.empty(2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"table must be \[rows, width\]"):
        gather_rows_cpu(table.view(-1), torch.tensor([1]))


def test_cpu_gather_threads_work_inside_inference_mode():
    """The engine's step runs under inference mode and the gather's worker threads write into
    buffers made there; every thread must enter inference mode too."""
    from engram_serve.kernels.cpu_gather import gather_rows_cpu
    from engram_serve.kernels.reference import gather_rows as reference_gather

    table = torch.randn(5000, 64)
    ids = torch.randint(0, 5000, (20000,))
    with torch.inference_mode():
        out = torch.empty(20000, 64)
        got = gather_rows_cpu(table, ids, out=out, num_threads=2)
    torch.testing.assert_close(got, reference_gather(table, ids), rtol=0, atol=0)


# --- CPU decode attention ----------------------------------------------------------------


def _decode_case(seq_lens, heads, kv_heads, hd, block_size, seed):
    """Queries and a shuffled block pool holding each sequence's context (block 0: padding)."""
    gen = _gen(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, hd, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, hd, generator=gen)
    pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(blocks_per_seq, default=1)
    tables = [[pool.pop() for _ in range(n)] for n in blocks_per_seq]
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables]).view(-1, width)
    q = 3 * torch.randn(len(seq_lens), heads, hd, generator=gen)  # peaked softmaxes too
    return q, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int64)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize(
    "heads,kv_heads,hd", [(9, 3, 64), (6, 2, 8), (4, 4, 16), (5, 1, 24)], ids=str
)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize(
    "seq_lens", [[1], [300], [1, 77, 5, 16, 17, 129, 2, 64], [40] * 11], ids=len
)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=str)
def test_cpu_decode_attention_equals_twin(
    num_threads, heads, kv_heads, hd, block_size, seq_lens, cache_dtype
):
    """Against the torch twin, which reads a float16 cache widened to float32 by torch."""
    from engram_serve.kernels.cpu_attention import decode_attention_cpu
    from engram_serve.model.attention import decode_attention

    q, k_cache, v_cache, tables, lens = _decode_case(seq_lens, heads, kv_heads, hd, block_size, 0)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    got = decode_attention_cpu(q, k_cache, v_cache, tables, lens, 0.2, num_threads=num_threads)
    want = decode_attention(q, k_cache, v_cache, tables, lens, max(seq_lens), 0.2)
    # Both sum in float32 in their own order, and SDPA's order depends on the CPU (its AVX2 and
    # AVX-512 kernels differ by up to 3e-6 here).
    torch.testing.assert_close(got, want, atol=5e-6, rtol=1e-5)


def test_half_conversions_equal_torchs_bit_for_bit():
    """kernels/cpu_half.py's float16 <-> float32 in compiled code against torch's casts, over
    every float16 bit pattern (widening) and float32 values around each float16 (narrowing: ties,
    subnormals, overflow to inf, NaN)."""
    import numba

    from engram_serve.kernels.cpu_half import as_bits, load, store

    @numba.njit
    def widen(bits, out):
        for i in range(bits.size):
            out[i] = load(bits[i])

    @numba.njit
    def narrow(values, out):
        for i in range(values.size):
            out[i] = store(out, values[i])

    every_half = (
        torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    )
    widened = torch.empty(every_half.shape, dtype=torch.float32)
    widen(as_bits(every_half), widened.numpy())
    want = every_half.float()
    assert torch.equal(widened.isnan(), want.isnan())
    assert torch.equal(widened[~want.isnan()], want[~want.isnan()])

    finite = want[want.isfinite()]
    spacing = (finite.abs() * 2.0**-11).clamp(min=2.0**-25)  # half a float16 step, about
    values = torch.cat([
        finite, finite + spacing, finite - spacing, finite + spacing / 2,
        torch.randn(100_000) * 3e4,
        torch.tensor([7e4, -7e4, 65520.0, 65519.0, float("inf"), float("-inf"), 1e-9]),
    ])  # fmt: skip
    narrowed = torch.empty(values.shape, dtype=torch.float16)
    narrow(values.numpy(), as_bits(narrowed))
    assert torch.equal(narrowed.view(torch.int16), values.to(torch.float16).view(torch.int16))
    with pytest.raises(ValueError, match="float32 or float16 caches, got torch.bfloat16"):
        as_bits(torch.zeros(2, dtype=torch.bfloat16))


def test_cpu_attention_exp_is_within_its_stated_error():
    """The softmax's exp (kernels/cpu_attention._exp_nonpositive) against float64 exp over
    [-100, 0]: within 1.5e-7 relative where float32 holds the value as a normal number (NumPy's
    own float32 exp is off by up to 2e-7), exactly 1 at 0, and a tiny positive weight below."""
    import numba

    from engram_serve.kernels.cpu_attention import _exp_nonpositive

    @numba.njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = _exp_nonpositive(x[i])

    x = np.concatenate([
        -np.random.default_rng(0).exponential(8.0, 200_000), np.linspace(-100, 0, 100_001)
    ]).astype(np.float32)  # fmt: skip
    got = np.empty_like(x)
    apply(x, got)
    want = np.exp(x.astype(np.float64))
    normal = x > -87
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 1.5e-7
    assert got[x == 0].min() == got[x == 0].max() == 1.0
    assert (got[~normal] > 0).all() and (got[~normal] < 1.7e-38).all()


def test_cpu_decode_attention_reads_nothing_past_a_sequences_length():
    """Cache slots beyond each length (the rest of its last block, and padding block 0) hold NaN:
    the output stays finite, so the kernel never read them."""
    from engram_serve.kernels.cpu_attention import decode_attention_cpu

    seq_lens = [5, 16, 1, 33]
    q, k_cache, v_cache, tables, lens = _decode_case(seq_lens, 6, 2, 8, 16, 1)
    used = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for s, n in enumerate(seq_lens):
        for p in range(n):
            used[tables[s, p // 16], p % 16] = True
    k_cache[~used], v_cache[~used] = float("nan"), float("nan")
    out = decode_attention_cpu(q, k_cache, v_cache, tables, lens, 0.3, num_threads=2)
    assert out.isfinite().all()


def test_cpu_decode_attention_handles_no_sequences_and_refuses_bad_inputs():
    from engram_serve.kernels import cpu_attention
    from engram_serve.kernels.cpu_attention import decode_attention_cpu

    q, k_cache, v_cache, tables, lens = _decode_case([4, 9], 6, 2, 8, 4, 2)
    empty = decode_attention_cpu(q[:0], k_cache, v_cache, tables[:0], lens[:0], 0.3)
    assert empty.shape == (0, 6, 8)
    assert not cpu_attention.supports(q.bfloat16(), k_cache.bfloat16())
    assert not cpu_attention.supports(q, k_cache.bfloat16())
    with pytest.raises(ValueError, match="caches, got .* caches torch.float32/torch.float16"):
        decode_attention_cpu(q, k_cache, v_cache.half(), tables, lens, 0.3)
    with pytest.raises(ValueError, match="does not fit caches"):
        decode_attention_cpu(q[:, :5], k_cache, v_cache, tables, lens, 0.3)
    with pytest.raises(ValueError, match="must be contiguous"):
        strided = k_cache.transpose(0, 1).contiguous().transpose(0, 1)
        decode_attention_cpu(q, strided, v_cache, tables, lens, 0.3)
    with pytest.raises(ValueError, match=r"seq_lens span \[0, 9\], outside \[1, 12\]"):
        decode_attention_cpu(q, k_cache, v_cache, tables, torch.tensor([0, 9]), 0.3)
    with pytest.raises(ValueError, match=r"seq_lens span \[4, 13\], outside \[1, 12\]"):
        decode_attention_cpu(q, k_cache, v_cache, tables, torch.tensor([4, 13]), 0.3)
    with pytest.raises(ValueError, match="outside the pool"):
        decode_attention_cpu(q, k_cache, v_cache, tables + k_cache.shape[0], lens, 0.3)


# --- CPU small-batch linear ---------------------------------------------------------------


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 64, 256])
@pytest.mark.parametrize(
    "out_features,in_features", [(1, 1), (5, 3), (576, 576), (1003, 77), (13, 1100)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_linear_equals_a_float64_product(
    num_threads, rows, out_features, in_features, with_bias
):
    """Every shape the tiling splits differently: odd rows (a lone last row), N % 4 != 0 (a short
    last tile), K too short to vectorize."""
    from engram_serve.kernels.cpu_linear import linear_cpu

    gen = _gen(rows * out_features)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    got = linear_cpu(x, weight, bias, num_threads=num_threads)
    want = torch.nn.functional.linear(
        x.double(), weight.double(), None if bias is None else bias.double()
    )
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * in_features**0.5)


def test_cpu_linear_takes_strided_inputs_and_trainable_weights():
    from engram_serve.kernels.cpu_linear import linear_cpu

    layer = torch.nn.Linear(40, 24)  # weight and bias require grad, outside inference mode
    x = torch.randn(40, 5).t()  # [5, 40], not contiguous
    got = linear_cpu(x, layer.weight, layer.bias)
    torch.testing.assert_close(got, layer(x).detach(), rtol=1e-5, atol=1e-5)


def test_cpu_linear_refuses_what_it_cannot_run():
    from engram_serve.kernels import cpu_linear
    from engram_serve.kernels.cpu_linear import MAX_ROWS, linear_cpu

    weight = torch.randn(8, 4)
    assert not cpu_linear.supports(torch.randn(MAX_ROWS + 1, 4), weight)
    assert not cpu_linear.supports(torch.randn(0, 4), weight)
    assert not cpu_linear.supports(torch.randn(2, 4).bfloat16(), weight.bfloat16())
    with pytest.raises(ValueError, match=f"x of 1..{MAX_ROWS} rows"):
        linear_cpu(torch.randn(4), weight)
    with pytest.raises(ValueError, match="needs float32 CPU tensors"):
        linear_cpu(torch.randn(2, 4), weight.double())
    with pytest.raises(ValueError, match=r"x \(2, 5\) does not fit weight \(8, 4\)"):
        linear_cpu(torch.randn(2, 5), weight)


def test_model_linear_runs_the_kernel_up_to_max_rows_and_mkl_beyond():
    from engram_serve.kernels.cpu_linear import MAX_ROWS, linear_cpu
    from engram_serve.model.linear import linear

    weight, bias = torch.randn(96, 64), torch.randn(96)
    for rows, twin in [(MAX_ROWS, linear_cpu), (MAX_ROWS + 1, torch.nn.functional.linear)]:
        x = torch.randn(rows, 64)
        assert torch.equal(linear(x, weight, bias), twin(x, weight, bias))
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(
        linear(x, weight.bfloat16()), torch.nn.functional.linear(x, weight.bfloat16())
    )


def test_float32_weights_among_quantized_ones_multiply_as_they_do_in_bfloat16():
    """Under bfloat16 products (a quantized model's, model/linear.prefill_in), a float32 weight
    such as Engram's wkv runs its products of cpu_quant.BFLOAT16_BAND_MIN_ROWS rows or more in
    bfloat16 too: the float64 product of the rounded x and W, rounded once more to bfloat16;
    fewer rows stay float32."""
    import torch.nn.functional as F

    from engram_serve.kernels.cpu_quant import BFLOAT16_BAND_MIN_ROWS
    from engram_serve.model.linear import linear, prefill_in

    gen = _gen(9)
    weight, bias = torch.randn(40, 64, generator=gen), torch.randn(40, generator=gen)
    few, many = (torch.randn(n, 64, generator=gen) for n in (3, BFLOAT16_BAND_MIN_ROWS))
    with prefill_in(torch.bfloat16):
        got_few, got_many = linear(few, weight, bias), linear(many, weight, bias)
    assert torch.equal(got_few, linear(few, weight, bias))  # float32, as outside the context
    x, w, b = (t.bfloat16().double() for t in (many, weight, bias))
    want = F.linear(x, w, b)
    # float32 sums of 64 products in any order, then one rounding to bfloat16
    bound = 64 * 2.0**-24 * F.linear(x.abs(), w.abs(), b.abs()) + 2.0**-8 * want.abs()
    assert got_many.dtype == torch.float32 and not torch.equal(got_many, linear(many, weight, bias))
    assert ((got_many.double() - want).abs() <= bound * (1 + 2.0**-8)).all()


# --- CPU fused decode layer (its output against the eager layer: tests/test_llama.py) -----


def _decode_layer_case(num_seqs=2, dim=8, heads=2, kv_heads=1, hd=4, ff=12, block_size=4):
    from engram_serve.kernels.cpu_decode import LayerWeights

    gen = _gen(7)
    qkv_rows = (heads + 2 * kv_heads) * hd
    weights = LayerWeights(
        torch.ones(dim),
        torch.randn(qkv_rows, dim, generator=gen),
        None,
        None,
        None,
        torch.randn(dim, heads * hd, generator=gen),
        torch.ones(dim),
        torch.randn(2 * ff, dim, generator=gen),
        torch.randn(dim, ff, generator=gen),
    )
    caches = [torch.zeros(1 + num_seqs, block_size, kv_heads, hd) for _ in range(2)]
    meta = dict(
        slot_mapping=torch.arange(num_seqs) * block_size + block_size,  # position 0 of blocks 1..
        block_tables=torch.arange(1, 1 + num_seqs)[:, None],
        seq_lens=torch.ones(num_seqs, dtype=torch.int64),
    )
    rope = [torch.ones(num_seqs, 1, hd // 2), torch.zeros(num_seqs, 1, hd // 2)]
    return torch.randn(num_seqs, dim, generator=gen), weights, rope, caches, meta


def test_cpu_decode_layer_refuses_what_it_cannot_run():
    from engram_serve.kernels import cpu_decode
    from engram_serve.kernels.cpu_linear import MAX_ROWS

    h, weights, rope, (k, v), meta = _decode_layer_case()

    def bind(weights=weights, k=k, v=v):
        return cpu_decode.bind(weights, 1e-6, k, v, scale=0.5)

    def call(h=h, **changes):
        step = cpu_decode.decode_step(*rope, **{**meta, **changes}, k_cache=k)
        return cpu_decode.decode_layer(h, bind(), step)

    out = call()
    assert out.shape == h.shape and out.isfinite().all() and not torch.equal(out, h)
    assert cpu_decode.supports(h)
    assert not cpu_decode.supports(torch.randn(MAX_ROWS + 1, 8))
    assert not cpu_decode.supports(h.bfloat16())
    # Weights or caches of other dtypes: the eager layer runs them.
    assert bind(weights._replace(qkv=weights.qkv.bfloat16())) is None
    assert bind(weights._replace(down=weights.down.half())) is None
    assert bind(k=k.bfloat16(), v=v.bfloat16()) is None
    with pytest.raises(ValueError, match="needs float32 CPU tensors and 1..256 sequences"):
        call(h=h.double())
    with pytest.raises(ValueError, match="one a slot, got h torch.float32 .3, 8. .* for 2 slots"):
        call(h=torch.randn(3, 8))
    with pytest.raises(ValueError, match="K and V caches differ: torch.float32 .* torch.float16"):
        bind(v=v.half())
    with pytest.raises(ValueError, match="q_norm and k_norm come together"):
        bind(weights._replace(q_norm=torch.ones(4)))
    with pytest.raises(ValueError, match="do not fit its hidden size 8"):
        bind(weights._replace(down=weights.down[:, :10]))
    with pytest.raises(ValueError, match="must be contiguous"):
        bind(k=k.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(ValueError, match="2 tokens need 2 slots"):
        call(slot_mapping=meta["slot_mapping"][:1])
    with pytest.raises(ValueError, match=r"block ids span \[2, 3\], outside the pool"):
        call(block_tables=meta["block_tables"] + 1)
    with pytest.raises(ValueError, match=r"seq_lens span \[1, 5\], outside \[1, 4\]"):
        call(seq_lens=torch.tensor([1, 5]))
    with pytest.raises(ValueError, match=r"slots span \[4, 12\], outside the pool"):
        call(slot_mapping=torch.tensor([4, 12]))


# --- how numba compiles ------------------------------------------------------------------


@pytest.mark.parametrize("user_features", [None, "+avx2"], ids=["default", "set by the user"])
def test_numba_compiles_for_this_cpu_with_wide_vectors_unless_told_otherwise(user_features):
    """Importing the package makes numba's code generator target this CPU's features with
    512-bit vectors allowed; a NUMBA_CPU_FEATURES the user set is kept as it is. Checked in a
    fresh interpreter, where nothing has compiled yet."""
    import subprocess
    import sys

    import llvmlite.binding as llvm

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CPU_FEATURES"}
    if user_features is not None:
        env["NUMBA_CPU_FEATURES"] = user_features
    script = (
        "import engram_serve\n"
        "from numba.core.registry import cpu_target\n"
        "print(cpu_target.target_context.codegen().magic_tuple()[2])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    features = result.stdout.strip()
    if user_features is None:
        assert features == llvm.get_host_cpu_features().flatten() + ",-prefer-256-bit"
    else:
        assert features == user_features


def test_numba_cache_is_keyed_by_every_numba_module(tmp_path):
    """A compiled kernel that inlines another module's code (the fused decode layer inlines
    cpu_quant's tiles) must not be loaded from the cache after an edit to that module: numba
    itself checks only the kernel's own file. Run on a copy of the package in fresh
    interpreters: the kernels' cache lands under $ENGRAM_SERVE_CACHE (or the user's
    $NUMBA_CACHE_DIR), and an edit to cpu_half.py alone moves it."""
    import shutil
    import subprocess
    import sys
    import sysconfig

    import engram_serve

    root = tmp_path / "copy"
    shutil.copytree(
        Path(engram_serve.__file__).parent,
        root / "engram_serve",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    # -S: the checkout's editable install would import the original package before the copy
    site_packages = sysconfig.get_paths()["purelib"]
    script = (
        f"import sys; sys.path[:0] = [{str(root)!r}]; sys.path.append({site_packages!r})\n"
        "import numba, numpy as np\n"
        "from engram_serve.kernels.cpu_hash import ngram_hash_cpu\n"
        "one = np.ones((1, 2), dtype=np.int64)\n"
        "ngram_hash_cpu(np.arange(3), np.array([0, 3]), one[:, :1], one, one * 7)\n"
        "print(numba.config.CACHE_DIR)\n"
    )

    def cache_dir(**env) -> Path:
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | env
        command = [sys.executable, "-S", "-c", script]
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return Path(result.stdout.strip())

    cache = tmp_path / "cache"
    first = cache_dir(ENGRAM_SERVE_CACHE=str(cache))
    assert first.parent == cache / "numba"
    assert any(first.rglob("cpu_hash.*.nbi")), "the hash kernel was not cached there"

    half = root / "engram_serve" / "kernels" / "cpu_half.py"
    half.write_text(half.read_text() + "\n# an edit\n")
    user = tmp_path / "numba-set-by-user"
    edited = cache_dir(NUMBA_CACHE_DIR=str(user))
    assert edited.parent == user and edited.name != first.name
