"""A Llama-family decoder: Llama 2/3, SmolLM2, Qwen2 (q/k/v bias), Qwen3 (per-head q/k norm).

    h = embed(ids)
    per layer i:  h = Engram_i(h)                         (Engram layers only, before attention)
                  h = h + Attn(RMSNorm(h))                (RoPE, GQA, paged KV cache)
                  h = h + W_down(SiLU(W_gate x) * W_up x),  x = RMSNorm(h)
    logits = lm_head(RMSNorm(h))                          (sampled positions only)

Tokens of all sequences in a step are packed flat, T in all (see model/batch.py); every tensor
below is per token, `[T, ...]`. Module and parameter names are Hugging Face's, so a checkpoint
loads by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engram_serve.config import ModelConfig
from engram_serve.engram.config import EngramConfig
from engram_serve.kernels import cpu_decode
from engram_serve.model.attention import paged_attention
from engram_serve.model.batch import CacheTensors, ForwardBatch
from engram_serve.model.engram import build_engram
from engram_serve.model.linear import (
    Linear,
    QuantizedWeight,
    Weight,
    current_prefill_dtype,
    linear,
    prefill_in,
    set_fused,
    set_weight,
)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def fuse_linears(linears: list[nn.Linear]) -> tuple[Weight, torch.Tensor | None]:
    """One weight (and bias) for several projections of the same input, so a step runs one
    matmul instead of several. The projections' parameters become views into the fused tensors:
    names stay Hugging Face's, no memory is duplicated, and in-place updates stay in sync.
    Quantized weights are stacked (kernels/cpu_quant.py) and the projections' own dropped."""
    has_bias = linears[0].bias is not None
    bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
    parts = [lin.weight for lin in linears]
    quantized = [isinstance(w, QuantizedWeight) for w in parts]
    if all(quantized):
        weight = QuantizedWeight.concat(parts)
        for lin in linears:
            set_weight(lin, "weight", None)
    else:  # dense; a GGUF may store some of the parts as floats: the others are dequantized
        dtype = next(w.dtype for w in parts if isinstance(w, torch.Tensor))
        dense = [w.dequantize().to(dtype) if isinstance(w, QuantizedWeight) else w for w in parts]
        weight = torch.cat([w.detach() for w in dense])  # [sum(out), in]
    start = 0
    for lin in linears:
        rows = lin.out_features
        if isinstance(weight, torch.Tensor):
            set_weight(lin, "weight", weight.narrow(0, start, rows))
        if has_bias:
            set_weight(lin, "bias", bias.narrow(0, start, rows))
        start += rows
    return weight, bias


class Embedding(nn.Embedding):
    """`nn.Embedding` whose table may be kept quantized (the GGUF's token_embd)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, QuantizedWeight):
            return self.weight.take_rows(ids)
        return super().forward(ids)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics taken in float32 whatever the model dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        # One fused op: x * rsqrt(mean(x^2) + eps), in float32 (the same bits as spelling it out).
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotation frequency of each pair of dimensions, `[hd/2]` float32, with rope_scaling."""
    hd = config.attn_head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} unsupported; use {SUPPORTED_ROPE_TYPES}")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 long context: slow rotations (wavelength beyond the original context /
    low_freq_factor) are slowed down by `factor`, fast ones (below context / high_freq_factor)
    are kept, and the band between is blended linearly in context/wavelength."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    blend = ((context / wavelen - low) / (high - low)).clamp(0, 1)  # 0: slowed, 1: kept
    return (1 - blend) * inv_freq / factor + blend * inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Not in checkpoints, so computed for real even when the model is built on `meta`.
        with torch.device("cpu"):
            inv_freq = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [hd/2] float32

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin [T, 1, hd/2] in dtype
        inv_freq = self.inv_freq.to(positions.device, torch.float32)  # no-op once in place
        angles = positions.float()[:, None, None] * inv_freq  # [T, 1, hd/2]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_j, x_{j + hd/2}) by each token's angles (Hugging Face's half layout);
    x `[T, heads, hd]`, cos and sin `[T, 1, hd/2]`."""
    x1, x2 = x.chunk(2, dim=-1)  # [T, heads, hd/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd = config.attn_head_dim
        self.scale = hd**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * hd, bias=bias)
        self.o_proj = Linear(self.num_heads * hd, config.hidden_size, bias=False)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch
    ) -> torch.Tensor:  # x [T, D] -> [T, D]
        num_tokens, hd = x.shape[0], self.head_dim
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = linear(x, self.qkv_weight, self.qkv_bias).view(num_tokens, heads + 2 * kv_heads, hd)
        qk, v = qkv.split([heads + kv_heads, kv_heads], 1)  # [T, H + KVH, hd], [T, KVH, hd]
        if hasattr(self, "q_norm"):
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), 1)
        q, k = apply_rope(qk, *rope).split([heads, kv_heads], 1)  # one rotation for q and k
        cache = batch.cache
        out = paged_attention(
            q, k, v, cache.k[self.layer_id], cache.v[self.layer_id], batch.attn, self.scale
        )  # [T, H, hd]
        return self.o_proj(out.view(num_tokens, -1))

    def fuse_projections(self) -> None:
        weight, bias = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        set_fused(self, "qkv_weight", weight)
        set_fused(self, "qkv_bias", bias)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, ff = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)  # [T, FF] each
        return self.down_proj(F.silu(gate) * up)

    def fuse_projections(self) -> None:
        weight, _ = fuse_linears([self.gate_proj, self.up_proj])
        set_fused(self, "gate_up_weight", weight)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_id: int, engram_config: EngramConfig | None
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_id)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        self.engram = None
        self._fused: tuple | None = None  # (the K cache it is bound to, cpu_decode.FusedLayer)
        if engram_config is not None and layer_id in engram_config.layer_ids:
            self.engram = build_engram(engram_config, config.hidden_size)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        decode: cpu_decode.DecodeStep | None = None,
    ) -> torch.Tensor:  # [T, D] -> [T, D]
        """`decode`: a decode-only step's inputs for the fused layer (LlamaModel.forward)."""
        if self.engram is not None:
            h = self.apply_engram(h, batch)
        fused = None if decode is None else self.fused_layer(batch.cache)
        if fused is not None:
            return cpu_decode.decode_layer(h, fused, decode, current_prefill_dtype())
        h = h + self.self_attn(self.input_layernorm(h), rope, batch)
        return h + self.mlp(self.post_attention_layernorm(h))

    def fuse_projections(self) -> None:
        self.self_attn.fuse_projections()
        self.mlp.fuse_projections()
        self._fused = None  # bound to the replaced weights

    def fused_layer(self, cache: CacheTensors) -> cpu_decode.FusedLayer | None:
        """This layer as the fused decode kernel takes it (None: the kernel does not run it),
        bound once for the cache's tensors and again after fuse_projections."""
        k, v = cache.k[self.layer_id], cache.v[self.layer_id]
        if self._fused is None or self._fused[0] is not k:
            attn, mlp = self.self_attn, self.mlp
            qk_norm = hasattr(attn, "q_norm")
            weights = cpu_decode.LayerWeights(
                self.input_layernorm.weight,
                attn.qkv_weight,
                attn.qkv_bias,
                attn.q_norm.weight if qk_norm else None,
                attn.k_norm.weight if qk_norm else None,
                attn.o_proj.weight,
                self.post_attention_layernorm.weight,
                mlp.gate_up_weight,
                mlp.down_proj.weight,
            )
            eps = self.input_layernorm.eps
            self._fused = (k, cpu_decode.bind(weights, eps, k, v, attn.scale))
        return self._fused[1]

    def apply_engram(self, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if batch.engram_rows is None:
            raise ValueError(f"layer {self.layer_id} is an Engram layer but the batch has no rows")
        rows = batch.engram_rows.wait(self.layer_id)  # [T, (N-1)*H, W]
        conv_state = batch.cache.engram_conv.get(self.layer_id)  # [slots, hist, D] or None
        if conv_state is not None:
            # A sequence starting at position 0 has no history; its slot may hold a
            # previous occupant's.
            conv_state.index_fill_(0, batch.fresh_state_slots, 0.0)
        hidden = self.engram(
            h[:, None, :],  # [T, hc=1, D]: a dense backbone has one residual branch
            rows,
            batch.attn.query_start_loc,
            conv_state,
            batch.state_slots,
        )  # [T, 1, D], residual included; conv_state updated in place
        return hidden[:, 0, :]


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, engram_config: EngramConfig | None) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, engram_config) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:  # -> [T, D], before the final norm
        # A quantized table gives float32 rows: the model's dtype is its norms'.
        h = self.embed_tokens(batch.token_ids).to(self.norm.weight.dtype)  # [T, D]
        rope = self.rotary_emb(batch.positions, h.dtype)  # cos, sin, shared by all layers
        decode = None
        meta, cache = batch.attn, batch.cache
        if meta.is_decode_only and cpu_decode.supports(h):
            decode = cpu_decode.decode_step(
                *rope, meta.slot_mapping, meta.block_tables, meta.seq_lens, cache.k[0]
            )
        for layer in self.layers:
            h = layer(h, rope, batch, decode)
        return h


class LlamaForCausalLM(nn.Module):
    """`model(batch) -> logits [S', vocab]` float32, for `batch.logits_indices` only."""

    def __init__(self, config: ModelConfig, engram_config: EngramConfig | None = None) -> None:
        super().__init__()
        _check_config(config, engram_config)
        self.config, self.engram_config = config, engram_config
        self.model = LlamaModel(config, engram_config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # The dtype of quantized weights' products of many rows (prefill, batched decode:
        # model/linear.prefill_in); the loader sets it.
        self.prefill_dtype = torch.float32
        self.tie_weights()
        if not self.lm_head.weight.is_meta:  # a meta model is fused by its loader, once real
            self.fuse_projections()

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up into single matmuls; call again after replacing parameters
        (the loader does)."""
        for layer in self.model.layers:
            layer.fuse_projections()

    def tie_weights(self) -> None:
        """Share the embedding with the output projection when the config ties them; call again
        after replacing `embed_tokens.weight` (the loader does)."""
        if self.config.tie_word_embeddings:
            set_weight(self.lm_head, "weight", self.model.embed_tokens.weight)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        with prefill_in(self.prefill_dtype):
            h = self.model(batch)[batch.logits_indices]  # [S', D]: skip lm_head on other tokens
        # The logits' products stay float32: rounded to bfloat16 (a step of 0.06 at 10),
        # near-equal logits would swap and change greedy text.
        return self.lm_head(self.model.norm(h)).float()  # [S', vocab]


def _check_config(config: ModelConfig, engram_config: EngramConfig | None) -> None:
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads {config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {config.num_key_value_heads}"
        )
    if engram_config is None:
        return
    if engram_config.hc_mult != 1:
        raise ValueError(
            f"a Llama backbone has one residual branch; Engram hc_mult is {engram_config.hc_mult}"
        )
    bad = [i for i in engram_config.layer_ids if not 0 <= i < config.num_hidden_layers]
    if bad:
        raise ValueError(
            f"Engram layer_ids {bad} outside the model's {config.num_hidden_layers} layers"
        )
