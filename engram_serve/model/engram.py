"""The Engram module (arXiv 2601.07372): gated fusion of looked-up n-gram rows into the residual.

The module does no hashing and no table access. The engine hashes token ids ahead of the forward
pass and the offload tier gathers and dequantizes the rows; the module receives them as
`rows [T, (N-1)*H, W]` float, T tokens of S sequences packed flat (see model/batch.py).

Per branch b of the hc_mult residual branches, with e the token's concatenated rows:

    k_b = W_K^b e (+ b_K^b)                                        key
    a_b = sigmoid(sgnsqrt(<RMSNorm(h_b), RMSNorm(k_b)> / sqrt(D)))  context gate, one scalar
    v_b = a_b * (W_V e (+ b_V))                                     gated value, W_V shared
    demo: Y_b = v_b + SiLU(CausalConv(RMSNorm(v)))_b               short conv, dilation N
    v41:  Y_b = v_b
    h_b <- h_b + Y_b

Both variants share `forward(hidden, rows, query_start_loc, conv_state, state_slots)` and return
the new hidden state (the residual is included), so the model calls them alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engram_serve.engram.config import EngramConfig
from engram_serve.kernels import cpu_gate
from engram_serve.kernels.reference import dequantize_blocks, engram_gate
from engram_serve.model.linear import Linear

CONV_NORM_EPS = 1e-5  # the reference demo's ShortConv norms


def _check_inputs(module: nn.Module, hidden: torch.Tensor, rows: torch.Tensor) -> None:
    config: EngramConfig = module.config
    want_h = (module.hc_mult, module.hidden_size)
    if hidden.dim() != 3 or tuple(hidden.shape[1:]) != want_h:
        raise ValueError(f"hidden must be [T, {want_h[0]}, {want_h[1]}], got {tuple(hidden.shape)}")
    want_r = (hidden.shape[0], config.num_heads, config.head_dim)
    if tuple(rows.shape) != want_r:
        raise ValueError(f"rows must be [T, (N-1)*H, W] = {want_r}, got {tuple(rows.shape)}")


class ShortConv(nn.Module):
    """Per-branch RMSNorm, then a causal depthwise conv over each sequence's history, then SiLU.

    The conv reads `history_len = (kernel_size - 1) * dilation` earlier inputs of the same
    sequence. A serving engine runs a sequence in pieces (prefill chunks, then one token per step)
    packed with other sequences, so the inputs of earlier pieces are kept in a per-sequence state
    `[num_slots, history_len, hc*D]`: the last `history_len` conv inputs (normalized values), zeros
    before the sequence start.
    """

    def __init__(self, hidden_size: int, hc_mult: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        channels = hidden_size * hc_mult
        self.hc_mult = hc_mult
        # Holds the weight `[hc*D, 1, k]`; no padding because history supplies the left context.
        self.conv = nn.Conv1d(
            channels, channels, kernel_size, groups=channels, dilation=dilation, bias=False
        )
        self.norms = nn.ModuleList(
            nn.RMSNorm(hidden_size, eps=CONV_NORM_EPS) for _ in range(hc_mult)
        )

    @property
    def history_len(self) -> int:
        return (self.conv.kernel_size[0] - 1) * self.conv.dilation[0]

    def forward(
        self,
        v: torch.Tensor,  # [T, hc, D]
        query_start_loc: torch.Tensor,  # [S+1]
        conv_state: torch.Tensor | None,  # [num_slots, history_len, hc*D]; None: zero history
        state_slots: torch.Tensor | None,  # [S]; None: sequence s uses state row s
    ) -> torch.Tensor:
        if v.shape[0] == 0:  # nothing new: the history stays as it is
            return torch.zeros_like(v)
        x = torch.stack([norm(v[:, b]) for b, norm in enumerate(self.norms)], 1).flatten(1)
        num_seqs, hist = query_start_loc.shape[0] - 1, self.history_len
        history = self._read_history(x, num_seqs, conv_state, state_slots)  # [S, hist, hc*D]
        token_pos, history_pos, tail_pos = _strip_layout(query_start_loc, hist, x.shape[0])
        # One strip holding each sequence's history right before its new tokens: a single
        # unpadded conv over it then never reads across a sequence boundary.
        strip = x.new_empty(x.shape[0] + num_seqs * hist, x.shape[1])  # [T + S*hist, hc*D]
        strip[token_pos] = x
        strip[history_pos.flatten()] = history.flatten(0, 1)
        y = self.conv(strip.T.unsqueeze(0))[0].T  # [T + S*hist - hist, hc*D]
        if conv_state is not None:
            self._write_history(conv_state, state_slots, strip[tail_pos])
        return F.silu(y[token_pos - hist]).view_as(v)  # [T, hc, D]

    def _read_history(
        self,
        x: torch.Tensor,
        num_seqs: int,
        conv_state: torch.Tensor | None,
        state_slots: torch.Tensor | None,
    ) -> torch.Tensor:
        want = (self.history_len, x.shape[1])
        if conv_state is None:
            return x.new_zeros(num_seqs, *want)
        if conv_state.dim() != 3 or tuple(conv_state.shape[1:]) != want:
            raise ValueError(
                f"conv_state must be [num_slots, {want[0]}, {want[1]}], "
                f"got {tuple(conv_state.shape)}"
            )
        if state_slots is None:
            if conv_state.shape[0] != num_seqs:
                raise ValueError(
                    f"conv_state has {conv_state.shape[0]} rows for {num_seqs} sequences; "
                    "pass state_slots to pick rows of a larger state"
                )
            return conv_state.to(x.dtype)
        if state_slots.shape != (num_seqs,):
            raise ValueError(f"state_slots must be [{num_seqs}], got {tuple(state_slots.shape)}")
        return conv_state[state_slots].to(x.dtype)

    @staticmethod
    def _write_history(
        conv_state: torch.Tensor, state_slots: torch.Tensor | None, tail: torch.Tensor
    ) -> None:
        if state_slots is None:
            conv_state.copy_(tail)
        else:
            conv_state[state_slots] = tail.to(conv_state.dtype)


def _strip_layout(
    query_start_loc: torch.Tensor, hist: int, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where history and tokens go in the strip: sequence s occupies
    `[qsl[s] + s*hist, qsl[s+1] + (s+1)*hist)`, its `hist` history rows first.

    Returns token_pos `[T]`, history_pos `[S, hist]`, tail_pos `[S, hist]` (the last `hist`
    rows of each segment: the sequence's history for its next piece).
    """
    qsl = query_start_loc.to(torch.long)
    num_seqs = qsl.shape[0] - 1
    device = qsl.device
    seq_ids = torch.repeat_interleave(
        torch.arange(num_seqs, device=device), qsl.diff(), output_size=num_tokens
    )  # [T]
    token_pos = torch.arange(num_tokens, device=device) + (seq_ids + 1) * hist
    shift = torch.arange(num_seqs, device=device) * hist  # [S]
    within = torch.arange(hist, device=device)  # [hist]
    history_pos = (qsl[:-1] + shift)[:, None] + within
    tail_pos = (qsl[1:] + shift)[:, None] + within
    return token_pos, history_pos, tail_pos


def _gated_value(
    hidden: torch.Tensor,  # [T, hc, D]
    key: torch.Tensor,  # [T, hc, D]
    value: torch.Tensor,  # [T, D]
    q_weight: torch.Tensor | None,  # [hc, D]
    k_weight: torch.Tensor | None,
    eps: float,
    add_residual: bool,
) -> torch.Tensor:  # [T, hc, D]
    """a * value (+ hidden), a = engram_gate(hidden, key, ...): one compiled pass for float32 on
    CPU (kernels/cpu_gate.py), torch calls elsewhere."""
    if cpu_gate.supports(hidden):
        return cpu_gate.fused_engram_gate_cpu(
            hidden, key, value, q_weight, k_weight, eps, add_residual
        )
    y = engram_gate(hidden, key, q_weight, k_weight, eps)[..., None] * value[:, None, :]
    return hidden + y if add_residual else y


def _whole_batch(num_tokens: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([0, num_tokens], device=device)


class EngramDemo(nn.Module):
    """The reference demo's Engram: per-branch key projections with bias, a shared value
    projection, and the short conv. State-dict names are the demo's, minus the table
    (`multi_head_embedding.*` belongs to the offload tier)."""

    def __init__(self, config: EngramConfig, hidden_size: int) -> None:
        super().__init__()
        self.config, self.hidden_size, self.hc_mult = config, hidden_size, config.hc_mult
        self.key_projs = nn.ModuleList(
            Linear(config.engram_dim, hidden_size) for _ in range(config.hc_mult)
        )
        self.value_proj = Linear(config.engram_dim, hidden_size)
        # Gate norms: eps None is the dtype's machine epsilon, as in the demo.
        self.norm1 = nn.ModuleList(nn.RMSNorm(hidden_size) for _ in range(config.hc_mult))  # key
        self.norm2 = nn.ModuleList(nn.RMSNorm(hidden_size) for _ in range(config.hc_mult))  # h
        self.short_conv = ShortConv(
            hidden_size, config.hc_mult, config.kernel_size, dilation=config.max_ngram_size
        )

    @property
    def history_len(self) -> int:
        """Conv inputs each sequence must carry between steps (rows of its conv_state)."""
        return self.short_conv.history_len

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hc, D]
        rows: torch.Tensor,  # [T, (N-1)*H, W] float
        query_start_loc: torch.Tensor | None = None,  # [S+1]; None: one sequence
        conv_state: torch.Tensor | None = None,  # [num_slots, history_len, hc*D]
        state_slots: torch.Tensor | None = None,  # [S]
    ) -> torch.Tensor:
        """Returns the new hidden state `[T, hc, D]` (h + Y).

        conv_state holds, per sequence, its last `history_len` conv inputs; it is read and then
        updated IN PLACE (rows `state_slots`, or rows 0..S-1 when state_slots is None). The caller
        must zero a sequence's row before its first piece (position 0). None: every sequence
        starts at position 0 and nothing is kept.
        """
        _check_inputs(self, hidden, rows)
        if query_start_loc is None:
            query_start_loc = _whole_batch(hidden.shape[0], hidden.device)
        e = rows.flatten(1).to(hidden.dtype)  # [T, (N-1)*H*W]
        key = torch.stack([proj(e) for proj in self.key_projs], 1)  # [T, hc, D]
        v = _gated_value(
            hidden,
            key,
            self.value_proj(e),  # [T, D]
            q_weight=torch.stack([n.weight for n in self.norm2]),  # [hc, D]
            k_weight=torch.stack([n.weight for n in self.norm1]),  # [hc, D]
            eps=torch.finfo(hidden.dtype).eps,
            add_residual=False,
        )  # [T, hc, D]
        y = v + self.short_conv(v, query_start_loc, conv_state, state_slots)
        return hidden + y


class EngramV41(nn.Module):
    """DeepSeek-V4.1's Engram: one fused `wkv` projection (a key per branch, then the shared
    value), RMSNorm weights `q_weight`/`k_weight` per branch, no bias, no conv."""

    def __init__(self, config: EngramConfig, hidden_size: int) -> None:
        super().__init__()
        self.config, self.hidden_size, self.hc_mult = config, hidden_size, config.hc_mult
        self.wkv = Linear(config.engram_dim, hidden_size * (config.hc_mult + 1), bias=False)
        self.q_weight = nn.Parameter(torch.ones(config.hc_mult, hidden_size))
        self.k_weight = nn.Parameter(torch.ones(config.hc_mult, hidden_size))

    @property
    def history_len(self) -> int:
        return 0

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hc, D]
        rows: torch.Tensor,  # [T, (N-1)*H, W] float
        query_start_loc: torch.Tensor | None = None,  # unused: no state across tokens
        conv_state: torch.Tensor | None = None,  # unused
        state_slots: torch.Tensor | None = None,  # unused
    ) -> torch.Tensor:
        """Returns the new hidden state `[T, hc, D]`: h_b + a_b * value."""
        _check_inputs(self, hidden, rows)
        hc, d = self.hc_mult, self.hidden_size
        kv = self.wkv(rows.flatten(1).to(hidden.dtype))  # [T, (hc+1)*D]
        key = kv[:, : hc * d].unflatten(1, (hc, d))  # [T, hc, D]
        value = kv[:, hc * d :]  # [T, D]
        eps = self.config.rms_norm_eps
        return _gated_value(hidden, key, value, self.q_weight, self.k_weight, eps, True)


def build_engram(config: EngramConfig, hidden_size: int) -> EngramDemo | EngramV41:
    """The Engram module of `config.variant`."""
    return {"demo": EngramDemo, "v41": EngramV41}[config.variant](config, hidden_size)


def load_v41_checkpoint(
    module: EngramV41, tensors: Mapping[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    """Load one V4.1 Engram layer's checkpoint tensors into `module`, dequantizing `wkv`.

    `tensors` maps names to tensors; this reads `{prefix}wkv.weight` (FP8-E4M3 bytes or
    float8_e4m3fn), `{prefix}wkv.scale` (UE8M0, one per 32x32 block), `{prefix}q_weight` and
    `{prefix}k_weight`, with prefix e.g. "layers.1.engram.". The table is the offload tier's,
    so it is returned untouched, not loaded: {"embed.weight": ..., "embed.scale": ...}.
    """
    missing = [
        f"{prefix}{n}"
        for n in ("wkv.weight", "wkv.scale", "q_weight", "k_weight")
        if f"{prefix}{n}" not in tensors
    ]
    if missing:
        raise KeyError(f"V4.1 Engram checkpoint lacks {missing}")
    wkv = dequantize_blocks(
        torch.as_tensor(tensors[f"{prefix}wkv.weight"]),
        torch.as_tensor(tensors[f"{prefix}wkv.scale"]),
        module.config.quant_block,
    )
    with torch.no_grad():
        for name, value in (
            ("wkv.weight", wkv),
            ("q_weight", tensors[f"{prefix}q_weight"]),
            ("k_weight", tensors[f"{prefix}k_weight"]),
        ):
            param = module.get_parameter(name)
            value = torch.as_tensor(value)
            if value.shape != param.shape:
                raise ValueError(
                    f"{prefix}{name}: checkpoint shape {tuple(value.shape)}, "
                    f"module expects {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
    return {
        n: tensors[f"{prefix}{n}"]
        for n in ("embed.weight", "embed.scale")
        if f"{prefix}{n}" in tensors
    }


def zero_value_path(module: EngramDemo | EngramV41) -> None:
    """Zero what carries the table into the residual, so the module returns its input exactly
    (an identity retrofit: a new model starts as its base until trained tables are loaded).

    demo: value_proj weight and bias (v = 0, so the conv input and output are 0 too, given a
    zero conv history); v41: the value rows of wkv.
    """
    with torch.no_grad():
        if isinstance(module, EngramDemo):
            module.value_proj.weight.zero_()
            module.value_proj.bias.zero_()
        elif isinstance(module, EngramV41):
            module.wkv.weight[module.hc_mult * module.hidden_size :].zero_()
        else:
            raise TypeError(f"not an Engram module: {type(module).__name__}")
