"""The real engine (`LLM` -> `Engine.step()`) against oracles that share none of its batching.

Everything else that compares with transformers goes through `PagedRun`, a test-side stand-in for
the engine's batching; an error the engine makes consistently (positions, slots, block tables,
chunk boundaries, recompute after preemption, Engram lookback across chunks) passes there. Here
the engine runs as served, with chunked prefill (a small token budget), preemption (a small KV
pool: `scheduler.num_preemptions > 0` is asserted) and prompts of mixed lengths, so steps mix
prefill chunks with decodes; every generated token and its logprobs are then checked against
an oracle that runs each finished sequence in one plain, unpaged forward:

- Engram off, on the default backbone and on tiny random Llama-family models: transformers'
  `AutoModelForCausalLM` (float32, CPU), teacher-forced on the engine's own tokens.
- Engram on, with a non-zero value path (the default retrofit is an identity: a wrong row
  changes nothing there): transformers' decoder with each Engram layer computed token by token
  from the module's equations (model/engram.py docstring), on rows hashed by a per-token loop
  and read from the table files with a plain loop.

Greedy ties: the engine's token must be the oracle's argmax up to the tolerance (its oracle
logprob within `2 * atol` of the oracle's best), which is exact wherever the oracle's top two
are further apart than that; the logprobs are compared everywhere, so a near-tie hides nothing.
Teacher forcing on the engine's tokens means a legitimate near-tie flip never derails the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BACKBONE_FILES, save_tiny_hf
from safetensors.torch import load_file, save_file

from engram_serve.engine.request import CompletionOutput, SamplingParams
from engram_serve.engine.tokenizer import Tokenizer
from engram_serve.engram.compression import load_compression, num_compressed
from engram_serve.engram.config import EngramConfig
from engram_serve.engram.ngram_hash import NgramHasher
from engram_serve.engram.tables import (
    MANIFEST,
    MODULES_FILE,
    file_digests,
    read_engram_config,
    table_path,
    verify_tables,
)
from engram_serve.kernels.cpu_quant import QuantizedWeight
from engram_serve.llm import LLM
from engram_serve.model.default_model import DEFAULT_ENGRAM, packaged_gguf_path
from engram_serve.model.retrofit import init_tables

# Tolerances on logprobs (log_softmax of float32 logits), engine vs oracle. Both are float32 on
# the same weights and differ in summation order only (fused q/k/v and gate/up matmuls, the
# numba linear, decode-layer and Engram-gate kernels, attention split over chunks and KV
# blocks). Measured on this machine: at most 3.4e-5 on the 30-layer default backbone (logits up
# to ~20), 9e-6 on the 3-layer tiny models. The bounds leave ~10x headroom for other CPUs'
# vector widths, and are 100x below what the controls in check_engram show a wrong Engram row
# does (>= 2.6 on the default backbone, >= 0.37 on the tiny model).
DEFAULT_ATOL = 3e-4
TINY_ATOL = 1e-4
# Keys and values rounded to float16 (11 significant bits: 2.4e-4 relative, each) move the
# default model's logprobs by up to 6.3e-3 here (float32's rounding: 3e-5); tokens stay equal.
FLOAT16_KV_ATOL = 1e-2
EXACT_KV = "float32"  # the oracle tests below check float32 arithmetic: a float32 KV cache
TOP_K = 5  # logprobs asked for: the chosen token's plus the top 5

TOKENIZER_FILES = BACKBONE_FILES[2:]

TEXTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon "
    "dioxide to make their own food. It takes place mainly in the leaves, inside",
    "Dear diary, today the engine kept every request moving while its memory tables lived "
    "on disk and the hot rows stayed in a cache near the model. In the morning I read about "
    "the history of the printing press, which spread across Europe within fifty years of",
)


# ---------------------------------------------------------------------------------------------
# the engine, and the comparison


@contextmanager
def recorded_steps(engine):
    """Yields a list that gains one entry per engine step: `chunks`, the scheduled
    `(request, start, num_new_tokens)`, and `positions` / `token_ids`, what the model received
    (copied: the engine reuses its input buffers). The spies call through to the real methods."""
    steps: list[dict] = []
    scheduler = engine.scheduler
    schedule = scheduler.schedule

    def spy():
        batch = schedule()
        chunks = [
            (r, r.num_computed_tokens, n) for r, n in zip(batch.requests, batch.num_new_tokens)
        ]
        steps.append({"chunks": chunks})
        return batch

    def pre_hook(module, args):
        steps[-1]["positions"] = args[0].positions.tolist()
        steps[-1]["token_ids"] = args[0].token_ids.tolist()

    scheduler.schedule = spy
    hook = engine.model.register_forward_pre_hook(pre_hook)
    try:
        yield steps
    finally:
        del scheduler.schedule
        hook.remove()


def engine_greedy(
    llm: LLM, prompts: Sequence[list[int]], max_tokens: int
) -> list[CompletionOutput]:
    """All prompts through `LLM.generate` at once: greedy, EOS ignored, top-k logprobs. Asserts
    that the schedule exercised what these tests are about: preemption, a prompt continued in a
    later chunk, and a step mixing prefill chunks with decodes."""
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=TOP_K)
    with recorded_steps(llm.engine) as steps:
        outputs = [out.outputs[0] for out in llm.generate(list(prompts), sampling)]
    assert all(len(c.token_ids) == max_tokens for c in outputs)
    assert llm.engine.scheduler.num_preemptions > 0, "the KV pool should force preemptions"
    chunks = [[(start, n) for _, start, n in step["chunks"]] for step in steps]
    assert any(start > 0 and n > 1 for step in chunks for start, n in step), "no chunked prefill"
    assert any({n == 1 for _, n in step} == {True, False} for step in chunks), "no mixed step"
    return outputs


def assert_matches_oracle(
    prompt: list[int], completion: CompletionOutput, oracle_logits: torch.Tensor, atol: float
) -> int:
    """`oracle_logits [len(prompt) + G, V]`: the oracle's logits over the prompt and the engine's
    G generated tokens. Checks every generated position; returns how many had a clear top-2
    margin (> 2 * atol), where the greedy check is exact."""
    tokens = completion.token_ids
    want = torch.log_softmax(oracle_logits.double(), -1)[len(prompt) - 1 : -1]  # [G, V]
    assert want.shape[0] == len(tokens) == len(completion.logprobs)
    clear = 0
    for i, (token, got) in enumerate(zip(tokens, completion.logprobs, strict=True)):
        top = want[i].topk(TOP_K)
        where = f"generated position {i} (token {token})"
        # greedy: an argmax of the oracle, up to the tolerance
        assert want[i, token] >= top.values[0] - 2 * atol, (
            f"{where}: the oracle's argmax is {int(top.indices[0])} "
            f"({float(top.values[0]):.5f} vs {float(want[i, token]):.5f})"
        )
        clear += bool(top.values[0] - top.values[1] > 2 * atol)
        assert got[token].rank == 1, where
        # every logprob returned, at its id, equals the oracle's
        for token_id, logprob in got.items():
            assert abs(logprob.logprob - float(want[i, token_id])) <= atol, (
                f"{where}: logprob of {token_id} is {logprob.logprob:.6f}, "
                f"the oracle's {float(want[i, token_id]):.6f}"
            )
        # ... and by rank they are the oracle's top k values (the chosen token is rank 1)
        ranked = sorted(got.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked] == list(range(1, TOP_K + 1)), (where, got)
        np.testing.assert_allclose(
            [lp.logprob for lp in ranked], top.values.numpy(), rtol=0, atol=atol, err_msg=where
        )
    return clear


def check_all(
    prompts: Sequence[list[int]],
    completions: Sequence[CompletionOutput],
    oracle: Callable[[list[int]], torch.Tensor],
    atol: float,
) -> None:
    clear = total = 0
    for prompt, completion in zip(prompts, completions, strict=True):
        clear += assert_matches_oracle(
            prompt, completion, oracle(prompt + completion.token_ids), atol
        )
        total += len(completion.token_ids)
    # The greedy check is exact at the clear positions; they must be nearly all of them (else
    # the prompts are a poor probe, not the engine wrong).
    assert clear >= 0.9 * total, f"only {clear} of {total} positions have a clear argmax"


def hf_oracle(model: torch.nn.Module) -> Callable[[list[int]], torch.Tensor]:
    def logits(sequence: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=torch.tensor([sequence])).logits[0].float()

    return logits


def mixed_prompts(tok: Tokenizer, lengths: Sequence[int]) -> list[list[int]]:
    """Prompts of exactly `lengths` tokens, cut from the texts (repeated where short)."""
    out = []
    for i, n in enumerate(lengths):
        ids = tok.encode(" ".join([TEXTS[i % len(TEXTS)]] * 8))
        assert len(ids) >= n
        out.append(ids[:n])
    return out


# ---------------------------------------------------------------------------------------------
# models


@pytest.fixture(scope="module")
def smollm2_hf():
    """transformers' own reading of the packaged SmolLM2 GGUF (float32): independent of our
    conversion, loader and model (tests/test_default_model.py shows the weights are equal)."""
    from transformers import AutoModelForCausalLM

    path = packaged_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def tiny_hf_config(model_type: str, eos_token_id):
    """A 3-layer random model with GQA over the real SmolLM2 vocabulary (its tokenizer is
    copied in): Llama, or Qwen3 (per-head q/k norms, explicit head_dim)."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=eos_token_id,
    )  # fmt: skip
    if model_type == "llama":
        return LlamaConfig(**common, rope_theta=10000.0)
    return Qwen3Config(**common, head_dim=16, rope_theta=10000.0)


def save_tiny_model(path: Path, model_type: str, default_model_dir: Path, seed: int):
    """A tiny random Hugging Face model directory with the default model's tokenizer; returns
    the transformers model (float32, eval)."""
    import shutil

    path.mkdir(parents=True, exist_ok=True)
    generation = json.loads((default_model_dir / "generation_config.json").read_text())
    hf_model = save_tiny_hf(path, tiny_hf_config(model_type, generation["eos_token_id"]), seed)
    for name in TOKENIZER_FILES:
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, path / name)
    return hf_model


# ---------------------------------------------------------------------------------------------
# 1. Engram off: the engine's greedy tokens and logprobs are transformers'


@pytest.mark.parametrize(
    "kv_cache_dtype,atol", [("float32", DEFAULT_ATOL), ("float16", FLOAT16_KV_ATOL)]
)
def test_default_backbone_matches_transformers(default_model_dir, smollm2_hf, kv_cache_dtype, atol):
    """The default SmolLM2 backbone served by the engine with Engram off, under a token budget
    of 24 (the 70-token prompt is prefilled over several steps, some mixing chunks and decodes)
    and 7 KV blocks of 16 for four sequences that need 11 (preemption and recompute), gives
    transformers' greedy tokens and logprobs at every generated position: with a float32 KV
    cache to float32's rounding, with the default float16 one to float16's."""
    llm = LLM(
        default_model_dir, enable_engram=False, max_num_seqs=4, max_num_batched_tokens=24,
        kv_block_size=16, num_kv_blocks=7, max_model_len=112, kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip
    assert llm.engine.cache.k[0].dtype == getattr(torch, kv_cache_dtype)
    prompts = mixed_prompts(llm.get_tokenizer(), (5, 19, 37, 70))
    completions = engine_greedy(llm, prompts, max_tokens=10)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    check_all(prompts, completions, hf_oracle(smollm2_hf), atol)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_tiny_random_model_matches_transformers(model_type, default_model_dir, tmp_path):
    """A tiny random model (large weights: sharp attention, positions matter), 2-token KV
    blocks (block tables of up to 28 entries), a token budget of 8 and a pool of 32 blocks for
    six sequences that need 93: chunked prefill, mixed steps and repeated preemption. Every
    generated token and logprob must be transformers'."""
    hf_model = save_tiny_model(tmp_path, model_type, default_model_dir, seed=3)
    llm = LLM(
        tmp_path, enable_engram=False, max_num_seqs=4, max_num_batched_tokens=8,
        kv_block_size=2, num_kv_blocks=32, max_model_len=64, kv_cache_dtype=EXACT_KV,
    )  # fmt: skip
    prompts = mixed_prompts(llm.get_tokenizer(), (1, 3, 9, 17, 26, 41))
    completions = engine_greedy(llm, prompts, max_tokens=14)
    check_all(prompts, completions, hf_oracle(hf_model), TINY_ATOL)


def test_each_token_runs_at_its_index_in_its_sequence(default_model_dir, tmp_path):
    """What the model receives in every step, under chunked prefill, mixed steps and
    recompute after preemption: request r's chunk `[start, start + n)` is its tokens
    `all_token_ids[start:start + n]` at RoPE positions `start .. start + n - 1` (transformers'
    `position_ids`: a token's index in its sequence).

    This is checked on the inputs because the outputs cannot show one defect: RoPE attention
    depends only on position differences, and keys are cached already rotated, so shifting
    every position by the same offset leaves every output equal up to float rounding (an
    equivalent mutant for the oracle tests above); any other position error changes outputs
    and fails them."""
    save_tiny_model(tmp_path, "llama", default_model_dir, seed=5)
    llm = LLM(
        tmp_path, enable_engram=False, max_num_seqs=3, max_num_batched_tokens=8,
        kv_block_size=2, num_kv_blocks=32, max_model_len=64,
    )  # fmt: skip
    prompts = mixed_prompts(llm.get_tokenizer(), (2, 11, 23, 30))
    sampling = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with recorded_steps(llm.engine) as steps:
        llm.generate(prompts, sampling)
    assert llm.engine.scheduler.num_preemptions > 0
    checked = 0
    for step in steps:
        positions, token_ids, at = step.get("positions", []), step.get("token_ids", []), 0
        for request, start, n in step["chunks"]:
            assert positions[at : at + n] == list(range(start, start + n)), request.request_id
            assert token_ids[at : at + n] == request.all_token_ids[start : start + n]
            at, checked = at + n, checked + n
        assert at == len(positions) == len(token_ids)
    # every prompt and generated token, plus what preemption made the engine recompute
    assert checked > sum(len(p) + 12 - 1 for p in prompts)


# ---------------------------------------------------------------------------------------------
# 2. Engram on, non-zero: the engine against a token-by-token reference


class SlowEngram:
    """An Engram model's Engram layers from first principles, one token at a time.

    Row ids: a per-token loop over the hash definition, out[l, t, c] =
    (XOR_{k<n} x[t-k] * mult[l, k]) mod prime[l, c] + offset[l, c] for order n, head j,
    c = (n-2)*H + j, with x the compressed ids and pad before the sequence start. The constants
    (compression, multipliers, primes; checked against the DeepSeek reference by the golden
    fixtures) are the hasher's; the batching, lookback and kernels are not used.
    Rows: the table files read with safetensors, FP8 decoded through torch's float8_e4m3fn and
    2**(scale - 127), gathered one row at a time. Modules: the equations of the module docstring
    (model/engram.py), written out per token from the weights file.
    """

    def __init__(self, model_dir: Path, config: EngramConfig, tokenizer: Tokenizer):
        self.config = config
        self.hasher = NgramHasher(config, load_compression(tokenizer.hf_tokenizer))
        self.tables = {layer: self._read_table(model_dir, layer) for layer in config.layer_ids}
        weights = load_file(model_dir / MODULES_FILE)
        self.weights = {
            layer: {
                name.removeprefix(f"model.layers.{layer}.engram."): t.double()
                for name, t in weights.items()
                if name.startswith(f"model.layers.{layer}.engram.")
            }
            for layer in config.layer_ids
        }

    def _read_table(self, model_dir: Path, layer: int) -> torch.Tensor:  # [rows, W] float64
        tensors = load_file(table_path(model_dir, layer))
        if self.config.table_dtype != "fp8_e4m3":
            return tensors["weight"].double()
        values = tensors["weight"].view(torch.float8_e4m3fn).double()  # [rows, W]
        scales = torch.exp2(tensors["scale"].double() - 127)  # [rows, W / block]
        return values * scales.repeat_interleave(self.config.quant_block, 1)

    def row_ids(self, sequence: list[int]) -> list[list[list[int]]]:  # [L][T][(N-1)*H]
        cfg, h = self.config, self.hasher
        back, heads = cfg.max_ngram_size - 1, cfg.n_head_per_ngram
        x = [h.pad_id] * back + [int(h.lookup[t]) for t in sequence]
        out = []
        for layer in range(len(cfg.layer_ids)):
            mult = [int(m) for m in h.multipliers[layer]]
            per_token = []
            for t in range(back, len(x)):
                mix, cols = x[t] * mult[0], []
                for n in range(2, cfg.max_ngram_size + 1):
                    mix ^= x[t - (n - 1)] * mult[n - 1]
                    for j in range(heads):
                        c = (n - 2) * heads + j
                        cols.append(mix % int(h.primes[layer, c]) + int(h.offsets[layer, c]))
                per_token.append(cols)
            out.append(per_token)
        return out

    def apply(self, layer: int, hidden: torch.Tensor, row_ids: list[list[int]]) -> torch.Tensor:
        """hidden `[T, D]` (one sequence, from its start) -> the layer's output `[T, D]`."""
        table, w, cfg = self.tables[layer], self.weights[layer], self.config
        out, conv_inputs = [], []
        for t, cols in enumerate(row_ids):
            e = torch.cat([table[r] for r in cols])  # the token's rows, concatenated
            h = hidden[t].double()
            if cfg.variant == "v41":  # fused wkv: the key, then the shared value
                kv = w["wkv.weight"] @ e
                key, value = kv[: h.shape[0]], kv[h.shape[0] :]
                a = _gate(h, key, w["q_weight"][0], w["k_weight"][0], cfg.rms_norm_eps)
                out.append(h + a * value)
                continue
            key = w["key_projs.0.weight"] @ e + w["key_projs.0.bias"]
            value = w["value_proj.weight"] @ e + w["value_proj.bias"]
            eps = torch.finfo(torch.float32).eps  # the demo's gate norms: machine epsilon
            v = _gate(h, key, w["norm2.0.weight"], w["norm1.0.weight"], eps) * value
            # ShortConv: RMSNorm (eps 1e-5), causal depthwise conv of dilation N over this
            # sequence's earlier conv inputs (zeros before its start), SiLU.
            conv_inputs.append(_rms(v, 1e-5) * w["short_conv.norms.0.weight"])
            kernel = w["short_conv.conv.weight"][:, 0, :]  # [D, k]
            k, dilation = kernel.shape[1], cfg.max_ngram_size
            conv = torch.zeros_like(v)
            for j in range(k):
                src = t - (k - 1 - j) * dilation
                if src >= 0:
                    conv += kernel[:, j] * conv_inputs[src]
            out.append(h + v + torch.nn.functional.silu(conv))
        return torch.stack(out).to(hidden.dtype)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean() + eps)


def _gate(h, key, q_weight, k_weight, eps) -> torch.Tensor:
    """a = sigmoid(sgnsqrt(<RMSNorm(h) q_w, RMSNorm(key) k_w> / sqrt(D))), sgnsqrt clamped at
    |g| >= 1e-6 (as the demo's)."""
    g = torch.dot(_rms(h, eps) * q_weight, _rms(key, eps) * k_weight) / math.sqrt(h.shape[0])
    return torch.sigmoid(torch.sign(g) * torch.sqrt(g.abs().clamp_min(1e-6)))


def engram_oracle(
    hf_model, slow: SlowEngram, rows_of: Callable[[list[int]], list] | None = None
) -> Callable[[list[int]], torch.Tensor]:
    """transformers' model on one whole sequence, each Engram layer's `SlowEngram` applied to
    the hidden state entering that decoder layer (before its attention, as model/llama.py
    places it). `rows_of`: row ids of a sequence (default: the slow hash); None layers: off."""
    rows_of = rows_of or slow.row_ids

    def logits(sequence: list[int]) -> torch.Tensor:
        rows = rows_of(sequence)
        hooks = []
        for index, layer in enumerate(slow.config.layer_ids):

            def pre_hook(module, args, kwargs, layer=layer, layer_rows=rows[index]):
                key = "hidden_states" if "hidden_states" in kwargs else None
                hidden = kwargs[key] if key else args[0]
                new = slow.apply(layer, hidden[0], layer_rows)[None]
                if key:
                    return args, {**kwargs, key: new}
                return (new, *args[1:]), kwargs

            decoder_layer = hf_model.model.layers[layer]
            hooks.append(decoder_layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            return hf_oracle(hf_model)(sequence)
        finally:
            for hook in hooks:
                hook.remove()

    return logits


def make_engram_model(
    path: Path, backbone: Path, config: EngramConfig, seed: int, value_scale: float = 1.0
) -> None:
    """`engram-serve tables init` without --identity: random tables and module weights, the
    value path non-zero; then the value projection scaled by `value_scale` (and the manifest
    updated), as trained weights would be imported. The backbone's files are linked in when
    not already there."""
    path.mkdir(parents=True, exist_ok=True)
    for name in BACKBONE_FILES:
        if not (path / name).exists() and (backbone / name).exists():
            os.symlink(backbone / name, path / name)
    lookup = load_compression(Tokenizer(path).hf_tokenizer)
    init_tables(path, config, num_compressed(lookup), seed=seed, identity=False, progress=False)
    if value_scale != 1.0:
        modules = path / MODULES_FILE
        weights = load_file(modules)
        hidden = json.loads((path / "config.json").read_text())["hidden_size"]
        for name, weight in weights.items():
            if name.endswith(".wkv.weight"):  # v41: keys first, the shared value last
                weight[config.hc_mult * hidden :] *= value_scale
            elif name.endswith(".value_proj.weight") or name.endswith(".value_proj.bias"):
                weight *= value_scale
        save_file(weights, modules)
        manifest = json.loads((path / MANIFEST).read_text())
        manifest["files"][MODULES_FILE].update(file_digests(modules))
        (path / MANIFEST).write_text(json.dumps(manifest))
    verify_tables(path, full=True)
    assert read_engram_config(path) == config


def check_engram(llm: LLM, model_dir: Path, hf_model, prompts, max_tokens: int, atol: float):
    """The engine's greedy tokens and logprobs against `engram_oracle`, plus two controls that
    show the comparison sees the Engram rows: the backbone alone, and every token given the
    rows of the token before it, are each far outside the tolerance."""
    tokenizer = llm.get_tokenizer()
    completions = engine_greedy(llm, prompts, max_tokens)
    slow = SlowEngram(model_dir, read_engram_config(model_dir), tokenizer)
    oracle = engram_oracle(hf_model, slow)
    check_all(prompts, completions, oracle, atol)

    def shifted_rows(sequence):  # token t gets the rows of token t-1 (a lookback off by one)
        return [[per_token[0], *per_token[:-1]] for per_token in slow.row_ids(sequence)]

    sequence = prompts[-1] + completions[-1].token_ids
    want = torch.log_softmax(oracle(sequence), -1)
    for control in (hf_oracle(hf_model), engram_oracle(hf_model, slow, shifted_rows)):
        assert (torch.log_softmax(control(sequence), -1) - want).abs().max() > 100 * atol


def test_default_backbone_with_nonzero_v41_engram(default_model_dir, smollm2_hf, tmp_path):
    """The served configuration (v41 Engram at layers 1 and 14, FP8 tables with UE8M0 scales)
    with random, non-zero tables and modules (small tables, so rows repeat across tokens; the
    value path scaled 30x so that the Engram moves logprobs by units, not hundredths), run with
    chunked prefill and preemption: the engine's tokens and logprobs are the slow reference's.
    Chunks split n-grams, so each chunk's first tokens hash through the lookback."""
    config = dataclasses.replace(DEFAULT_ENGRAM, engram_vocab_size=(2003, 2011))
    make_engram_model(tmp_path, default_model_dir, config, seed=1, value_scale=30.0)
    llm = LLM(
        tmp_path, max_num_seqs=4, max_num_batched_tokens=24, kv_block_size=16, num_kv_blocks=7,
        max_model_len=112, kv_cache_dtype=EXACT_KV,
    )  # fmt: skip
    prompts = mixed_prompts(llm.get_tokenizer(), (5, 19, 37, 70))
    check_engram(llm, tmp_path, smollm2_hf, prompts, max_tokens=10, atol=DEFAULT_ATOL)


def test_tiny_model_with_nonzero_demo_engram(default_model_dir, tmp_path):
    """The demo variant, whose short conv carries per-sequence state between steps (the last
    (k-1)*N conv inputs): with a token budget of 8 and preemption, that state must carry
    across chunks and decode steps and restart from zero on recompute. The tiny Llama's
    tokens and logprobs must be the slow reference's."""
    hf_model = save_tiny_model(tmp_path, "llama", default_model_dir, seed=4)
    config = EngramConfig(
        variant="demo", layer_ids=(1, 2), max_ngram_size=3, n_head_per_ngram=2, head_dim=16,
        engram_vocab_size=(509, 521), kernel_size=4, table_dtype="float32", pad_id=2,
    )  # fmt: skip
    make_engram_model(tmp_path, default_model_dir, config, seed=2)
    llm = LLM(
        tmp_path, max_num_seqs=4, max_num_batched_tokens=8, kv_block_size=2, num_kv_blocks=32,
        max_model_len=64, kv_cache_dtype=EXACT_KV,
    )  # fmt: skip
    prompts = mixed_prompts(llm.get_tokenizer(), (1, 3, 9, 17, 26, 41))
    check_engram(llm, tmp_path, hf_model, prompts, max_tokens=14, atol=TINY_ATOL)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_configuration_keeps_transformers_greedy_text(default_model_dir, smollm2_hf, dtype):
    """The default configuration (the GGUF's blocks read in place, a float16 KV cache), with
    prefill-sized products in float32 or bfloat16: greedy continuations of 6 prompts of 24
    tokens, prefilled in one step with 10 more (384 rows: the products above 256 rows run in
    `dtype`), equal transformers' float32 ones on the dequantized model for at least 5 of the 6.
    This is the bar a default must pass (docs/cpu-serving.md)."""
    llm = LLM(default_model_dir, enable_engram=False, dtype=dtype, max_model_len=128)
    assert isinstance(llm.engine.model.lm_head.weight, QuantizedWeight)
    assert llm.engine.cache.k[0].dtype == torch.float16
    ids = llm.get_tokenizer().encode(" ".join(TEXTS) * 3)
    prompts = [ids[17 * i : 17 * i + 24] for i in range(16)]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)][:6]
    with torch.no_grad():
        theirs = [
            smollm2_hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, 24:]
            for p in prompts[:6]
        ]
    equal = sum(a == b.tolist() for a, b in zip(ours, theirs, strict=True))
    assert equal >= 5, f"{equal} of 6 continuations equal transformers'"
