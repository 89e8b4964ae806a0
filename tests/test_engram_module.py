"""Engram module (demo and V4.1 variants) and its pure-torch kernel twins.

Golden agreement with the reference demo lives in test_reference_fixtures.py; here: byte formats
against hand-computed values, the gate and fused projection against per-element loops, and the
serving properties of the demo's short conv (chunked = whole, packed = separate).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_serve.engram.config import EngramConfig
from engram_serve.kernels.reference import (
    decode_fp8_e4m3,
    decode_ue8m0,
    dequantize_blocks,
    dequantize_rows,
    engram_gate,
    gather_rows,
)
from engram_serve.model.engram import (
    EngramDemo,
    EngramV41,
    build_engram,
    load_v41_checkpoint,
    zero_value_path,
)

# Tiny shapes: 2 orders x 2 heads of 3-wide rows -> 12 engram values per token.
DEMO = EngramConfig(
    variant="demo",
    layer_ids=(1,),
    max_ngram_size=3,
    n_head_per_ngram=2,
    engram_vocab_size=(11, 13),
    head_dim=3,
    hc_mult=2,
    kernel_size=3,
)
V41 = EngramConfig(
    variant="v41",
    layer_ids=(1,),
    max_ngram_size=3,
    n_head_per_ngram=2,
    engram_vocab_size=(11, 13),
    head_dim=3,
    hc_mult=2,
    rms_norm_eps=1e-5,
)
D = 8


def _u8(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return module


def _inputs(config: EngramConfig, num_tokens: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, config.hc_mult, D, generator=gen)
    rows = torch.randn(num_tokens, config.num_heads, config.head_dim, generator=gen)
    return hidden, rows


# ---- byte formats ------------------------------------------------------------------------------


def test_fp8_e4m3_hand_values():
    cases = {
        0x00: 0.0,
        0x38: 1.0,  # exponent 7 = bias
        0x3C: 1.5,  # mantissa 4/8
        0x40: 2.0,
        0x08: 2.0**-6,  # smallest normal
        0x01: 2.0**-9,  # smallest subnormal: 1/8 * 2**-6
        0x06: 0.75 * 2.0**-6,  # subnormal 6/8 * 2**-6
        0x7E: 448.0,  # largest finite: 1.75 * 2**8
        0xB8: -1.0,  # sign bit
        0xFE: -448.0,
        0x87: -7 / 8 * 2.0**-6,
    }
    got = decode_fp8_e4m3(_u8(list(cases)))
    assert got.dtype == torch.float32
    assert got.tolist() == list(cases.values())
    assert torch.signbit(decode_fp8_e4m3(_u8([0x80]))).item()  # -0.0
    assert torch.isnan(decode_fp8_e4m3(_u8([0x7F, 0xFF]))).all()
    assert not torch.isnan(decode_fp8_e4m3(_u8([0x77, 0xF7, 0x7E]))).any()  # E4M3FN: no infs


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8")
def test_fp8_e4m3_matches_torch_for_every_byte():
    every = torch.arange(256, dtype=torch.uint8)
    ours, theirs = decode_fp8_e4m3(every), every.view(torch.float8_e4m3fn).float()
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    # float8 tensors (as safetensors loads F8_E4M3) are read as their bytes
    assert torch.equal(decode_fp8_e4m3(every[:127].view(torch.float8_e4m3fn)), ours[:127])


def test_ue8m0_hand_values():
    got = decode_ue8m0(_u8([127, 128, 126, 0, 254, 120]))
    assert got.tolist() == [1.0, 2.0, 0.5, 2.0**-127, 2.0**127, 2.0**-7]
    assert torch.isnan(decode_ue8m0(_u8([255]))).all()


def test_dequantize_rows_one_scale_per_32_values():
    rows = torch.full((2, 64), 0x38, dtype=torch.uint8)  # every value 1.0
    rows[1, 40] = 0xC0  # -2.0 in row 1's second block
    scales = _u8([[127, 130], [125, 127]])  # x1, x8 / x0.25, x1
    got = dequantize_rows(rows, scales)
    expected = torch.ones(2, 64)
    expected[0, 32:] = 8.0
    expected[1, :32] = 0.25
    expected[1, 40] = -2.0
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="scales"):
        dequantize_rows(rows, scales[:, :1])


def test_dequantize_blocks_32x32_and_ragged_edges():
    w = torch.full((40, 70), 0x38, dtype=torch.uint8)  # 1.0 everywhere
    scale = torch.arange(6, dtype=torch.uint8).view(2, 3) + 127  # 2**(block index)
    got = dequantize_blocks(w, scale)
    for m, k in [(0, 0), (31, 31), (32, 0), (0, 32), (39, 69), (5, 64), (33, 40)]:
        assert got[m, k].item() == 2.0 ** (3 * (m // 32) + k // 32), (m, k)
    with pytest.raises(ValueError, match="needs scale"):
        dequantize_blocks(w, scale[:, :2])


def test_gather_rows_float_and_fp8():
    table = torch.arange(20, dtype=torch.float32).view(5, 4)
    ids = torch.tensor([[4, 0, 2], [1, 1, 3]])
    got = gather_rows(table.to(torch.bfloat16), ids)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 4)
    assert torch.equal(got[0, 0], table[4]) and torch.equal(got[1, 2], table[3])

    fp8 = torch.full((3, 64), 0x38, dtype=torch.uint8)
    fp8[2, 0] = 0x40  # 2.0
    scale = _u8([[127, 127], [128, 128], [126, 127]])
    got = gather_rows(fp8, torch.tensor([2, 1]), scale)
    assert got[0, 0].item() == 1.0 and got[0, 1].item() == 0.5 and got[0, 32].item() == 1.0
    assert torch.equal(got[1], torch.full((64,), 2.0))
    with pytest.raises(IndexError, match="outside a table of 5 rows"):
        gather_rows(table, torch.tensor([5]))
    with pytest.raises(ValueError, match="needs its UE8M0"):
        gather_rows(fp8, torch.tensor([0]))


# ---- gate and V4.1 fused projection against per-element loops ---------------------------------


def _slow_gate(h, key, qw, kw, eps):
    """a[t, b] written out with explicit sums."""
    num_tokens, hc, d = h.shape
    out = torch.empty(num_tokens, hc)
    for t in range(num_tokens):
        for b in range(hc):
            hs = [float(x) for x in h[t, b]]
            ks = [float(x) for x in key[t, b]]
            rh = 1 / math.sqrt(sum(x * x for x in hs) / d + eps)
            rk = 1 / math.sqrt(sum(x * x for x in ks) / d + eps)
            g = sum(hs[i] * rh * qw[b, i] * ks[i] * rk * kw[b, i] for i in range(d)) / math.sqrt(d)
            g = math.copysign(math.sqrt(max(abs(g), 1e-6)), g) if g != 0 else 0.0
            out[t, b] = 1 / (1 + math.exp(-g))
    return out


def test_engram_gate_matches_per_element_loops():
    gen = torch.Generator().manual_seed(3)
    h, key = torch.randn(4, 3, 5, generator=gen), torch.randn(4, 3, 5, generator=gen) * 3
    qw, kw = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    key[1, 2] = 0  # zero key: g = 0, gate 1/2
    got = engram_gate(h, key, qw, kw, eps=1e-6)
    torch.testing.assert_close(got, _slow_gate(h, key, qw, kw, 1e-6), atol=1e-6, rtol=1e-5)
    assert got[1, 2].item() == 0.5


def test_v41_forward_matches_per_element_loops():
    module = _randomize(EngramV41(V41, D))
    hidden, rows = _inputs(V41, num_tokens=3)
    got = module(hidden, rows)

    w = module.wkv.weight.detach()
    e = rows.flatten(1)
    hc, num_in = V41.hc_mult, V41.engram_dim
    kv = torch.tensor(
        [
            [sum(float(w[o, i]) * float(e[t, i]) for i in range(num_in)) for o in range(w.shape[0])]
            for t in range(3)
        ]
    )  # kv[t, o] = sum_i wkv[o, i] e[t, i]
    key, value = kv[:, : hc * D].view(3, hc, D), kv[:, hc * D :]
    a = _slow_gate(hidden, key, module.q_weight.detach(), module.k_weight.detach(), 1e-5)
    expected = torch.stack(
        [torch.stack([hidden[t, b] + a[t, b] * value[t] for b in range(hc)]) for t in range(3)]
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_load_v41_checkpoint_dequantizes_wkv_and_returns_the_table():
    module = EngramV41(V41, D)
    out_dim, in_dim = module.wkv.weight.shape  # [24, 12]: one 32x32 block
    gen = torch.Generator().manual_seed(5)
    wkv = torch.randint(0, 0x7F, (out_dim, in_dim), generator=gen, dtype=torch.uint8)  # no NaN
    wkv |= torch.randint(0, 2, wkv.shape, generator=gen, dtype=torch.uint8) << 7  # random signs
    prefix = "layers.1.engram."
    table = torch.zeros(7, 64, dtype=torch.uint8)
    tensors = {
        f"{prefix}wkv.weight": wkv.view(torch.float8_e4m3fn),  # as safetensors loads F8_E4M3
        f"{prefix}wkv.scale": _u8([[125]]),
        f"{prefix}q_weight": torch.randn(2, D, generator=gen).to(torch.bfloat16),
        f"{prefix}k_weight": torch.randn(2, D, generator=gen).to(torch.bfloat16),
        f"{prefix}embed.weight": table,
        f"{prefix}embed.scale": torch.zeros(7, 2, dtype=torch.uint8),
    }
    rest = load_v41_checkpoint(module, tensors, prefix)
    expected = wkv.view(torch.float8_e4m3fn).float() * 0.25  # torch's own fp8 decoder
    assert torch.equal(module.wkv.weight.detach(), expected)
    assert torch.equal(module.q_weight.detach(), tensors[f"{prefix}q_weight"].float())
    assert set(rest) == {"embed.weight", "embed.scale"} and rest["embed.weight"] is table
    with pytest.raises(KeyError, match="wkv.scale"):
        load_v41_checkpoint(module, {k: v for k, v in tensors.items() if "wkv.s" not in k}, prefix)


# ---- demo short conv: causal per sequence, chunked and packed ----------------------------------


def _conv_whole(module: EngramDemo, v: torch.Tensor) -> torch.Tensor:
    """The demo's own formulation for one whole sequence: left-padded conv, keep the first T."""
    conv = module.short_conv
    x = torch.cat([n(v[:, b]) for b, n in enumerate(conv.norms)], -1).T[None]  # [1, hc*D, T]
    y = F.conv1d(
        x,
        conv.conv.weight,
        padding=conv.history_len,
        dilation=conv.conv.dilation,
        groups=x.shape[1],
    )
    return F.silu(y[0, :, : v.shape[0]].T).view_as(v)


def test_short_conv_matches_padded_conv_per_sequence():
    module = _randomize(EngramDemo(DEMO, D))
    gen = torch.Generator().manual_seed(2)
    lens = [7, 1, 12]
    v = torch.randn(sum(lens), DEMO.hc_mult, D, generator=gen)
    qsl = torch.tensor([0, 7, 8, 20])
    got = module.short_conv(v, qsl, None, None)
    for s in range(3):
        part = slice(qsl[s], qsl[s + 1])
        torch.testing.assert_close(got[part], _conv_whole(module, v[part]), atol=1e-6, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    lens=st.lists(st.integers(1, 14), min_size=1, max_size=4),
    schedule_seed=st.integers(0, 2**31),
)
def test_demo_chunked_and_packed_equals_whole(lens, schedule_seed):
    """Sequences run in random pieces, packed in random order into state slots of a larger
    state, give the same outputs as each sequence run whole on its own."""
    module = _randomize(EngramDemo(DEMO, D))
    inputs = [_inputs(DEMO, n, seed=10 + s) for s, n in enumerate(lens)]
    whole = [module(h, r) for h, r in inputs]

    rng = random.Random(schedule_seed)
    num_slots = len(lens) + 2
    slots = rng.sample(range(num_slots), len(lens))
    state = torch.randn(num_slots, module.history_len, DEMO.hc_mult * D)  # stale garbage
    state[slots] = 0  # the caller zeros a sequence's row before position 0
    before = state.clone()
    done, outs = [0] * len(lens), [[] for _ in lens]
    while any(d < n for d, n in zip(done, lens, strict=True)):
        live = [s for s in range(len(lens)) if done[s] < lens[s]]
        step = rng.sample(live, rng.randint(1, len(live)))  # some sequences, any order
        pieces = [(s, done[s], min(lens[s], done[s] + rng.randint(0, 5))) for s in step]
        hidden = torch.cat([inputs[s][0][a:b] for s, a, b in pieces])
        rows = torch.cat([inputs[s][1][a:b] for s, a, b in pieces])
        qsl = torch.tensor([0] + [b - a for _, a, b in pieces]).cumsum(0)
        out = module(hidden, rows, qsl, state, torch.tensor([slots[s] for s in step]))
        for i, (s, _, b) in enumerate(pieces):
            outs[s].append(out[qsl[i] : qsl[i + 1]])
            done[s] = b
    for s in range(len(lens)):
        torch.testing.assert_close(torch.cat(outs[s]), whole[s], atol=1e-5, rtol=1e-5)
    untouched = [i for i in range(num_slots) if i not in slots]
    assert torch.equal(state[untouched], before[untouched])  # other slots are never written


def test_demo_state_without_slots_holds_last_conv_inputs():
    module = _randomize(EngramDemo(DEMO, D))
    hidden, rows = _inputs(DEMO, 9)
    state = torch.zeros(2, module.history_len, DEMO.hc_mult * D)
    qsl = torch.tensor([0, 2, 9])  # a 2-token sequence (shorter than history) and a 7-token one
    module(hidden, rows, qsl, state)
    first, second = module(hidden[:2], rows[:2]), module(hidden[2:], rows[2:])
    # continuing each sequence with one more token equals running it whole with that token
    extra_h, extra_r = _inputs(DEMO, 2, seed=7)
    step = module(extra_h, extra_r, torch.tensor([0, 1, 2]), state)
    full0 = module(torch.cat([hidden[:2], extra_h[:1]]), torch.cat([rows[:2], extra_r[:1]]))
    full1 = module(torch.cat([hidden[2:], extra_h[1:]]), torch.cat([rows[2:], extra_r[1:]]))
    torch.testing.assert_close(step[0], full0[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1], full1[-1], atol=1e-5, rtol=1e-5)
    assert first.shape == (2, 2, D) and second.shape == (7, 2, D)


# ---- factory, identity retrofit, input checks --------------------------------------------------


def test_build_engram_picks_the_variant():
    demo, v41 = build_engram(DEMO, D), build_engram(V41, D)
    assert isinstance(demo, EngramDemo) and isinstance(v41, EngramV41)
    assert demo.history_len == (DEMO.kernel_size - 1) * DEMO.max_ngram_size
    assert v41.history_len == 0
    names = set(demo.state_dict())
    assert {"key_projs.1.bias", "norm1.0.weight", "short_conv.conv.weight"} <= names
    assert not any(n.startswith("multi_head_embedding") for n in names)
    assert set(v41.state_dict()) == {"wkv.weight", "q_weight", "k_weight"}


@pytest.mark.parametrize("config", [DEMO, V41], ids=["demo", "v41"])
def test_zero_value_path_makes_the_module_an_identity(config):
    module = _randomize(build_engram(config, D))
    hidden, rows = _inputs(config, 11)
    assert not torch.equal(module(hidden, rows), hidden)
    zero_value_path(module)
    qsl = torch.tensor([0, 4, 11])
    state = torch.zeros(2, module.history_len, config.hc_mult * D)
    assert torch.equal(module(hidden, rows * 100, qsl, state), hidden)
    assert torch.equal(module(hidden, rows, qsl, state), hidden)  # again, with the carried state


def test_bad_inputs_are_refused_with_the_expected_shape():
    module = EngramDemo(DEMO, D)
    hidden, rows = _inputs(DEMO, 5)
    with pytest.raises(ValueError, match=r"hidden must be \[T, 2, 8\]"):
        module(hidden[:, :1], rows)
    with pytest.raises(ValueError, match=r"rows must be \[T, \(N-1\)\*H, W\] = \(5, 4, 3\)"):
        module(hidden, rows[:, :3])
    with pytest.raises(ValueError, match="conv_state must be"):
        module(hidden, rows, torch.tensor([0, 5]), torch.zeros(1, 1, 16))
    with pytest.raises(ValueError, match="pass state_slots"):
        module(hidden, rows, torch.tensor([0, 5]), torch.zeros(3, module.history_len, 16))
